"""Resizing images and prompts to the model's input, as the reference does.

The reference resizes a uint8 image with torchvision on a PIL image, which is
PIL's bilinear filter with antialiasing. Doing the same here (PIL, not
`jax.image.resize`) keeps the pixels identical, so masks on real photos agree
with the reference's, not only on arrays that are already the right size.
"""

from typing import Tuple, Union

import numpy as np
from PIL import Image

Size = Union[int, Tuple[int, int]]


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
  """Raises a ValueError that says how to fix anything but an (H, W, 3) uint8 image."""
  if not isinstance(image, np.ndarray):
    raise ValueError(f"{name} must be a NumPy array (H, W, 3) uint8, got {type(image).__name__}; "
                     "use np.asarray(PIL.Image.open(path).convert('RGB')).")
  if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
    raise ValueError(f"{name} is grayscale with shape {image.shape}; SAM takes RGB (H, W, 3): "
                     "convert it with np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1) "
                     "or PIL's .convert('RGB').")
  if image.ndim == 3 and image.shape[-1] == 4:
    raise ValueError(f"{name} has 4 channels (RGBA) with shape {image.shape}; SAM takes RGB "
                     "(H, W, 3): drop the alpha channel with image[..., :3] or use PIL's "
                     ".convert('RGB').")
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8 with values in [0, 255], got {image.dtype}; for "
                     "floats in [0, 1] use (image * 255).round().astype(np.uint8).")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {image.shape}.")
  return image


class ResizeLongestSide:
  """Resizes images so that they fit `target_length`, and coordinates to match.

  `target_length` is the model's square input size, as in the reference, or
  an (H, W) input size, in which case the image is scaled to fit inside it.
  """

  def __init__(self, target_length: Size) -> None:
    self.target_length = target_length

  def apply_image(self, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> resized (h, w, 3) uint8, bilinear with antialiasing."""
    check_image(image)
    h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

  def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    """(..., 2) (x, y) pixel coordinates of the original image -> of the resized one."""
    old_h, old_w = original_size
    new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
    coords = np.array(coords, dtype=float)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords

  def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    """(..., 4) (x0, y0, x1, y1) boxes of the original image -> of the resized one."""
    boxes = np.asarray(boxes)
    return self.apply_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size).reshape(
        boxes.shape)

  @staticmethod
  def get_preprocess_shape(old_h: int, old_w: int, target: Size) -> Tuple[int, int]:
    """The (h, w) the image is resized to; rounded as the reference rounds."""
    if isinstance(target, int):
      scale = target * 1.0 / max(old_h, old_w)
    else:
      scale = min(target[0] * 1.0 / old_h, target[1] * 1.0 / old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)
