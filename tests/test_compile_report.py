"""The compile mode (sam_jax/train/compile_report.py): the tiny model's real step compiled for TPU.

Needs libtpu (the `tpu` extra, in `test`) but no TPU: the devices are abstract.
"""

import re

import jax
import numpy as np
import pytest

from configs import demo
from sam_jax.train import compile_report as cr
from sam_jax.train.trainer import Trainer

pytest.importorskip("libtpu")


def tiny_config(mesh_shape, batch_size=4, **encoder):
  c = demo.get_config("quick")
  c.model = demo.tiny_model(128)  # 2 blocks of width 64: the smallest program that has it all
  c.mesh_shape = mesh_shape
  c.batch_size = batch_size
  c.prompts.update(dict(num_rounds=1, num_no_point_rounds=0))  # a short program compiles fast
  c.model.image_encoder.update(encoder)
  return c


def test_topology_names_as_sold():
  assert cr.libtpu_topology("v5p-128") == ("v5p:4x4x4", "v5p")  # 128 TensorCores, 64 chips
  assert cr.libtpu_topology("v5p-8") == ("v5p:2x2x1", "v5p")
  assert cr.libtpu_topology("v4-32") == ("v4:2x2x4", "v4")
  assert cr.libtpu_topology("v5p-256") == ("v5p:4x4x8", "v5p")
  assert cr.libtpu_topology("v5e-64") == ("v5e:8x8", "v5e")  # chips
  assert cr.libtpu_topology("v6e-8") == ("v6e:2x4", "v6e")
  assert cr.libtpu_topology("v5p:4x4x4") == ("v5p:4x4x4", "v5p")
  assert len(cr.topology_devices("v5p-16")) == 8
  assert len(cr.topology_devices("v5e:2x2", num_slices=2)) == 8


def test_time_bounds_say_what_bounds_the_step():
  cost = dict(flops=459e12, bytes_accessed=2 * 2.765e12, optimal_seconds=2.5)
  b = cr.time_bounds(cost, "TPU v5", 459e12)
  assert (b["compute_seconds"], b["hbm_seconds"], b["bound"]) == (1.0, 2.0, "memory")
  assert cr.time_bounds(dict(flops=None), "TPU v9", None)["bound"] is None
  # A negative time (libtpu's v6e cost model gives them) is no estimate.
  assert cr.valid_seconds(-795.8) is None and cr.valid_seconds(0.63) == 0.63


def test_a_mesh_axis_may_span_two_sides_of_the_torus():
  # fsdp 8 on v5p-128's 4x4x4: no side is 8 long, so the axis takes 4 x 2 of two sides.
  mesh = cr.make_mesh((-1, 8, 1), cr.topology_devices("v5p-128"))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 8, "tensor": 1}
  assert len(set(mesh.devices.flat)) == 64


@pytest.mark.parametrize("name, match", [("v9-8", "Unknown TPU topology"),
                                         ("v5p-12", "not a v4/v5p slice size"),
                                         ("v5e-12", "v5e slices have"),
                                         ("v5p:4x4", "XxYxZ")])
def test_unknown_topology_is_a_clear_error(name, match):
  with pytest.raises(cr.CompileError, match=match):
    cr.topology_devices(name)


def test_mismatched_mesh_is_a_clear_error():
  devices = cr.topology_devices("v5e:2x2")
  with pytest.raises(cr.CompileError, match="does not fit the 4 devices"):
    cr.make_mesh((1, 3, 1), devices)
  with pytest.raises(cr.CompileError, match="does not fit the 4 devices"):
    cr.make_mesh((-1, 3, 1), devices)
  with pytest.raises(cr.CompileError, match="multiple of 2"):
    cr.make_mesh((1, 8, 1), cr.topology_devices("v5e:2x2", num_slices=2))


def test_slices_split_the_data_axis_only():
  """Two slices: each data row lies in one slice, so only the data axis crosses DCN."""
  mesh = cr.make_mesh((-1, 2, 1), cr.topology_devices("v5e:2x2", num_slices=2))
  assert mesh.devices.shape == (4, 2, 1)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert sorted(set(slices.ravel())) == [0, 1]
  assert all(len(set(slices[i].ravel())) == 1 for i in range(4))


def test_collectives_parsed_from_hlo_text():
  text = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (q: f32[256]) -> f32[256] {
  %q = f32[256]{0} parameter(0)
  ROOT %ar.1 = f32[256]{0} all-reduce(f32[256]{0} %q), to_apply=%add
}

ENTRY %main (p: f32[4,8], x: bf16[1024], y: f32[8,3], z: f32[256]) -> f32[16,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %x = bf16[1024]{0} parameter(1)
  %y = f32[8,3]{1,0} parameter(2)
  %z = f32[256]{0} parameter(3)
  %all-gather-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), dimensions={0}
  %all-gather-done = f32[16,8]{1,0} all-gather-done(%all-gather-start)
  %ar = bf16[1024]{0} all-reduce(bf16[1024]{0} %x), to_apply=%add
  %rs = f32[2,3]{1,0} reduce-scatter(f32[8,3]{1,0} %y), dimensions={0}, to_apply=%add
  %loop = f32[256]{0} while(f32[256]{0} %z), condition=%cond, body=%body
  ROOT %out = f32[16,8]{1,0} copy(%all-gather-done)
}
"""
  got = cr.collectives(text)
  assert got["all-gather"] == dict(count=1, bytes=16 * 8 * 4)  # the gathered array
  assert got["all-reduce"] == dict(count=2, bytes=2048 + 256 * 4)  # the loop's body once
  assert got["reduce-scatter"] == dict(count=1, bytes=24)
  assert got["all-to-all"]["count"] == 0


def _bytes(leaves):
  return sum(x.size * x.dtype.itemsize for x in leaves)


def test_per_chip_state_is_split_by_the_fsdp_degree():
  config = tiny_config((1, 4, 1))
  config.optim.muon_lr = 0.0  # AdamW everywhere
  trainer = Trainer(config, mesh=cr.make_mesh((1, 4, 1), cr.topology_devices("v5e:2x2")))
  params = trainer.abstract_state["params"]
  single = _bytes(jax.tree.leaves(params))
  # Left whole: biases, norms, tables and the patch embedding's 3 input channels.
  whole = _bytes(x for x in jax.tree.leaves(params) if x.sharding.shard_shape(x.shape) == x.shape)
  assert whole < 0.2 * single
  per_chip = cr.per_chip_bytes(params)
  assert per_chip == (single - whole) // 4 + whole
  # Adam's two moments follow their (trained) parameters.
  assert 1.9 * per_chip <= cr.per_chip_bytes(trainer.abstract_state["opt_state"]) <= 2 * per_chip

  # Muon's momentum of a kernel is split as its kernel is: what is left whole is
  # Adam's two moments of the trained parameters left whole, one momentum for a
  # kernel left whole on Muon (the patch embedding's, with the convolutions).
  from sam_jax.train import optim
  for convs in (False, True):
    config.optim.update(dict(muon_lr=0.02, muon_convs=convs))
    opt = Trainer(config, mesh=trainer.mesh).abstract_state["opt_state"]
    is_whole = lambda x: x.sharding.shard_shape(x.shape) == x.shape  # noqa: E731
    whole_opt = _bytes(x for x in jax.tree.leaves(opt) if is_whole(x))
    muon = jax.tree.leaves(optim.muon_params(params, convs=convs))
    whole_muon = _bytes(x for x, m in zip(jax.tree.leaves(params), muon) if m and is_whole(x))
    assert (whole_muon > 0) == convs, whole_muon
    # Less the frozen buffer, plus counters:
    assert abs(whole_opt - (2 * whole - whole_muon)) <= 1024
    assert cr.per_chip_bytes(opt) == (_bytes(jax.tree.leaves(opt)) - whole_opt) // 4 + whole_opt


@pytest.mark.slow  # the step compiled twice (rolled; unrolled, for the costs): minutes
def test_tiny_training_step_compiles_for_tpu_with_fsdp(tmp_path):
  c = tiny_config((1, 4, 1))
  c.prompts.num_rounds, c.unroll_rounds = 3, False  # a loop of 2 click rounds, as the recipes
  c.model.mask_decoder.transformer_depth = 1  # compiles sooner; every part is still there
  assert cr.rounds_rolled(c)
  r = cr.run(c, str(tmp_path), "v5e:2x2", inference_batch=1)
  assert (tmp_path / "compile_report.json").exists()
  assert r["chips"] == 4 and r["mesh"] == dict(data=1, fsdp=4, tensor=1)
  assert r["device_kind"] == "TPU v5 lite" and r["hbm_per_chip"] == 16 * 2**30
  m = r["train"]["memory"]
  # The compiled program's arguments are the fsdp-split state plus the batch, per chip.
  assert m["arguments"] >= m["params"] + m["optimizer_state"] + m["batch"]
  # TPU layouts pad the tiny model's small arrays to tiles; replicating the state over
  # the 4 chips would still be about 4 times these bytes.
  assert m["arguments"] < 2.5 * (m["params"] + m["optimizer_state"] + m["batch"])
  assert m["temporaries"] > 0 and m["total"] > m["arguments"]
  assert r["train"]["fits"] is True
  assert r["train"]["cost"]["optimal_seconds"] > 0 and r["cost_model_step_seconds"] > 0
  assert r["model_flops_per_step"] > 0 and 0 < r["cost_model_mfu"] < 1
  # Every round's matmuls are in XLA's count (the loop's body alone would be ~2/3 of them).
  assert r["train"]["cost"]["flops"] >= 0.95 * r["model_flops_per_step"] / r["chips"]
  assert "unrolled" in r["note"] and r["cost_source"]["per_chip_batch"] == 1
  assert r["cost_model_mfu"] <= r["mfu_upper_bound"]  # the estimate is above its lower bounds
  coll = r["train"]["collectives"]
  assert coll["all-gather"]["count"] > 0 and coll["all-gather"]["bytes"] > 0  # FSDP's gathers
  assert coll["reduce-scatter"]["count"] + coll["all-reduce"]["count"] > 0  # its gradients
  assert r["inference"]["memory"]["total"] > 0 and r["inference"]["fits"] is True
  table = cr.format_table(r)
  assert "cost model's step time (estimate)" in table and "fits" in table
  # Where the time goes: every part of the step is named, and carries the compiler's estimates.
  parts = r["train"]["parts"]
  for name in ("image encoder", "decoder: two-way transformer", "decoder: upscaling",
               "prompt encoder", "losses", "prompt simulation", "optimizer update"):
    assert parts[name]["cycles"] > 0 and parts[name]["bytes"] > 0, name
  assert sum(p["share_of_cycles"] for p in parts.values()) == pytest.approx(1)
  assert parts.get("other", {}).get("share_of_cycles", 0) < 0.2  # little is left unnamed
  assert "where the time goes" in table


def _block_collectives(hlo_text, depth):
  """{block: [(kind, module)] of its collectives}, from the compiled ops' metadata."""
  out = {i: [] for i in range(depth)}
  for line in hlo_text.splitlines():
    op = re.search(r"= .*?\b(" + "|".join(cr.COLLECTIVES) + r")(-start)?\(", line)
    where = re.search(r'op_name="[^"]*blocks_(\d+)/(attn|mlp)/', line)
    if op and where:
      out[int(where.group(1))].append((op.group(1), where.group(2)))
  return out


def test_tensor_parallel_block_is_megatron():
  """On (1, 1, 4): each block's forward reduces once after attention and once after the
  MLP, and gathers nothing (heads and the MLP's hidden units stay split)."""
  c = tiny_config((1, 1, 4), num_heads=4)
  trainer = Trainer(c, mesh=cr.make_mesh(c.mesh_shape, cr.topology_devices("v5e:2x2")))
  text = _compiled_text(trainer, 2)
  depth = c.model.image_encoder.depth
  assert _block_collectives(text, depth) == {
      i: [("all-reduce", "attn"), ("all-reduce", "mlp")] for i in range(depth)}


def _compiled_text(trainer, batch):
  import flax.linen as nn
  import jax.numpy as jnp
  from sam_jax.build import image_size_hw
  from sam_jax.modeling.image_encoder import compiling_for
  from sam_jax.train import sharding as shard_lib
  model, mesh = trainer.model, trainer.mesh
  images = jax.ShapeDtypeStruct((batch, *image_size_hw(trainer.mcfg.image_size), 3), jnp.float32,
                                sharding=shard_lib.batch_sharding(mesh, 4))
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_images))
  with compiling_for("tpu"), jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
    return fn.lower(trainer.abstract_state["params"], images).compile().as_text()


GIB = 2**30


class _FakeCompiles:
  """total_at for batch_search: per-chip memory as a function of the per-chip batch."""

  def __init__(self, memory, oom_above=None):
    self.memory, self.oom_above, self.calls = memory, oom_above, []

  def __call__(self, b):
    self.calls.append(b)
    if self.oom_above is not None and b > self.oom_above:
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")
    return self.memory(b) * GIB


@pytest.mark.parametrize("memory,oom_above", [
    (lambda b: 1.3 + 10.2 * b, None),  # ViT-H on v5p-64, in GiB: 8 fits, 9 does not
    (lambda b: 2 + 3 * b + (20 if b > 12 else 0), None),  # a jump: the line overshoots
    (lambda b: 5 + b * b / 4, None),  # convex
    (lambda b: 1.3 + 10.2 * b, 10),  # the compiler itself gives up above 10
])
def test_batch_search_finds_the_largest_batch_that_fits(memory, oom_above):
  want = max(b for b in range(1, 200) if memory(b) <= 95)
  for seed in (None, 1, 4, want, want + 3):
    fake = _FakeCompiles(memory, oom_above=oom_above)
    if seed is not None and oom_above is not None and seed > oom_above:
      continue
    known = None if seed is None else {seed: memory(seed) * GIB}
    best, totals = cr.batch_search(fake, 95 * GIB, known)
    assert best == want, (seed, totals)
    assert len(fake.calls) == len(set(fake.calls))  # nothing compiled twice
    if memory(1) == 1.3 + 10.2:  # linear: a line and its two checks
      assert len(fake.calls) <= 3 + (seed is None), (seed, fake.calls)


def test_costs_of_a_batch_that_does_not_fit_are_scaled_from_half_of_it():
  def compile_at(global_batch):
    if global_batch > 8:
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    return cr.Compiled(memory=dict(total=global_batch * GIB), cost=dict(
        flops=1e12 * global_batch, bytes_accessed=None, optimal_seconds=0.5 * global_batch),
        collectives={}, compile_seconds=1.0)
  c, batch = cr.costs_at_fitting_batch(compile_at, 32, 4)
  assert batch == 8 and c.memory["total"] == 8 * GIB  # 8 per chip, then 4, then 2 compiled
  assert c.cost == dict(flops=32e12, bytes_accessed=None, optimal_seconds=16.0)
  c, batch = cr.costs_at_fitting_batch(compile_at, 8, 4)
  assert batch == 8 and c.cost["flops"] == 8e12
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    cr.costs_at_fitting_batch(compile_at, 12, 12)  # 1 per chip does not fit: no smaller batch


def test_batch_search_when_nothing_fits_everything_fits_and_a_compile_fails():
  assert cr.batch_search(_FakeCompiles(lambda b: 100 * b), 95 * GIB)[0] == 0
  everything = _FakeCompiles(lambda b: 1.0)
  assert cr.batch_search(everything, 95 * GIB, {2: GIB}, most=6)[0] == 6
  assert max(everything.calls) == 6
  def broken(b):
    raise ValueError("shapes do not match")
  with pytest.raises(ValueError, match="shapes do not match"):
    cr.batch_search(broken, 95 * GIB)
  def misconfigured(b):  # names memory, but is not the compiler running out of it
    raise ValueError("memory_kind 'pinned_host' is not supported by this backend")
  with pytest.raises(ValueError, match="memory_kind"):
    cr.batch_search(misconfigured, 95 * GIB)


@pytest.mark.slow  # two compiles of the full-width decoder, about a minute
def test_decoder_round_in_bfloat16_moves_less_memory():
  """benchmarks/tpu_decoder.py: one click round of the recipe's decoder, compiled for TPU
  (on a 16 x 16 token grid, an eighth of 1024 px's, which compiles sooner)."""
  from benchmarks.tpu_decoder import compile_round
  f32, bf16 = (compile_round(dtype, "v5p", images=1, masks=4, image_size=256)
               for dtype in ("float32", "bfloat16"))
  assert bf16["hbm_gb"] < 0.8 * f32["hbm_gb"] and bf16["temporaries_gib"] < f32["temporaries_gib"]
  assert bf16["est_ms"] < f32["est_ms"]
  # The decoder's image-sized work is where a round's time goes.
  for r in (f32, bf16):
    assert r["parts"]["decoder: two-way transformer"] + r["parts"]["decoder: upscaling"] > 0.5


def test_a_config_that_caches_embeddings_is_compiled_on_embeddings():
  """The compile mode sizes the step that trains: on cached embeddings where the config
  caches them, without the encoder's passes."""
  c = tiny_config((1, 4, 1))
  mesh = cr.make_mesh((1, 4, 1), cr.topology_devices("v5e:2x2"))
  images = Trainer(c, mesh=mesh).abstract_batch(4)
  c.cache_embeddings = True
  embeddings = Trainer(c, mesh=mesh).abstract_batch(4)
  assert set(images) == {"images", "masks", "valid"}
  assert set(embeddings) == {"embeddings", "masks", "valid"}
  grid = Trainer(c, mesh=mesh).model.prompt_encoder.image_embedding_size
  assert embeddings["embeddings"].shape[:3] == (4, *grid)
