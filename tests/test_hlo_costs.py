"""Where a compiled step's work goes (sam_jax/train/hlo_costs.py): ops, bytes, parts."""

import jax
import jax.numpy as jnp
import pytest

from sam_jax.train import hlo_costs

# The shapes of a compiled TPU program's text: a tuple-typed copy into on-chip memory
# (S(1)), a Pallas-style attribute that runs over two lines, a loop whose body counts.
HLO = """HloModule step, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%fused_neg (param_0: f32[8,128]) -> f32[8,128] {
  %param_0 = f32[8,128]{1,0} parameter(0)
  ROOT %neg = f32[8,128]{1,0} negate(%param_0)
}

%fused_dot (param_0.1: f32[8,128], param_1: bf16[128,128]) -> f32[8,128] {
  %param_0.1 = f32[8,128]{1,0} parameter(0)
  %param_1 = bf16[128,128]{1,0:S(1)} parameter(1)
  ROOT %dot = f32[8,128]{1,0} dot(%param_0.1, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %f = f32[8,128]{1,0} fusion(%x), kind=kLoop, calls=%fused_neg, metadata={op_name="jit(_train_step)/transpose(jvp(Sam.decode))/mask_decoder/transformer/layers_0/neg"}, backend_config={"estimated_cycles":"100"}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %f)
}

%cond (p.1: (s32[], f32[8,128])) -> pred[] {
  %p.1 = (s32[], f32[8,128]{1,0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main (a: f32[8,128], w: bf16[128,128]) -> (s32[], f32[8,128]) {
  %a = f32[8,128]{1,0} parameter(0), metadata={op_name="batch"}
  %w = bf16[128,128]{1,0} parameter(1)
  %cs = (bf16[128,128]{1,0:S(1)}, bf16[128,128]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %cd = bf16[128,128]{1,0:S(1)} copy-done(%cs)
  %d = f32[8,128]{1,0} fusion(%a, %cd), kind=kOutput, calls=%fused_dot, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="jit(_train_step)/jvp(Sam.embed_images)/image_encoder/blocks_0/attn/dot_general"}, backend_config={"estimated_cycles":"300"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,128]{1,0}) tuple(%zero, %d)
  ROOT %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_ops_of_hand_written_program():
  ops = {op.name: op for op in hlo_costs.ops(HLO)}
  assert set(ops) == {"cs", "d", "f"}  # parameters, tuples, constants, copy-done move nothing
  # The copy reads its HBM source and writes the on-chip destination.
  assert ops["cs"].bytes == 2 * 128 * 128 * 2 and ops["cs"].hbm_bytes == 128 * 128 * 2
  # The matmul reads a (HBM) and w (on chip), writes its result (HBM).
  assert ops["d"].bytes == 8 * 128 * 4 * 2 + 128 * 128 * 2
  assert ops["d"].hbm_bytes == 8 * 128 * 4 * 2
  assert (ops["d"].cycles, ops["f"].cycles) == (300, 100)
  assert hlo_costs.part(ops["d"].scope) == "image encoder"
  assert hlo_costs.phase(ops["d"].scope) == "forward"
  # The loop body's op is found, and counted once.
  assert hlo_costs.part(ops["f"].scope) == "decoder: two-way transformer"
  assert hlo_costs.phase(ops["f"].scope) == "backward"


def test_breakdown_sums_and_orders_the_parts():
  parts = hlo_costs.breakdown(HLO)
  assert list(parts) == ["image encoder", "decoder: two-way transformer", "other"]
  assert parts["image encoder"]["share_of_cycles"] == pytest.approx(0.75)
  assert parts["other"]["cycles"] == 0 and parts["other"]["hbm_bytes"] == 128 * 128 * 2
  assert parts["decoder: two-way transformer"]["backward_hbm_bytes"] == 8 * 128 * 4 * 2
  assert sum(p["share_of_hbm_bytes"] for p in parts.values()) == pytest.approx(1)


def test_named_scopes_of_a_compiled_program_reach_the_parts():
  """A real compiled program: each scope's ops land in its part, with their bytes."""
  def f(x, w):
    with jax.named_scope("image_encoder"):
      y = jnp.tanh(x @ w)
    with jax.named_scope("optimizer"):
      return jnp.cumsum(y, axis=0) * 3.0  # not fusable into the matmul
  x = jnp.ones((512, 1024), jnp.float32)
  w = jnp.ones((1024, 1024), jnp.float32)
  parts = hlo_costs.breakdown(jax.jit(f).lower(x, w).compile().as_text())
  assert {"image encoder", "optimizer update"} <= set(parts), parts
  # The matmul reads x and w: at least their bytes, wherever they were placed.
  assert parts["image encoder"]["bytes"] >= x.nbytes + w.nbytes
  assert parts["optimizer update"]["bytes"] >= 2 * 512 * 1024 * 4  # reads y, writes the sum


def test_the_decoders_parts_are_found_in_its_compiled_program():
  """The decoder's named modules and scopes reach their parts, the mask product included."""
  from configs import demo
  from sam_jax.build import build_sam
  from sam_jax.checkpoint import init_params
  from sam_jax.modeling.sam import Sam
  model = build_sam(demo.tiny_model(64))
  params = init_params(model, jax.random.key(0))
  emb = jnp.ones((1, 4, 4, 64), jnp.float32)
  coords, labels = jnp.full((1, 2, 1, 2), 30.0), jnp.ones((1, 2, 1), jnp.int32)
  decode = jax.jit(lambda p: model.apply({"params": p}, emb, coords, labels, method=Sam.decode))
  parts = hlo_costs.breakdown(decode.lower(params).compile().as_text())
  for name in ("decoder: two-way transformer", "decoder: upscaling",
               "decoder: mask heads (hypernetworks, product)", "prompt encoder"):
    assert parts.get(name, {}).get("ops", 0) > 0, (name, sorted(parts))
