"""Pieces shared by the training and evaluation scripts (transforms, batching, metrics)."""
