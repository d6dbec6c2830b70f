"""`SamPredictor`: the reference's predictor API on compiled JAX functions.

An image is embedded once by `set_image`; every `predict` then runs the prompt
encoder and the mask decoder as one compiled function, and the upscaling to
the original size as another (so a new image size recompiles only the
upscaling). Prompts are padded to bucket sizes (points with the PADDING label,
which the decoder masks out) so that a new number of points or prompts does
not compile again. `set_image_batch` and `predict_batch` do the
same for many prompts and several images in one call.
"""

import collections
import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sam_jax.modeling.mask_decoder import ImageCache
from sam_jax.modeling.prompt_encoder import PADDING
from sam_jax.modeling.sam import MASK_THRESHOLD, Sam
from sam_jax.transforms import ResizeLongestSide, check_image

VALID_LABELS = (-1, 0, 1)  # not-a-point, background, foreground
PROMPT_SIDE = ("prompt_encoder", "mask_decoder")  # the parameters `Sam.decode` reads


class ImageNotSetError(ValueError, RuntimeError):
  """Prediction before `set_image`. A RuntimeError too, as the reference raises."""


def bucket(n: int, minimum: int = 1) -> int:
  """The next power of two >= max(n, minimum): the padded size of n items."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _pad_axis(x: np.ndarray, size: int, axis: int, value) -> np.ndarray:
  # Not np.pad: a few small prompt arrays per call, where np.pad's overhead
  # (tens of microseconds each) adds up to a noticeable part of a predict.
  out = np.full((*x.shape[:axis], size, *x.shape[axis + 1:]), value, x.dtype)
  out[(slice(None),) * axis + (slice(0, x.shape[axis]),)] = x
  return out


# How often each compiled function was traced. The functions take the model as
# a static argument (Flax modules compare by value), so every predictor of one
# model shares their compilations; tests check that new prompt counts do not
# compile again.
TRACE_COUNTS = collections.Counter()


@functools.partial(jax.jit, static_argnums=0)
def embed_images(model: Sam, params, images: jax.Array) -> jax.Array:
  """(B, H, W, 3) images at the full input size -> (B, h, w, C) embeddings."""
  TRACE_COUNTS["embed"] += 1
  return model.apply({"params": params}, images, method=model.embed_images)


@functools.partial(jax.jit, static_argnums=0)
def cache_image(model: Sam, params, embeddings: jax.Array) -> ImageCache:
  """What every decode on these images would compute from them alone: `Sam.cache_image`."""
  TRACE_COUNTS["cache"] += 1
  return model.apply({"params": params}, embeddings, method=model.cache_image)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("multimask_output",))
def decode(model: Sam, params, cache, embeddings, coords, labels, boxes, masks,
           multimask_output=True):
  """(B, P) prompts -> low-resolution logits (B, P, M, 4h, 4w) and IoUs (B, P, M)."""
  TRACE_COUNTS["decode"] += 1
  return model.apply({"params": params}, embeddings, coords, labels, boxes, masks,
                     multimask_output, cache, method=model.decode)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("input_sizes", "original_sizes", "return_logits"))
def upscale(model: Sam, low_res, input_sizes, original_sizes, return_logits=False):
  """Each image's (P, M, 4h, 4w) logits at its original size, thresholded unless `return_logits`.

  Apart from `decode`, so that a new image size compiles only this.
  """
  TRACE_COUNTS["upscale"] += 1
  full = []
  for b, (input_size, original_size) in enumerate(zip(input_sizes, original_sizes)):
    up = model.postprocess_masks(low_res[b], input_size, original_size)
    full.append(up if return_logits else up > MASK_THRESHOLD)
  return tuple(full)


class SamPredictor:
  """Embeds images once, then predicts masks for prompts on them.

  Attributes:
    original_size: (H, W) of the image set, as given to `set_image`.
    input_size: (h, w) it was resized to before the encoder.
    is_image_set: whether an image has been set.
  """

  def __init__(self, model: Sam, params, min_point_bucket: int = 4,
               mesh: Optional[Mesh] = None) -> None:
    """`min_point_bucket`: points per prompt are padded to a power of two, at least this.

    `mesh`: `set_image_batch` splits the images over all of its devices, with
    the parameters replicated on each (data-parallel encoding); the batch is
    filled up to a multiple of the device count and the filler dropped.
    """
    self.model = model
    self.mesh = mesh
    # On the device once: host (NumPy) parameters would be copied at every call.
    self.params = jax.device_put(params, None if mesh is None else NamedSharding(mesh, P()))
    # What the calls after the encoder read: a jitted call flattens every array
    # it is passed, and the encoder's are most of them (BENCHMARKS.md, predict).
    self.prompt_params = {k: self.params[k] for k in PROMPT_SIDE}
    size = model.image_size
    self.transform = ResizeLongestSide(size[0] if size[0] == size[1] else size)
    self.min_point_bucket = min_point_bucket
    self.reset_image()

  # --- images -------------------------------------------------------------

  def reset_image(self) -> None:
    """Forgets the image(s) set."""
    self.is_image_set = False
    self.features = None
    self.cache = None
    self.original_sizes: List[Tuple[int, int]] = []
    self.input_sizes: List[Tuple[int, int]] = []

  @property
  def original_size(self) -> Optional[Tuple[int, int]]:
    return self._single(self.original_sizes)

  @property
  def input_size(self) -> Optional[Tuple[int, int]]:
    return self._single(self.input_sizes)

  def _single(self, sizes):
    if len(sizes) > 1:
      raise ValueError(f"{len(sizes)} images are set; use original_sizes and input_sizes.")
    return sizes[0] if sizes else None

  def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
    """Embeds one (H, W, 3) uint8 image in RGB or BGR order."""
    self.set_image_batch([image], image_format)

  def set_image_batch(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
    """Embeds several (H, W, 3) uint8 images, of any sizes, in one encoder call."""
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    if not isinstance(images, (list, tuple)) or not images:
      raise ValueError("set_image_batch takes a non-empty list of (H, W, 3) uint8 images.")
    batch = []
    for i, image in enumerate(images):
      check_image(image, f"image {i}" if len(images) > 1 else "image")
      if image_format == "BGR":
        image = image[..., ::-1]
      batch.append(self.transform.apply_image(np.ascontiguousarray(image)))
    self.reset_image()
    self.original_sizes = [tuple(im.shape[:2]) for im in images]
    self.input_sizes = [tuple(im.shape[:2]) for im in batch]
    self.features = self._embed(self.pad_images(batch))
    self.cache = cache_image(self.model, self.prompt_params, self.features)
    self.is_image_set = True

  def _embed(self, images: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return embed_images(self.model, self.params, jnp.asarray(images))
    n = len(images)
    filler = np.broadcast_to(images[:1], (-n % self.mesh.devices.size, *images.shape[1:]))
    images = jax.device_put(np.concatenate([images, filler]),
                            NamedSharding(self.mesh, P(tuple(self.mesh.axis_names))))
    return embed_images(self.model, self.params, images)[:n]

  def pad_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Resized images -> (B, H, W, 3) float32 at the full input size.

    The padding is the pixel mean, which normalises to exactly the zeros the
    model pads with, so any aspect ratio runs through one compiled encoder.
    """
    h, w = self.model.image_size
    out = np.empty((len(images), h, w, 3), np.float32)
    out[:] = np.asarray(self.model.pixel_mean, np.float32)
    for i, im in enumerate(images):
      out[i, :im.shape[0], :im.shape[1]] = im
    return out

  def get_image_embedding(self) -> jax.Array:
    """The embedding(s) of the image(s) set, (B, h, w, C) channels-last as `Sam.decode` takes."""
    self._check_image_set()
    return self.features

  def _check_image_set(self) -> None:
    if not self.is_image_set:
      raise ImageNotSetError("An image must be set with .set_image(...) before mask prediction.")

  # --- prompts ------------------------------------------------------------

  def predict(
      self,
      point_coords: Optional[np.ndarray] = None,
      point_labels: Optional[np.ndarray] = None,
      box: Optional[np.ndarray] = None,
      mask_input: Optional[np.ndarray] = None,
      multimask_output: bool = True,
      return_logits: bool = False,
  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks for one prompt on the image set, as the reference's `predict`.

    Args:
      point_coords: (N, 2) points as (x, y) pixels of the original image.
      point_labels: (N,) 1 foreground, 0 background, -1 ignored.
      box: (4,) as (x0, y0, x1, y1) pixels of the original image.
      mask_input: (1, 256, 256) low-resolution logits of an earlier prediction.
      multimask_output: three masks for an ambiguous prompt, or one.
      return_logits: logits instead of boolean masks.

    Returns:
      masks (C, H, W), IoU predictions (C,) and low-resolution logits
      (C, 256, 256), C = 3 or 1.
    """
    self._check_image_set()
    if len(self.original_sizes) > 1:
      raise ValueError("Several images are set: use predict_batch.")
    add = lambda x: None if x is None else np.asarray(x)[None]  # noqa: E731
    masks, iou, low_res = self.predict_batch(
        add(point_coords), add(point_labels), add(box), add(mask_input), multimask_output,
        return_logits)
    return masks[0], iou[0], low_res[0]

  def predict_batch(
      self,
      point_coords=None,
      point_labels=None,
      boxes=None,
      mask_input=None,
      multimask_output: bool = True,
      return_logits: bool = False,
  ):
    """Masks for P prompts at once, on the image or on each of the images set.

    With one image set: point_coords (P, N, 2), point_labels (P, N), boxes
    (P, 4) and mask_input (P, 1, 256, 256), any of them None, returning masks
    (P, C, H, W), IoU predictions (P, C) and low-resolution logits
    (P, C, 256, 256). With B images set, each argument is a length-B sequence
    of those (the number of prompts and points may differ between images) and
    the results are length-B lists. Coordinates are pixels of the original images.
    """
    self._check_image_set()
    n_images = len(self.original_sizes)
    args = dict(point_coords=point_coords, point_labels=point_labels, boxes=boxes,
                mask_input=mask_input)
    if n_images == 1:
      per_image = [args]
    else:
      for name, value in args.items():
        if value is not None and len(value) != n_images:
          raise ValueError(f"{n_images} images are set: {name} must have one entry per image, "
                           f"got {len(value)}.")
      per_image = [{k: None if v is None else v[i] for k, v in args.items()}
                   for i in range(n_images)]
    kinds = {tuple(k for k, v in a.items() if v is not None) for a in per_image}
    if len(kinds) > 1:
      raise ValueError("Every image needs the same kinds of prompt (points, boxes, masks); got "
                       f"{sorted(kinds)}.")
    prompts = [self._check_prompts(i, **a) for i, a in enumerate(per_image)]
    counts = [p[0] for p in prompts]
    coords, labels, boxes_, masks = self._stack_padded([p[1:] for p in prompts])
    low_res, iou = decode(self.model, self.prompt_params, self.cache, self.features, coords,
                          labels, boxes_, masks, multimask_output=multimask_output)
    full = upscale(self.model, low_res, input_sizes=tuple(self.input_sizes),
                   original_sizes=tuple(self.original_sizes), return_logits=return_logits)
    iou, low_res = np.asarray(iou), np.asarray(low_res)
    # Sliced on the device (a dispatch) only where there is padding to drop.
    out = [(np.asarray(full[b] if n == len(full[b]) else full[b][:n]), iou[b, :n], low_res[b, :n])
           for b, n in enumerate(counts)]
    if n_images == 1:
      return out[0]
    return tuple(list(x) for x in zip(*out))

  def _check_prompts(self, index, point_coords, point_labels, boxes, mask_input):
    """Validates one image's prompts; returns (P, coords, labels, boxes, masks) resized."""
    where = f" (image {index})" if len(self.original_sizes) > 1 else ""
    if point_coords is None and boxes is None and mask_input is None:
      raise ValueError(f"No prompt{where}: give point_coords and point_labels, a box or a "
                       "mask_input.")
    if (point_coords is None) != (point_labels is None):
      raise ValueError(f"point_coords and point_labels go together{where}; one of them is None.")
    original_size = self.original_sizes[index]
    counts = {}
    coords = labels = None
    if point_coords is not None:
      coords, labels = self._check_points(point_coords, point_labels, original_size, where)
      counts["point_coords"] = len(coords)
      coords = self.transform.apply_coords(coords, original_size)
    if boxes is not None:
      boxes = self._check_boxes(boxes, original_size, where)
      counts["boxes"] = len(boxes)
      boxes = self.transform.apply_boxes(boxes, original_size)
    if mask_input is not None:
      mask_input = self._check_masks(mask_input, where)
      counts["mask_input"] = len(mask_input)
    if len(set(counts.values())) > 1:
      raise ValueError(f"Prompts disagree on the number of prompts{where}: {counts}.")
    return next(iter(counts.values())), coords, labels, boxes, mask_input

  @staticmethod
  def _check_points(coords, labels, original_size, where):
    coords, labels = np.asarray(coords), np.asarray(labels)
    if coords.ndim != 3 or coords.shape[-1] != 2:
      raise ValueError(f"point_coords{where} must be (N, 2) (x, y) pixels, got shape "
                       f"{coords.shape[1:]}.")
    if labels.shape != coords.shape[:-1]:
      raise ValueError(f"point_labels{where} must have shape {coords.shape[1:-1]} to match "
                       f"point_coords, got {labels.shape[1:]}.")
    if coords.shape[1] == 0:
      raise ValueError(f"point_coords{where} is empty: give at least one point, or None.")
    if not np.issubdtype(coords.dtype, np.number) or not np.all(np.isfinite(coords)):
      raise ValueError(f"point_coords{where} must be finite numbers.")
    h, w = original_size
    outside = (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | \
        (coords[..., 1] > h)
    if outside.any():
      bad = coords[outside][0].tolist()
      raise ValueError(f"Point {bad}{where} is outside the {w}x{h} (width x height) image; "
                       "points are (x, y) pixels of the original image.")
    if not np.all(np.isin(labels, VALID_LABELS)):
      bad = sorted(set(np.unique(labels).tolist()) - set(VALID_LABELS))
      raise ValueError(f"point_labels{where} must be 1 (foreground), 0 (background) or -1 "
                       f"(ignored), got {bad}.")
    return coords.astype(np.float64), labels.astype(np.int32)

  @staticmethod
  def _check_boxes(boxes, original_size, where):
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
      raise ValueError(f"box{where} must be (x0, y0, x1, y1), got shape {boxes.shape[1:]}.")
    if not np.issubdtype(boxes.dtype, np.number) or not np.all(np.isfinite(boxes)):
      raise ValueError(f"box{where} must be finite numbers.")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
      raise ValueError(f"box{where} must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1.")
    h, w = original_size
    if np.any(boxes < 0) or np.any(boxes[:, 0::2] > w) or np.any(boxes[:, 1::2] > h):
      raise ValueError(f"box{where} reaches outside the {w}x{h} (width x height) image.")
    return boxes.astype(np.float64)

  def _check_masks(self, masks, where):
    masks = np.asarray(masks)
    want = self.model.prompt_encoder.mask_input_size
    if masks.shape[1:] != (1, *want):
      raise ValueError(f"mask_input{where} must have shape (1, {want[0]}, {want[1]}) per prompt "
                       f"(low-resolution logits of an earlier prediction), got {masks.shape[1:]}.")
    if not np.issubdtype(masks.dtype, np.number) or not np.all(np.isfinite(masks)):
      raise ValueError(f"mask_input{where} must be finite numbers (logits), but holds NaN or "
                       "Inf.")
    return masks.astype(np.float32)

  def _stack_padded(self, prompts):
    """Pads every image's prompts to one (B, P, N) bucketed shape."""
    n_prompts = bucket(max(len(next(x for x in p if x is not None)) for p in prompts))
    coords, labels, boxes, masks = zip(*prompts)
    out_coords = out_labels = out_boxes = out_masks = None
    if coords[0] is not None:
      n = bucket(max(c.shape[1] for c in coords), self.min_point_bucket)
      out_coords = np.stack([_pad_axis(_pad_axis(c, n, 1, 0.0), n_prompts, 0, 0.0)
                             for c in coords]).astype(np.float32)
      out_labels = np.stack([_pad_axis(_pad_axis(lab, n, 1, PADDING), n_prompts, 0, PADDING)
                             for lab in labels])
    if boxes[0] is not None:
      out_boxes = np.stack([_pad_axis(b, n_prompts, 0, 0.0) for b in boxes]).astype(np.float32)
    if masks[0] is not None:
      out_masks = np.stack([_pad_axis(m[:, 0], n_prompts, 0, 0.0) for m in masks])
    return out_coords, out_labels, out_boxes, out_masks
