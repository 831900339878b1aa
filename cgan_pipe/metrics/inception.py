"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph as ported by pytorch-fid), from a local file or fetched once.

Its weights are `pt_inception-2015-12-05-6726825d.pth` from the pytorch-fid releases; the network is
torchvision's Inception3 with the four blocks TensorFlow computes differently: its average pools
leave the zero padding out of the mean, and the last block max-pools.
"""

from __future__ import annotations

import pickle
import re
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception

from ..atomic import atomic_path
from ..errors import ConfigError, DataError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
INPUT_SIZE = 299
FEATURES = 2048
CLASSES = 1008  # the TF graph's softmax has 1008 outputs


def _pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(inception.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_pool_without_padding(x))]


class _BlockC(inception.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_pool_without_padding(x))]


class _BlockE(inception.InceptionE):
    max_pool = False  # Mixed_7c max-pools its pool branch, Mixed_7b averages

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _pool_without_padding(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


class FidInception(nn.Module):
    """Images in [-1, 1] (any size; resized to 299x299 bilinearly) -> (2048-d pool features, 1008 logits)."""

    def __init__(self) -> None:
        super().__init__()
        blocks = [inception.BasicConv2d, _BlockA, inception.InceptionB, _BlockC, inception.InceptionD, _BlockE,
                  inception.InceptionAux]
        self.net = inception.Inception3(num_classes=CLASSES, aux_logits=False, transform_input=False,
                                        inception_blocks=blocks, init_weights=False)
        self.net.Mixed_7c.max_pool = True

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        for layer in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
                      net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                      net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b,
                      net.Mixed_7c):
            x = layer(x)
        features = net.avgpool(x).flatten(1)
        return features, net.fc(features)


def fetch_fid_weights(cache_dir: Path, url: str | None = None, progress: bool = True) -> Path:
    """The FID Inception weights in `cache_dir`, downloaded from `url` (default WEIGHTS_URL) the first time.

    The download is written under a temp name and checked against the sha256 prefix its file name
    carries (torch.hub's rule: `...-6726825d.pth`) before it takes its final name. Raises ConfigError
    when it cannot be fetched (offline, say), naming a local copy as the way out, and DataError when
    the bytes do not match their checksum.
    """
    url = url or WEIGHTS_URL
    target = Path(cache_dir).expanduser() / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    named = re.search(r"-([0-9a-f]{8,64})\.[a-z]+$", target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=named.group(1) if named else None,
                                           progress=progress)
    except (OSError, urllib.error.URLError) as exc:
        raise ConfigError(f"eval.metrics: fid/kid/is need {WEIGHTS_NAME}, which could not be downloaded from {url} "
                          f"({exc}); download it where the network allows and set eval.inception_weights to "
                          f"its local path") from None
    except RuntimeError as exc:  # torch.hub's checksum mismatch
        raise DataError(f"{url}: the download does not match the checksum in its name ({exc}); nothing was "
                        f"kept, try again or give a local copy in eval.inception_weights") from None
    return target


def load_fid_inception(path: Path | str) -> FidInception:
    """The FID Inception-v3 with the weights in `path` (a state dict, loaded with weights_only=True).

    Raises ConfigError when the file is absent (saying where to get it) and DataError when it does
    not hold these weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.inception_weights: {path} not found; download {WEIGHTS_URL} once "
                          f"and give its local path (FID/KID/IS need it; the classifier metrics do not)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: unreadable as a weights file ({str(exc).splitlines()[0]})") from None
    model = FidInception()
    try:
        model.net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not the FID Inception-v3 weights ({WEIGHTS_NAME}): "
                        f"{str(exc).splitlines()[0][:200]}") from None
    return model.eval().requires_grad_(False)
