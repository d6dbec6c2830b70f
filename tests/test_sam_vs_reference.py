"""The whole model, end to end, against the reference `Sam.forward`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.conftest import assert_close_abs, assert_close_rel, assert_masks_agree
from tests.reference import (random_image_and_prompts, reference_sam, sam_jax_end_to_end,
                             save_and_convert)

EMB_REL, LOGIT_ABS, MASK_AGREE = 1e-4, 1e-3, 0.9999


def end_to_end(ref, model, params, input_hw, original_hw, tag, seed=0, n_prompts=3,
               multimask=True):
  """Runs both models on one image with points and boxes; checks every output."""
  expected = reference_outputs(ref, input_hw, original_hw, seed, n_prompts, multimask)
  check_against(expected, model, params, tag)


def reference_outputs(ref, input_hw, original_hw, seed=0, n_prompts=3, multimask=True):
  """The reference's outputs on a random image with points and boxes, and its inputs:
  what `check_against` compares sam_jax with, once `ref` may be freed."""
  image, coords, labels, boxes = random_image_and_prompts(seed, input_hw, n_prompts)
  with torch.no_grad():
    out = ref([{
        "image": torch.from_numpy(image).permute(2, 0, 1),
        "original_size": original_hw,
        "point_coords": torch.from_numpy(coords),
        "point_labels": torch.from_numpy(labels),
        "boxes": torch.from_numpy(boxes),
    }], multimask_output=multimask)[0]
    emb_ref = ref.image_encoder(ref.preprocess(torch.from_numpy(image).permute(2, 0, 1))[None])
  return dict(inputs=(image, coords, labels, boxes), original_hw=original_hw,
              multimask=multimask, embeddings=emb_ref.numpy().transpose(0, 2, 3, 1),
              **{k: out[k].numpy() for k in ("low_res_logits", "iou_predictions", "masks")})


def check_against(expected, model, params, tag):
  emb, logits, iou, masks = sam_jax_end_to_end(model, params, *expected["inputs"],
                                                expected["original_hw"], expected["multimask"])
  assert_close_rel(emb, expected["embeddings"], EMB_REL, f"image embeddings ({tag})")
  assert_close_abs(logits, expected["low_res_logits"], LOGIT_ABS, f"low-res logits ({tag})")
  assert_close_abs(iou, expected["iou_predictions"], LOGIT_ABS, f"IoU predictions ({tag})")
  assert_masks_agree(masks > 0, expected["masks"], MASK_AGREE,
                     f"binary masks, fraction differing ({tag})")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  ref = reference_sam(embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3),
                      image_size=256, seed=2)
  return (ref, *save_and_convert(ref, tmp_path_factory.mktemp("e2e"))[2:])


@pytest.mark.parametrize("input_hw,original_hw,multimask", [
    pytest.param((256, 256), (256, 256), True, marks=pytest.mark.slow),
    pytest.param((256, 256), (256, 256), False, marks=pytest.mark.slow),
    ((256, 176), (700, 481), True),   # portrait, upscaled back
    pytest.param((256, 176), (700, 481), False, marks=pytest.mark.slow),
    pytest.param((144, 256), (90, 160), True, marks=pytest.mark.slow),  # landscape, downscaled
    pytest.param((144, 256), (90, 160), False, marks=pytest.mark.slow),
])
def test_end_to_end_small(small, input_hw, original_hw, multimask):
  end_to_end(*small, input_hw, original_hw, "small", multimask=multimask)


@pytest.mark.slow
def test_non_square_model(tmp_path):
  """A model built for a non-square input (224 x 320): the grid is 14 x 20 tokens,
  not a multiple of the window (7) in width, with non-square global tables."""
  ref = reference_sam(embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(2,),
                      image_size=320, window_size=7, seed=4)
  gh, gw = 224 // 16, 320 // 16
  with torch.no_grad():
    enc = ref.image_encoder
    enc.pos_embed = torch.nn.Parameter(torch.randn(1, gh, gw, 64))
    enc.blocks[2].attn.rel_pos_h = torch.nn.Parameter(torch.randn(2 * gh - 1, 32))
    enc.blocks[2].attn.rel_pos_w = torch.nn.Parameter(torch.randn(2 * gw - 1, 32))
  _, _, model, params = save_and_convert(ref, tmp_path)
  assert model.image_size == (224, 320)
  image = np.random.RandomState(0).uniform(0, 255, (1, 224, 320, 3)).astype(np.float32)
  image_t = (image - np.array(model.pixel_mean)) / np.array(model.pixel_std)
  with torch.no_grad():
    expected = enc(torch.from_numpy(image_t.astype(np.float32)).permute(0, 3, 1, 2))
  got = model.apply({"params": params}, jnp.asarray(image), method=model.embed_images)
  assert_close_rel(got, expected.numpy().transpose(0, 2, 3, 1), EMB_REL,
                   "image embeddings (non-square model)")


@pytest.mark.slow
def test_batch_of_images_and_prompts(small):
  """Two images with three prompts each equal the images run one at a time."""
  _, model, params = small
  rng = np.random.RandomState(7)
  images = jnp.asarray(rng.uniform(0, 255, (2, 256, 256, 3)).astype(np.float32))
  coords = jnp.asarray(rng.uniform(0, 256, (2, 3, 4, 2)).astype(np.float32))
  labels = jnp.asarray(rng.randint(0, 2, (2, 3, 4)))
  apply = jax.jit(model.apply)  # op by op, these three calls made one of the slowest tests
  v = {"params": params}
  logits, iou = apply(v, images, coords, labels)
  for i in range(2):
    one, one_iou = apply(v, images[i:i + 1], coords[i:i + 1], labels[i:i + 1])
    np.testing.assert_allclose(logits[i], one[0], atol=1e-4)
    np.testing.assert_allclose(iou[i], one_iou[0], atol=1e-5)
