"""Model FLOPs against a hand count, and the peak table; tracing only, nothing compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from sam_jax.build import build_sam
from sam_jax.checkpoint import abstract_params
from sam_jax.modeling.sam import Sam
from sam_jax.train import flops
from tests.conftest import fake_batch, tiny_train_config


def encoder_flops_by_hand(m, batch: int, folded: bool = True) -> float:
  """2 x multiply-adds of the encoder's matmuls and convolutions, from the paper's
  architecture (windows must tile the token grid: no padding here). `folded`: with
  the columns of the bias folded into q k^T where "auto" folds it on a CPU."""
  e, s = m.image_encoder, m.image_size
  g = s // e.patch_size
  tokens, c, heads = g * g, e.embed_dim, e.num_heads
  d, mlp = c // heads, int(c * e.mlp_ratio)
  patch_embed = 2 * tokens * (e.patch_size ** 2 * 3) * c
  total = patch_embed
  for i in range(e.depth):
    total += 2 * tokens * (c * 3 * c + c * c + 2 * c * mlp)  # qkv, proj, MLP
    side = g if i in e.global_attn_indexes else e.window_size
    assert g % side == 0
    seqs, n = (g // side) ** 2, side * side  # windows (one for a global block), their tokens
    total += seqs * heads * (2 * n * n * d * 2)  # q k^T and attn v
    total += seqs * heads * (2 * n * side * d * 2)  # q . R_h and q . R_w (relative positions)
    if folded and 2 * side <= d:  # ... and their sum folded into q k^T as 2 * side more columns
      total += seqs * heads * (2 * n * n * 2 * side)  # (image_encoder.fold_rel_pos)
  out = m.prompt_embed_dim
  total += 2 * tokens * c * out + 2 * tokens * 9 * out * out  # neck: 1x1 and 3x3 convs
  return batch * total, batch * patch_embed


def test_encoder_flops_match_a_hand_count():
  m = demo.tiny_model(128)  # 8x8 tokens, width 64, 2 heads, windows of 4 and one global block
  model = build_sam(m)
  params = abstract_params(model)
  images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
  embed = lambda p, x: model.apply({"params": p}, x, method=Sam.embed_images)  # noqa: E731
  counted = flops.count_flops(embed, params, images)
  by_hand, patch_embed = encoder_flops_by_hand(m, 2)
  # Every matmul and convolution is counted exactly: no tolerance beyond rounding.
  assert counted == pytest.approx(by_hand, rel=1e-9)
  # XLA's cost analysis of the same (loop-free) function is an independent count. It adds
  # the elementwise work (norms, softmax, GELU) and counts a few small products its own
  # way: within a few percent at this small width.
  xla = jax.jit(embed).lower(params, images).cost_analysis()["flops"]
  assert xla == pytest.approx(by_hand, rel=0.1)
  # The backward: two matmuls per forward one, except that the images need no gradient.
  grads = jax.grad(lambda p, x: embed(p, x).sum())
  assert flops.count_flops(grads, params, images) == pytest.approx(
      3 * by_hand - patch_embed, rel=1e-9)


@pytest.mark.slow
def test_step_flops_are_model_work_only():
  config = tiny_train_config()
  config.freeze = "frozen_image_encoder"
  model = build_sam(config.model)
  params = abstract_params(model)
  batch = fake_batch(config, 4)
  frozen = flops.train_step_flops(config.model, config, params, batch)
  cached = dict(batch)
  cached["embeddings"] = np.zeros((4, 4, 4, config.model.prompt_embed_dim), np.float32)
  del cached["images"]
  # A frozen encoder runs forward only: the cached step saves exactly its forward pass,
  # counted with XLA's attention as written (no folded bias: model work only).
  by_hand, _ = encoder_flops_by_hand(config.model, 4, folded=False)
  assert frozen - flops.train_step_flops(config.model, config, params, cached) == (
      pytest.approx(by_hand, rel=1e-9))
  # Remat's recomputation is not model work: the count is taken on a twin without it.
  config.model.image_encoder.remat = True
  assert flops.counting_model_config(config.model).image_encoder.remat is False


def test_loops_count_every_iteration():
  """Where XLA's cost analysis counts a while loop's body once, whatever its trip count."""
  w = jnp.ones((8, 8))
  step = lambda c, _: (c @ w, None)  # noqa: E731
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  one = 2 * 8 ** 3
  assert flops.count_flops(lambda x: jax.lax.scan(step, x, None, length=10)[0], x) == 10 * one
  assert flops.count_flops(lambda x: jax.lax.map(lambda r: r @ w, x), x) == one
  assert flops.count_flops(lambda x: jax.lax.cond(x[0, 0] > 0, lambda y: y @ w @ w,
                                                  lambda y: y @ w, x), x) == 2 * one
  assert jax.jit(lambda x: jax.lax.scan(step, x, None, length=10)[0]).lower(
      x).cost_analysis()["flops"] < 2 * one


def test_peak_flops_and_utilization():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12
  assert flops.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert flops.peak_flops("TPU v4", "float16") == 275e12
  assert flops.peak_flops("cpu", "float32") is None  # unknown: no guess
  assert flops.peak_flops("cpu", "float32", override=1e12) == 1e12
  assert flops.utilization(4e12, 2.0, 1e12, 2) == dict(model_tflops_per_s=2.0, mfu=1.0)
  assert flops.utilization(4e12, 2.0, None, 2) == dict(model_tflops_per_s=2.0, mfu=None)
  assert flops.utilization(0.0, 2.0, 1e12, 2) == dict(model_tflops_per_s=None, mfu=None)
