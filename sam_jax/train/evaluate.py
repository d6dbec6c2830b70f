"""The SAM paper's prompt metrics: mIoU with 1 point, 1 box, and after k clicks.

Prompts follow the paper's evaluation: the first point is the mask's
most interior pixel (maximum of the distance transform), the box is the tight
box, and each further click is the most interior pixel of the current error
region, foreground for a miss and background for a false positive. Masks are
scored at the input resolution (low-res logits upsampled bilinearly).
"""

import functools
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, PADDING
from sam_jax.modeling.sam import Sam


def interior_point(region: np.ndarray) -> np.ndarray:
  """(x, y) of the pixel of `region` farthest from its boundary (image border included)."""
  dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
  row, col = np.unravel_index(np.argmax(dist), dist.shape)
  return np.array([col, row], np.float32)


def tight_box(mask: np.ndarray) -> np.ndarray:
  rows, cols = np.nonzero(mask)
  return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decode(model: Sam, params, emb, coords, labels, multimask, boxes=None, mask_inputs=None):
  logits, iou = model.apply({"params": params}, emb, coords, labels, boxes, mask_inputs,
                            multimask, method=Sam.decode)
  # The most confident output, as a user without ground truth would pick it.
  best = jnp.argmax(iou, axis=-1)
  low = jnp.take_along_axis(logits, best[..., None, None, None], axis=2)[:, :, 0]
  full = jax.image.resize(low, (*low.shape[:2], *model.image_size), "linear", antialias=False)
  return low, full > 0


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(model: Sam, params, images):
  return model.apply({"params": params}, images, method=Sam.embed_images)


def _miou(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> float:
  inter = (pred & gt).sum((-2, -1))
  union = (pred | gt).sum((-2, -1))
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  return float(iou[valid].mean())


def evaluate(model: Sam, params, examples: Dict[str, np.ndarray], num_clicks: int = 5,
             batch_size: int = 16) -> Dict[str, object]:
  """mIoU over every valid mask of `examples` (masks at the model's input size).

  Returns `miou_1point`, `miou_box`, `miou_clicks` (after 1 .. num_clicks clicks)
  and `masks_1point` (predicted boolean masks, for pictures).
  """
  results = dict(pred_1point=[], pred_box=[], clicks=[])
  n = len(examples["images"])
  batch_size = min(batch_size, n)
  for start in range(0, n, batch_size):
    part = {k: v[start:start + batch_size] for k, v in examples.items()}
    r = _evaluate_batch(model, params, _pad_batch(part, batch_size), num_clicks)
    real = len(part["images"])
    results["pred_1point"].append(r["pred_1point"][:real])
    results["pred_box"].append(r["pred_box"][:real])
    results["clicks"].append(r["clicks"][:, :real])
  gt, valid = examples["masks"].astype(bool), examples["valid"]
  pred1 = np.concatenate(results["pred_1point"])
  clicks = np.concatenate(results["clicks"], axis=1)
  return dict(miou_1point=_miou(pred1, gt, valid),
              miou_box=_miou(np.concatenate(results["pred_box"]), gt, valid),
              miou_clicks=[_miou(c, gt, valid) for c in clicks],
              masks_1point=pred1, num_masks=int(valid.sum()))


def _pad_batch(part: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
  """A short last batch filled up with invalid zero examples: one compilation for all batches."""
  missing = size - len(part["images"])
  if not missing:
    return part
  return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
          for k, v in part.items()}


def _evaluate_batch(model, params, ex, num_clicks):
  gt, valid = ex["masks"].astype(bool), ex["valid"]
  b, n = valid.shape
  emb = _embed(model, params, jnp.asarray(ex["images"], jnp.float32))
  coords = np.zeros((b, n, num_clicks, 2), np.float32)
  labels = np.full((b, n, num_clicks), PADDING, np.int32)
  boxes = np.zeros((b, n, 4), np.float32)
  for i, j in zip(*np.nonzero(valid)):
    coords[i, j, 0] = interior_point(gt[i, j])
    labels[i, j, 0] = FOREGROUND
    boxes[i, j] = tight_box(gt[i, j])
  # The 1-point prompt is ambiguous: multimask output, most confident mask.
  low, pred = _decode(model, params, emb, coords[:, :, :1], labels[:, :, :1], True)
  pred_1point = np.asarray(pred)
  _, pred_box = _decode(model, params, emb, None, None, False, jnp.asarray(boxes))
  clicks = [pred_1point]
  for k in range(1, num_clicks):
    prev = np.asarray(clicks[-1])
    for i, j in zip(*np.nonzero(valid)):
      error = prev[i, j] != gt[i, j]
      if error.any():
        coords[i, j, k] = interior_point(error)
        x, y = coords[i, j, k].astype(int)
        labels[i, j, k] = FOREGROUND if gt[i, j, y, x] else BACKGROUND
    # Fixed shape: all num_clicks slots, the future ones padding.
    low, pred = _decode(model, params, emb, coords, labels, False, None, low)
    clicks.append(np.asarray(pred))
  return dict(pred_1point=pred_1point, pred_box=np.asarray(pred_box), clicks=np.stack(clicks))


def render(path: str, images: np.ndarray, columns: Sequence, titles: Sequence[str],
           points: np.ndarray = None, valid: np.ndarray = None, max_rows: int = 4) -> None:
  """A PNG grid: a row per image; the image, then each column's masks overlaid in colour."""
  from PIL import Image, ImageDraw
  rows = min(max_rows, len(images))
  s = images.shape[1]
  palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                      [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], float)
  canvas = Image.new("RGB", ((len(columns) + 1) * s, rows * s + 14), "white")
  draw = ImageDraw.Draw(canvas)
  for c, t in enumerate(["image"] + list(titles)):
    draw.text((c * s + 2, 1), t, fill="black")
  for r in range(rows):
    img = np.clip(images[r], 0, 255).astype(np.uint8)
    canvas.paste(Image.fromarray(img), (0, r * s + 14))
    for c, masks in enumerate(columns):
      out = img.astype(float)
      for j in range(masks.shape[1]):
        if valid is None or valid[r, j]:
          m = masks[r, j]
          out[m] = 0.45 * out[m] + 0.55 * palette[j % len(palette)]
      tile = Image.fromarray(out.astype(np.uint8))
      if points is not None:
        d = ImageDraw.Draw(tile)
        for j, (x, y) in enumerate(points[r]):
          if valid is None or valid[r, j]:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill="white", outline="black")
      canvas.paste(tile, ((c + 1) * s, r * s + 14))
  canvas.save(path)
