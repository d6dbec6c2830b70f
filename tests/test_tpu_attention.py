"""Pallas splash attention (TPU's global blocks) against XLA attention, in interpret mode on CPU."""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.modeling import image_encoder as ie

pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")


def _inputs(grid=(16, 16), heads=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  n = grid[0] * grid[1]
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, heads, d)), jnp.float32) for _ in range(3))
  tables = [jnp.asarray(rng.normal(size=(2 * s - 1, d)), jnp.float32) for s in grid]
  return q, k, v, tables


def _xla(q, k, v, tables, grid):
  """The XLA path of `Attention`: (B * heads, N, d), bias added in the softmax."""
  b = q.shape[0]
  q, k, v = (einops.rearrange(x, "b n h d -> (b h) n d") for x in (q, k, v))
  rel_h, rel_w = ie.decomposed_rel_pos_terms(q, *tables, grid, grid)
  out = ie._attend(q * q.shape[-1]**-0.5, k, v, rel_h, rel_w, grid)
  return einops.rearrange(out, "(b h) n d -> b n h d", b=b)


def _splash(q, k, v, tables, grid):
  rel_h, rel_w = ie.decomposed_rel_pos_terms(q, *tables, grid, grid)
  return ie.splash_attention(q * q.shape[-1]**-0.5, k, v, rel_h, rel_w, grid, interpret=True)


def test_splash_matches_xla_values_and_gradients():
  grid = (16, 16)
  q, k, v, tables = _inputs(grid)
  np.testing.assert_allclose(_splash(q, k, v, tables, grid), _xla(q, k, v, tables, grid),
                             atol=2e-5, rtol=2e-5)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a, grid) * weights)  # noqa: E731
  got = jax.grad(loss(_splash), argnums=(0, 1, 2, 3))(q, k, v, tables)
  want = jax.grad(loss(_xla), argnums=(0, 1, 2, 3))(q, k, v, tables)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.abs(w).max()) > 0  # the relative-position tables get a gradient too
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_auto_picks_splash_for_tpu_global_blocks_only():
  r = ie.resolve_attention
  assert r("auto", jnp.bfloat16, (64, 64), 80, backend="tpu") == "splash"
  assert r("auto", jnp.bfloat16, (14, 14), 80, backend="tpu") == "xla"  # windows
  with ie.compiling_for("tpu"):  # the compile mode's target, on this CPU
    assert r("auto", jnp.float32, (64, 64), 80) == "splash"
  assert r("auto", jnp.float32, (64, 64), 80, backend="cpu") != "splash"
  with pytest.raises(ValueError, match="multiple of 128"):
    q, k, v, _ = _inputs((10, 10))
    ie.splash_attention(q, k, v, None, None, (10, 10), interpret=True)
