"""Optimizer: schedule, parameter groups by regex (freezing, lr and weight-decay
multipliers), the frozen buffer, layer-wise lr decay."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.build import build_sam
from sam_jax.checkpoint import abstract_params
from sam_jax.train import optim, param_groups
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _setup(freeze, layer_decay=0.5, **optim_fields):
  config = tiny_train_config()
  config.optim.update(dict(lr=1e-2, warmup_steps=10, decay_steps=(20, 30), decay_factor=0.1,
                           layer_decay=layer_decay, grad_clip=0.0, **optim_fields))
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype),
                        abstract_params(build_sam(config.model)))
  tx, schedule = optim.make_optimizer(config.optim, params, config.model.image_encoder.depth,
                                      freeze)
  return params, tx, schedule


def test_schedule_warmup_then_step_decay():
  _, _, schedule = _setup("full")
  got = [float(schedule(s)) for s in (0, 5, 10, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(got, [0, 5e-3, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-5)


def _frozen_names(params, freeze):
  flat = jax.tree_util.tree_flatten_with_path(param_groups.frozen_mask(params, freeze))[0]
  return {param_groups.path_name(p) for p, frozen in flat if frozen}


def test_freezing_presets_and_frozen_buffer():
  params, _, _ = _setup("full")
  names = param_groups.path_names(params)
  buffer = "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"
  for freeze, trained in (("full", {"image_encoder", "prompt_encoder", "mask_decoder"}),
                          ("frozen_image_encoder", {"prompt_encoder", "mask_decoder"}),
                          ("decoder_only", {"mask_decoder"})):
    want = {n for n in names if n.split("/")[0] not in trained} | {buffer}
    assert _frozen_names(params, freeze) == want, freeze
    # A preset inside a list expands too, and its patterns are the same.
    assert _frozen_names(params, [freeze]) == want
    assert _frozen_names(params, param_groups.FREEZE_PRESETS[freeze]) == want


def test_freezing_by_regex():
  params, _, _ = _setup("full")
  frozen = _frozen_names(params, "prompt_encoder/.*")
  assert frozen == {n for n in param_groups.path_names(params) if n.startswith("prompt_encoder/")}
  # Patterns match whole paths; a list freezes the union.
  frozen = _frozen_names(params, ("image_encoder/blocks_0/.*", ".*/neck_3/bias"))
  assert "image_encoder/neck_3/bias" in frozen and "image_encoder/neck_3/scale" not in frozen
  assert all(n.startswith("image_encoder/blocks_0/") for n in frozen
             if n.startswith("image_encoder/") and "neck" not in n)
  assert "image_encoder/blocks_1/attn/qkv/kernel" not in frozen


@pytest.mark.parametrize("freeze,match", [
    ("prompt_encodr/.*", r"pattern 'prompt_encodr/\.\*' matches no parameter"),
    ("frozen_image_encodr", "presets: .*frozen_image_encoder.*matches no parameter"),
    ("prompt_encoder", "matches no parameter"),  # a prefix is not a whole path
    ("image_encoder/(.*", r"'image_encoder/\(\.\*' is not a valid regular expression"),
])
def test_bad_freeze_patterns_are_clear_errors(freeze, match):
  params, _, _ = _setup("full")
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(tiny_train_config().optim, params, 2, freeze)


def test_bad_multiplier_patterns_are_clear_errors():
  with pytest.raises(ValueError, match="config.optim.lr_mults.*'decoder/.*' matches no"):
    _setup("full", lr_mults=(("decoder/.*", 0.1),))
  with pytest.raises(ValueError, match="config.optim.wd_mults.*not a .pattern, multiplier. pair"):
    _setup("full", wd_mults=((".*/kernel",),))


def test_lr_and_weight_decay_multipliers():
  """lr_mults scale the whole step of their group (after layer decay); wd_mults set
  which parameters decay and how much; the first matching pattern wins."""
  grads = None
  steps = {}
  for name, fields in (("plain", {}),
                       ("mults", dict(lr_mults=(("mask_decoder/iou_prediction_head/.*", 0.25),
                                                ("mask_decoder/.*", 0.5)),
                                      wd_mults=((".*/iou_token/.*", 2.0), (".*/kernel", 1.0))))):
    params, tx, _ = _setup("full", layer_decay=1.0, weight_decay=0.1, **fields)
    grads = jax.tree.map(jnp.ones_like, params)
    state, update = tx.init(params), jax.jit(tx.update)  # one program, not op by op
    for _ in range(3):
      updates, state = update(grads, state, params)
    steps[name] = updates["mask_decoder"]
  plain, mults = steps["plain"], steps["mults"]
  head = ("iou_prediction_head", "layers_0", "bias")
  get = lambda tree, path: np.asarray(functools.reduce(lambda t, k: t[k], path, tree))  # noqa: E731
  np.testing.assert_allclose(get(mults, head), 0.25 * get(plain, head), rtol=1e-6)
  up = ("output_upscaling_0", "bias")
  np.testing.assert_allclose(get(mults, up), 0.5 * get(plain, up), rtol=1e-6)
  # The iou token's embedding now decays (ones: the decay term is lr * 0.1 * 2 * 1 more).
  token = ("iou_token", "embedding")
  lr = 1e-2 * 2 / 10  # the warmup's lr at the third update (count 2)
  np.testing.assert_allclose(get(mults, token) - 0.5 * get(plain, token), -0.5 * lr * 0.2,
                             rtol=1e-5)


@pytest.mark.slow
def test_frozen_parameters_get_no_update_and_layer_decay_scales():
  params, tx, _ = _setup("frozen_image_encoder")
  state, update = tx.init(params), jax.jit(tx.update)  # one program, not op by op
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):  # past step 0, where the warmup lr is 0
    updates, state = update(grads, state, params)
  pe = updates["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"]
  assert not np.any(np.asarray(pe))
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["image_encoder"]))
  assert np.all(np.asarray(updates["mask_decoder"]["iou_token"]["embedding"]) != 0)

  params, tx, _ = _setup("full", layer_decay=0.5)
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
  enc = updates["image_encoder"]
  # No weight decay on biases: Adam's step on all-ones gradients is the same for each,
  # so the ratio of bias updates is exactly the layer-decay ratio.
  b0 = np.asarray(enc["blocks_0"]["mlp"]["lin1"]["bias"])
  b1 = np.asarray(enc["blocks_1"]["mlp"]["lin1"]["bias"])
  dec = np.asarray(updates["mask_decoder"]["iou_prediction_head"]["layers_0"]["bias"])
  assert np.all(dec < 0)
  # Depth 2, decay 0.5: block 0 at 0.25, block 1 at 0.5, the decoder at 1.
  np.testing.assert_allclose(b0 / b1, 0.5, rtol=1e-5)
  np.testing.assert_allclose(b1.mean() / dec.mean(), 0.5, rtol=1e-5)
  assert np.ptp(b1) == 0 and np.ptp(dec) == 0


def test_default_weight_decay_is_on_kernels_only():
  params, _, _ = _setup("full")
  mults = optim.weight_decay_mults(params, tiny_train_config().optim)
  assert mults["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"] == 1.0
  assert mults["image_encoder"]["blocks_0"]["attn"]["qkv"]["bias"] == 0.0
  assert mults["image_encoder"]["pos_embed"] == 0.0
  assert mults["mask_decoder"]["iou_token"]["embedding"] == 0.0


@pytest.mark.slow  # a training step's compile; the default tier has test_train_recipe's
def test_freezing_the_prompt_encoder_by_regex_leaves_it_unchanged():
  """The ablation of docs/ablations.md: `config.freeze='prompt_encoder/.*'`, one real
  training step (on precomputed embeddings, to keep it small)."""
  from sam_jax.checkpoint import init_params
  from sam_jax.train import trainer
  from tests.conftest import fake_batch
  config = tiny_train_config()
  config.freeze = "prompt_encoder/.*"
  config.model.mask_decoder.transformer_depth = 1
  config.prompts.num_rounds, config.prompts.num_no_point_rounds = 2, 1
  t = trainer.Trainer(config)
  before = init_params(t.model, jax.random.key(0))
  batch = {k: v for k, v in fake_batch(config, 4).items() if k != "images"}
  batch["embeddings"] = np.random.RandomState(0).randn(4, 4, 4, 32).astype(np.float32)
  state = t.init_state(before)
  for _ in range(2):  # past step 0, where the warmup lr is 0
    state, metrics = t.train_step(state, batch)
  after = jax.device_get(state["params"])
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, after["prompt_encoder"], before["prompt_encoder"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                       after["mask_decoder"], before["mask_decoder"]))
  assert sum(moved) > 0.9 * len(moved)  # the decoder trains


def test_cosine_schedule_after_warmup_ends_at_the_last_decay_step():
  _, _, schedule = _setup("full", schedule="cosine")
  got = [float(schedule(s)) for s in (0, 5, 10, 20, 30, 100)]
  # Warmup to lr at 10, half way down the cosine at 20, lr x decay_factor from 30 on.
  np.testing.assert_allclose(got, [0, 5e-3, 1e-2, 5.5e-3, 1e-3, 1e-3], rtol=1e-5)
  with pytest.raises(ValueError, match="'step' and 'cosine'"):
    _setup("full", schedule="linear")


def test_muon_steps_the_kernels_and_adam_the_rest():
  """`optim.muon_lr` > 0: each dense kernel, and with `muon_convs` each convolution's,
  gets Muon's orthogonalised step at its own rate; every other parameter gets exactly
  AdamW's step; frozen ones none."""
  from optax import contrib
  fields = dict(layer_decay=1.0, weight_decay=0.0)
  params, adam_tx, schedule = _setup("frozen_image_encoder", muon_lr=0.0, **fields)
  _, muon_tx, _ = _setup("frozen_image_encoder", muon_lr=0.05, muon_convs=True, **fields)
  rng = np.random.RandomState(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), params)
  steps = {}
  for name, tx in (("adam", adam_tx), ("muon", muon_tx)):
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
      updates, state = update(grads, state, params)
    steps[name] = updates
  is_muon = optim.muon_params(params, convs=True)
  names = {param_groups.path_name(p) for p, m in jax.tree_util.tree_flatten_with_path(is_muon)[0]
           if m}
  assert {"mask_decoder/transformer/layers_0/mlp/lin1/kernel", "image_encoder/neck_0/kernel",
          "image_encoder/blocks_0/attn/qkv/kernel", "image_encoder/patch_embed/proj/kernel",
          "mask_decoder/output_upscaling_0/kernel"} <= names
  assert not any(n.endswith(("/bias", "/embedding", "/scale")) for n in names)
  dense_only = optim.muon_params(params)
  assert not dense_only["image_encoder"]["patch_embed"]["proj"]["kernel"]
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
  for (path, a), (_, m), (_, muon) in zip(flat(steps["adam"]), flat(steps["muon"]), flat(is_muon)):
    if param_groups.path_name(path).startswith("image_encoder/"):
      assert not np.any(np.asarray(m)), path  # frozen
    elif not muon:
      np.testing.assert_allclose(m, a, rtol=1e-6, err_msg=str(path))
  # One kernel by hand: optax's Muon direction, x muon_lr / lr x sqrt(fan_out / fan_in) x -lr.
  kernel = grads["mask_decoder"]["transformer"]["layers_0"]["mlp"]["lin1"]["kernel"]
  ref = contrib.scale_by_muon()
  state = ref.init(kernel)
  for _ in range(3):
    direction, state = ref.update(kernel, state)
  fan_in, fan_out = kernel.shape
  want = -float(schedule(2)) * 0.05 / 1e-2 * max(1.0, fan_out / fan_in) ** 0.5 * direction
  got = steps["muon"]["mask_decoder"]["transformer"]["layers_0"]["mlp"]["lin1"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  # A transposed convolution's kernel, (kh, kw, out, in): Muon on its (in, kh kw out) matrix.
  kernel = grads["mask_decoder"]["output_upscaling_3"]["kernel"]
  kh, kw, out, fan_in = kernel.shape
  matrix = jnp.transpose(kernel, (3, 0, 1, 2)).reshape(fan_in, kh * kw * out)
  state = ref.init(matrix)
  for _ in range(3):
    direction, state = ref.update(matrix, state)
  want = -float(schedule(2)) * 0.05 / 1e-2 * max(1.0, kh * kw * out / fan_in) ** 0.5 * direction
  want = jnp.transpose(want.reshape(fan_in, kh, kw, out), (1, 2, 3, 0))
  got = steps["muon"]["mask_decoder"]["output_upscaling_3"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  # A convolution's kernel, (kh, kw, in, out): Muon on its (kh kw in, out) matrix.
  kernel = grads["prompt_encoder"]["mask_downscaling_3"]["kernel"]
  matrix = kernel.reshape(-1, kernel.shape[-1])
  state = ref.init(matrix)
  for _ in range(3):
    direction, state = ref.update(matrix, state)
  fan_in, fan_out = matrix.shape
  want = -float(schedule(2)) * 0.05 / 1e-2 * max(1.0, fan_out / fan_in) ** 0.5 * direction
  got = steps["muon"]["prompt_encoder"]["mask_downscaling_3"]["kernel"]
  np.testing.assert_allclose(got, want.reshape(kernel.shape), rtol=1e-5, atol=1e-8)


def test_stacked_muon_is_optax_muon_kernel_by_kernel():
  """`optim.scale_by_muon_stacked` runs the Newton-Schulz iterations of all kernels of one
  matrix shape together: the same updates as optax's `scale_by_muon` on each kernel
  (a convolution's as its (kh kw c, c') matrix), the momentum kept per kernel as optax
  keeps it (so it shards as its parameter), and the kernels other transforms own left out."""
  import optax
  from optax import contrib
  shapes = {"a": (64, 64), "b": (64, 64), "c": (32, 64), "conv": (2, 2, 16, 16),
            "convT": (2, 2, 16, 4), "bias": (64,)}
  rng = np.random.RandomState(0)
  params = {k: jnp.asarray(rng.randn(*s), jnp.float32) for k, s in shapes.items()}
  labels = {k: "adam" if k == "bias" else "muon" for k in shapes}
  dims = {k: contrib.MuonDimensionNumbers(tuple(range(len(s) - 1)), len(s) - 1)
          for k, s in shapes.items() if k != "bias"}

  def of(muon):
    return optax.multi_transform({"muon": muon, "adam": optax.scale_by_adam()}, labels)
  masked = lambda x: isinstance(x, optax.transforms.MaskedNode)  # noqa: E731
  per_kernel = of(contrib.scale_by_muon(weight_dimension_numbers=lambda tree: {
      k: x if masked(x) else dims[k] for k, x in tree.items()}))
  stacked = of(optim.scale_by_muon_stacked())
  want, got = per_kernel.init(params), stacked.init(params)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for _ in range(3):
    grads = {k: jnp.asarray(rng.randn(*s), jnp.float32) for k, s in shapes.items()}
    u_want, want = jax.jit(per_kernel.update)(grads, want)
    u_got, got = jax.jit(stacked.update)(grads, got)
    for k in shapes:
      np.testing.assert_allclose(u_got[k], u_want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_muon_params_picks_the_kernels_muon_steps():
  """`optim.muon_params`: Muon for the decoder's dense kernels only; the encoder's get
  exactly AdamW's step. A pattern that matches nothing is a clear error."""
  fields = dict(layer_decay=1.0, weight_decay=0.0)
  params, adam_tx, _ = _setup("full", muon_lr=0.0, **fields)
  _, muon_tx, _ = _setup("full", muon_lr=0.05, muon_params=("mask_decoder/.*",), **fields)
  rng = np.random.RandomState(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), params)
  steps = []
  for tx in (adam_tx, muon_tx):
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(3):  # past step 0, where the warmup lr is 0
      updates, state = update(grads, state, params)
    steps.append(updates)
  a, m = steps
  is_muon = optim.muon_params(params, ("mask_decoder/.*",))
  names = {param_groups.path_name(p) for p, x in jax.tree_util.tree_flatten_with_path(is_muon)[0]
           if x}
  assert names and all(n.startswith("mask_decoder/") and n.endswith("/kernel") for n in names)
  qkv = lambda t: np.asarray(t["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])  # noqa: E731
  np.testing.assert_allclose(qkv(m), qkv(a), rtol=1e-6)
  lin1 = lambda t: np.asarray(  # noqa: E731
      t["mask_decoder"]["transformer"]["layers_0"]["mlp"]["lin1"]["kernel"])
  assert not np.allclose(lin1(m), lin1(a), rtol=1e-2)
  with pytest.raises(ValueError, match="config.optim.muon_params.*mask_decodr"):
    _setup("full", muon_lr=0.05, muon_params=("mask_decodr/.*",))
