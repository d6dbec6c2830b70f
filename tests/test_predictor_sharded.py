"""Data-parallel encoding: `SamPredictor(mesh=...)` splits the image batch over devices."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs.demo import tiny_model
from sam_jax.build import build_sam
from sam_jax.checkpoint import init_params
from sam_jax.predictor import SamPredictor
from tests.conftest import with_cpu_devices


@pytest.mark.slow
@with_cpu_devices(4)
def test_sharded_encoding_equals_single_device():
  model = build_sam(tiny_model(128))
  params = init_params(model, jax.random.key(0))
  rs = np.random.RandomState(0)
  images = [rs.randint(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((90, 128), (128, 60), (40, 40))]
  single = SamPredictor(model, params)
  sharded = SamPredictor(model, params,
                         mesh=Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b")))
  single.set_image_batch(images)
  sharded.set_image_batch(images)  # 3 images, filled to 4, one per device
  assert sharded.features.shape == single.features.shape == (3, 8, 8, 64)
  np.testing.assert_allclose(sharded.features, single.features, rtol=0, atol=1e-5)
  p = dict(point_coords=[np.array([[[30.0, 20.0]]])] * 3, point_labels=[np.ones((1, 1), int)] * 3)
  for a, b in zip(sharded.predict_batch(**p)[1], single.predict_batch(**p)[1]):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
