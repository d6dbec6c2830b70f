"""The two-way transformer at the heart of SAM's mask decoder.

Shapes carry any leading batch dimensions, which broadcast: the decoder passes
the image keys as (B, 1, h*w, C) and the prompt tokens as (B, P, T, C), so the
P prompts of an image share the work that depends on the image alone (the
first layer's image projections) instead of repeating it per prompt, as the
reference does.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import MLPBlock, layer_norm

_EPS = 1e-5  # PyTorch's LayerNorm default, which the decoder's transformer keeps


class Projection(nn.Module):
  """An `nn.Dense`'s parameters (same names, shapes and initialisers), unapplied.

  `Attention` contracts them in whichever order is cheapest, so it needs the
  matrices themselves.
  """
  features: int

  @nn.compact
  def __call__(self, in_features: int) -> Tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))
    return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


def _batch(x: jax.Array) -> int:
  return int(np.prod(x.shape[:-2]))


class Attention(nn.Module):
  """Multi-head attention with an optional projection to fewer channels.

  q (..., Nq, C), k and v (..., Nk, C), leading dimensions broadcasting;
  `key_mask` (..., Nk), True for real keys, removes padded prompt tokens.

  The decoder attends between a few prompt tokens and thousands of image
  tokens. Projecting the image side to the heads costs Nimage x C x C/2 per
  projection, while a head's scores and values only ever meet the image
  tokens through a few token vectors. So the products are associated the
  cheaper way, decided from static shapes (`contraction`):
    "keys":    scores = (q_h W_k,h^T) k^T, values = (P_h v) W_v,h + b_v,h,
               i.e. k and v are never projected (tokens attending to the image);
    "queries": scores = q (W_q,h k_h^T) + b_q,h k_h^T, output = sum_h P_h (v_h W_o,h),
               i.e. q is never projected and the output never leaves C (the
               image attending to tokens);
    "projected": the reference's order, cheapest when the image side is
               shared by many prompts (projected once, used P times).
  All three are the same function up to float rounding (the key bias adds a
  constant to each score row, which softmax ignores; softmax rows sum to 1,
  which moves the value bias out).
  """
  num_heads: int
  downsample_rate: int = 1

  def contraction(self, q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    """The order with the fewest multiply-adds for these shapes."""
    (nq, c), nk = q.shape[-2:], k.shape[-2]
    i, heads = c // self.downsample_rate, self.num_heads
    bq, bk, bv = _batch(q), _batch(k), _batch(v)
    bo = int(np.prod(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])))
    every_pair_in_c = bo * heads * nq * nk * c
    cost = {
        "projected": (bq * nq + (bk + bv) * nk + bo * nq) * c * i + 2 * bo * nq * nk * i,
        "keys": 2 * (bq + bo) * nq * c * i + 2 * every_pair_in_c,
        "queries": 2 * (bk + bv) * nk * c * i + 2 * every_pair_in_c,
    }
    return min(cost, key=cost.get)

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
               key_mask: Optional[jax.Array] = None, contraction: Optional[str] = None
               ) -> jax.Array:
    """`contraction` forces an order (tests); by default the cheapest is taken."""
    dim = q.shape[-1]
    internal = dim // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide {internal} channels.")
    heads, head_dim = self.num_heads, internal // self.num_heads
    contraction = contraction or self.contraction(q, k, v)
    if contraction not in ("projected", "keys", "queries"):
      raise ValueError(f"contraction must be 'projected', 'keys' or 'queries', got "
                       f"{contraction!r}.")
    wq, bq = Projection(internal, name="q_proj")(dim)
    wk, bk = Projection(internal, name="k_proj")(dim)
    wv, bv = Projection(internal, name="v_proj")(dim)
    wo, bo = Projection(dim, name="out_proj")(internal)
    split = lambda x: x.reshape(*x.shape[:-1], heads, head_dim)  # noqa: E731  (..., h, d)
    project = lambda x, w, b: split(x @ w + b)  # noqa: E731
    wo = wo.reshape(heads, head_dim, dim)
    scale = head_dim ** -0.5

    if contraction == "keys":
      # Keys first in the scores, (..., Nk, Nq, h): the image stays in its
      # row-major layout (XLA would otherwise transpose it, which costs more
      # than the product on a CPU).
      qh = project(q, wq, bq) * scale
      scores = jnp.einsum("...kc,...qhc->...kqh", k,
                          jnp.einsum("...qhd,chd->...qhc", qh, split(wk)))
      probs = _softmax(scores, None if key_mask is None else key_mask[..., None, None], axis=-3)
      values = jnp.einsum("...kqh,...kc->...qhc", probs, v)
      heads_out = jnp.einsum("...qhc,chd->...qhd", values, split(wv)) + split(bv)
      return jnp.einsum("...qhd,hdc->...qc", heads_out, wo) + bo

    mask = None if key_mask is None else key_mask[..., None, None, :]
    kh, vh = project(k, wk, bk) * scale, project(v, wv, bv)
    if contraction == "queries":
      scores = jnp.einsum("...qc,...chk->...qhk", q,
                          jnp.einsum("chd,...khd->...chk", split(wq), kh))
      scores += jnp.einsum("hd,...khd->...hk", split(bq), kh)[..., None, :, :]
      probs = _softmax(scores, mask, axis=-1)
      out_per_token = jnp.einsum("...khd,hdc->...hkc", vh, wo)
      return jnp.einsum("...qhk,...hkc->...qc", probs, out_per_token) + bo
    probs = _softmax(jnp.einsum("...qhd,...khd->...qhk", project(q, wq, bq), kh), mask, axis=-1)
    heads_out = jnp.einsum("...qhk,...khd->...qhd", probs, vh)
    return jnp.einsum("...qhd,hdc->...qc", heads_out, wo) + bo


def _softmax(scores: jax.Array, key_mask: Optional[jax.Array], axis: int) -> jax.Array:
  if key_mask is not None:
    scores = jnp.where(key_mask, scores, jnp.finfo(scores.dtype).min)
  return jax.nn.softmax(scores, axis=axis)


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
    """image_embedding, image_pe: (..., h, w, C); point_embedding: (..., T, C).

    Leading dimensions broadcast. Returns the processed tokens (..., T, C)
    and image keys (..., h*w, C).
    """
    keys = image_embedding.reshape(*image_embedding.shape[:-3], -1, image_embedding.shape[-1])
    key_pe = image_pe.reshape(*image_pe.shape[:-3], -1, image_pe.shape[-1])
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
