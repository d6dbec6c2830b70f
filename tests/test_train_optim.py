"""Optimizer: schedule, freezing options, frozen buffer, layer-wise lr decay, weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.build import build_sam
from sam_jax.checkpoint import abstract_params
from sam_jax.train import optim
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _setup(freeze, layer_decay=0.5):
  config = tiny_train_config()
  config.optim.update(dict(lr=1e-2, warmup_steps=10, decay_steps=(20, 30), decay_factor=0.1,
                           layer_decay=layer_decay, grad_clip=0.0))
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype),
                        abstract_params(build_sam(config.model)))
  tx, schedule = optim.make_optimizer(config.optim, params, config.model.image_encoder.depth,
                                      freeze)
  return params, tx, schedule


def test_schedule_warmup_then_step_decay():
  _, _, schedule = _setup("full")
  got = [float(schedule(s)) for s in (0, 5, 10, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(got, [0, 5e-3, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-5)


def test_freezing_options_and_frozen_buffer():
  for freeze, trained in (("full", {"image_encoder", "prompt_encoder", "mask_decoder"}),
                          ("frozen_image_encoder", {"prompt_encoder", "mask_decoder"}),
                          ("decoder_only", {"mask_decoder"})):
    params, _, _ = _setup(freeze)
    labels = jax.tree_util.tree_flatten_with_path(optim.trainable_labels(params, freeze))[0]
    for path, label in labels:
      names = [p.key for p in path]
      expect = names[0] in trained and names[-1] != "positional_encoding_gaussian_matrix"
      assert (label == "train") == expect, (freeze, names)


@pytest.mark.slow
def test_frozen_parameters_get_no_update_and_layer_decay_scales():
  params, tx, _ = _setup("frozen_image_encoder")
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):  # past step 0, where the warmup lr is 0
    updates, state = tx.update(grads, state, params)
  pe = updates["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"]
  assert not np.any(np.asarray(pe))
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["image_encoder"]))
  assert np.all(np.asarray(updates["mask_decoder"]["iou_token"]["embedding"]) != 0)

  params, tx, _ = _setup("full", layer_decay=0.5)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
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


def test_weight_decay_mask():
  params, _, _ = _setup("full")
  mask = optim.weight_decay_mask(params)
  assert mask["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert not mask["image_encoder"]["blocks_0"]["attn"]["qkv"]["bias"]
  assert not mask["image_encoder"]["pos_embed"]
  assert not mask["mask_decoder"]["iou_token"]["embedding"]
