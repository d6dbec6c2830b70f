"""The whole SAM model: image normalisation and padding, the three components,
and mask postprocessing, as in the reference's `Sam`."""

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.image_encoder import ImageEncoderViT, linear_resize_matrix
from sam_jax.modeling.mask_decoder import ImageCache, MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder

MASK_THRESHOLD = 0.0


class Sam(nn.Module):
  """Segment Anything.

  Images are (B, H, W, 3) RGB in [0, 255], already resized so that the longest
  side is the model's image size (`sam_jax.transforms.ResizeLongestSide`).
  Prompts come P to an image: point coordinates (B, P, N, 2) as (x, y) in the
  resized image's pixels with labels (B, P, N), boxes (B, P, 4), and mask
  logits (B, P, 4h, 4w) from an earlier prediction.
  """
  image_encoder: ImageEncoderViT
  prompt_encoder: PromptEncoder
  mask_decoder: MaskDecoder
  pixel_mean: Sequence[float] = (123.675, 116.28, 103.53)
  pixel_std: Sequence[float] = (58.395, 57.12, 57.375)

  @property
  def image_size(self) -> Tuple[int, int]:
    return tuple(self.image_encoder.image_size)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """Normalises and zero-pads (bottom and right) to the encoder's input size."""
    h, w = images.shape[1:3]
    if h > self.image_size[0] or w > self.image_size[1]:
      raise ValueError(
          f"Images of {h}x{w} are larger than the model's input {self.image_size}: "
          "resize them with sam_jax.transforms.ResizeLongestSide first.")
    x = (images - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    return jnp.pad(x, ((0, 0), (0, self.image_size[0] - h), (0, self.image_size[1] - w), (0, 0)))

  def embed_images(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, 3) images -> (B, h, w, C) image embeddings."""
    return self.image_encoder(self.preprocess(images), train)

  def cache_image(self, image_embeddings: jax.Array) -> ImageCache:
    """What `decode` computes from the image embeddings alone, for prompts without masks.

    A caller that decodes prompts on one image again and again keeps it and
    passes it to `decode`: the positional encoding's sines, the no-mask
    embedding's sum and the transformer's first projections of the image are
    then not redone (the `predict` rows of BENCHMARKS.md time it).
    """
    no_mask = self.prompt_encoder.no_mask_embed.embedding[0]
    return self.mask_decoder.cache_image(image_embeddings, self.prompt_encoder.get_dense_pe(),
                                         no_mask)

  def decode(
      self,
      image_embeddings: jax.Array,
      point_coords: Optional[jax.Array] = None,
      point_labels: Optional[jax.Array] = None,
      boxes: Optional[jax.Array] = None,
      mask_inputs: Optional[jax.Array] = None,
      multimask_output: bool = True,
      cache: Optional[ImageCache] = None,
      pad: Optional[jax.Array] = None,
  ) -> Tuple[jax.Array, jax.Array]:
    """Masks for P prompts on each of B embedded images.

    `cache` is `cache_image(image_embeddings)`, kept by the caller; prompts
    with mask inputs use only its positional encoding. `pad` (B, P): which
    prompts of points without boxes get the reference's not-a-point token
    (None: all); see `PromptEncoder.__call__`.

    Returns low-resolution mask logits (B, P, M, 4h, 4w) and IoU predictions
    (B, P, M), with M = 3 for multimask output and 1 otherwise.
    """
    prompts = [x for x in (point_coords, boxes, mask_inputs) if x is not None]
    if not prompts:
      raise ValueError("Give at least one prompt: points, boxes or mask inputs.")
    b, p = prompts[0].shape[:2]
    flat = lambda x: None if x is None else x.reshape(b * p, *x.shape[2:])  # noqa: E731
    points = None if point_coords is None else (flat(point_coords), flat(point_labels))
    sparse, sparse_mask, dense = self.prompt_encoder(points, flat(boxes), flat(mask_inputs),
                                                     flat(pad))
    unflat = lambda x: x.reshape(b, p, *x.shape[1:])  # noqa: E731
    sparse, sparse_mask = unflat(sparse), unflat(sparse_mask)
    if cache is not None and mask_inputs is None:
      return self.mask_decoder.decode_cached(cache, sparse, multimask_output, sparse_mask)
    # Without mask prompts every prompt has the same dense embedding; keeping it
    # shared lets the decoder do the image's own work once, not once per prompt.
    dense = dense[:1, None] if mask_inputs is None else unflat(dense)
    image_pe = self.prompt_encoder.get_dense_pe() if cache is None else cache.image_pe
    return self.mask_decoder(image_embeddings, image_pe, sparse, dense, multimask_output,
                             sparse_mask)

  def __call__(self, images, point_coords=None, point_labels=None, boxes=None,
               mask_inputs=None, multimask_output=True, train=False):
    """`embed_images` then `decode`; see those."""
    return self.decode(self.embed_images(images, train), point_coords, point_labels, boxes,
                       mask_inputs, multimask_output)

  def postprocess_masks(self, masks: jax.Array, input_size: Tuple[int, int],
                        original_size: Tuple[int, int]) -> jax.Array:
    """Low-res logits (..., 4h, 4w) -> logits (..., H0, W0) at the original size.

    The reference upscales bilinearly to the padded input, crops the padding
    away and resizes bilinearly to the original image. All three are linear
    and separable, so each axis is one (H0, 4h) matrix: the same values,
    without the 1024 x 1024 intermediate. The columns are a matmul at the
    low resolution, which XLA materialises; the rows a few gathers
    (`_apply_banded`), which XLA fuses into the consumers of the result.
    Both other orders are slower on large photos (BENCHMARKS.md's `predict`
    row at 1500 x 2250). A caller that reads the result several times does so
    a mask or a few at a time, while they are in cache (the automatic mask
    generator's `filter_masks`).
    """
    def axis(low: int, padded: int, valid: int, original: int) -> np.ndarray:
      return linear_resize_matrix(valid, original) @ linear_resize_matrix(low, padded)[:valid]
    rows = axis(masks.shape[-2], self.image_size[0], input_size[0], original_size[0])
    cols = axis(masks.shape[-1], self.image_size[1], input_size[1], original_size[1])
    masks = jnp.einsum("...hw,Ww->...hW", masks, jnp.asarray(cols),
                       precision=jax.lax.Precision.HIGHEST)  # thresholded at 0: no TF32
    return _apply_banded(masks, rows, -2)


def _apply_banded(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
  """`matrix` (R, n) applied to `x` along `axis` (of length n).

  A composed interpolation matrix has its nonzeros on a run of two or three
  columns per row, so it is applied as that many gathers, weighted and summed,
  rather than as a dense product (a hundred times the arithmetic).
  """
  nonzero = matrix != 0
  first = nonzero.argmax(1)
  last = matrix.shape[1] - 1 - nonzero[:, ::-1].argmax(1)
  width = int((last - first).max()) + 1
  index = np.minimum(first, matrix.shape[1] - width)[:, None] + np.arange(width)
  weight = np.take_along_axis(matrix, index, 1)
  shape = [1] * x.ndim
  shape[axis] = matrix.shape[0]
  return sum(jnp.take(x, index[:, j], axis=axis) * weight[:, j].reshape(shape)
             for j in range(width))
