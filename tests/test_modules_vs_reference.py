"""Each SAM component against Meta's reference, with every tensor randomised.

Small configs (a few blocks, 256-pixel images) so the whole file takes seconds;
full sizes are in test_full_size_vs_reference.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.modeling import image_encoder as ref_ie

from sam_jax.convert import state_dict_to_params
from sam_jax.modeling import image_encoder as ie
from tests.conftest import assert_close_abs, assert_close_rel
from tests.reference import randomise_, reference_sam, save_and_convert

EMB_REL, LOGIT_ABS = 1e-4, 1e-3


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  ref = reference_sam(embed_dim=96, depth=3, num_heads=4, global_attn_indexes=(1,),
                      image_size=256, seed=1)
  _, _, model, params = save_and_convert(ref, tmp_path_factory.mktemp("small"))
  return ref, model, {"params": params}


def _images(n, h, w, seed=0):
  return np.random.RandomState(seed).uniform(0, 255, (n, h, w, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_image_encoder(small):
  ref, model, variables = small
  x = _images(2, 256, 256)
  with torch.no_grad():
    expected = ref.image_encoder(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  got = model.apply(variables, jnp.asarray(x), method=lambda m, x: m.image_encoder(x))
  assert_close_rel(got, expected, EMB_REL, "image embeddings (small, fp32)")


@pytest.mark.parametrize("hw,window", [((20, 34), 14), ((34, 20), 14), ((9, 23), 7)])
def test_window_partition_non_square(hw, window):
  """Height and width padded separately; a swapped pad passes square tests only."""
  x = np.random.RandomState(0).randn(2, *hw, 5).astype(np.float32)
  windows, padded = ie.window_partition(jnp.asarray(x), window)
  ref_windows, ref_padded = ref_ie.window_partition(torch.from_numpy(x), window)
  assert padded == ref_padded
  np.testing.assert_array_equal(windows, ref_windows.numpy())
  back = ie.window_unpartition(windows, window, padded, hw)
  np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("window", [0, 14])
def test_block_non_square_tokens(window):
  """A block on a non-square grid; global blocks resize their tables as the reference."""
  torch.manual_seed(0)
  blk = ref_ie.Block(dim=64, num_heads=4, use_rel_pos=True, window_size=window,
                     input_size=(16, 16),
                     norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)).eval()
  randomise_(blk, seed=3)
  x = np.random.RandomState(1).randn(2, 20, 34, 64).astype(np.float32)
  with torch.no_grad():
    expected = blk(torch.from_numpy(x)).numpy()
  module = ie.Block(num_heads=4, window_size=window, input_size=(16, 16))
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros_like(x))["params"]
  params = state_dict_to_params({k: v.numpy() for k, v in blk.state_dict().items()}, abstract)
  got = module.apply({"params": params}, jnp.asarray(x))
  assert_close_rel(got, expected, EMB_REL, "encoder block, non-square grid")


@pytest.mark.parametrize("sizes", [(27, 127), (127, 27), (31, 31)])
def test_rel_pos_resize_matches_torch_interpolate(sizes):
  n_in, n_out = sizes
  table = np.random.RandomState(0).randn(n_in, 8).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(table).T[None], size=n_out, mode="linear").numpy()[0].T
  got = ie.linear_resize_matrix(n_in, n_out) @ table
  # float32 rounding of the source coordinates (torch may fuse multiply-adds)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def _prompt_cases(rng, n=3):
  coords = rng.uniform(0, 256, (n, 4, 2)).astype(np.float32)
  labels = rng.randint(-1, 2, (n, 4))
  boxes = np.sort(rng.uniform(0, 256, (n, 2, 2)), axis=1).reshape(n, 4).astype(np.float32)
  masks = rng.randn(n, 64, 64).astype(np.float32) * 5
  return {
      "points": dict(points=(coords, labels)),
      "boxes": dict(boxes=boxes),
      "masks": dict(masks=masks),
      "points+boxes": dict(points=(coords, labels), boxes=boxes),
      "all": dict(points=(coords, labels), boxes=boxes, masks=masks),
  }


@torch.no_grad()
def _reference_prompts(ref, kwargs):
  t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
  return ref.prompt_encoder(
      points=None if "points" not in kwargs else (t(kwargs["points"][0]), t(kwargs["points"][1])),
      boxes=None if "boxes" not in kwargs else t(kwargs["boxes"]),
      masks=None if "masks" not in kwargs else t(kwargs["masks"])[:, None])


@pytest.mark.parametrize("case", ["points", "boxes", "masks", "points+boxes", "all"])
def test_prompt_encoder(small, case):
  ref, model, variables = small
  kwargs = _prompt_cases(np.random.RandomState(2))[case]
  sparse_ref, dense_ref = _reference_prompts(ref, kwargs)
  sparse, valid, dense = model.apply(
      variables, method=lambda m: m.prompt_encoder(**{k: kwargs[k] for k in kwargs}))
  assert_close_rel(sparse, sparse_ref.detach().numpy(), EMB_REL, "sparse prompt embeddings")
  assert np.all(valid)
  assert_close_rel(dense, dense_ref.detach().numpy().transpose(0, 2, 3, 1), EMB_REL,
                   "dense prompt embeddings")
  pe_ref = ref.prompt_encoder.get_dense_pe().detach().numpy().transpose(0, 2, 3, 1)
  pe = model.apply(variables, method=lambda m: m.prompt_encoder.get_dense_pe())
  assert_close_rel(pe, pe_ref, EMB_REL, "dense positional encoding")


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", ["points", "boxes", "all"])
def test_mask_decoder(small, multimask, case):
  ref, model, variables = small
  kwargs = _prompt_cases(np.random.RandomState(3))[case]
  emb = np.random.RandomState(4).randn(1, 16, 16, 256).astype(np.float32)
  sparse_ref, dense_ref = _reference_prompts(ref, kwargs)
  with torch.no_grad():
    masks_ref, iou_ref = ref.mask_decoder(
        image_embeddings=_nchw(emb), image_pe=ref.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse_ref, dense_prompt_embeddings=dense_ref,
        multimask_output=multimask)

  def run(m):
    sparse, valid, dense = m.prompt_encoder(**kwargs)
    return m.mask_decoder(jnp.asarray(emb), m.prompt_encoder.get_dense_pe(), sparse[None],
                          dense[None], multimask, valid[None])
  masks, iou = model.apply(variables, method=run)
  masks, iou = masks[0], iou[0]  # the reference decodes one image's prompts
  assert masks.shape == tuple(masks_ref.shape) and iou.shape == tuple(iou_ref.shape)
  assert_close_abs(masks, masks_ref.numpy(), LOGIT_ABS, "low-res mask logits (decoder)")
  assert_close_abs(iou, iou_ref.numpy(), LOGIT_ABS, "IoU predictions")


@pytest.mark.slow
def test_padding_tokens_change_nothing(small):
  """Prompts padded with PADDING labels give the unpadded prompts' masks."""
  _, model, variables = small
  rng = np.random.RandomState(5)
  emb = jnp.asarray(rng.randn(1, 16, 16, 256).astype(np.float32))
  coords = rng.uniform(0, 256, (1, 2, 3, 2)).astype(np.float32)
  labels = np.array([[[1, 0, 1], [1, 1, 0]]])
  decode = jax.jit(functools.partial(model.apply, method=model.decode))  # op by op: slow
  base = decode(variables, emb, coords, labels)
  pad_c = np.concatenate([coords, rng.uniform(0, 256, (1, 2, 5, 2)).astype(np.float32)], 2)
  pad_l = np.concatenate([labels, np.full((1, 2, 5), -2)], 2)
  padded = decode(variables, emb, pad_c, pad_l)
  for a, b in zip(padded, base):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # A not-a-point (-1) token is real in the reference: it does change the output.
  notpoint = decode(variables, emb, pad_c, np.where(pad_l == -2, -1, pad_l))
  assert np.abs(notpoint[0] - base[0]).max() > 1e-3
