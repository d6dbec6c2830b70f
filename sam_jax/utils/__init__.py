"""Helpers for inference: mask operations (mask_ops) and pictures of masks (visualize)."""
