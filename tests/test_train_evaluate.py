"""The prompt evaluation: a short last batch is padded, changing no result and compiling nothing new."""

import jax
import numpy as np
import pytest

from sam_jax.build import build_sam
from sam_jax.checkpoint import init_params
from sam_jax.train import demo_data, evaluate
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def examples(num_images: int, size: int, max_masks: int = 3):
  rng = np.random.default_rng(0)
  images = np.zeros((num_images, size, size, 3), np.float32)
  masks = np.zeros((num_images, max_masks, size, size), bool)
  valid = np.zeros((num_images, max_masks), bool)
  for i in range(num_images):
    image, shapes = demo_data.make_example(rng, size, max_masks)
    images[i] = image
    for j, m in enumerate(shapes[:max_masks]):
      masks[i, j], valid[i, j] = m, True
  return dict(images=images, masks=masks, valid=valid)


@pytest.mark.slow
def test_a_padded_last_batch_changes_nothing_and_compiles_once():
  model = build_sam(tiny_train_config().model)
  params = init_params(model, jax.random.key(0))
  ex = examples(3, model.image_size[0])
  compiled = evaluate._decode._cache_size()
  # Batches of 2: image 2 is padded with a filler in the first run, image 1 in the second.
  first = evaluate.evaluate(model, params, ex, num_clicks=3, batch_size=2)
  order = [2, 0, 1]
  second = evaluate.evaluate(model, params, {k: v[order] for k, v in ex.items()}, num_clicks=3,
                             batch_size=2)
  # One shape for every batch: the 1-point, box and click decodes compile once each.
  assert evaluate._decode._cache_size() == compiled + 3
  assert first["num_masks"] == second["num_masks"] == int(ex["valid"].sum())
  np.testing.assert_array_equal(second["masks_1point"], first["masks_1point"][order])
  for key in ("miou_1point", "miou_box", "miou_clicks"):
    np.testing.assert_allclose(second[key], first[key], rtol=1e-6, err_msg=key)
  assert first["miou_clicks"][0] == first["miou_1point"]
