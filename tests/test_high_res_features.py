"""SAM 2's high-resolution features (`model.high_res_features`): packed after the
image embedding's channels, and added at the right pixels of the decoder's upscaling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import tiny_model
from sam_jax.build import build_sam
from sam_jax.modeling.common import gelu, pack_high_res, split_high_res


def _random(rs, *shape):
  return jnp.asarray(rs.randn(*shape).astype(np.float32))


def test_split_undoes_pack_in_the_decoders_subpixel_layout():
  """Pixel (4i + 2a + c, 4j + 2e + f) of the stride-4 map is the split's [i, j, a, e, c, f],
  pixel (2i + a, 2j + e) of the stride-2 map its [i, j, a, e] (SubpixelConvTranspose's)."""
  rs = np.random.RandomState(0)
  emb, s0, s1 = _random(rs, 2, 8, 6, 64), _random(rs, 2, 32, 24, 8), _random(rs, 2, 16, 12, 16)
  packed = pack_high_res(emb, s0, s1)
  assert packed.shape == (2, 8, 6, 256)
  got_emb, sub0, sub1 = split_high_res(packed, 64)
  np.testing.assert_array_equal(got_emb, emb)
  assert sub0.shape == (2, 8, 6, 2, 2, 2, 2, 8) and sub1.shape == (2, 8, 6, 2, 2, 16)
  i, j, a, e, c, f = np.ix_(*map(np.arange, (8, 6, 2, 2, 2, 2)))
  np.testing.assert_array_equal(sub0, np.asarray(s0)[:, 4 * i + 2 * a + c, 4 * j + 2 * e + f])
  np.testing.assert_array_equal(sub1, np.asarray(s1)[:, 2 * i[..., 0, 0] + a[..., 0, 0],
                                                     2 * j[..., 0, 0] + e[..., 0, 0]])


def _model_and_params(rs, high_res: bool = True):
  config = tiny_model(64)
  config.high_res_features = high_res
  model = build_sam(config)
  images = jnp.asarray(rs.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32))
  coords = jnp.asarray(rs.uniform(0, 64, (2, 3, 2, 2)).astype(np.float32))
  labels = jnp.asarray(rs.randint(0, 2, (2, 3, 2)))
  masks = jnp.zeros((2, 3, 16, 16))
  both = lambda m, *a: (m(*a), m(*a[:3], None, masks))  # noqa: E731  every parameter
  shapes = jax.eval_shape(functools.partial(model.init, method=both), jax.random.key(0),
                          images, coords, labels)["params"]
  params = jax.tree.map(lambda x: jnp.asarray(0.2 * rs.randn(*x.shape), x.dtype), shapes)
  return model, params, images, coords, labels


def test_the_stride_4_features_reach_their_own_pixels_of_the_masks():
  """With the last upscaling's weights at zero, each mask is a linear function of
  gelu(the stride-4 features) at the same pixel: a least-squares fit per mask leaves
  no residual. Features placed at other pixels would leave one as large as the masks."""
  rs = np.random.RandomState(1)
  model, params, images, coords, labels = _model_and_params(rs)
  dec = dict(params["mask_decoder"])
  dec["output_upscaling_3"] = jax.tree.map(jnp.zeros_like, dec["output_upscaling_3"])
  params = {**params, "mask_decoder": dec}
  apply = functools.partial(model.apply, {"params": params})
  emb = apply(images, method=model.embed_images)
  assert emb.shape == (2, 4, 4, 4 * 64)
  masks, _ = apply(emb, coords, labels, method=model.decode)  # (2, 3, 3, 16, 16)
  feats = gelu(jax.lax.conv_general_dilated(  # conv_s0 on the normalised images, by hand
      model.apply({}, images, method=model.preprocess),
      params["image_encoder"]["conv_s0"]["kernel"], (4, 4), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["image_encoder"]["conv_s0"]["bias"])
  for b in range(2):
    design = np.asarray(feats[b]).reshape(-1, 8)  # (256 pixels, 8 channels)
    targets = np.asarray(masks[b]).reshape(-1, 256).T
    coef = np.linalg.lstsq(design, targets, rcond=None)[0]
    residual = targets - design @ coef
    assert np.abs(targets).max() > 0.1
    assert np.abs(residual).max() < 1e-4 * np.abs(targets).max()


@pytest.mark.slow
def test_decode_on_a_cached_image_with_high_res_features_equals_decode():
  rs = np.random.RandomState(2)
  model, params, images, coords, labels = _model_and_params(rs)
  apply = functools.partial(model.apply, {"params": params})
  emb = apply(images, method=model.embed_images)
  cache = apply(emb, method=model.cache_image)
  masks = _random(rs, 2, 3, 16, 16)
  for mask_inputs in (None, masks):
    want = apply(emb, coords, labels, None, mask_inputs, method=model.decode)
    got = apply(emb, coords, labels, None, mask_inputs, cache=cache, method=model.decode)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("high_res", [True, False])
def test_embeddings_of_the_other_kind_are_refused(high_res):
  rs = np.random.RandomState(3)
  model, params, images, coords, labels = _model_and_params(rs, high_res)
  channels = 64 if high_res else 4 * 64
  with pytest.raises(ValueError, match=f"expects image embeddings of {4 * 64 if high_res else 64} "
                     f"channels, got {channels}"):
    model.apply({"params": params}, _random(rs, 2, 4, 4, channels), coords, labels,
                method=model.decode)
