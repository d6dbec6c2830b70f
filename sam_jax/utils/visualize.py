"""Pictures of masks over an image, for a person to look at."""

from typing import Optional, Sequence

import cv2
import numpy as np


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5,
                  seed: int = 0) -> np.ndarray:
  """(H, W, 3) uint8 RGB with each (H, W) bool mask tinted in its own colour.

  Larger masks are drawn first so that smaller ones stay visible on top, and
  each mask gets a thin outline.
  """
  out = image.astype(np.float32).copy()
  colors = np.random.default_rng(seed).integers(40, 256, (len(masks), 3))
  order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
  for i in order:
    mask = np.asarray(masks[i], bool)
    out[mask] = (1 - alpha) * out[mask] + alpha * colors[i]
  out = out.round().astype(np.uint8)
  for i in order:
    contours, _ = cv2.findContours(np.asarray(masks[i], np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colors[i]), 1)
  return out


def draw_prompts(image: np.ndarray, points: Optional[np.ndarray] = None,
                 labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None
                 ) -> np.ndarray:
  """Marks points (green foreground, red background) and a box (blue) on an RGB image."""
  out = np.ascontiguousarray(image.copy())
  radius = max(3, min(image.shape[:2]) // 100)
  if points is not None:
    for (x, y), label in zip(np.asarray(points), np.asarray(labels)):
      color = (0, 200, 0) if label == 1 else (220, 0, 0)
      center = (int(round(x)), int(round(y)))
      cv2.circle(out, center, radius, color, -1)
      cv2.circle(out, center, radius, (255, 255, 255), 1)
  if box is not None:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    cv2.rectangle(out, (x0, y0), (x1, y1), (0, 80, 255), 2)
  return out
