"""The two-way transformer at the heart of SAM's mask decoder.

Shapes carry any leading batch dimensions, which broadcast: the decoder passes
the image keys as (B, 1, h*w, C) and the prompt tokens as (B, P, T, C), so the
P prompts of an image share the work that depends on the image alone instead
of repeating it per prompt, as the reference does. That work (the first
layer's projections of the image) can also be kept across calls:
`TwoWayTransformer.image_heads`.
"""

from typing import Dict, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
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
  in_features: int
  features: int

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.in_features, self.features))
    return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


class Heads(NamedTuple):
  """Queries, keys or values already projected to the heads: (..., heads, N, head_dim).

  Made by `Attention.project`; keys come scaled by head_dim ** -0.5. Heads-major,
  as the per-head products read them: in (N, heads) order XLA transposed the
  kept image projections at every call (`python -m benchmarks.profile_predict`).
  """
  x: jax.Array


Side = Union[jax.Array, Heads]
SCORES = ("project", "fold_wk", "fold_wq")
OUTPUTS = ("project", "fold_wv", "fold_wo")


def _tokens(x: Side) -> int:
  return (x.x if isinstance(x, Heads) else x).shape[-2]


def _kept_in_c(q: Side, k: Side, v: Side) -> Dict[str, Side]:
  """The side each folding order keeps in C, which therefore must come unprojected."""
  return {"fold_wk": k, "fold_wq": q, "fold_wv": v}


def _batch_shape(x: Side) -> Tuple[int, ...]:
  return x.x.shape[:-3] if isinstance(x, Heads) else x.shape[:-2]


class Attention(nn.Module):
  """Multi-head attention with an optional projection to fewer channels.

  q (..., Nq, C), k and v (..., Nk, C), leading dimensions broadcasting, or
  any of them as `Heads` projected beforehand; `key_mask` (..., Nk), True for
  real keys, removes padded prompt tokens.

  The decoder attends between a few prompt tokens and thousands of image
  tokens. Projecting the image side to the heads costs Nimage x C x C/2 per
  projection, while a head's scores and values only ever meet the image
  tokens through a few token vectors. So the products are associated the
  cheaper way, chosen from static shapes (`contraction`), for the scores:
    "project": (q W_q,h + b_q,h)(k W_k,h + b_k,h)^T, the reference's order,
               cheapest when the image side is shared by many prompts;
    "fold_wk": (q_h W_k,h^T) k^T: k is never projected (tokens attending to
               the image);
    "fold_wq": q (W_q,h k_h^T) + b_q,h k_h^T: q is never projected (the image
               attending to tokens);
  and for the output, from the probabilities P_h:
    "project": (P_h v_h) W_o,h summed over heads;
    "fold_wv": (P_h v) W_v,h + b_v,h, then W_o: v is never projected;
    "fold_wo": P_h (v_h W_o,h) summed over heads: the output never leaves C.
  All are the same function up to float rounding (the key bias adds a
  constant to each score row, which softmax ignores; softmax rows sum to 1,
  which moves the value bias out).

  `dtype`: the compute dtype; the parameters are cast to it and softmax runs in float32.
  """
  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    dim, internal = self.embedding_dim, self.embedding_dim // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide {internal} channels.")
    self.q_proj = Projection(dim, internal)
    self.k_proj = Projection(dim, internal)
    self.v_proj = Projection(dim, internal)
    self.out_proj = Projection(internal, dim)

  def _weights(self, proj: Projection) -> Tuple[jax.Array, jax.Array]:
    return promote_dtype(*proj(), dtype=self.dtype)

  @property
  def head_dim(self) -> int:
    return self.embedding_dim // self.downsample_rate // self.num_heads

  def _split(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, -1)

  def project(self, x: jax.Array, which: str) -> Heads:
    """x (..., N, C) projected as the queries ("q"), keys ("k") or values ("v")."""
    w, b = self._weights({"q": self.q_proj, "k": self.k_proj, "v": self.v_proj}[which])
    heads = self._split(x @ w + b)
    heads = jnp.swapaxes(heads, -2, -3)
    return Heads(heads * self.head_dim ** -0.5 if which == "k" else heads)

  def contraction(self, q: Side, k: Side, v: Side) -> Tuple[str, str]:
    """The (scores, output) orders with the fewest multiply-adds for these shapes."""
    # A symbolic token count (a shape-polymorphic export) is costed as a few prompt points.
    nq, nk = (n if isinstance(n, int) else 8 for n in (_tokens(q), _tokens(k)))
    c = self.embedding_dim
    i, heads = c // self.downsample_rate, self.num_heads
    bq, bk, bv = (int(np.prod(_batch_shape(x))) for x in (q, k, v))
    bo = int(np.prod(np.broadcast_shapes(*(_batch_shape(x) for x in (q, k, v)))))
    every_pair_in_c = bo * heads * nq * nk * c
    project = lambda x, b, n: 0 if isinstance(x, Heads) else b * n * c * i  # noqa: E731
    scores = {
        "project": project(q, bq, nq) + project(k, bk, nk) + bo * nq * nk * i,
        "fold_wk": project(q, bq, nq) + bq * nq * i * c + every_pair_in_c,
        "fold_wq": project(k, bk, nk) + bk * nk * i * c + every_pair_in_c,
    }
    output = {
        "project": project(v, bv, nk) + bo * nq * nk * i + bo * nq * i * c,
        "fold_wv": every_pair_in_c + 2 * bo * nq * c * i,
        "fold_wo": project(v, bv, nk) + bv * nk * i * c + every_pair_in_c,
    }
    for order, side in _kept_in_c(q, k, v).items():
      if isinstance(side, Heads):
        (scores if order in scores else output).pop(order)
    return min(scores, key=scores.get), min(output, key=output.get)

  def __call__(self, q: Side, k: Side, v: Side, key_mask: Optional[jax.Array] = None,
               contraction: Optional[Tuple[str, str]] = None) -> jax.Array:
    """`contraction` forces the (scores, output) orders (tests); by default the cheapest."""
    scores_order, output_order = contraction or self.contraction(q, k, v)
    if scores_order not in SCORES or output_order not in OUTPUTS:
      raise ValueError(f"contraction must be a (scores, output) pair from {SCORES} and "
                       f"{OUTPUTS}, got {contraction!r}.")
    for order in (scores_order, output_order):
      if isinstance(_kept_in_c(q, k, v).get(order), Heads):
        raise ValueError(f"The {order!r} order needs that side unprojected, not Heads.")
    wq, bq = self._weights(self.q_proj)
    wk, _ = self._weights(self.k_proj)
    wv, bv = self._weights(self.v_proj)
    wo, bo = self._weights(self.out_proj)
    wo = wo.reshape(self.num_heads, self.head_dim, -1)
    heads = lambda x, which: x.x if isinstance(x, Heads) else self.project(x, which).x  # noqa: E731

    # Scores laid out (..., Nk, Nq, h) when k stays in C: the image keeps its
    # row-major layout (XLA would otherwise transpose it, which costs more
    # than the product on a CPU). Projected heads are heads-major throughout.
    if scores_order == "fold_wk":
      layout, axis = "kqh", -3
      folded = jnp.einsum("...hqd,chd->...qhc", heads(q, "q") * self.head_dim ** -0.5,
                          self._split(wk))
      scores = jnp.einsum("...kc,...qhc->...kqh", k, folded)
    elif scores_order == "fold_wq":
      layout, axis = "qhk", -1
      kh = heads(k, "k")
      scores = jnp.einsum("...qc,...chk->...qhk", q, jnp.einsum("chd,...hkd->...chk",
                                                                self._split(wq), kh))
      scores += jnp.einsum("hd,...hkd->...hk", self._split(bq), kh)[..., None, :, :]
    else:
      layout, axis = "hqk", -1
      scores = jnp.einsum("...hqd,...hkd->...hqk", heads(q, "q"), heads(k, "k"))
    if key_mask is not None:
      mask = key_mask[..., None, None] if layout == "kqh" else key_mask[..., None, None, :]
      scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=axis).astype(self.dtype)

    if output_order == "fold_wo":
      out_per_token = jnp.einsum("...hkd,hdc->...hkc", heads(v, "v"), wo)
      return jnp.einsum(f"...{layout},...hkc->...qc", probs, out_per_token) + bo
    if output_order == "fold_wv":
      values = jnp.einsum(f"...{layout},...kc->...qhc", probs, v)
      heads_out = jnp.einsum("...qhc,chd->...qhd", values, self._split(wv)) + self._split(bv)
      return jnp.einsum("...qhd,hdc->...qc", heads_out, wo) + bo
    heads_out = jnp.einsum(f"...{layout},...hkd->...hqd", probs, heads(v, "v"))
    return jnp.einsum("...hqd,hdc->...qc", heads_out, wo) + bo


class TwoWayAttentionBlock(nn.Module):
  """Tokens attend to themselves and to the image; the image attends to tokens."""
  embedding_dim: int
  num_heads: int
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    dim, heads, rate = self.embedding_dim, self.num_heads, self.attention_downsample_rate
    dt = self.dtype
    self.self_attn = Attention(dim, heads, dtype=dt)
    self.norm1 = layer_norm(_EPS, None, dt)
    self.cross_attn_token_to_image = Attention(dim, heads, rate, dt)
    self.norm2 = layer_norm(_EPS, None, dt)
    self.mlp = MLPBlock(self.mlp_dim, act=nn.relu, dtype=dt)
    self.norm3 = layer_norm(_EPS, None, dt)
    self.norm4 = layer_norm(_EPS, None, dt)
    self.cross_attn_image_to_token = Attention(dim, heads, rate, dt)

  def image_heads(self, keys: jax.Array, key_pe: jax.Array) -> Dict[str, Heads]:
    """The block's projections of the image keys alone, which a caller may keep.

    Valid for every call with these keys: `__call__(..., image_heads=)`.
    """
    k = keys + key_pe
    return {"token_to_image_k": self.cross_attn_token_to_image.project(k, "k"),
            "token_to_image_v": self.cross_attn_token_to_image.project(keys, "v"),
            "image_to_token_q": self.cross_attn_image_to_token.project(k, "q")}

  def __call__(self, queries, keys, query_pe, key_pe, token_mask=None,
               image_heads: Optional[Dict[str, Heads]] = None):
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries, token_mask)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries, token_mask)
    queries = self.norm1(queries)

    q = queries + query_pe
    if image_heads is None:
      k = keys + key_pe
      image_heads = {"token_to_image_k": k, "token_to_image_v": keys, "image_to_token_q": k}
    queries = queries + self.cross_attn_token_to_image(
        q, image_heads["token_to_image_k"], image_heads["token_to_image_v"])
    queries = self.norm2(queries)

    queries = queries + self.mlp(queries)
    queries = self.norm3(queries)

    q = queries + query_pe
    keys = keys + self.cross_attn_image_to_token(image_heads["image_to_token_q"], q, queries,
                                                  token_mask)
    return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
  embedding_dim: int = 256
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  dtype: jnp.dtype = jnp.float32  # compute dtype; inputs and parameters are cast to it

  def setup(self):
    self.layers = [
        TwoWayAttentionBlock(self.embedding_dim, self.num_heads, self.mlp_dim,
                             self.attention_downsample_rate, skip_first_layer_pe=i == 0,
                             dtype=self.dtype)
        for i in range(self.depth)]
    self.final_attn_token_to_image = Attention(self.embedding_dim, self.num_heads,
                                               self.attention_downsample_rate, self.dtype)
    self.norm_final_attn = layer_norm(_EPS, None, self.dtype)

  def image_heads(self, image_embedding: jax.Array, image_pe: jax.Array) -> Dict[str, Heads]:
    """The first layer's projections of the image alone (`TwoWayAttentionBlock.image_heads`)."""
    return self.layers[0].image_heads(*self._cast(_flatten(image_embedding), _flatten(image_pe)))

  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
               point_embedding: jax.Array, token_mask: Optional[jax.Array] = None,
               image_heads: Optional[Dict[str, Heads]] = None,
               num_outputs: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """image_embedding, image_pe: (..., h, w, C); point_embedding: (..., T, C).

    Leading dimensions broadcast. `image_heads`: `self.image_heads` of these
    image inputs, kept from an earlier call. `num_outputs`: only the first
    this many tokens are returned, and only they go through the final
    attention (each token's is its own; the decoder reads only its output
    tokens). Returns the processed tokens (..., T or num_outputs, C) and
    image keys (..., h*w, C).
    """
    keys, key_pe, point_embedding = self._cast(_flatten(image_embedding), _flatten(image_pe),
                                               point_embedding)
    queries = point_embedding
    for i, layer in enumerate(self.layers):
      queries, keys = layer(queries, keys, point_embedding, key_pe, token_mask,
                            image_heads if i == 0 else None)
    queries, query_pe = queries[..., :num_outputs, :], point_embedding[..., :num_outputs, :]
    queries = queries + self.final_attn_token_to_image(queries + query_pe, keys + key_pe, keys)
    return self.norm_final_attn(queries), keys


  def _cast(self, *xs: jax.Array) -> Tuple[jax.Array, ...]:
    return tuple(promote_dtype(*xs, dtype=self.dtype))


def _flatten(image: jax.Array) -> jax.Array:
  """(..., h, w, C) -> (..., h*w, C)."""
  return image.reshape(*image.shape[:-3], -1, image.shape[-1])
