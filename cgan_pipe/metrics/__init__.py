"""Sample quality: feature extractors (our CIFAR-style classifier, FID Inception-v3) and distances."""
