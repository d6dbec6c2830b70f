"""Builds reference (PyTorch) SAM models with every tensor randomised, and the
matching sam_jax model converted from the saved `.pth`, for parity tests."""

import functools
import os

import jax
import numpy as np
import torch
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)

from sam_jax import convert_weights
from sam_jax.checkpoint import load_sam


def reference_sam(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
                  image_size=1024, window_size=14, patch_size=16, prompt_embed_dim=256,
                  decoder_depth=2, decoder_mlp_dim=2048, seed=0) -> Sam:
  """The reference `Sam` as `_build_sam` makes it, with every tensor randomised.

  The reference zero-initialises pos_embed and every rel_pos_*: parity on
  those would prove nothing, so all tensors get seeded random values, scaled
  like a trained network's (unit-variance rows for the Fourier matrix and
  embeddings, fan-in-scaled weights).
  """
  grid = image_size // patch_size
  sam = Sam(
      image_encoder=ImageEncoderViT(
          depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads,
          patch_size=patch_size, qkv_bias=True, use_rel_pos=True,
          global_attn_indexes=list(global_attn_indexes), window_size=window_size,
          out_chans=prompt_embed_dim),
      prompt_encoder=PromptEncoder(
          embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
          input_image_size=(image_size, image_size), mask_in_chans=16),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=3,
          transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_embed_dim,
                                        mlp_dim=decoder_mlp_dim, num_heads=8),
          transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256),
  ).eval()
  randomise_(sam, seed)
  return sam


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int) -> None:
  """Seeded values of a trained network's scale for every tensor."""
  gen = torch.Generator().manual_seed(seed)
  for name, t in module.state_dict().items():
    noise = torch.randn(t.shape, generator=gen)
    leaf_module = name.rsplit(".", 2)[-2]
    if t.ndim == 1 and name.endswith(".weight"):  # norm scales
      t.copy_(1.0 + 0.2 * noise)
    elif t.ndim == 1:  # biases
      t.copy_(0.1 * noise)
    elif name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
      # Position tables at 0.1: at unit scale the rel-pos bias saturates the
      # softmax and deep random stacks amplify rounding past the tolerance, fp32
      # torch included (docs/parity.md); a mapping error still shows at order 0.1.
      t.copy_(0.1 * noise)
    elif name.endswith("gaussian_matrix") or "embed" in leaf_module or "token" in leaf_module:
      t.copy_(noise)  # the Fourier matrix and embeddings: unit scale, as at init
    else:
      t.copy_(noise / np.sqrt(np.prod(t.shape[1:])))  # fan-in scaled weights


def save_and_convert(sam: Sam, tmp_path, name="sam"):
  """Saves `sam` as the official .pth files are saved, converts it, loads it."""
  pth = os.path.join(tmp_path, f"{name}.pth")
  torch.save(sam.state_dict(), pth)
  out = os.path.join(tmp_path, name)
  assert convert_weights.main(["--checkpoint", pth, "--output", out]) == 0
  model, params = load_sam(out)
  return pth, out, model, params


# Generator settings under which random weights keep masks (see tests/test_amg.py).
AMG_TEST_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.6,
                         stability_score_offset=0.1, box_nms_thresh=0.999)


def tiny_reference_sam() -> Sam:
  """The small randomised reference that the generator and CLI tests share."""
  return reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                       image_size=256, window_size=7, decoder_mlp_dim=256, seed=0)


def random_image_and_prompts(seed, input_hw, n_prompts):
  """A random image with `n_prompts` prompts of two points and a box each, as the
  end-to-end parity tests feed both models."""
  rng = np.random.RandomState(seed)
  h, w = input_hw
  image = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
  coords = np.stack([rng.uniform(0, w, (n_prompts, 2)), rng.uniform(0, h, (n_prompts, 2))],
                    -1).astype(np.float32)
  labels = rng.randint(0, 2, (n_prompts, 2))
  x0, x1 = np.sort(rng.uniform(0, w, (2, n_prompts)), 0)
  y0, y1 = np.sort(rng.uniform(0, h, (2, n_prompts)), 0)
  boxes = np.stack([x0, y0, x1, y1], -1).astype(np.float32)
  return image, coords, labels, boxes


def sam_jax_end_to_end(model, params, image, coords, labels, boxes, original_hw, multimask):
  """sam_jax on the same inputs, jitted: (embeddings, low-res logits, IoU, masks)."""
  h, w = image.shape[:2]

  @jax.jit
  def run(params, image, coords, labels, boxes):
    variables = {"params": params}
    emb = model.apply(variables, image[None], method=model.embed_images)
    logits, iou = model.apply(variables, emb, coords[None], labels[None], boxes[None],
                              None, multimask, method=model.decode)
    masks = model.apply(variables, logits[0], (h, w), original_hw, method=model.postprocess_masks)
    return emb, logits[0], iou[0], masks
  return run(params, image, coords, labels, boxes)
