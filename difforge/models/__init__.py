"""Shared model layer: one resolver for every model reference, the loaders of the models several
operators use (the classifier, the VAE), image feature extractors and their metrics."""
