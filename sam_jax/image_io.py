"""Reading and writing image files, as the reference's scripts do (OpenCV, RGB in memory)."""

from typing import Optional

import cv2
import numpy as np


def read_rgb(path: str) -> Optional[np.ndarray]:
  """An image file as (H, W, 3) uint8 RGB, read as the reference reads it; None if unreadable."""
  image = cv2.imread(path)
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def png_bytes(image: np.ndarray) -> bytes:
  """An (H, W, 3) uint8 RGB image encoded as PNG (written under a temporary name, then moved)."""
  return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def mask_png_bytes(mask: np.ndarray) -> bytes:
  """A binary mask encoded as a one-channel PNG of 0 and 255."""
  return cv2.imencode(".png", mask.astype(np.uint8) * 255)[1].tobytes()


def write_mask(path: str, mask: np.ndarray) -> None:
  """A binary mask as a one-channel PNG file of 0 and 255."""
  with open(path, "wb") as f:
    f.write(mask_png_bytes(mask))
