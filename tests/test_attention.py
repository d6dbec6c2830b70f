"""The image encoder's attention implementations (the `ATTENTION_FNS` registry)
agree with each other, and "auto" picks by backend as documented.

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

pytestmark = pytest.mark.usefixtures("fast_compiles")


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

  got, want = (jax.jit(attend, static_argnums=4)(q, k, v, tables, fold) for fold in (True, False))
  assert got.shape == want.shape == (b, n, heads, d)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()))
  loss = lambda fold: lambda *a: (attend(*a, fold) ** 2).sum()  # noqa: E731
  grads = [jax.jit(jax.grad(loss(fold), (0, 1, 2, 3)))(q, k, v, tables) for fold in (True, False)]
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
    # Chunks with the bias: slow only, as every_registered_attention compares them fast.
    pytest.param((9, 13), True, 50, marks=pytest.mark.slow), ((9, 13), True, 0), ((9, 13), False, 16),
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
  got, want = jax.jit(fast.apply)(params, x), jax.jit(slow)(params)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
  loss = lambda f: lambda p: (f(p) ** 2).sum()  # noqa: E731
  grad = lambda f: jax.jit(jax.grad(loss(f)))(params)  # noqa: E731  one program, not op by op
  for g, w in zip(jax.tree.leaves(grad(lambda p: fast.apply(p, x))), jax.tree.leaves(grad(slow))):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()))


def test_one_hots_pick_the_key_row_and_column():
  table = np.asarray(ie.rel_pos_one_hots((3, 4), jnp.float32))
  assert table.shape == (12, 7)
  for y in range(3):
    for x in range(4):
      assert np.flatnonzero(table[y * 4 + x]).tolist() == [y, 3 + x]


def test_resolve_attention_auto_rules_per_backend():
  r = ie.resolve_attention
  # A GPU in half precision: cuDNN's flash attention; in float32, XLA's.
  assert r("auto", jnp.bfloat16, (64, 64), 64, backend="gpu") == "cudnn"
  assert r("auto", jnp.float32, (64, 64), 64, backend="gpu") == "xla"
  assert r("auto", jnp.bfloat16, (64, 64), 64, backend="tpu") == "splash"  # tests/test_tpu_attention.py
  # A CPU: windows fold the bias (14 + 14 <= 64 columns); a 64x64 grid is chunked.
  assert r("auto", jnp.float32, (14, 14), 64, backend="cpu") == "xla_folded"
  assert r("auto", jnp.float32, (64, 64), 64, backend="cpu") == "xla_chunked"
  assert r("auto", jnp.float32, (32, 32), 64, backend="cpu") == "xla_folded_chunked"
  assert r("auto", jnp.float32, (32, 32), 64, use_rel_pos=False, backend="cpu") == "xla_chunked"
  assert r("auto", jnp.float32, (32, 32), 64, backend="cpu", query_chunk=0) == "xla_folded"
  assert r("dense", jnp.float32, (64, 64), 64, backend="gpu") == "dense"  # a name is itself
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    r("cudnn", jnp.float32)
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'.*'dense'"):
    r("flash", jnp.bfloat16)


def _module_io(grid, use_rel_pos=True, dim=24, heads=4):
  x = jnp.asarray(np.random.RandomState(1).randn(2, *grid, dim).astype(np.float32))
  params = ie.Attention(heads, use_rel_pos, grid, implementation="xla").init(
      jax.random.key(0), x)
  # Random relative-position tables too (they start at zero).
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape),
                        params)
  return x, params


@pytest.mark.parametrize("grid,use_rel_pos,query_chunk", [((9, 13), True, 50),
                                                       ((9, 13), False, 16)])
def test_every_registered_attention_gives_the_same_outputs(grid, use_rel_pos, query_chunk):
  """Values and gradients of each implementation but cuDNN's (GPU and half precision
  only; its folding is checked above) on non-square grids whose token count no
  chunk divides; the reference's formula ("dense") is the yardstick."""
  x, params = _module_io(grid, use_rel_pos)

  def run(name):
    module = ie.Attention(4, use_rel_pos, grid, implementation=name, query_chunk=query_chunk)
    loss = lambda p: (module.apply(p, x) ** 2).sum()  # noqa: E731
    return jax.jit(lambda p: (module.apply(p, x), jax.grad(loss)(p)))(params)

  want, want_grads = run("dense")
  scale = float(jnp.abs(want).max())
  # Splash needs a multiple of 128 tokens: tests/test_tpu_attention.py checks it.
  for name in [n for n in ie.ATTENTION_FNS if n not in ("cudnn", "splash")] + ["auto"]:
    got, grads = run(name)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=name)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()),
                                 err_msg=name)


def test_encoder_attention_choices_give_the_same_embeddings():
  """The ablation of docs/ablations.md: two attention choices in the model config, one
  set of parameters (the names do not depend on the choice), the same embeddings."""
  from configs import demo
  from sam_jax.build import build_sam
  from sam_jax.checkpoint import abstract_params, init_params
  from sam_jax.modeling.sam import Sam
  m = demo.tiny_model(64)
  images = jnp.asarray(np.random.RandomState(3).uniform(0, 255, (1, 64, 64, 3)), jnp.float32)
  out, params = {}, None
  for name in ("auto", "dense"):
    m.image_encoder.attention = m.image_encoder.window_attention = name
    model = build_sam(m)
    if params is None:
      params = init_params(model, jax.random.key(0))
    assert jax.tree.structure(abstract_params(model)) == jax.tree.structure(params)
    out[name] = jax.jit(lambda p, x, model=model: model.apply(
        {"params": p}, x, method=Sam.embed_images))(params, images)
  np.testing.assert_allclose(out["dense"], out["auto"], rtol=0,
                             atol=1e-5 * float(jnp.abs(out["auto"]).max()))
