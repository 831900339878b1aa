"""GAN training: loop, losses, EMA, checkpoints."""
