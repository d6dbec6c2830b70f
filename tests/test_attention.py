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


@pytest.mark.parametrize("use_rel_pos", [pytest.param(True, marks=pytest.mark.slow), False])
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


@pytest.mark.slow
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
  monkeypatch.setattr(ie, "resolve_attention", lambda implementation, dtype: implementation)
  monkeypatch.setattr(ie, "cudnn_attention",
                      functools.partial(ie.cudnn_attention, implementation="xla"))
  got = ie.Attention(4, True, (6, 5), implementation="cudnn").apply(params, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()))
