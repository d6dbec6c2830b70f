"""A generated dataset in SA-1B's layout: images of random coloured shapes.

Each image is written as `NAME.jpg` beside `NAME.json`, whose `annotations`
hold every shape's visible region as a COCO run-length encoding, exactly as
SA-1B stores its masks; so the demo exercises the same reader as real data.
"""

import json
import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES = ("ellipse", "rectangle", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A smooth two-colour gradient plus mild noise, so that no shape is trivially flat."""
  a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:size, 0:size] / size
  t = (np.cos(angle) * xx + np.sin(angle) * yy)
  t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
  img = a * (1 - t[..., None]) + b * t[..., None]
  return img + rng.normal(0, 6, img.shape)


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
  """One random ellipse, rectangle or triangle, 8% to 45% of the side across."""
  canvas = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  w, h = rng.uniform(0.12, 0.45, 2) * size
  x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
  kind = SHAPES[rng.integers(len(SHAPES))]
  if kind == "ellipse":
    draw.ellipse([x0, y0, x0 + w, y0 + h], fill=1)
  elif kind == "rectangle":
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=1)
  else:
    pts = [(x0 + rng.uniform(0, w), y0), (x0, y0 + h), (x0 + w, y0 + h)]
    draw.polygon(pts, fill=1)
  return np.asarray(canvas, bool)


def make_example(rng: np.random.Generator, size: int, max_shapes: int):
  """An (image uint8 (size, size, 3), list of visible boolean masks) pair.

  Later shapes occlude earlier ones; a shape left with under 1% of the image
  visible is dropped, so every mask is a real, visible object.
  """
  img = _background(rng, size)
  masks = []
  for _ in range(rng.integers(2, max_shapes + 1)):
    m = _shape_mask(rng, size)
    color = rng.uniform(0, 255, 3)
    img[m] = color + rng.normal(0, 6, (m.sum(), 3))
    masks = [prev & ~m for prev in masks] + [m]
  masks = [m for m in masks if m.mean() >= 0.01]
  return np.clip(img, 0, 255).astype(np.uint8), masks


def annotation(mask: np.ndarray, ann_id: int) -> dict:
  """An SA-1B annotation: COCO RLE segmentation, area, XYWH bbox."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  x, y, w, h = mask_utils.toBbox(rle).tolist()
  return dict(id=ann_id, segmentation=rle, area=int(mask.sum()), bbox=[x, y, w, h],
              predicted_iou=1.0, stability_score=1.0, crop_box=[0, 0, *mask.shape[::-1]],
              point_coords=[[x + w / 2, y + h / 2]])


def write_dataset(directory: str, num_images: int, size: int = 128, max_shapes: int = 6,
                  seed: int = 0, prefix: str = "sa_") -> list:
  """Writes `num_images` examples into `directory`; returns their names. Idempotent."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = []
  for i in range(num_images):
    name = f"{prefix}{i:06d}"
    img, masks = make_example(rng, size, max_shapes)
    names.append(name)
    json_path = os.path.join(directory, name + ".json")
    if os.path.exists(json_path):
      continue
    Image.fromarray(img).save(os.path.join(directory, name + ".jpg"), quality=95)
    record = dict(
        image=dict(image_id=i, width=size, height=size, file_name=name + ".jpg"),
        annotations=[annotation(m, j) for j, m in enumerate(masks)])
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(record, f)
    os.replace(tmp, json_path)  # the json last: its presence marks a complete example
  return names
