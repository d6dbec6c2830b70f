"""Loading a checkpoint at another image size (an open request upstream)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sam_jax.build import image_size_hw
from sam_jax.checkpoint import load_sam
from tests.conftest import assert_close_rel
from tests.reference import reference_sam, save_and_convert


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  ref = reference_sam(embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(1,),
                      image_size=256, window_size=7, seed=5)
  return ref, save_and_convert(ref, tmp_path_factory.mktemp("size"))[1]


@pytest.mark.parametrize("size", [pytest.param(128, marks=pytest.mark.slow), (128, 192),
                                  pytest.param(384, marks=pytest.mark.slow)])
def test_encoder_at_another_size_matches_reference_runtime_resizing(converted, size):
  """Ours resizes the tables at load time; the reference resizes them at run time.

  The reference cannot change its absolute position embedding, so it gets ours
  (resized bicubically over the token grid); everything else is its own.
  """
  ref, directory = converted
  model, params = load_sam(directory, image_size=size)
  h, w = image_size_hw(size)
  assert model.image_size == (h, w)
  pos = params["image_encoder"]["pos_embed"]
  assert pos.shape == (1, h // 16, w // 16, 64)
  enc = ref.image_encoder
  saved = enc.pos_embed
  try:
    enc.pos_embed = torch.nn.Parameter(torch.from_numpy(np.array(pos)))
    image = np.random.RandomState(0).uniform(-2, 2, (1, h, w, 3)).astype(np.float32)
    with torch.no_grad():
      expected = enc(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy().transpose(0, 2, 3, 1)
  finally:
    enc.pos_embed = saved
  got = model.apply({"params": params}, jnp.asarray(image),
                    method=lambda m, x: m.image_encoder(x))
  assert_close_rel(got, expected, 1e-4, "image embeddings (resized checkpoint)")


def test_same_size_is_untouched(converted):
  ref, directory = converted
  _, params = load_sam(directory)
  _, same = load_sam(directory, image_size=256)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(same)):
    np.testing.assert_array_equal(a, b)


def test_pos_embed_resize_keeps_smooth_fields(converted, tmp_path):
  """A position embedding that is a smooth function of position stays one:
  the resized grid samples the same function at its own cell centres."""
  ref, _ = converted
  f = lambda y, x: np.sin(2.0 * y + 1.1 * x)  # noqa: E731
  centres = lambda n: (np.arange(n) + 0.5) / n  # noqa: E731
  yy, xx = np.meshgrid(centres(16), centres(16), indexing="ij")
  field = np.repeat(f(yy, xx)[None, ..., None], 64, -1).astype(np.float32)
  with torch.no_grad():
    ref.image_encoder.pos_embed.copy_(torch.from_numpy(field))
  directory = save_and_convert(ref, tmp_path)[1]
  _, params = load_sam(directory, image_size=512)
  got = np.asarray(params["image_encoder"]["pos_embed"])[0, ..., 0]
  v = centres(32)
  inner = (v > centres(16)[1]) & (v < centres(16)[-2])  # away from the clamped border
  y2, x2 = np.meshgrid(v, v, indexing="ij")
  np.testing.assert_allclose(got[np.ix_(inner, inner)], f(y2, x2)[np.ix_(inner, inner)],
                             atol=2e-3)
