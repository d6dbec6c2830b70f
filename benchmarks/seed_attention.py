"""The image encoder's attention as it was before the fast path (commit dbef528),
for before/after rows: it scores every query at once and materialises the
(heads, N, N) relative-position bias.

`seed_attention()` swaps it into sam_jax.modeling.image_encoder while a model
is traced; parameter names and shapes are the same, so the same params serve.
"""

import contextlib
from typing import Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling import image_encoder as ie


def decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, q_size, k_size):
  """The relative-position bias materialised as (B, qh*qw, kh*kw), as before."""
  rel_h, rel_w = ie.decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
  bias = rel_h[:, :, :, None] + rel_w[:, :, None, :]
  return bias.reshape(q.shape[0], q.shape[1], k_size[0] * k_size[1])


class SeedAttention(nn.Module):
  num_heads: int
  use_rel_pos: bool = True
  input_size: Tuple[int, int] = (14, 14)
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  implementation: str = "xla"  # only XLA's, as before

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    q, k, v = einops.rearrange(
        qkv, "b h w (three n d) -> three (b n) (h w) d", three=3, n=self.num_heads)
    attn = (q * head_dim**-0.5) @ jnp.swapaxes(k, -1, -2)
    if self.use_rel_pos:
      init = nn.initializers.zeros
      rel_pos_h = self.param("rel_pos_h", init, (2 * self.input_size[0] - 1, head_dim))
      rel_pos_w = self.param("rel_pos_w", init, (2 * self.input_size[1] - 1, head_dim))
      attn = attn + decomposed_rel_pos_bias(
          q, rel_pos_h.astype(q.dtype), rel_pos_w.astype(q.dtype), (h, w), (h, w))
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
    x = einops.rearrange(attn @ v, "(b n) (h w) d -> b h w (n d)", b=b, h=h)
    return nn.Dense(dim, dtype=self.dtype, name="proj")(x)


@contextlib.contextmanager
def seed_attention():
  """Within: models traced use SeedAttention. Compile inside, run anywhere."""
  fast = ie.Attention
  ie.Attention = SeedAttention
  try:
    yield
  finally:
    ie.Attention = fast
