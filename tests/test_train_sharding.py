"""One train step on an 8-device CPU mesh (data x fsdp x tensor) equals the 1-device step,
and a checkpoint saved on either mesh restores onto the other."""

import tempfile

import jax
import numpy as np
import pytest

from sam_jax.train import sharding, trainer
from tests.conftest import (FAST_COMPILE_FLAGS, fake_batch, one_block_train_config,
                            random_params, with_cpu_devices)


@pytest.mark.slow
@with_cpu_devices(8, FAST_COMPILE_FLAGS)
def test_eight_device_step_equals_one_device_step_and_restores_across_meshes():
  # Round 0 only: click rounds sample from thresholded predictions, where the
  # untrained model's near-zero logits flip under reduction-order noise (~1e-7)
  # and move a click; that changes the loss legitimately, not by a sharding bug.
  # One windowed encoder block after the patch embedding is enough to meet the
  # XLA partitioner bug that sharding.gather_fsdp works around: without it this
  # loss is wrong (docs/training.md, "Sharding").
  config = one_block_train_config()
  config.optim.update(dict(layer_decay=0.8, warmup_steps=0))  # a non-zero first lr
  config.optim.muon_lr = 0.0  # AdamW: the moments and tolerances below are Adam's
  batch = fake_batch(config, batch_size=4)

  results, live, trainers, memory = {}, {}, {}, {}
  for name, shape, devices in (("one", (1, 1, 1), jax.devices()[:1]),
                               ("eight", (2, 2, 2), jax.devices())):
    tr = trainer.Trainer(config, sharding.make_mesh(shape, devices))
    state = tr.init_state(random_params(tr.abstract_params))  # no init compile
    if name == "eight":  # really sharded: FSDP on a kernel, tensor on an MLP
      spec = state["params"]["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"].sharding.spec
      assert tuple(spec) == ("fsdp", "tensor"), spec
      mu = jax.tree.leaves(state["opt_state"])
      assert any(getattr(x, "sharding", None) is not None and
                 "fsdp" in str(x.sharding.spec) for x in mu)
    state, metrics = tr.train_step(state, batch)
    results[name] = jax.device_get((state, metrics))
    live[name], trainers[name] = state, tr
    # Ahead of time, for the same shapes: the step's own compilation, no other.
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    memory[name] = tr.compile_step(batch).memory_analysis()
    jax.monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles, compiles
  # Per device: the batch is split 4 ways (data x fsdp); the donated state
  # (parameters, moments) at most 4 ways (fsdp x tensor), small ones replicated.
  state_bytes = {k: m.alias_size_in_bytes for k, m in memory.items()}
  batch_bytes = {k: m.argument_size_in_bytes - state_bytes[k] for k, m in memory.items()}
  assert batch_bytes["eight"] * 4 == batch_bytes["one"], batch_bytes
  assert 0.25 < state_bytes["eight"] / state_bytes["one"] < 0.5, state_bytes
  assert all(m.temp_size_in_bytes > 0 for m in memory.values()), memory
  (s1, m1), (s8, m8) = results["one"], results["eight"]
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
  # Adam's moments after one step are 0.1 g and 0.001 g^2: every gradient, compared
  # against the largest (some, as the k_proj biases', are exactly 0 up to noise).
  for name in ("mu", "nu"):
    a, b = ([x for p, x in jax.tree_util.tree_flatten_with_path(s["opt_state"])[0]
             if f".{name}[" in jax.tree_util.keystr(p)] for s in (s1, s8))
    assert len(a) > 100, (name, len(a))  # every trainable parameter's
    scale = max(np.abs(x).max() for x in a)
    for x, y in zip(a, b):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
  # Adam's step g / (|g| + eps) turns the ~1e-10 noise of those zero gradients into
  # up to a few % of lr (2e-3) either way: half a step is the tolerance here.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-3),
               s1["params"], s8["params"])
  # Restore onto another mesh: each saved state onto the other trainer's mesh.
  for saved, other in (("eight", "one"), ("one", "eight")):
    with tempfile.TemporaryDirectory() as d:
      mgr = trainer.checkpoint_manager(d, config)
      trainer.save_checkpoint(mgr, 1, live[saved], dict(step=1, data_step=1))
      mgr.wait_until_finished()
      restored, meta = trainer.restore_checkpoint(mgr, trainers[other], 1)
    path = lambda t: t["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"]  # noqa: E731
    kernel, want = path(restored["params"]), path(trainers[other].param_shardings)
    assert kernel.sharding.mesh.shape == trainers[other].mesh.shape, kernel.sharding
    assert kernel.sharding.spec == want.spec, (kernel.sharding.spec, want.spec)
    assert len(kernel.sharding.device_set) == len(trainers[other].mesh.devices.flat)
    assert meta["data_step"] == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), results[saved][0])


@pytest.mark.slow
@with_cpu_devices(8, FAST_COMPILE_FLAGS)
def test_eight_device_muon_step_equals_one_device_step():
  """Muon orthogonalises each kernel's whole momentum: under FSDP and tensor
  sharding it must see the gathered matrix, not a shard's."""
  from sam_jax.train import optim
  config = one_block_train_config()
  config.optim.update(dict(warmup_steps=0, muon_lr=0.01))
  batch = fake_batch(config, batch_size=4)
  before, after = {}, {}
  for name, shape, devices in (("one", (1, 1, 1), jax.devices()[:1]),
                               ("eight", (2, 2, 2), jax.devices())):
    tr = trainer.Trainer(config, sharding.make_mesh(shape, devices))
    state = tr.init_state(random_params(tr.abstract_params))
    before[name] = jax.device_get(state["params"])
    state, metrics = tr.train_step(state, batch)
    after[name] = jax.device_get((state["params"], metrics["loss"]))
  np.testing.assert_allclose(after["one"][1], after["eight"][1], rtol=1e-5)
  is_muon = optim.muon_params(before["one"], convs=config.optim.muon_convs)
  moved = 0
  for path, m in jax.tree_util.tree_flatten_with_path(is_muon)[0]:
    if not m:
      continue
    get = lambda t: np.asarray(  # noqa: E731
        [v for p, v in jax.tree_util.tree_flatten_with_path(t)[0] if p == path][0])
    d1, d8 = (get(after[k][0]) - get(before[k]) for k in ("one", "eight"))
    # A shard's orthogonalisation would be another matrix altogether, not noise.
    np.testing.assert_allclose(d8, d1, rtol=0, atol=1e-3 * np.abs(d1).max(),
                               err_msg=jax.tree_util.keystr(path))
    moved += np.abs(d1).max() > 1e-4
  assert moved >= 10, moved  # every dense kernel took a Muon step
