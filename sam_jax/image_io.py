"""Reading and writing image files, as the reference's scripts do (OpenCV, RGB in memory)."""

from typing import Optional

import cv2
import numpy as np


def read_rgb(path: str) -> Optional[np.ndarray]:
  """An image file as (H, W, 3) uint8 RGB, read as the reference reads it; None if unreadable."""
  image = cv2.imread(path)
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_rgb(path: str, image: np.ndarray) -> None:
  cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def write_mask(path: str, mask: np.ndarray) -> None:
  """A binary mask as a one-channel PNG of 0 and 255."""
  cv2.imwrite(path, mask.astype(np.uint8) * 255)


def png_bytes(image: np.ndarray) -> bytes:
  """An (H, W, 3) uint8 RGB image encoded as PNG, for a file whose name has no extension."""
  return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
