"""Interactive prompt simulation (SAM paper, appendix A), with fixed shapes.

Masks live on the decoder's low-res grid (L, L); one cell is `stride` input
pixels wide. Points are returned as (x, y) input-pixel coordinates, the centre
of the chosen cell, in the convention of `PromptEncoder.embed_points`. All
functions broadcast over leading dimensions and are safe under `jax.jit`.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, PADDING


def sample_uniform(key: jax.Array, region: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """A cell drawn uniformly from the boolean `region` (..., L, L) by a masked argmax.

  Returns (row, col, found); where the region is empty `found` is False and the
  cell is arbitrary.
  """
  h, w = region.shape[-2:]
  scores = jnp.where(region, jax.random.uniform(key, region.shape), -1.0)
  idx = jnp.argmax(scores.reshape(*region.shape[:-2], h * w), axis=-1)
  return idx // w, idx % w, region.any(axis=(-2, -1))


def cell_centre(row: jax.Array, col: jax.Array, stride: float) -> jax.Array:
  """(x, y) pixel coordinates of a cell's centre; the prompt encoder adds 0.5 itself."""
  return jnp.stack([col * stride + (stride - 1) / 2, row * stride + (stride - 1) / 2], axis=-1)


def point_from_mask(key: jax.Array, mask: jax.Array, stride: float):
  """A foreground point drawn uniformly from `mask`: coords (..., 2), found (...)."""
  row, col, found = sample_uniform(key, mask)
  return cell_centre(row, col, stride).astype(jnp.float32), found


def box_from_mask(mask: jax.Array, stride: float) -> jax.Array:
  """The tight (x0, y0, x1, y1) box of `mask` in input pixels (x1, y1 one past the end)."""
  h, w = mask.shape[-2:]
  rows, cols = mask.any(axis=-1), mask.any(axis=-2)
  first = lambda a, n: jnp.argmax(a, axis=-1)  # noqa: E731
  last = lambda a, n: n - 1 - jnp.argmax(a[..., ::-1], axis=-1)  # noqa: E731
  box = jnp.stack([first(cols, w), first(rows, h), last(cols, w) + 1, last(rows, h) + 1], -1)
  return box.astype(jnp.float32) * stride


def jitter_box(key: jax.Array, box: jax.Array, noise_frac: float, noise_max: float,
               image_size) -> jax.Array:
  """Adds to each corner Gaussian noise of std `noise_frac` x the side, at most `noise_max` px.

  Corners stay inside the image: `image_size` is a side or (height, width).
  """
  side = jnp.stack([box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]], -1)
  std = jnp.minimum(noise_frac * jnp.concatenate([side, side], -1), noise_max)
  noisy = box + std * jax.random.normal(key, box.shape)
  h, w = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
  noisy = jnp.clip(noisy, 0.0, jnp.array([w, h, w, h], jnp.float32))
  # Keep the corners ordered so that top-left stays the top-left corner.
  lo = jnp.minimum(noisy[..., :2], noisy[..., 2:])
  hi = jnp.maximum(noisy[..., :2], noisy[..., 2:])
  return jnp.concatenate([lo, hi], -1)


def point_from_error(key: jax.Array, pred: jax.Array, gt: jax.Array, stride: float):
  """A corrective click drawn uniformly from the error region of `pred` against `gt`.

  A false negative cell gives a foreground click, a false positive a background
  one. Returns coords (..., 2) and labels (...); where the prediction has no
  error the label is PADDING, a token masked out of the decoder's attention.
  """
  row, col, found = sample_uniform(key, pred != gt)
  hit = jnp.take_along_axis(
      gt.reshape(*gt.shape[:-2], -1), (row * gt.shape[-1] + col)[..., None], axis=-1)[..., 0]
  label = jnp.where(hit, FOREGROUND, BACKGROUND)
  return cell_centre(row, col, stride).astype(jnp.float32), jnp.where(found, label, PADDING)


def no_point_rounds(key: jax.Array, num_rounds: int, num_no_point: int) -> jax.Array:
  """Which of the rounds 1 .. num_rounds-1 add a click (bool, (num_rounds - 1,)).

  As in the paper: the last round adds none, and num_no_point - 1 more rounds
  without a click are inserted at random among the others.
  """
  n = num_rounds - 1
  if num_no_point <= 0 or n <= 0:
    return jnp.ones((max(n, 0),), bool)
  adds = jnp.ones((n,), bool).at[n - 1].set(False)
  extra = min(num_no_point - 1, n - 1)
  if extra > 0:
    chosen = jax.random.permutation(key, n - 1)[:extra]
    adds = adds.at[chosen].set(False)
  return adds
