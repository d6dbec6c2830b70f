"""Building blocks shared by the three SAM components."""

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x * Phi(x), as torch.nn.GELU (Flax defaults to the tanh form).

  Written with erf, as torch does: `jax.nn.gelu(approximate=False)` uses erfc,
  which is as accurate here and slower on a CPU (BENCHMARKS.md, the mask decoder).
  """
  return x * (1 + jax.lax.erf(x * _SQRT_HALF.astype(x.dtype))) / 2


def layer_norm(eps: float, name: str, dtype=jnp.float32) -> nn.LayerNorm:
  # Flax's default "fast variance" E[x^2] - E[x]^2 loses digits that the
  # reference's two-pass variance keeps; parity needs the two-pass form.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def layer_norm_2d(name: str, dtype=jnp.float32) -> nn.LayerNorm:
  """SAM's LayerNorm2d: a channel LayerNorm (eps 1e-6); channels are last here."""
  return layer_norm(1e-6, name, dtype)


class MLPBlock(nn.Module):
  """Two linear layers with an activation between them (`lin1`, `lin2`)."""
  mlp_dim: int
  act: Callable = gelu
  dtype: jnp.dtype = jnp.float32
  # Logical axis names of the hidden activation (e.g. ("batch", None, None,
  # "mlp")), for tensor parallelism under a mesh; None leaves it to XLA.
  hidden_names: Optional[Tuple[Optional[str], ...]] = None

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x)
    if self.hidden_names is not None:
      x = nn.with_logical_constraint(x, self.hidden_names)
    return nn.Dense(dim, dtype=self.dtype, name="lin2")(self.act(x))


def pack_high_res(embeddings: jax.Array, feat_s0: jax.Array, feat_s1: jax.Array) -> jax.Array:
  """The image embeddings (B, h, w, C) with SAM 2's high-resolution features
  (B, 4h, 4w, C/8) and (B, 2h, 2w, C/4) packed after their channels: (B, h, w, 4C).

  One array, so that everything that passes embeddings on (the predictor, the
  embedding cache, the exports) carries them unchanged; `split_high_res` undoes it.
  """
  b, h, w, c = embeddings.shape
  s0 = feat_s0.reshape(b, h, 4, w, 4, c // 8).transpose(0, 1, 3, 2, 4, 5)
  s1 = feat_s1.reshape(b, h, 2, w, 2, c // 4).transpose(0, 1, 3, 2, 4, 5)
  return jnp.concatenate([embeddings, s0.reshape(b, h, w, 2 * c), s1.reshape(b, h, w, c)], -1)


def split_high_res(packed: jax.Array, dim: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """`pack_high_res`'s output (..., h, w, 4 dim) -> the embeddings (..., h, w, dim) and the
  features in the mask decoder's subpixel layout: (..., h, w, 2, 2, 2, 2, dim/8), the
  row offset in the cell 2a + c at (a, e, c, f), column 2e + f, and (..., h, w, 2, 2, dim/4)."""
  lead = packed.shape[:-1]
  emb, s0, s1 = jnp.split(packed, [dim, 3 * dim], -1)
  s0 = s0.reshape(*lead, 2, 2, 2, 2, dim // 8)  # (a, c, e, f): a row offset 2a + c
  s0 = jnp.moveaxis(s0, -4, -3)  # (a, e, c, f)
  return emb, s0, s1.reshape(*lead, 2, 2, dim // 4)
