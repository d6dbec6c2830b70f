"""SAM's image encoder: a plain ViT with windowed attention (ViTDet style).

Channels are last throughout: images are (B, H, W, 3), tokens (B, h, w, C) and
the output embedding (B, h, w, out_chans).
"""

import contextlib
import contextvars
import functools
from typing import Optional, Sequence, Tuple

import einops
import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import MLPBlock, layer_norm, layer_norm_2d


def window_partition(x: jax.Array, window: int) -> Tuple[jax.Array, Tuple[int, int]]:
  """(B, H, W, C) -> (B * nh * nw, window, window, C), zero-padding H and W."""
  _, h, w, _ = x.shape
  pad_h, pad_w = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  windows = einops.rearrange(
      x, "b (nh wh) (nw ww) c -> (b nh nw) wh ww c", wh=window, ww=window)
  return windows, (h + pad_h, w + pad_w)


def window_unpartition(windows: jax.Array, window: int, padded_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, dropping the padding."""
  hp, wp = padded_hw
  x = einops.rearrange(
      windows, "(b nh nw) wh ww c -> b (nh wh) (nw ww) c",
      nh=hp // window, nw=wp // window)
  return x[:, :hw[0], :hw[1], :]


def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of 1-D linear interpolation, half-pixel centres.

  Equals torch's `F.interpolate(mode="linear", align_corners=False)` without
  antialiasing, which is how the reference resizes relative-position tables.
  """
  scale = np.float32(in_size / out_size)
  src = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """Relative-position embeddings (q_size, k_size, C) for one spatial axis.

  A table of another length (e.g. from a checkpoint at another image size) is
  linearly resized first, as in the reference.
  """
  max_rel_dist = 2 * max(q_size, k_size) - 1
  if rel_pos.shape[0] != max_rel_dist:
    rel_pos = jnp.asarray(linear_resize_matrix(rel_pos.shape[0], max_rel_dist),
                          rel_pos.dtype) @ rel_pos
  # Shapes are static: the index table is computed once, at trace time, in the
  # same float32 arithmetic as the reference.
  q_coords = np.arange(q_size, dtype=np.float32)[:, None] * max(k_size / q_size, 1.0)
  k_coords = np.arange(k_size, dtype=np.float32)[None, :] * max(q_size / k_size, 1.0)
  relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return rel_pos[relative.astype(np.int64)]


def decomposed_rel_pos_terms(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                             q_size: Tuple[int, int], k_size: Tuple[int, int]
                             ) -> Tuple[jax.Array, jax.Array]:
  """The two factors of the decomposed bias: (B, qh*qw, ..., kh) and (B, qh*qw, ..., kw).

  bias[b, i, ..., (y, x)] = rel_h[b, i, ..., y] + rel_w[b, i, ..., x]; q is
  (B, qh*qw, ..., C), unscaled, with any axes (e.g. heads) before the channels.
  """
  (qh, qw), (kh, kw) = q_size, k_size
  rh = get_rel_pos(qh, kh, rel_pos_h)
  rw = get_rel_pos(qw, kw, rel_pos_w)
  r_q = q.reshape(q.shape[0], qh, qw, *q.shape[2:])
  rel_h = jnp.einsum("bhw...c,hkc->bhw...k", r_q, rh).reshape(*q.shape[:-1], kh)
  rel_w = jnp.einsum("bhw...c,wkc->bhw...k", r_q, rw).reshape(*q.shape[:-1], kw)
  return rel_h, rel_w


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
            rel_w: Optional[jax.Array], k_size: Tuple[int, int]) -> jax.Array:
  """softmax(q k^T + bias) v for queries (..., c, d), keys and values (..., N, d).

  q is already scaled. The bias (rel_h[i, y] + rel_w[i, x] for key (y, x)) is
  added inside the softmax's fusions rather than stored as an (N, N) array,
  and the softmax is normalised after the product with v: (N, d) divisions
  instead of (N, N).
  """
  scores = q @ jnp.swapaxes(k, -1, -2)
  if rel_h is not None:
    grid = scores.reshape(*scores.shape[:-1], *k_size)
    scores = (grid + rel_h[..., :, None] + rel_w[..., None, :]).reshape(scores.shape)
  scores = scores.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  p = jnp.exp(scores - top)
  total = jnp.sum(p, axis=-1, keepdims=True)
  out = (p.astype(v.dtype) @ v).astype(jnp.float32) / total
  return out.astype(v.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
                      rel_w: Optional[jax.Array], k_size: Tuple[int, int],
                      query_chunk: int) -> jax.Array:
  """`_attend` on (B, N, d) one head and `query_chunk` queries at a time.

  On CPU, scoring every query of a 64x64 grid at once streams (heads, N, N)
  arrays through main memory several times (scores, bias, exp); chunks of a
  few MB stay in cache, which roughly halves a global block's attention time.
  Queries are zero-padded to a whole number of chunks and the padding dropped.
  """
  b, n, _ = q.shape
  if not query_chunk or n <= query_chunk:
    return _attend(q, k, v, rel_h, rel_w, k_size)
  n_chunks = -(-n // query_chunk)

  def split(x):  # (B, N, C) -> (B, n_chunks, query_chunk, C)
    x = jnp.pad(x, ((0, 0), (0, n_chunks * query_chunk - n), (0, 0)))
    return x.reshape(b, n_chunks, query_chunk, x.shape[-1])

  rel = (split(rel_h), split(rel_w)) if rel_h is not None else ()

  def one_head(args):  # lax.map over heads, then over this head's query chunks
    q_head, k_head, v_head, *rel_head = args

    def one_chunk(chunk):
      q_chunk, *rel_chunk = chunk
      return _attend(q_chunk, k_head, v_head, *(rel_chunk or (None, None)), k_size)

    return jax.lax.map(one_chunk, (q_head, *rel_head))

  out = jax.lax.map(one_head, (split(q), k, v, *rel))
  return out.reshape(b, n_chunks * query_chunk, v.shape[-1])[:, :n]


def rel_pos_one_hots(k_size: Tuple[int, int], dtype) -> jax.Array:
  """(kh*kw, kh + kw): key (y, x) is one-hot at y and at kh + x."""
  kh, kw = k_size
  y, x = np.divmod(np.arange(kh * kw), kw)
  table = np.zeros((kh * kw, kh + kw), np.float32)
  table[np.arange(kh * kw), y] = 1.0
  table[np.arange(kh * kw), kh + x] = 1.0
  return jnp.asarray(table, dtype)


def fold_rel_pos(q: jax.Array, k: jax.Array, rel_h: jax.Array, rel_w: jax.Array,
                 k_size: Tuple[int, int]) -> Tuple[jax.Array, jax.Array]:
  """q and k widened so that q k^T includes the decomposed bias, exactly.

  rel_h[i, y] + rel_w[i, x] is the dot product of [rel_h[i], rel_w[i]] with
  key (y, x)'s one-hot [e_y, e_x]: kh + kw more columns (28 for a 14x14
  window, 128 for a 64x64 grid) instead of an (N, N) bias. q (B, N, ..., d)
  and k (B, Nk, ..., d) have their tokens on axis 1.
  """
  one_hots = rel_pos_one_hots(k_size, k.dtype)
  one_hots = jnp.broadcast_to(one_hots.reshape(1, -1, *[1] * (k.ndim - 3), sum(k_size)),
                              (*k.shape[:-1], sum(k_size)))
  q = jnp.concatenate([q, rel_h.astype(q.dtype), rel_w.astype(q.dtype)], axis=-1)
  return q, jnp.concatenate([k, one_hots], axis=-1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
                    rel_w: Optional[jax.Array], k_size: Tuple[int, int],
                    implementation: str = "cudnn") -> jax.Array:
  """`_attend` through cuDNN's flash attention; q, k, v are (B, N, heads, d), q scaled.

  Flash attention takes no bias, and a materialised one is (heads, N, N) per
  image: the bias goes inside q k^T (`fold_rel_pos`). The widened head is
  zero-padded to a multiple of 8, as cuDNN requires; v is padded to the same
  width. `implementation` is jax.nn.dot_product_attention's ("xla" checks the
  fold on CPU).
  """
  d = q.shape[-1]
  if rel_h is not None:
    q, k = fold_rel_pos(q, k, rel_h, rel_w, k_size)
  width = -(-q.shape[-1] // 8) * 8
  pad = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))  # noqa: E731
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=1.0,
                                     implementation=implementation)
  return out[..., :d]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
                     rel_w: Optional[jax.Array], k_size: Tuple[int, int],
                     interpret: Optional[bool] = None) -> jax.Array:
  """`_attend` through Pallas' splash (flash) attention on TPU; q, k, v (B, N, heads, d), q scaled.

  As `cudnn_attention`, the bias is folded into q and k (no (heads, N, N)
  scores are stored) and the widened head zero-padded, here to the TPU's 128
  lanes. N must be a multiple of 128 (a 64x64 grid is). Inside a mesh, the
  kernel (an opaque custom call to the SPMD partitioner) runs per shard under
  `shard_map`: batch over (data, fsdp), heads over tensor. `interpret` runs
  the kernel's Python semantics on any backend (the CPU parity test); by
  default, wherever the target is not a TPU.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, n, heads, d = q.shape
  interpret = target_platform() != "tpu" if interpret is None else interpret
  if n % 128:
    raise ValueError(f"splash attention needs a multiple of 128 tokens, got {n}; use 'xla'.")
  if rel_h is not None:
    q, k = fold_rel_pos(q, k, rel_h, rel_w, k_size)
  width = -(-q.shape[-1] // 128) * 128
  # (B, N, heads, d') -> (B, heads, N, width), the kernel's layout.
  prep = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),)).transpose(  # noqa: E731
      0, 2, 1, 3)
  q, k, v = prep(q), prep(k), prep(v)

  def attend(q, k, v):
    mask = masks.MultiHeadMask([masks.FullMask((n, n))] * q.shape[1])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q, k, v)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and set(mesh.axis_names) >= {"data", "fsdp", "tensor"}:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    spec = jax.P(("data", "fsdp") if b % ways == 0 else None,
                 "tensor" if heads % mesh.shape["tensor"] == 0 else None)
    attend = jax.shard_map(attend, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  return attend(q, k, v).transpose(0, 2, 1, 3)[..., :d]


# The platform the model is traced for when it differs from the host's, as when
# compiling for abstract TPU devices on a CPU machine (sam_jax.train.compile_report).
_TARGET_PLATFORM: contextvars.ContextVar = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within: the attention choices are those of `platform` ("tpu", "gpu", "cpu")."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
  """The platform being compiled for: `compiling_for`'s, else JAX's default backend."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
                  rel_w: Optional[jax.Array], k_size: Tuple[int, int], fold: bool = False,
                  query_chunk: int = 0) -> jax.Array:
  """`_attend` through XLA, one head at a time; q, k, v are (B, N, heads, d), q scaled.

  `fold`: the bias as kh + kw more columns of q k^T (`fold_rel_pos`) rather than
  added in the softmax's fusion. `query_chunk`: `chunked_attention`'s chunk (0: none).
  """
  if fold and rel_h is not None:
    q, k = fold_rel_pos(q, k, rel_h, rel_w, k_size)
    rel_h = rel_w = None
  if not query_chunk:
    # (B, heads, N, d): heads stay their own axis, so a tensor-parallel split of
    # them needs no resharding (merged with the batch, they would).
    swap = lambda t: None if t is None else jnp.swapaxes(t, 1, 2)  # noqa: E731
    return swap(_attend(*map(swap, (q, k, v, rel_h, rel_w)), k_size))
  def heads_first(t):
    return None if t is None else einops.rearrange(t, "b l n d -> (b n) l d")
  out = chunked_attention(*map(heads_first, (q, k, v, rel_h, rel_w)), k_size, query_chunk)
  return einops.rearrange(out, "(b n) l d -> b l n d", b=q.shape[0])


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
                    rel_w: Optional[jax.Array], k_size: Tuple[int, int]) -> jax.Array:
  """The reference's formula: the (heads, N, N) bias materialised, then a plain softmax."""
  scores = jnp.einsum("bqnd,bknd->bnqk", q, k)
  if rel_h is not None:
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, N, heads, kh, kw)
    scores = scores + einops.rearrange(bias, "b q n kh kw -> b n q (kh kw)")
  p = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", p, v)


# Queries per chunk of the "*_chunked" implementations.
QUERY_CHUNK = 256

# The image encoder's attention functions by name, as `attention_fn` in Flax's
# MultiHeadDotProductAttention: f(q, k, v, rel_h, rel_w, k_size) -> (B, N, heads, d)
# with q, k, v (B, N, heads, d), q already scaled, and rel_h (B, N, heads, kh),
# rel_w (B, N, heads, kw) the decomposed relative-position bias (or None).
ATTENTION_FNS = {
    "xla": xla_attention,  # every query at once, the bias added in the softmax's fusion
    "xla_chunked": functools.partial(xla_attention, query_chunk=QUERY_CHUNK),
    "xla_folded": functools.partial(xla_attention, fold=True),
    "xla_folded_chunked": functools.partial(xla_attention, fold=True, query_chunk=QUERY_CHUNK),
    "cudnn": cudnn_attention,  # flash attention; GPU, half precision
    "splash": splash_attention,  # Pallas flash attention; TPU, N a multiple of 128
    "dense": dense_attention,
}


def resolve_attention(name: str, dtype, k_size: Optional[Tuple[int, int]] = None,
                      head_dim: Optional[int] = None, use_rel_pos: bool = True,
                      backend: Optional[str] = None, query_chunk: int = QUERY_CHUNK) -> str:
  """The name in `ATTENTION_FNS` that `name` stands for; "auto" picks by backend:

  - a GPU in half precision: "cudnn";
  - a CPU: the bias folded into q k^T when that adds at most head_dim columns (a
    window's kh + kw; faster on a CPU, BENCHMARKS.md's window fold, while a 64x64
    grid's 128 columns cost more than they save), and more than `query_chunk`
    queries scored a chunk at a time, which keeps the (N, N) scores in cache;
  - a TPU: "splash" for 1024 tokens or more in multiples of 128 (global blocks);
  - otherwise "xla". Without `k_size` the CPU rules are not applied (a summary).
  `backend` defaults to the platform compiled for (`compiling_for`), else JAX's default.
  """
  if name != "auto" and name not in ATTENTION_FNS:
    raise ValueError(f"Unknown attention implementation {name!r}; choose one of "
                     f"{['auto', *ATTENTION_FNS]}.")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == "cudnn" and not half:
    raise ValueError("attention 'cudnn' (flash attention) needs a bfloat16 or float16 model "
                     "(config.dtype); use 'xla' or 'auto' for float32.")
  if name != "auto":
    return name
  backend = backend or target_platform()
  if half and backend == "gpu":
    return "cudnn"
  if backend == "tpu" and k_size is not None and (n := k_size[0] * k_size[1]) >= 1024 \
      and n % 128 == 0:
    return "splash"
  if backend != "cpu" or k_size is None:
    return "xla"
  fold = use_rel_pos and sum(k_size) <= head_dim
  chunk = bool(query_chunk) and k_size[0] * k_size[1] > query_chunk
  return "xla" + ("_folded" if fold else "") + ("_chunked" if chunk else "")


class QKV(nn.Module):
  """`nn.Dense(3 * dim)` (same `kernel` and `bias`) with its output as (B, tokens, 3, heads, d).

  The kernel's columns are (q|k|v) x heads x d, so a contiguous split of them
  is not a split by heads; the kernel is left whole over the tensor axis
  (sharding.logical_axes) and each device takes its heads from it, so that
  tensor parallelism needs no resharding of the activations (Megatron).
  """
  num_heads: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, dim = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (dim, 3 * dim))
    kernel = nn.with_logical_constraint(
        kernel.reshape(dim, 3, self.num_heads, dim // self.num_heads),
        (None, None, "heads", None))
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    out = jnp.einsum("btc,cknd->btknd", x.reshape(b, h * w, dim), kernel)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (3 * dim,))
      out = out + bias.reshape(3, self.num_heads, -1).astype(out.dtype)
    return nn.with_logical_constraint(out, ("batch", "tokens", None, "heads", None))


class Attention(nn.Module):
  """Multi-head self-attention over a (B, H, W, C) grid, with relative positions."""
  num_heads: int
  use_rel_pos: bool = True
  input_size: Tuple[int, int] = (14, 14)  # sizes the relative-position tables
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  # A name in ATTENTION_FNS, or "auto" (see `resolve_attention`).
  implementation: str = "auto"
  query_chunk: int = QUERY_CHUNK  # queries per chunk of the "*_chunked" implementations

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, dim = x.shape
    head_dim = dim // self.num_heads
    name = resolve_attention(self.implementation, self.dtype, (h, w), head_dim,
                             self.use_rel_pos, query_chunk=self.query_chunk)
    attention_fn = ATTENTION_FNS[name]
    if name.endswith("_chunked"):
      attention_fn = functools.partial(attention_fn, query_chunk=self.query_chunk)
    # (B, tokens, 3, heads, d); heads split over the tensor axis (Megatron).
    qkv = QKV(self.num_heads, self.qkv_bias, self.dtype, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    rel_h = rel_w = None
    if self.use_rel_pos:
      init = nn.initializers.zeros
      rel_pos_h = self.param("rel_pos_h", init, (2 * self.input_size[0] - 1, head_dim))
      rel_pos_w = self.param("rel_pos_w", init, (2 * self.input_size[1] - 1, head_dim))
      rel_h, rel_w = decomposed_rel_pos_terms(
          q, rel_pos_h.astype(q.dtype), rel_pos_w.astype(q.dtype), (h, w), (h, w))
    q = q * head_dim**-0.5
    x = attention_fn(q, k, v, rel_h, rel_w, (h, w)).reshape(b, h, w, dim)
    x = nn.with_logical_constraint(x, ("batch", "height", "width", "heads"))
    return nn.Dense(dim, dtype=self.dtype, name="proj")(x)


class Block(nn.Module):
  """Pre-norm transformer block; window_size 0 means global attention."""
  num_heads: int
  mlp_ratio: float = 4.0
  window_size: int = 0
  input_size: Tuple[int, int] = (64, 64)  # token grid, for global blocks' tables
  use_rel_pos: bool = True
  qkv_bias: bool = True
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention: str = "auto"  # a name in ATTENTION_FNS, or "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    # The residual stream: split over the batch only, so the attention's and the
    # MLP's outputs are reduced over the tensor axis once each (Megatron).
    residual = ("batch", "height", "width", None)
    x = nn.with_logical_constraint(x, residual)
    shortcut = x
    x = layer_norm(1e-6, "norm1", self.dtype)(x)
    if self.window_size > 0:
      hw = x.shape[1:3]
      x, padded_hw = window_partition(x, self.window_size)
    table_size = (self.window_size,) * 2 if self.window_size > 0 else self.input_size
    x = Attention(self.num_heads, self.use_rel_pos, table_size, self.qkv_bias,
                  self.dtype, self.attention, name="attn")(x)
    if self.window_size > 0:
      x = window_unpartition(x, self.window_size, padded_hw, hw)
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
    x = nn.with_logical_constraint(shortcut + drop(x), residual)
    y = MLPBlock(int(dim * self.mlp_ratio), dtype=self.dtype, name="mlp",
                 hidden_names=("batch", "height", "width", "mlp"))(
        layer_norm(1e-6, "norm2", self.dtype)(x))
    return nn.with_logical_constraint(x + drop(y), residual)


class PatchEmbed(nn.Module):
  """Non-overlapping patches to tokens: (B, H, W, 3) -> (B, H/p, W/p, C)."""
  patch_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                   dtype=self.dtype, name="proj")(x.astype(self.dtype))


class ImageEncoderViT(nn.Module):
  """ViT backbone plus the neck that maps it to `out_chans` channels."""
  image_size: Tuple[int, int] = (1024, 1024)
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  remat: bool = False  # rematerialise each block in the backward pass
  dtype: jnp.dtype = jnp.float32
  # Attention implementations (names in ATTENTION_FNS, or "auto") of the global
  # and the windowed blocks, which differ in sequence length (4096 and 196 at 1024).
  attention: str = "auto"
  window_attention: str = "auto"

  @property
  def grid_size(self) -> Tuple[int, int]:
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: (B, H, W, in_chans) normalised and padded to `image_size`."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(
          f"The image encoder expects images of {tuple(self.image_size)} (H, W), got "
          f"{tuple(images.shape[1:3])}. Pad them (Sam.preprocess does) or build the "
          "model with that image_size.")
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(images)
    if self.use_abs_pos:
      pos = self.param("pos_embed", nn.initializers.zeros, (1, *self.grid_size, self.embed_dim))
      x = x + pos.astype(x.dtype)
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(
          num_heads=self.num_heads,
          mlp_ratio=self.mlp_ratio,
          window_size=0 if i in self.global_attn_indexes else self.window_size,
          input_size=self.grid_size,
          use_rel_pos=self.use_rel_pos,
          qkv_bias=self.qkv_bias,
          drop_path=self.drop_path_rate * i / max(self.depth - 1, 1),
          dtype=self.dtype,
          attention=self.attention if i in self.global_attn_indexes else self.window_attention,
          name=f"blocks_{i}")(x, train)
    x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(x)
    x = layer_norm_2d("neck_1", self.dtype)(x)
    x = nn.Conv(self.out_chans, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="neck_2")(x)
    return layer_norm_2d("neck_3", self.dtype)(x)
