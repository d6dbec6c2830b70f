"""Operations on masks, boxes and point grids: the automatic mask generator's parts.

Point grids and crop boxes are small Python computations, as in the
reference. Everything done per mask (stability scores, boxes, edge filtering,
NMS) is JAX on fixed shapes; RLEs go through pycocotools.
"""

import math
from itertools import product
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

# --- point grids and crops (as the reference computes them) ---------------


def build_point_grid(n_per_side: int) -> np.ndarray:
  """(n^2, 2) points evenly spaced in [0, 1]^2, as (x, y), row by row."""
  offset = 1 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs = np.tile(side[None, :], (n_per_side, 1))
  ys = np.tile(side[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int,
                                scale_per_layer: int) -> List[np.ndarray]:
  """One grid per crop layer; layer i has n_per_side / scale_per_layer^i points a side."""
  return [build_point_grid(int(n_per_side / (scale_per_layer ** i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
  """The whole image, then (2^i)^2 overlapping crops in layer i; (x0, y0, x1, y1) boxes."""
  im_h, im_w = im_size
  short_side = min(im_h, im_w)
  crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

  def crop_len(orig_len, n_crops, overlap):
    return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

  for i_layer in range(n_layers):
    n_crops_per_side = 2 ** (i_layer + 1)
    overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
    crop_w = crop_len(im_w, n_crops_per_side, overlap)
    crop_h = crop_len(im_h, n_crops_per_side, overlap)
    x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
    y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
    for x0, y0 in product(x0s, y0s):  # x-major, as the reference orders them
      crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layer_idxs.append(i_layer + 1)
  return crop_boxes, layer_idxs


def box_xyxy_to_xywh(box) -> List:
  x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box)
  return [x0, y0, x1 - x0, y1 - y0]


# --- per-mask computations in JAX ------------------------------------------


def stability_score(logits: jax.Array, threshold: float, offset: float) -> jax.Array:
  """IoU of the masks thresholded at threshold +- offset; logits (..., H, W)."""
  inter = jnp.sum(logits > threshold + offset, axis=(-2, -1), dtype=jnp.int32)
  union = jnp.sum(logits > threshold - offset, axis=(-2, -1), dtype=jnp.int32)
  return inter / union


def masks_to_boxes(masks: jax.Array) -> jax.Array:
  """(..., H, W) bool -> (..., 4) int32 (x0, y0, x1, y1) inclusive; zeros for empty masks."""
  h, w = masks.shape[-2:]
  rows, cols = jnp.any(masks, axis=-1), jnp.any(masks, axis=-2)

  def edges(hit, n):
    idx = jnp.arange(n, dtype=jnp.int32)
    return jnp.min(jnp.where(hit, idx, n), axis=-1), jnp.max(jnp.where(hit, idx, 0), axis=-1)

  top, bottom = edges(rows, h)
  left, right = edges(cols, w)
  boxes = jnp.stack([left, top, right, bottom], axis=-1)
  return jnp.where(jnp.any(rows, axis=-1)[..., None], boxes, 0)


def is_box_near_crop_edge(boxes: jax.Array, crop_box: jax.Array, orig_box: jax.Array,
                          atol: float = 20.0) -> jax.Array:
  """Boxes (crop frame) touching a crop edge that is not an edge of the image."""
  boxes = boxes.astype(jnp.float32) + jnp.concatenate([crop_box[:2], crop_box[:2]])
  near_crop = jnp.abs(boxes - crop_box) <= atol
  near_image = jnp.abs(boxes - orig_box) <= atol
  return jnp.any(near_crop & ~near_image, axis=-1)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes, computed as torchvision does."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area_a[:, None] + area_b[None, :] - inter)


@jax.jit
def _nms(boxes, scores, valid, iou_threshold):
  n = boxes.shape[0]
  # Stable, so that equal scores keep their input order.
  order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
  iou = box_iou(boxes[order], boxes[order])
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
  over = (iou > iou_threshold) & later

  def visit(i, keep):
    return keep & ~(over[i] & keep[i])

  keep = jax.lax.fori_loop(0, n, visit, valid[order])
  return order, keep


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        min_bucket: int = 64) -> np.ndarray:
  """Greedy non-maximum suppression, as torchvision's `batched_nms` with one category.

  Returns the indices kept, highest score first. Inputs are padded to a power
  of two so that only a few shapes ever compile.
  """
  n = len(boxes)
  if n == 0:
    return np.zeros(0, np.int64)
  size = max(min_bucket, 1 << (n - 1).bit_length())
  pad = size - n
  # torchvision compares float32 IoUs with a float64 threshold: an IoU of
  # exactly 0.3 exceeds 0.3. The largest float32 <= the threshold does the same.
  threshold = np.float32(iou_threshold)
  if float(threshold) > iou_threshold:
    threshold = np.nextafter(threshold, np.float32(-np.inf))
  order, keep = _nms(
      jnp.asarray(np.pad(np.asarray(boxes, np.float32), ((0, pad), (0, 0)))),
      jnp.asarray(np.pad(np.asarray(scores, np.float32), (0, pad))),
      jnp.asarray(np.arange(size) < n), jnp.asarray(threshold))
  order, keep = np.asarray(order), np.asarray(keep)
  return order[keep].astype(np.int64)


# --- RLEs and small regions -------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
  """(H, W) bool -> COCO RLE (compressed counts as a str, ready for JSON)."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("utf-8")
  rle["size"] = [int(s) for s in rle["size"]]
  return rle


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
  """COCO RLE (compressed or uncompressed) -> (H, W) bool."""
  if isinstance(rle["counts"], list):
    h, w = rle["size"]
    rle = mask_utils.frPyObjects(rle, h, w)
  elif isinstance(rle["counts"], str):
    rle = dict(rle, counts=rle["counts"].encode("utf-8"))
  return mask_utils.decode(rle).astype(bool)


def area_from_rle(rle: Dict[str, Any]) -> int:
  return int(mask_utils.area(dict(rle, counts=rle["counts"].encode("utf-8"))))


def uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
  """(H, W) bool -> {'size': [H, W], 'counts': [...]}, column-major runs starting with 0s."""
  flat = mask.T.reshape(-1)
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def remove_small_regions(mask: np.ndarray, area_thresh: float,
                         mode: str) -> Tuple[np.ndarray, bool]:
  """Fills holes or removes islands smaller than `area_thresh`; also says if it changed."""
  import cv2  # only needed for min_mask_region_area > 0

  if mode not in ("holes", "islands"):
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}.")
  correct_holes = mode == "holes"
  working = (correct_holes ^ mask).astype(np.uint8)
  n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
  sizes = stats[:, -1][1:]  # row 0 is the background
  small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
  if not small:
    return mask, False
  fill = [0] + small
  if not correct_holes:
    fill = [i for i in range(n_labels) if i not in fill]
    if not fill:  # every island is small: keep the largest
      fill = [int(np.argmax(sizes)) + 1]
  return np.isin(regions, fill), True
