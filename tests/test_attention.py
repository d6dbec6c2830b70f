"""The image encoder's attention implementations agree with each other.

cuDNN itself needs a GPU; here the folding of the decomposed relative-position
bias into q and k (what makes flash attention possible) is checked through
jax.nn.dot_product_attention's XLA implementation, values and gradients.
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.modeling import image_encoder as ie


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_folded_bias_equals_added_bias(use_rel_pos):
  rs = np.random.RandomState(0)
  b, heads, kh, kw, d = 2, 3, 5, 7, 10  # 10 + 5 + 7 = 22: padded to 24
  n = kh * kw
  q, k, v = (jnp.asarray(rs.randn(b, n, heads, d).astype(np.float32)) for _ in range(3))
  tables = (jnp.asarray(rs.randn(2 * kh - 1, d).astype(np.float32)),
            jnp.asarray(rs.randn(2 * kw - 1, d).astype(np.float32)))

  def attend(q, k, v, tables, fold):
    rel = ie.decomposed_rel_pos_terms(q, *tables, (kh, kw), (kh, kw)) if use_rel_pos \
        else (None, None)
    q = q * d**-0.5
    if fold:
      return ie.cudnn_attention(q, k, v, *rel, (kh, kw), implementation="xla")
    first = lambda t: None if t is None else einops.rearrange(t, "b l n d -> (b n) l d")  # noqa: E731
    out = ie._attend(*map(first, (q, k, v, *rel)), (kh, kw))
    return einops.rearrange(out, "(b n) l d -> b l n d", b=b)

  got, want = attend(q, k, v, tables, True), attend(q, k, v, tables, False)
  assert got.shape == want.shape == (b, n, heads, d)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()))
  loss = lambda fold: lambda *a: (attend(*a, fold) ** 2).sum()  # noqa: E731
  grads = [jax.grad(loss(fold), (0, 1, 2, 3))(q, k, v, tables) for fold in (True, False)]
  for g, w in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(jnp.abs(w).max()))



def _materialised_attention(variables, x, num_heads, use_rel_pos):
  """The reference's formula from `Attention`'s parameters: every score and the
  (heads, N, N) relative-position bias built in full."""
  p = variables["params"]
  b, h, w, dim = x.shape
  d = dim // num_heads
  qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  q, k, v = einops.rearrange(qkv, "b h w (three n d) -> three (b n) (h w) d", three=3, n=num_heads)
  scores = (q * d**-0.5) @ jnp.swapaxes(k, -1, -2)
  if use_rel_pos:
    rel_h, rel_w = ie.decomposed_rel_pos_terms(q, p["rel_pos_h"], p["rel_pos_w"], (h, w), (h, w))
    scores = scores + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(scores.shape)
  out = einops.rearrange(jax.nn.softmax(scores, axis=-1) @ v, "(b n) (h w) d -> b h w (n d)",
                         b=b, h=h)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("grid,use_rel_pos,query_chunk", [
    ((9, 13), True, 50), ((9, 13), True, 0), ((9, 13), False, 16),
    ((3, 5), True, 0)])  # 3 + 5 <= head_dim 8: the bias folded into q k^T, as in windows
def test_attention_equals_the_materialised_formula(grid, use_rel_pos, query_chunk):
  """The chunked, fused-bias attention equals the materialising one, values and
  gradients, on a non-square grid whose token count no chunk divides."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, *grid, 32).astype(np.float32))
  fast = ie.Attention(4, use_rel_pos, grid, query_chunk=query_chunk)
  params = fast.init(jax.random.key(0), x)
  params = jax.tree_util.tree_map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)
  slow = lambda p: _materialised_attention(p, x, 4, use_rel_pos)  # noqa: E731
  got, want = fast.apply(params, x), slow(params)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
  loss = lambda f: lambda p: (f(p) ** 2).sum()  # noqa: E731
  for g, w in zip(jax.tree.leaves(jax.grad(loss(lambda p: fast.apply(p, x)))(params)),
                  jax.tree.leaves(jax.grad(loss(slow))(params))):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()))

def test_one_hots_pick_the_key_row_and_column():
  table = np.asarray(ie.rel_pos_one_hots((3, 4), jnp.float32))
  assert table.shape == (12, 7)
  for y in range(3):
    for x in range(4):
      assert np.flatnonzero(table[y * 4 + x]).tolist() == [y, 3 + x]


def test_resolve_attention():
  assert ie.resolve_attention("auto", jnp.float32) == "xla"
  if jax.default_backend() == "cpu":
    assert ie.resolve_attention("auto", jnp.bfloat16) == "xla"
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    ie.resolve_attention("cudnn", jnp.float32)
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    ie.resolve_attention("flash", jnp.bfloat16)


def test_attention_module_cudnn_layout_equals_xla(monkeypatch):
  """The module's cuDNN branch (heads-last q, k, v straight from qkv) gives the
  XLA branch's output; the kernel is swapped for XLA's so that this runs on CPU."""
  import functools
  x = jnp.asarray(np.random.RandomState(1).randn(2, 6, 5, 24).astype(np.float32))
  xla = ie.Attention(4, True, (6, 5), implementation="xla")
  params = xla.init(jax.random.key(0), x)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape),
                        params)
  want = xla.apply(params, x)
  monkeypatch.setattr(ie, "resolve_attention", lambda implementation, dtype, tokens=None: implementation)
  monkeypatch.setattr(ie, "cudnn_attention",
                      functools.partial(ie.cudnn_attention, implementation="xla"))
  got = ie.Attention(4, True, (6, 5), implementation="cudnn").apply(params, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()))
