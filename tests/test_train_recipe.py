"""Prompt simulation and losses on hand-made masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, PADDING
from sam_jax.train import losses, prompts, recipe

STRIDE = 4.0


def _cell(coords):
  """Back from (x, y) cell-centre pixels to (row, col) cells."""
  x, y = np.asarray(coords)[..., 0], np.asarray(coords)[..., 1]
  return ((y - (STRIDE - 1) / 2) / STRIDE).astype(int), ((x - (STRIDE - 1) / 2) / STRIDE).astype(int)


def _masks():
  m = np.zeros((3, 16, 16), bool)
  m[0, 2:5, 3:9] = True  # a rectangle
  m[1, 10, 12] = True  # a single cell
  yy, xx = np.mgrid[:16, :16]
  m[2] = (yy - 8) ** 2 + (xx - 6) ** 2 < 12  # a disc
  return m


def test_point_from_mask_is_inside_and_covers_the_mask():
  masks = _masks()
  seen = np.zeros_like(masks)
  for seed in range(200):
    coords, found = prompts.point_from_mask(jax.random.key(seed), jnp.asarray(masks), STRIDE)
    assert np.all(found)
    rows, cols = _cell(coords)
    for i in range(3):
      assert masks[i, rows[i], cols[i]], (seed, i)
      seen[i, rows[i], cols[i]] = True
  # Uniform over the mask: 200 draws reach every cell of the 18-cell rectangle.
  assert np.array_equal(seen[0], masks[0])


def test_point_from_empty_mask_is_flagged():
  _, found = prompts.point_from_mask(jax.random.key(0), jnp.zeros((2, 8, 8), bool), STRIDE)
  assert not np.any(found)


def test_error_point_lies_in_error_region_with_the_right_label():
  gt = _masks()
  pred = np.zeros_like(gt)
  pred[0, 2:5, 5:12] = True  # misses columns 3-4 (fn), adds columns 9-11 (fp)
  pred[1] = gt[1]  # perfect: no click
  pred[2, :, :] = False  # all false negatives
  for seed in range(100):
    coords, labels = prompts.point_from_error(jax.random.key(seed), jnp.asarray(pred),
                                              jnp.asarray(gt), STRIDE)
    rows, cols = _cell(coords)
    labels = np.asarray(labels)
    for i in (0, 2):
      r, c = rows[i], cols[i]
      assert pred[i, r, c] != gt[i, r, c], (seed, i)
      assert labels[i] == (FOREGROUND if gt[i, r, c] else BACKGROUND)
    assert labels[1] == PADDING
  # Both kinds of error occur for mask 0.
  both = {int(prompts.point_from_error(jax.random.key(s), jnp.asarray(pred), jnp.asarray(gt),
                                       STRIDE)[1][0]) for s in range(50)}
  assert both == {FOREGROUND, BACKGROUND}


def test_box_from_mask_and_jitter():
  gt = _masks()
  box = np.asarray(prompts.box_from_mask(jnp.asarray(gt), STRIDE))
  np.testing.assert_array_equal(box[0], np.array([3, 2, 9, 5]) * STRIDE)
  np.testing.assert_array_equal(box[1], np.array([12, 10, 13, 11]) * STRIDE)
  big = jnp.array([[0.0, 0.0, 1000.0, 1000.0]] * 4000)
  noisy = np.asarray(prompts.jitter_box(jax.random.key(0), big + 100, 0.1, 20.0, 2000.0))
  std = (noisy - np.asarray(big + 100)).std(0)
  np.testing.assert_allclose(std, 20.0, rtol=0.1)  # 10% of 1000 capped at 20 px
  small = jnp.array([[100.0, 100.0, 150.0, 200.0]] * 4000)
  std = (np.asarray(prompts.jitter_box(jax.random.key(1), small, 0.1, 20.0, 2000.0)) - small).std(0)
  np.testing.assert_allclose(std, [5, 10, 5, 10], rtol=0.1)


def test_no_point_rounds_plan():
  for seed in range(20):
    adds = np.asarray(prompts.no_point_rounds(jax.random.key(seed), 11, 2))
    assert adds.shape == (10,) and not adds[-1] and adds.sum() == 8


def _np_focal(x, t, alpha=0.25, gamma=2.0):
  p = 1 / (1 + np.exp(-x))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  a = alpha * t + (1 - alpha) * (1 - t)
  return (a * ce * (1 - p_t) ** gamma).mean(axis=(-2, -1))


def _np_dice(x, t):
  p = 1 / (1 + np.exp(-x))
  return 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)


def test_focal_and_dice_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (2, 3, 8, 8))
  t = (rng.uniform(size=(2, 3, 8, 8)) < 0.4).astype(np.float64)
  np.testing.assert_allclose(losses.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t)),
                             _np_focal(x, t), rtol=1e-5)
  np.testing.assert_allclose(losses.dice_loss(jnp.asarray(x), jnp.asarray(t)), _np_dice(x, t),
                             rtol=1e-5)
  # Stable far from zero, where the naive formula overflows.
  big = losses.sigmoid_focal_loss(jnp.full((1, 2, 2), 200.0), jnp.zeros((1, 2, 2)))
  assert np.isfinite(big).all()


PAPER_LOSS = dict(focal=20.0, dice=1.0, iou_mse=1.0)
PAPER_PARAMS = dict(focal=dict(alpha=0.25, gamma=2.0))


def test_mask_losses_ratio_and_iou_target():
  gt = np.zeros((1, 8, 8), bool)
  gt[0, :4] = True
  logits = np.full((1, 2, 8, 8), -5.0)
  logits[0, 0, :4] = 5.0  # perfect
  logits[0, 1, :2] = 5.0  # half
  terms = losses.mask_losses(jnp.asarray(logits), jnp.asarray(gt), jnp.array([[1.0, 0.0]]),
                             PAPER_LOSS, PAPER_PARAMS)
  assert sorted(terms) == ["dice", "focal", "iou_mse", "mask_loss", "true_iou"]
  np.testing.assert_allclose(terms["true_iou"], [[1.0, 0.5]])
  np.testing.assert_allclose(terms["iou_mse"], [[0.0, 0.25]])
  np.testing.assert_allclose(terms["mask_loss"],
                             20 * np.asarray(terms["focal"]) + np.asarray(terms["dice"]),
                             rtol=1e-6)
  # loss_params reach their term; a zero weight keeps the term out of the sum.
  other = losses.mask_losses(jnp.asarray(logits), jnp.asarray(gt), jnp.array([[1.0, 0.0]]),
                             dict(focal=20.0, dice=0.0), dict(focal=dict(gamma=0.0)))
  assert not np.allclose(other["focal"], terms["focal"])
  np.testing.assert_allclose(other["mask_loss"], 20 * np.asarray(other["focal"]), rtol=1e-6)


def test_unknown_loss_terms_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown loss terms \['focl'\]; the known terms are "
                                       r"\['bce', 'dice', 'focal', 'iou_mse'\]"):
    losses.check_config(dict(focl=20.0, dice=1.0))
  with pytest.raises(ValueError, match=r"config.loss_params names unknown loss terms \['dic'\]"):
    losses.check_config(PAPER_LOSS, dict(dic=dict(smooth=0.0)))
  with pytest.raises(ValueError, match="gives no mask term a weight"):
    losses.check_config(dict(focal=0.0, iou_mse=1.0))


@pytest.fixture(scope="module")
def tiny_step():
  """A tiny model's loss and gradients on precomputed embeddings (no encoder pass)."""
  from sam_jax.build import build_sam
  from sam_jax.checkpoint import init_params
  from tests.conftest import fake_batch, tiny_train_config
  config = tiny_train_config()
  config.model.mask_decoder.transformer_depth = 1
  config.prompts.num_rounds, config.prompts.num_no_point_rounds = 2, 1
  model = build_sam(config.model)
  params = init_params(model, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in fake_batch(config, 2).items() if k != "images"}
  batch["embeddings"] = jax.random.normal(jax.random.key(1), (2, 4, 4, 32))

  def step(loss, freeze="full"):
    c = config.copy_and_resolve_references()
    with c.ignore_type():
      c.loss, c.freeze = loss, freeze
    fn = lambda p: recipe.simulate(p, model, batch, jax.random.key(2), c)  # noqa: E731
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return step


@pytest.mark.slow  # two training steps compiled, 15-25 s: kept out of the quick tier
@pytest.mark.usefixtures("fast_compiles")
def test_a_zero_weighted_loss_term_changes_nothing(tiny_step):
  (loss, metrics), grads = tiny_step(PAPER_LOSS)
  (loss0, metrics0), grads0 = tiny_step(dict(PAPER_LOSS, bce=0.0))
  assert float(metrics0["bce"]) > 0  # computed and logged ...
  assert float(loss0) == float(loss)  # ... but not trained on
  jax.tree.map(np.testing.assert_array_equal, grads0, grads)
  # Metrics keep their names: the loss, each term, the per-round IoU.
  assert {"loss", "mask_loss", "focal", "dice", "iou_mse", "iou_per_round",
          "num_masks"} <= set(metrics)


@pytest.mark.slow  # two more compiles of the step
@pytest.mark.usefixtures("fast_compiles")
def test_weighting_a_term_zero_is_training_without_it(tiny_step):
  (loss, _), _ = tiny_step(PAPER_LOSS)
  (no_dice, _), g1 = tiny_step(dict(focal=20.0, iou_mse=1.0))
  (zero_dice, _), g2 = tiny_step(dict(focal=20.0, dice=0.0, iou_mse=1.0))
  assert float(no_dice) == float(zero_dice) != float(loss)
  jax.tree.map(np.testing.assert_array_equal, g1, g2)


@pytest.mark.usefixtures("fast_compiles")
def test_frozen_parameters_get_no_gradient(tiny_step):
  _, grads = tiny_step(PAPER_LOSS, freeze="prompt_encoder/.*|mask_decoder/transformer/.*")
  for part in (grads["prompt_encoder"], grads["mask_decoder"]["transformer"]):
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(part))
  assert np.any(np.asarray(grads["mask_decoder"]["iou_token"]["embedding"]))


def test_select_best_picks_the_minimum():
  rng = np.random.default_rng(1)
  loss = rng.uniform(size=(5, 7, 3))
  onehot = np.asarray(losses.select_best(jnp.asarray(loss)))
  assert onehot.sum(-1).min() == 1 and onehot.sum(-1).max() == 1
  np.testing.assert_array_equal(onehot.argmax(-1), loss.argmin(-1))
  np.testing.assert_allclose((onehot * loss).sum(-1), loss.min(-1))


def test_the_most_confident_output_is_passed_on():
  """Round 0 passes on the highest *predicted* IoU, not the lowest loss (SAM, app. A)."""
  iou_pred = jnp.array([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]])
  assert np.asarray(recipe.most_confident(iou_pred)).tolist() == [
      [False, True, False], [True, False, False]]


def test_jittered_boxes_stay_inside_a_non_square_image():
  box = jnp.array([[50.0, 180.0, 100.0, 200.0]] * 256)  # near the bottom of 200 x 120
  noisy = np.asarray(prompts.jitter_box(jax.random.key(0), box, 0.5, 1000.0, (200.0, 120.0)))
  assert noisy[:, [0, 2]].max() <= 120.0 and noisy[:, [1, 3]].max() <= 200.0
  assert noisy[:, [1, 3]].max() > 120.0  # y is clipped to the height, not to the width
  assert (noisy[:, :2] <= noisy[:, 2:]).all() and noisy.min() >= 0.0


def test_logits_are_upsampled_as_the_predictor_upscales_them():
  from sam_jax.build import build_sam
  from tests.conftest import tiny_train_config
  config = tiny_train_config()
  model = build_sam(config.model)
  low = recipe.low_res_size(model)
  with config.ignore_type():
    config.loss_upsample = 4
  size = recipe.target_size(model, config)
  assert size == tuple(4 * s for s in low) == tuple(model.image_size)
  logits = jax.random.normal(jax.random.key(0), (2, 3, *low))
  square = tuple(model.image_size)
  np.testing.assert_allclose(recipe.upsample(logits, size),
                             model.postprocess_masks(logits, square, square), atol=1e-5)
  assert recipe.upsample(logits, low) is logits
  config.loss_upsample = 0
  with pytest.raises(ValueError, match="loss_upsample"):
    recipe.target_size(model, config)


def test_a_click_on_a_finer_grid_is_drawn_from_the_upsampled_error_region():
  # Low-res logits: one positive cell at (1, 1) of 4 x 4; the ground truth on the 16 x 16
  # grid is that cell's 4 x 4 pixels shifted by one pixel, so the errors are thin strips.
  prev = jnp.full((1, 1, 4, 4), -10.0).at[0, 0, 1, 1].set(10.0)
  gt = np.zeros((1, 1, 16, 16), bool)
  gt[0, 0, 5:9, 5:9] = True
  pred = np.asarray(recipe.upsample(prev, (16, 16))) > 0
  coords = jnp.zeros((1, 1, 3, 2))
  labels = jnp.full((1, 1, 3), PADDING)
  slot = jnp.array([False, False, True])
  for seed in range(20):
    c, lab = recipe.add_click(jax.random.key(seed), prev, jnp.asarray(gt), 1.0, coords, labels,
                              jnp.bool_(True), slot)
    x, y = np.asarray(c[0, 0, 2]).astype(int)
    assert pred[0, 0, y, x] != gt[0, 0, y, x], (seed, x, y)
    assert int(lab[0, 0, 2]) == (FOREGROUND if gt[0, 0, y, x] else BACKGROUND)


def _tiny_model_and_embeddings():
  from sam_jax.build import build_sam
  from sam_jax.checkpoint import abstract_params
  from tests.conftest import random_params, tiny_train_config
  config = tiny_train_config()
  config.model.mask_decoder.transformer_depth = 1
  model = build_sam(config.model)
  # Non-zero everywhere (a fresh init zeroes biases), drawn without compiling the init.
  params = random_params(abstract_params(model))
  return config, model, params, jax.random.normal(jax.random.key(1), (2, 4, 4, 32))


@pytest.mark.usefixtures("fast_compiles")
def test_a_box_as_corner_points_decodes_as_the_box():
  """Training gives a box as two corner points among padded slots, with `pad` False:
  the masks of the box given as a box (which gets no not-a-point token), unlike
  the default `pad`, which adds the token as for points alone."""
  from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT
  from sam_jax.modeling.sam import Sam
  _, model, params, emb = _tiny_model_and_embeddings()
  boxes = jnp.array([[[4.0, 6.0, 30.0, 40.0]], [[20.0, 2.0, 60.0, 33.0]]])  # (B, P, 4)
  coords = jnp.concatenate([boxes.reshape(2, 1, 2, 2), jnp.zeros((2, 1, 3, 2))], 2)
  labels = jnp.broadcast_to(jnp.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PADDING, PADDING, PADDING]),
                            (2, 1, 5))
  point, fg = coords[:, :, :1], jnp.full((2, 1, 1), FOREGROUND)

  @jax.jit  # one program: each decode compiled apart takes seconds
  def decodes():
    d = lambda *a, **k: model.apply({"params": params}, emb, *a, **k, method=Sam.decode)  # noqa: E731
    return (d(boxes=boxes, multimask_output="all"),
            d(coords, labels, pad=jnp.zeros((2, 1), bool), multimask_output="all"),
            d(coords, labels, multimask_output="all"),
            d(point, fg, pad=jnp.ones((2, 1), bool)), d(point, fg))

  as_box, as_corners, with_token, point_padded, point_alone = decodes()
  for a, b in zip(as_corners, as_box):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert np.abs(with_token[0] - as_box[0]).max() > 1e-3
  # A point alone gets the token either way.
  np.testing.assert_allclose(point_padded[0], point_alone[0], atol=1e-5)


@pytest.mark.usefixtures("fast_compiles")
def test_the_recipe_pads_point_prompts_only(monkeypatch):
  """Every decode of the recipe, in every round: the not-a-point token for the masks
  that started from a point, none for those that started from a box."""
  from sam_jax.modeling.prompt_encoder import BOX_TOP_LEFT
  from sam_jax.modeling.sam import Sam
  from tests.conftest import fake_batch
  config, model, params, emb = _tiny_model_and_embeddings()
  batch = {k: jnp.asarray(v) for k, v in fake_batch(config, 4).items() if k != "images"}
  batch["embeddings"] = jnp.concatenate([emb, emb])
  seen, decode = [], Sam.decode

  def spy(self, *args, pad=None, **kwargs):
    labels = args[2]
    jax.debug.callback(lambda lab, p: seen.append((np.asarray(lab), np.asarray(p))), labels, pad)
    return decode(self, *args, pad=pad, **kwargs)

  monkeypatch.setattr(Sam, "decode", spy)
  jax.jit(lambda p: recipe.simulate(p, model, batch, jax.random.key(2), config))(params)
  assert len(seen) == config.prompts.num_rounds
  for labels, pad in seen:
    is_box = labels[..., 0] == BOX_TOP_LEFT
    assert is_box.any() and (~is_box).any()
    np.testing.assert_array_equal(pad, ~is_box)


def test_gradient_barrier_is_the_identity_whose_gradient_xla_stores():
  """`recipe.gradient_barrier`: the same value and gradient as without it; on CPU
  its gradient passes through a product (with the identity) that XLA does not fuse into."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 8, 8), jnp.float32)
  loss = lambda x: jnp.sum(jax.nn.sigmoid(x) ** 2)  # noqa: E731
  with_barrier = jax.jit(jax.grad(lambda x: loss(recipe.gradient_barrier(x))))
  np.testing.assert_array_equal(recipe.gradient_barrier(x), x)
  np.testing.assert_array_equal(with_barrier(x), jax.grad(loss)(x))
  hlo = with_barrier.lower(x).compile().as_text()
  assert " dot(" in hlo and " dot(" not in jax.jit(jax.grad(loss)).lower(x).compile().as_text()
