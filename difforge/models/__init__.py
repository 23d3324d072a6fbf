"""Shared model layer: one resolver for every model reference, and the loaders of the models several operators use (the classifier, the VAE)."""
