"""SAM's prompt encoder: points, box corners and dense mask prompts."""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import gelu, layer_norm_2d

# Point labels. The reference knows 1, 0 and -1 (its own padding point, which
# is a real token that the decoder attends to). Box corners are points labelled
# 2 and 3, so that any mix of prompts is one fixed-shape token array. Labels
# below -1 are batch padding: those tokens are masked out of every attention,
# so padding a prompt to a bucket size does not change its masks.
BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3
NOT_A_POINT = -1
PADDING = -2


class PositionEmbeddingRandom(nn.Module):
  """Positional encoding with random spatial frequencies (Tancik et al. 2020)."""
  num_pos_feats: int = 64
  scale: float = 1.0

  def setup(self):
    # A buffer in the reference: it is never trained, here or there.
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix",
        nn.initializers.normal(self.scale), (2, self.num_pos_feats))

  def _pe_encoding(self, coords: jax.Array) -> jax.Array:
    """coords in [0, 1], (..., 2) as (x, y) -> (..., 2 * num_pos_feats)."""
    coords = 2 * coords - 1
    coords = coords @ jax.lax.stop_gradient(self.positional_encoding_gaussian_matrix)
    coords = 2 * np.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def dense(self, size: Tuple[int, int]) -> jax.Array:
    """Encoding of every cell centre of an (h, w) grid: (h, w, C)."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self._pe_encoding(grid)

  def with_coords(self, coords: jax.Array, image_size: Tuple[int, int]) -> jax.Array:
    """Encoding of pixel coordinates (..., 2) as (x, y) in an (H, W) image."""
    scale = jnp.array([image_size[1], image_size[0]], jnp.float32)
    return self._pe_encoding(coords.astype(jnp.float32) / scale)


class PromptEncoder(nn.Module):
  """Sparse (point and box) and dense (mask) prompt embeddings."""
  embed_dim: int = 256
  image_embedding_size: Tuple[int, int] = (64, 64)
  input_image_size: Tuple[int, int] = (1024, 1024)
  mask_in_chans: int = 16

  def setup(self):
    dim = self.embed_dim
    self.pe_layer = PositionEmbeddingRandom(dim // 2)
    # Labels 0 and 1 (background, foreground), then box corners 2 and 3.
    self.point_embeddings = [nn.Embed(1, dim) for _ in range(4)]
    self.not_a_point_embed = nn.Embed(1, dim)
    self.no_mask_embed = nn.Embed(1, dim)
    # Names follow the reference's nn.Sequential indexes (activations hold 2 and 5).
    c = self.mask_in_chans
    self.mask_downscaling_0 = nn.Conv(c // 4, (2, 2), strides=(2, 2), padding="VALID")
    self.mask_downscaling_1 = layer_norm_2d(name=None)
    self.mask_downscaling_3 = nn.Conv(c, (2, 2), strides=(2, 2), padding="VALID")
    self.mask_downscaling_4 = layer_norm_2d(name=None)
    self.mask_downscaling_6 = nn.Conv(dim, (1, 1))

  @property
  def mask_input_size(self) -> Tuple[int, int]:
    return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

  def get_dense_pe(self) -> jax.Array:
    """Positional encoding of the image embedding grid, (1, h, w, C)."""
    return self.pe_layer.dense(self.image_embedding_size)[None]

  def embed_points(self, coords: jax.Array, labels: jax.Array) -> jax.Array:
    """coords (B, N, 2) as (x, y) in input-image pixels; labels (B, N) as above."""
    pe = self.pe_layer.with_coords(coords + 0.5, self.input_image_size)
    table = jnp.concatenate([e.embedding for e in self.point_embeddings], axis=0)
    labels = labels[..., None]
    emb = jnp.where(labels >= 0, pe + table[jnp.clip(labels[..., 0], 0, 3)],
                    self.not_a_point_embed.embedding[0])
    return jnp.where(labels >= NOT_A_POINT, emb, 0.0)

  def embed_masks(self, masks: jax.Array) -> jax.Array:
    """masks (B, 4h, 4w) low-resolution logits -> (B, h, w, C)."""
    x = masks[..., None].astype(jnp.float32)
    x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
    x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
    return self.mask_downscaling_6(x)

  def __call__(
      self,
      points: Optional[Tuple[jax.Array, jax.Array]] = None,
      boxes: Optional[jax.Array] = None,
      masks: Optional[jax.Array] = None,
      pad: Optional[jax.Array] = None,
  ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Embeds a batch of B prompts, as the reference's `PromptEncoder.forward`.

    Args:
      points: (coords (B, N, 2), labels (B, N)) or None.
      boxes: (B, 4) as (x0, y0, x1, y1) or None.
      masks: (B, 4h, 4w) mask logits or None.
      pad: where points come without boxes, the reference appends a not-a-point
        token; None does so for every prompt, a bool (B,) only where True (the
        token is PADDING elsewhere). Training passes box corners as points
        (labels 2 and 3), so that a batch mixes both: its box prompts must not
        get the token, as they do not when given as boxes.

    Returns:
      sparse embeddings (B, T, C), their validity (B, T) (False for padding),
      and dense embeddings (B, h, w, C).
    """
    coords, labels = [], []
    if points is not None:
      coords.append(jnp.asarray(points[0], jnp.float32))
      labels.append(jnp.asarray(points[1], jnp.int32))
      if boxes is None:  # the reference appends one not-a-point in this case
        bs = coords[0].shape[0]
        coords.append(jnp.zeros((bs, 1, 2), jnp.float32))
        label = NOT_A_POINT if pad is None else jnp.where(pad, NOT_A_POINT, PADDING)[:, None]
        labels.append(jnp.broadcast_to(label, (bs, 1)).astype(jnp.int32))
    if boxes is not None:
      boxes = jnp.asarray(boxes, jnp.float32)
      coords.append(boxes.reshape(-1, 2, 2))
      labels.append(jnp.broadcast_to(jnp.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], jnp.int32),
                                     (boxes.shape[0], 2)))
    if coords:
      coords, labels = jnp.concatenate(coords, axis=1), jnp.concatenate(labels, axis=1)
      bs = coords.shape[0]
    else:
      bs = 1 if masks is None else masks.shape[0]
      coords, labels = jnp.zeros((bs, 0, 2)), jnp.zeros((bs, 0), jnp.int32)
    sparse = self.embed_points(coords, labels)
    if masks is not None:
      dense = self.embed_masks(masks)
    else:
      dense = jnp.broadcast_to(self.no_mask_embed.embedding[0],
                               (bs, *self.image_embedding_size, self.embed_dim))
    return sparse, labels >= NOT_A_POINT, dense
