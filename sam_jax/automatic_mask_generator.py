"""`SamAutomaticMaskGenerator`: masks for a whole image from a grid of point prompts.

The reference's algorithm, parameters and records. Each batch of points is
decoded by one compiled function and upscaled, scored, thresholded, boxed and
edge-filtered by another, a few masks at a time, on fixed shapes (the last
batch is padded); only the masks kept are made at full size again and
fetched. NMS is compiled too. Python only walks crops and batches and
encodes the kept masks as RLEs with pycocotools.
"""

import functools
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.sam import MASK_THRESHOLD, Sam
from sam_jax.predictor import TRACE_COUNTS, SamPredictor, bucket, cache_image, upscale
from sam_jax.transforms import check_image
from sam_jax.utils import mask_ops

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@functools.partial(jax.jit, static_argnums=0)
def decode_points(model: Sam, params, cache, embeddings, points):
  """(K, 2) foreground points -> low-res logits (K, 3, 4h, 4w) and IoUs (K, 3)."""
  TRACE_COUNTS["amg_decode"] += 1
  k = points.shape[0]
  low_res, iou = model.apply(
      {"params": params}, embeddings, points[None, :, None, :], jnp.ones((1, k, 1), jnp.int32),
      multimask_output=True, cache=cache, method=model.decode)
  return low_res[0], iou[0]


# Masks scored per step of `filter_masks`: as many as fit about this many pixels,
# several small masks or one large one (BENCHMARKS.md, the generator's filter).
_PIXELS_PER_STEP = 1 << 21


@functools.partial(jax.jit, static_argnums=0, static_argnames=("input_size", "crop_size"))
def filter_masks(model: Sam, low_res, iou, valid, crop_box, orig_box, thresholds, input_size,
                 crop_size):
  """Scores, boxes and thresholds a batch of K x 3 masks at the crop's size; says which to keep.

  thresholds: (pred_iou_thresh, stability_score_thresh, stability_score_offset),
  traced, so that other settings do not compile again. The masks themselves
  are not returned: the caller upscales the few it keeps again.
  """
  TRACE_COUNTS["amg_filter"] += 1
  pred_iou_thresh, stability_thresh, stability_offset = thresholds

  def score(mask):  # one mask at the crop's size, read by both while it is in cache
    logits = model.postprocess_masks(mask, input_size, crop_size)
    return (mask_ops.stability_score(logits, MASK_THRESHOLD, stability_offset),
            mask_ops.masks_to_boxes(logits > MASK_THRESHOLD))

  # A mask or a few at a time, while in cache: all K x 3 at once streamed their
  # full-size logits through memory for each reader (BENCHMARKS.md, AMG rows).
  per_step = max(1, _PIXELS_PER_STEP // (crop_size[0] * crop_size[1]))
  stability, boxes = jax.lax.map(score, low_res.reshape(-1, *low_res.shape[-2:]),
                                 batch_size=per_step)
  iou = iou.reshape(-1)
  keep = jnp.repeat(valid, low_res.shape[1])
  keep &= jnp.where(pred_iou_thresh > 0, iou > pred_iou_thresh, True)
  keep &= jnp.where(stability_thresh > 0, stability >= stability_thresh, True)
  keep &= ~mask_ops.is_box_near_crop_edge(boxes, crop_box, orig_box)
  return boxes, iou, stability, keep


class SamAutomaticMaskGenerator:
  """Generates masks for an entire image, as the reference's generator.

  Arguments are the reference's, with its defaults (chosen for ViT-H):
    model, params: the sam_jax model and its parameters.
    points_per_side: points sampled along each side (points_per_side^2 in
      all); None when `point_grids` is given.
    points_per_batch: points decoded together; more is faster, uses more memory.
    pred_iou_thresh: keep masks whose predicted IoU is above this (0 keeps all).
    stability_score_thresh: keep masks at least this stable (0 keeps all).
    stability_score_offset: the shift of the cutoff for the stability score.
    box_nms_thresh: box IoU above which NMS drops duplicate masks.
    crop_n_layers: run again on crops; layer i has (2^i)^2 crops.
    crop_nms_thresh: box IoU for NMS between masks of different crops.
    crop_overlap_ratio: how much crops of the first layer overlap, as a
      fraction of the image's short side.
    crop_n_points_downscale_factor: layer i samples points_per_side / factor^i.
    point_grids: explicit grids in [0, 1]^2, one per crop layer.
    min_mask_region_area: remove holes and islands smaller than this (OpenCV).
    output_mode: 'binary_mask', 'uncompressed_rle' or 'coco_rle'.
  Two more, not the reference's, for encoding many images at once
  (`generate_batch`):
    crops_per_encode: crops (whole images included) embedded per encoder call.
    mesh: a device mesh; each encoder call splits its crops over all of its
      devices (data-parallel), so crops_per_encode is best a multiple of its size.
  """

  def __init__(
      self,
      model: Sam,
      params,
      points_per_side: Optional[int] = 32,
      points_per_batch: int = 64,
      pred_iou_thresh: float = 0.88,
      stability_score_thresh: float = 0.95,
      stability_score_offset: float = 1.0,
      box_nms_thresh: float = 0.7,
      crop_n_layers: int = 0,
      crop_nms_thresh: float = 0.7,
      crop_overlap_ratio: float = 512 / 1500,
      crop_n_points_downscale_factor: int = 1,
      point_grids: Optional[List[np.ndarray]] = None,
      min_mask_region_area: int = 0,
      output_mode: str = "binary_mask",
      crops_per_encode: int = 1,
      mesh: Optional[jax.sharding.Mesh] = None,
  ) -> None:
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("Give exactly one of points_per_side and point_grids.")
    if points_per_side is not None:
      self.point_grids = mask_ops.build_all_layer_point_grids(
          points_per_side, crop_n_layers, crop_n_points_downscale_factor)
    else:
      self.point_grids = [np.asarray(g, np.float64) for g in point_grids]
      if len(self.point_grids) < crop_n_layers + 1:
        raise ValueError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), "
                         f"got {len(self.point_grids)}.")
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}.")
    if points_per_batch < 1:
      raise ValueError(f"points_per_batch must be positive, got {points_per_batch}.")
    if crops_per_encode < 1:
      raise ValueError(f"crops_per_encode must be positive, got {crops_per_encode}.")
    self.predictor = SamPredictor(model, params, mesh=mesh)
    self.crops_per_encode = crops_per_encode
    self.points_per_batch = points_per_batch
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.box_nms_thresh = box_nms_thresh
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = crop_nms_thresh
    self.crop_overlap_ratio = crop_overlap_ratio
    self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode

  @property
  def model(self) -> Sam:
    return self.predictor.model

  # --- the algorithm ------------------------------------------------------

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """Masks for an (H, W, 3) uint8 RGB image, as a list of records.

    Each record has `segmentation` (an (H, W) bool array or an RLE, by
    output_mode), `area`, `bbox` (XYWH), `predicted_iou`, `point_coords`,
    `stability_score` and `crop_box` (XYWH), as the reference's.
    """
    return next(self.generate_batch([image]))

  def generate_batch(self, images: Sequence[np.ndarray]) -> Iterator[List[Dict[str, Any]]]:
    """`generate`'s records for each image in turn.

    The crops of all the images are embedded first, `crops_per_encode` per
    encoder call (over the mesh); the prompts are then decoded image by image,
    and each image's records are yielded as soon as they are ready.
    """
    crops = []  # (image index, crop box, layer), every image's crops in the reference's order
    for i, image in enumerate(images):
      check_image(image, f"image {i}" if len(images) > 1 else "image")
      boxes, layers = mask_ops.generate_crop_boxes(image.shape[:2], self.crop_n_layers,
                                              self.crop_overlap_ratio)
      crops += [(i, box, layer) for box, layer in zip(boxes, layers)]
    embedded = []  # (embedding (1, h, w, C), input size) per crop
    for start in range(0, len(crops), self.crops_per_encode):
      chunk = crops[start:start + self.crops_per_encode]
      self.predictor.set_image_batch([_crop(images[i], box) for i, box, _ in chunk])
      features = self.predictor.features
      embedded += [(features[j:j + 1], size) for j, size in enumerate(self.predictor.input_sizes)]
    self.predictor.reset_image()
    for i, image in enumerate(images):
      mine = [(c, e) for c, e in zip(crops, embedded) if c[0] == i]
      yield self._image_records(image, [(box, layer, *e) for (_, box, layer), e in mine])

  def _image_records(self, image: np.ndarray, crops) -> List[Dict[str, Any]]:
    orig_size = image.shape[:2]
    data = _concat([self._process_crop(image, box, layer, orig_size, features, input_size)
                    for box, layer, features, input_size in crops])
    if len(crops) > 1:
      # Prefer masks from smaller crops, whose masks are finer.
      boxes = data["crop_boxes"]
      areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32)
      data = _select(data, mask_ops.nms(data["boxes"], 1.0 / areas, self.crop_nms_thresh))
    if self.min_mask_region_area > 0:
      data = self.postprocess_small_regions(
          data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))
    return [self._record(data, i) for i in range(len(data["rles"]))]

  def _record(self, data, i) -> Dict[str, Any]:
    rle = data["rles"][i]
    if self.output_mode == "coco_rle":
      segmentation = rle
    elif self.output_mode == "binary_mask":
      segmentation = mask_ops.rle_to_mask(rle)
    else:
      segmentation = mask_ops.uncompressed_rle(mask_ops.rle_to_mask(rle))
    return {
        "segmentation": segmentation,
        "area": mask_ops.area_from_rle(rle),
        "bbox": mask_ops.box_xyxy_to_xywh(data["boxes"][i]),
        "predicted_iou": float(data["iou_preds"][i]),
        "point_coords": [data["points"][i].tolist()],
        "stability_score": float(data["stability_score"][i]),
        "crop_box": mask_ops.box_xyxy_to_xywh(data["crop_boxes"][i]),
    }

  def _process_crop(self, image, crop_box, layer_idx, orig_size, features,
                    input_size) -> Dict[str, Any]:
    x0, y0, x1, y1 = crop_box
    crop_size = (y1 - y0, x1 - x0)
    cache = cache_image(self.model, self.predictor.prompt_params, features)
    points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
    batches = [self._process_batch(points[i:i + self.points_per_batch], crop_size, crop_box,
                                   orig_size, features, cache, input_size)
               for i in range(0, len(points), self.points_per_batch)]
    data = _concat(batches)
    data = _select(data, mask_ops.nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
    offset = np.array([x0, y0])
    data["boxes"] = data["boxes"] + np.tile(offset, 2)
    data["points"] = data["points"] + offset
    data["crop_boxes"] = np.tile(np.array(crop_box), (len(data["rles"]), 1))
    return data

  def _process_batch(self, points, crop_size, crop_box, orig_size, features, cache,
                     input_size) -> Dict[str, Any]:
    n, batch = len(points), self.points_per_batch
    resized = self.predictor.transform.apply_coords(points, crop_size)
    padded = np.zeros((batch, 2), np.float32)
    padded[:n] = resized
    low_res, iou = decode_points(self.model, self.predictor.prompt_params, cache, features,
                                 jnp.asarray(padded))
    thresholds = jnp.array([self.pred_iou_thresh, self.stability_score_thresh,
                            self.stability_score_offset], jnp.float32)
    orig_box = jnp.array([0, 0, orig_size[1], orig_size[0]], jnp.float32)
    valid = jnp.asarray(np.arange(batch) < n)
    crop_size = tuple(crop_size)
    boxes, iou, stability, keep = filter_masks(
        self.model, low_res, iou, valid, jnp.asarray(crop_box, jnp.float32), orig_box, thresholds,
        input_size=input_size, crop_size=crop_size)
    idx = np.flatnonzero(np.asarray(keep))
    n_masks = iou.shape[0] // batch
    kept_masks = np.zeros((0, *crop_size), bool)
    if len(idx):
      # Only the kept masks are made at full size; their number is bucketed
      # so that few compile.
      take = np.pad(idx, (0, bucket(len(idx)) - len(idx)))
      kept = low_res.reshape(-1, *low_res.shape[-2:])[jnp.asarray(take)]
      (full,) = upscale(self.model, kept[None], input_sizes=(input_size,),
                        original_sizes=(crop_size,))
      kept_masks = np.asarray(full)[:len(idx)]
    return {
        "rles": [mask_ops.mask_to_rle(_uncrop_mask(m, crop_box, orig_size)) for m in kept_masks],
        "boxes": np.asarray(boxes)[idx].astype(np.int64),
        "iou_preds": np.asarray(iou)[idx],
        "stability_score": np.asarray(stability)[idx],
        "points": np.repeat(np.pad(points, ((0, batch - n), (0, 0))), n_masks, axis=0)[idx],
    }

  @staticmethod
  def postprocess_small_regions(data: Dict[str, Any], min_area: int,
                                nms_thresh: float) -> Dict[str, Any]:
    """Fills small holes and removes small islands, then drops new duplicates by NMS.

    Masks left unchanged win the NMS over masks that changed, as in the reference.
    """
    if not data["rles"]:
      return data
    masks, scores = [], []
    for rle in data["rles"]:
      mask = mask_ops.rle_to_mask(rle)
      mask, changed_holes = mask_ops.remove_small_regions(mask, min_area, mode="holes")
      mask, changed_islands = mask_ops.remove_small_regions(mask, min_area, mode="islands")
      masks.append(mask)
      scores.append(float(not (changed_holes or changed_islands)))
    boxes = np.stack([np.asarray(mask_ops.masks_to_boxes(jnp.asarray(m))) for m in masks])
    keep = mask_ops.nms(boxes, np.array(scores, np.float32), nms_thresh)
    data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].copy())
    for i in keep:
      if scores[i] == 0.0:
        data["rles"][i] = mask_ops.mask_to_rle(masks[i])
        data["boxes"][i] = boxes[i]
    return _select(data, keep)


def _crop(image: np.ndarray, crop_box) -> np.ndarray:
  x0, y0, x1, y1 = crop_box
  return np.ascontiguousarray(image[y0:y1, x0:x1])


def _uncrop_mask(mask: np.ndarray, crop_box, orig_size: Tuple[int, int]) -> np.ndarray:
  x0, y0, x1, y1 = crop_box
  if (x0, y0, x1, y1) == (0, 0, orig_size[1], orig_size[0]):
    return mask
  full = np.zeros(orig_size, bool)
  full[y0:y1, x0:x1] = mask
  return full


def _concat(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
  out = {}
  for key in parts[0]:
    values = [p[key] for p in parts]
    out[key] = sum(values, []) if isinstance(values[0], list) else np.concatenate(values)
  return out


def _select(data: Dict[str, Any], idx: Optional[np.ndarray]) -> Dict[str, Any]:
  """The records at `idx` (in that order), or a copy of all of them."""
  if idx is None:
    return dict(data)
  return {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] for k, v in data.items()}
