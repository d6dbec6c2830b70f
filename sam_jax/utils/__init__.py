"""Helpers for inference: the automatic mask generator's grids, boxes, NMS and RLEs."""
