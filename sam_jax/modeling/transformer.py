"""The two-way transformer at the heart of SAM's mask decoder."""

import math
from typing import Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import MLPBlock, layer_norm

_EPS = 1e-5  # PyTorch's LayerNorm default, which the decoder's transformer keeps


class Attention(nn.Module):
  """Multi-head attention with an optional projection to fewer channels.

  `key_mask` (B, Nk), True for real keys, removes padded prompt tokens.
  """
  num_heads: int
  downsample_rate: int = 1

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
               key_mask: Optional[jax.Array] = None) -> jax.Array:
    dim = q.shape[-1]
    internal = dim // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide {internal} channels.")
    split = lambda x: einops.rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)  # noqa: E731
    q = split(nn.Dense(internal, name="q_proj")(q))
    k = split(nn.Dense(internal, name="k_proj")(k))
    v = split(nn.Dense(internal, name="v_proj")(v))
    attn = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
      attn = jnp.where(key_mask[:, None, None, :], attn, jnp.finfo(attn.dtype).min)
    out = jax.nn.softmax(attn, axis=-1) @ v
    return nn.Dense(dim, name="out_proj")(einops.rearrange(out, "b h n d -> b n (h d)"))


class TwoWayAttentionBlock(nn.Module):
  """Tokens attend to themselves and to the image; the image attends to tokens."""
  num_heads: int
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
    if self.skip_first_layer_pe:
      queries = Attention(self.num_heads, name="self_attn")(
          queries, queries, queries, token_mask)
    else:
      q = queries + query_pe
      queries = queries + Attention(self.num_heads, name="self_attn")(q, q, queries, token_mask)
    queries = layer_norm(_EPS, "norm1")(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = queries + Attention(self.num_heads, self.attention_downsample_rate,
                                  name="cross_attn_token_to_image")(q, k, keys)
    queries = layer_norm(_EPS, "norm2")(queries)

    queries = queries + MLPBlock(self.mlp_dim, act=nn.relu, name="mlp")(queries)
    queries = layer_norm(_EPS, "norm3")(queries)

    q, k = queries + query_pe, keys + key_pe
    keys = keys + Attention(self.num_heads, self.attention_downsample_rate,
                            name="cross_attn_image_to_token")(k, q, queries, token_mask)
    keys = layer_norm(_EPS, "norm4")(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2

  @nn.compact
  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
               point_embedding: jax.Array, token_mask: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array]:
    """image_embedding, image_pe: (B, h, w, C); point_embedding: (B, T, C).

    Returns the processed tokens (B, T, C) and image keys (B, h*w, C).
    """
    keys = image_embedding.reshape(image_embedding.shape[0], -1, image_embedding.shape[-1])
    key_pe = image_pe.reshape(image_pe.shape[0], -1, image_pe.shape[-1])
    queries = point_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.num_heads, self.mlp_dim, self.attention_downsample_rate,
          skip_first_layer_pe=i == 0, name=f"layers_{i}")(
              queries, keys, point_embedding, key_pe, token_mask)
    q, k = queries + point_embedding, keys + key_pe
    queries = queries + Attention(self.num_heads, self.attention_downsample_rate,
                                  name="final_attn_token_to_image")(q, k, keys)
    return layer_norm(_EPS, "norm_final_attn")(queries), keys
