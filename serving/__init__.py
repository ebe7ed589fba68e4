"""Packaging, running and calling TorchServe for the exported models."""
