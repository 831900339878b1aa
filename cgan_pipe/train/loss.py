"""The GAN objective, phase by phase: D main (with condition mode's mismatched pairs), the gradient penalties
(R1 on reals, R2 on fakes), G main (with ambient mode's null-space penalty); the losses on raw logits."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import diff_augment, parse_policy
from ..compression import mismatched_qualities, simulate_jpeg
from ..config import PipelineConfig
from ..errors import ConfigError
from ..data.batch import Batch
from .schedule import Scheduled, values_at


class GANLoss:
    """The loss of each phase of a training step, for the networks and compression mode of one run (the
    shape of StyleGAN2-ADA's training/loss.py). The loop backpropagates and steps what these return.

    `G_train`/`D_train` are what the phases run (a torch.compile wrapper, or the modules themselves); `D`
    is the module itself, for R1's double backward. Every image D sees, real or fake, goes through the
    same DiffAugment policy. `now` holds the scheduled values the phases use (the penalty weights and
    augment_p), which the loop sets at each step.
    """

    def __init__(self, cfg: PipelineConfig, G: nn.Module, D: nn.Module, G_train: nn.Module, D_train: nn.Module,
                 num_classes: int, qualities: list[int] | None, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager], memory_format: torch.memory_format):
        self.G, self.D, self.G_train, self.D_train = G, D, G_train, D_train
        self.kind, self.z_dim, self.device = cfg.train.loss, cfg.model.z_dim, device
        self.num_classes = max(num_classes, 1)  # unlabelled data: every image is class 0
        self.autocast, self.memory_format = autocast, memory_format
        self.every = cfg.train.r1_every
        self.mode_seeking = cfg.train.mode_seeking
        self.class_loss = cfg.train.class_loss
        if self.class_loss and not num_classes:
            raise ConfigError("train.class_loss: needs class labels and these shards have none; set it to 0")
        self.now: Scheduled = values_at(cfg.train, 0.0)  # the penalty weights and augment_p; the loop moves it
        self.compression = cfg.compression
        self.mode = cfg.compression.mode
        self.policy = parse_policy(cfg.train.diffaugment)
        self.mismatch_weight = cfg.compression.condition_mismatch_weight if self.mode == "condition" else 0.0
        # the trained qualities in [0, 1], as batch.quality, from which condition mode draws wrong ones
        self.levels = torch.tensor(qualities, device=device) / 100 if self.mismatch_weight else None

    def discriminator_main(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's loss on a real batch and fakes of the same classes (and qualities), fake i paired with real i
        (the pairs of the relativistic loss), and in condition mode on every real again with a wrong quality,
        all in one forward pass of a fixed size (no host read, no recompilation). Returns (loss, the reals and
        the fakes as D saw them before augmentation, for the penalties and the G phase)."""
        reals = batch.images.contiguous(memory_format=self.memory_format)
        n, q, labels = reals.shape[0], batch.quality, batch.labels
        if self.mode == "ambient" and self.compression.ambient_recode_reals:
            reals = self._measured(reals, q).to(reals.dtype).contiguous(memory_format=self.memory_format)
        with torch.no_grad(), self.autocast():
            fake = self.G_train(torch.randn(n, self.z_dim, device=self.device), labels, self._g_quality(q))
            fake = self._measured(fake, q)
        images, d_labels, d_qualities = [reals, fake.to(reals.dtype)], [labels] * 2, [q, q]
        if self.mismatch_weight:  # reals paired with a wrong quality: D must call them fake
            wrong, has_one = mismatched_qualities(q, self.levels)
            images, d_labels, d_qualities = images + [reals], d_labels + [labels], d_qualities + [wrong]
        with self.autocast():
            logits, classes = self._judged(self._augment(torch.cat(images)), torch.cat(d_labels),
                                           self._d_quality(torch.cat(d_qualities)) if q is not None else None)
            loss = discriminator_loss(self.kind, logits[:n], logits[n:2 * n])
            if classes is not None:  # D names the reals' classes
                loss = loss + self.class_loss * F.cross_entropy(classes[:n].float(), labels)
            if self.mismatch_weight:  # the mismatched reals, those with a level far enough from their own
                loss = loss + self.mismatch_weight * fake_loss(self.kind, logits[2 * n:], keep=has_one)
        return loss, reals, fake.to(reals.dtype)

    def penalties(self, reals: torch.Tensor, fakes: torch.Tensor, labels: torch.Tensor,
                  quality: torch.Tensor | None) -> torch.Tensor:
        """gamma_1 / 2 * E ||grad D(real)||^2 (R1) + gamma_2 / 2 * E ||grad D(fake)||^2 (R2), at the images
        `discriminator_main` returned, times `train.r1_every` (lazy regularisation: applied every that many
        steps); through D itself (see gradient_penalty)."""
        q = self._d_quality(quality)
        total = torch.zeros((), device=self.device)
        for gamma, images in ((self.now.r1_gamma, reals), (self.now.r2_gamma, fakes)):
            if gamma:
                total = total + gamma / 2 * gradient_penalty(self.D, self._augment(images), labels, q, self.autocast)
        return total * self.every

    def generator_main(self, batch_size: int, real: Batch, reals_seen: torch.Tensor) -> torch.Tensor:
        """G's loss on fresh latents; in ambient mode plus the penalty on what the JPEG measurement discards.
        With the relativistic loss ('rpgan') each fake is paired with a real of `real` (the last real batch,
        `reals_seen` as D saw it) and takes its class and quality; otherwise `batch_size` fakes of uniformly
        drawn classes, with qualities drawn from the real batch's. D's parameters must be frozen by the caller."""
        if self.kind == "rpgan":
            return self._relativistic_generator(real, reals_seen)
        labels = torch.randint(0, self.num_classes, (batch_size,), device=self.device)
        q = real.quality
        if q is not None:
            q = q[torch.randint(0, q.shape[0], (batch_size,), device=self.device)]
        pairs = batch_size // 2 if self.mode_seeking else 0
        if pairs:  # the second half repeats the first's classes (and qualities) with other latents
            labels = torch.cat([labels[:pairs], labels[:pairs], labels[2 * pairs:]])
            q = torch.cat([q[:pairs], q[:pairs], q[2 * pairs:]]) if q is not None else None
        z = torch.randn(batch_size, self.z_dim, device=self.device)
        with self.autocast():
            fake = self.G_train(z, labels, self._g_quality(q))
            fake_seen = self._measured(fake, q)
            logits, classes = self._judged(self._augment(fake_seen), labels, self._d_quality(q))
            loss = generator_loss(self.kind, logits)
            if classes is not None:  # G makes fakes whose class D names right
                loss = loss + self.class_loss * F.cross_entropy(classes.float(), labels)
            if pairs:
                loss = loss + self.mode_seeking * mode_seeking_term(fake[:pairs], fake[pairs:2 * pairs],
                                                                    z[:pairs], z[pairs:2 * pairs])
            return self._with_null_space_penalty(loss, fake, fake_seen)

    def _relativistic_generator(self, real: Batch, reals_seen: torch.Tensor) -> torch.Tensor:
        n, labels, q = reals_seen.shape[0], real.labels, real.quality
        with self.autocast():
            fake = self.G_train(torch.randn(n, self.z_dim, device=self.device), labels, self._g_quality(q))
            fake_seen = self._measured(fake, q)
            both = torch.cat([fake_seen.to(reals_seen.dtype), reals_seen.detach()])
            logits, classes = self._judged(self._augment(both), torch.cat([labels, labels]),
                                           self._d_quality(torch.cat([q, q])) if q is not None else None)
            loss = generator_loss(self.kind, logits[:n], logits[n:])
            if classes is not None:
                loss = loss + self.class_loss * F.cross_entropy(classes[:n].float(), labels)
            return self._with_null_space_penalty(loss, fake, fake_seen)

    def _with_null_space_penalty(self, loss: torch.Tensor, fake: torch.Tensor, fake_seen: torch.Tensor) -> torch.Tensor:
        """`loss`, plus in ambient mode the weighted mean square of the part of each fake that its JPEG
        measurement discards: D cannot judge that part, so it is kept small."""
        weight = self.compression.ambient_null_weight
        if self.mode == "ambient" and weight:
            return loss + weight * (fake.float() - fake_seen.float()).square().mean()
        return loss

    def _judged(self, images: torch.Tensor, labels: torch.Tensor,
                quality: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D's realness logits of `images` and, with train.class_loss, their class logits (else None)."""
        if not self.class_loss:
            return self.D_train(images, labels, quality), None
        return self.D_train(images, labels, quality, classes=True)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, self.policy, self.now.augment_p)

    def _g_quality(self, quality: torch.Tensor | None) -> torch.Tensor | None:
        """The quality input of G: the qualities when build_networks made G take them, else none."""
        return quality if self.G.quality_conditioned else None

    def _d_quality(self, quality: torch.Tensor | None) -> torch.Tensor | None:
        """The quality input of D: the qualities when build_networks made D take them, else none."""
        return quality if self.D.quality_conditioned else None

    def _measured(self, images: torch.Tensor, quality: torch.Tensor | None) -> torch.Tensor:
        """What D sees of a fake (or, with ambient_recode_reals, of a real): in ambient mode, the image
        JPEG-compressed (differentiably) at `quality`."""
        if self.mode != "ambient":
            return images
        return simulate_jpeg(images, quality * 100, self.compression.ambient_rounding)


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss: 'hinge' (Lim & Ye 2017), 'nonsaturating' (Goodfellow et al. 2014, logistic), or 'rpgan',
    the relativistic pairing loss E softplus(D(fake_i) - D(real_i)) of R3GAN (Huang et al. 2024,
    https://arxiv.org/abs/2501.05441), real i and fake i being a pair."""
    if kind == "rpgan":
        return F.softplus(fake_logits - real_logits).mean()
    return fake_loss(kind, -real_logits) + fake_loss(kind, fake_logits)  # judged real: the negated logit judged fake


def fake_loss(kind: str, logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """D's loss on logits it should judge fake: the second half of `discriminator_loss`, and of the first
    with the logits negated. With `keep` (a bool per logit), the mean over the kept logits only (0 when
    none is), without the host read that selecting them would take."""
    if kind == "hinge":
        losses = F.relu(1.0 + logits)
    elif kind in ("nonsaturating", "rpgan"):  # rpgan: an unpaired logit is judged as the logistic loss does
        losses = F.softplus(logits)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    if keep is None:
        return losses.mean()
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def generator_loss(kind: str, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    """G's loss for the same kinds; 'rpgan' needs the logits of the reals paired with the fakes:
    E softplus(D(real_i) - D(fake_i))."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    if kind == "rpgan":
        return F.softplus(real_logits - fake_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def mode_seeking_term(a: torch.Tensor, b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """MSGAN's term (Mao et al. 2019, https://arxiv.org/abs/1903.05628) for fakes `a`, `b` of the same classes
    from latents `z_a`, `z_b`: 1 / (mean |a - b| / mean |z_a - z_b| + 1e-5), small when the pairs differ."""
    ratio = (a.float() - b.float()).abs().mean() / (z_a - z_b).abs().mean()
    return 1 / (ratio + 1e-5)


def gradient_penalty(D: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """E ||grad_x D(x)||^2 over `images` (as D sees them, augmented): R1 at real images (Mescheder et al.
    2018, https://arxiv.org/abs/1801.04406), R2 at fakes (R3GAN).

    `D` must be the module itself, not its torch.compile wrapper: compiled graphs have no double backward
    ("torch.compile with aot_autograd does not currently support double backward"). The gradient of the
    logits' sum is taken unscaled, whatever loss scaling the D step uses: each logit's gradient is then 1,
    where a GradScaler's 2**16 would overflow float16 (max 65504) and make the penalty inf at its first step.
    The penalty itself is scaled like any loss when it is backpropagated.
    """
    seen = images.detach().requires_grad_(True)
    with autocast():
        logits = D(seen, labels, quality)
    (grad,) = torch.autograd.grad(logits.float().sum(), seen, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1).mean()
