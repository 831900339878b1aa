"""cgan-pipe: conditional GANs trained on archives of compressed images."""

__version__ = "0.1.0"
