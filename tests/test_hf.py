"""Hugging Face transformers SAM checkpoints, in and out (convert_weights.py, sam_jax.hf).

Parity against `transformers.SamModel` with every tensor random (rel-pos
tables, position embedding and the Fourier matrix included), to the Meta
parity tests' tolerances; round trips; loud failures that write nothing.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

from sam_jax import convert_weights, hf  # noqa: E402
from sam_jax.checkpoint import load_sam  # noqa: E402
from tests.conftest import assert_close_abs, assert_close_rel, assert_masks_agree  # noqa: E402
from tests.reference import (randomise_, random_image_and_prompts, reference_sam,  # noqa: E402
                             sam_jax_end_to_end, save_and_convert)
from tests.test_sam_vs_reference import EMB_REL, LOGIT_ABS, MASK_AGREE  # noqa: E402


pytestmark = pytest.mark.usefixtures("fast_compiles")  # these compare values, not speeds


def hf_sam(hidden_size=96, depth=4, heads=4, global_attn_indexes=(1, 3), image_size=256,
           window_size=7, decoder_mlp_dim=256, seed=0, **decoder):
  """A `transformers.SamModel` with every tensor randomised as the Meta parity tests do.

  The decoder's LayerNorm eps stays HF's default (1e-6, where Meta and sam_jax
  use 1e-5): that is how the published HF checkpoints are configured.
  """
  config = transformers.SamConfig(
      vision_config=dict(hidden_size=hidden_size, num_hidden_layers=depth,
                         num_attention_heads=heads, global_attn_indexes=list(global_attn_indexes),
                         image_size=image_size, window_size=window_size),
      prompt_encoder_config=dict(image_size=image_size),
      mask_decoder_config=dict(mlp_dim=decoder_mlp_dim, **decoder))
  model = transformers.SamModel(config).eval()
  randomise_(model, seed)
  return model


def _convert(*args):
  return convert_weights.main([str(a) for a in args])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("hf")
  ref = hf_sam(seed=5)
  ref.save_pretrained(tmp / "hf")
  assert _convert("--checkpoint", tmp / "hf", "--output", tmp / "jax") == 0
  model, params = load_sam(tmp / "jax")
  return ref, model, params, tmp


def hf_end_to_end(ref, model, params, input_hw, original_hw, tag, seed=0, n_prompts=3,
                  multimask=True):
  """Both models on one image with points and boxes: embeddings, logits, IoU and masks."""
  image, coords, labels, boxes = random_image_and_prompts(seed, input_hw, n_prompts)
  size = ref.config.vision_config.image_size
  pixels = np.array(model.apply({}, image[None], method=model.preprocess)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    emb_ref = ref.get_image_embeddings(torch.from_numpy(pixels))
    out = ref(image_embeddings=emb_ref, input_points=torch.from_numpy(coords)[None],
              input_labels=torch.from_numpy(labels)[None], input_boxes=torch.from_numpy(boxes)[None],
              multimask_output=multimask)
  processor = transformers.SamImageProcessor()
  masks_ref = processor.post_process_masks(
      [out.pred_masks[0]], [original_hw], [input_hw], pad_size={"height": size, "width": size})[0]

  emb, logits, iou, masks = sam_jax_end_to_end(model, params, image, coords, labels, boxes,
                                                original_hw, multimask)
  assert_close_rel(emb, emb_ref.numpy().transpose(0, 2, 3, 1), EMB_REL,
                   f"HF image embeddings ({tag})")
  assert_close_abs(logits, out.pred_masks[0].numpy(), LOGIT_ABS, f"HF low-res logits ({tag})")
  assert_close_abs(iou, out.iou_scores[0].numpy(), LOGIT_ABS, f"HF IoU predictions ({tag})")
  assert_masks_agree(masks > 0, masks_ref.numpy(), MASK_AGREE,
                     f"HF binary masks, fraction differing ({tag})")


@pytest.mark.parametrize("input_hw,original_hw,multimask", [
    ((256, 256), (256, 256), True),
    ((256, 176), (700, 481), False),  # portrait, upscaled back
    pytest.param((144, 256), (90, 160), True,  # landscape, downscaled back
                 marks=pytest.mark.slow),
])
def test_parity_small(small, input_hw, original_hw, multimask):
  ref, model, params, _ = small
  hf_end_to_end(ref, model, params, input_hw, original_hw, "small", multimask=multimask)


def test_detects_architecture(small):
  ref, model, _, _ = small
  enc, dec = model.image_encoder, model.mask_decoder
  assert (enc.embed_dim, enc.depth, enc.num_heads, tuple(enc.global_attn_indexes),
          enc.window_size, model.image_size) == (96, 4, 4, (1, 3), 7, (256, 256))
  assert (dec.transformer_mlp_dim, dec.iou_head_depth) == (256, 3)


def test_hf_round_trip_is_exact(small, tmp_path):
  """HF -> sam_jax -> HF gives back every tensor bit for bit, and the config."""
  ref, _, _, tmp = small
  out = tmp_path / "hf_again"
  assert _convert("--to-hf", "--checkpoint", tmp / "jax", "--output", out) == 0
  original, again = load_file(tmp / "hf" / hf.SAFETENSORS), load_file(out / hf.SAFETENSORS)
  assert sorted(original) == sorted(again)
  for k in original:
    assert original[k].dtype == again[k].dtype, k
    np.testing.assert_array_equal(again[k], original[k], err_msg=k)
  loaded = transformers.SamModel.from_pretrained(out).eval()
  a, b = ref.config.to_dict(), loaded.config.to_dict()
  for section in ("vision_config", "prompt_encoder_config"):
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "global_attn_indexes", "window_size", "mlp_dim", "output_channels"):
      if key in a[section]:
        assert a[section][key] == b[section][key], (section, key)
  # Meta's decoder LayerNorm eps, so that HF computes what sam_jax computes.
  assert b["mask_decoder_config"]["layer_norm_eps"] == 1e-5
  for (k, v), (k2, v2) in zip(ref.state_dict().items(), loaded.state_dict().items()):
    assert k == k2
    torch.testing.assert_close(v2, v, rtol=0, atol=0, msg=k)


def test_meta_to_hf_to_jax_equal_params(tmp_path):
  """Meta .pth -> sam_jax -> HF -> sam_jax: the same parameters, and HF runs them as Meta does."""
  ref = reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                      image_size=128, decoder_mlp_dim=256, seed=6)
  _, jax_dir, model, params = save_and_convert(ref, tmp_path)
  assert _convert("--to-hf", "--checkpoint", jax_dir, "--output", tmp_path / "hf") == 0
  assert _convert("--checkpoint", tmp_path / "hf", "--output", tmp_path / "back") == 0
  model2, params2 = load_sam(tmp_path / "back")
  assert model2 == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  # The HF model (decoder eps written as Meta's) reproduces Meta's logits.
  hf_model = transformers.SamModel.from_pretrained(tmp_path / "hf").eval()
  rng = np.random.RandomState(0)
  image = torch.from_numpy(rng.randn(1, 3, 128, 128).astype(np.float32))
  points = torch.from_numpy(rng.uniform(0, 128, (1, 2, 3, 2)).astype(np.float32))
  labels = torch.from_numpy(rng.randint(0, 2, (1, 2, 3)))
  with torch.no_grad():
    emb = ref.image_encoder(image)
    sparse, dense = ref.prompt_encoder((points[0], labels[0]), None, None)
    logits, iou = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, True)
    out = hf_model(pixel_values=image, input_points=points, input_labels=labels)
  assert_close_abs(out.pred_masks[0].numpy(), logits.numpy(), LOGIT_ABS, "HF from Meta: logits")
  assert_close_abs(out.iou_scores[0].numpy(), iou.numpy(), LOGIT_ABS, "HF from Meta: IoU")


def test_rename_is_one_to_one_and_covers_hf():
  ref = hf_sam(hidden_size=64, depth=2, heads=2, global_attn_indexes=(1,), image_size=128,
               window_size=14, iou_head_depth=4)
  meta = reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                       image_size=128, decoder_mlp_dim=256)
  meta.mask_decoder.iou_prediction_head.layers.insert(
      1, torch.nn.Linear(256, 256))  # a 4-layer IoU head, as the HF one
  meta.mask_decoder.iou_prediction_head.num_layers = 4
  names = hf.meta_to_hf_names(meta.state_dict())
  expected = set(ref.state_dict()) - {hf.PE_TIED_KEY}
  assert set(names.values()) == expected
  assert names["mask_decoder.iou_prediction_head.layers.3.weight"] == (
      "mask_decoder.iou_prediction_head.proj_out.weight")
  assert names["mask_decoder.iou_prediction_head.layers.2.bias"] == (
      "mask_decoder.iou_prediction_head.layers.1.bias")
  for k, v in meta.state_dict().items():
    assert tuple(ref.state_dict()[names[k]].shape) == tuple(v.shape), k


def test_pytorch_bin_and_tied_copy(small, tmp_path):
  """A pytorch_model.bin with both tied position keys reads like the safetensors."""
  ref, _, params, tmp = small
  d = tmp_path / "bin"
  d.mkdir()
  (d / "config.json").write_text((tmp / "hf" / "config.json").read_text())
  sd = dict(ref.state_dict())
  assert hf.PE_TIED_KEY in sd
  torch.save(sd, d / "pytorch_model.bin")
  assert _convert("--checkpoint", d, "--output", tmp_path / "jax") == 0
  _, params2 = load_sam(tmp_path / "jax")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  sd[hf.PE_TIED_KEY] = sd[hf.PE_TIED_KEY] + 1
  torch.save(sd, d / "pytorch_model.bin")
  assert _convert("--checkpoint", d, "--output", tmp_path / "jax2") == 1
  assert not (tmp_path / "jax2").exists()


def _hf_copy(tmp, dst, edit_tensors=None, edit_config=None):
  dst.mkdir()
  tensors = load_file(tmp / "hf" / hf.SAFETENSORS)
  config = json.loads((tmp / "hf" / "config.json").read_text())
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  save_file(tensors, dst / hf.SAFETENSORS)
  (dst / "config.json").write_text(json.dumps(config))
  return dst


@pytest.mark.parametrize("edit_tensors,edit_config,expected", [
    (lambda t: t.pop("mask_decoder.iou_token.weight"), None,
     "missing:\n    mask_decoder.iou_token.weight"),
    (lambda t: t.update({"mask_decoder.extra.weight": np.zeros(3, np.float32)}), None,
     "unexpected:\n    mask_decoder.extra.weight"),
    (None, lambda c: c["vision_config"].update(num_hidden_layers=5),
     "missing:\n    vision_encoder.layers.4."),
    (None, lambda c: c["mask_decoder_config"].update(hidden_act="gelu"),
     "hidden_act = 'gelu' (sam_jax implements 'relu')"),
    (None, lambda c: c.update(model_type="sam2"), "not a transformers SamModel"),
])
def test_bad_hf_checkpoints(small, tmp_path, capsys, edit_tensors, edit_config, expected):
  _, _, _, tmp = small
  src = _hf_copy(tmp, tmp_path / "edited", edit_tensors, edit_config)
  assert _convert("--checkpoint", src, "--output", tmp_path / "out") == 1
  assert expected in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert not [p for p in os.listdir(tmp_path) if "sam_jax-tmp" in p]


def test_corrupt_weights_and_bare_directories(small, tmp_path, capsys):
  _, _, _, tmp = small
  src = _hf_copy(tmp, tmp_path / "corrupt")
  (src / hf.SAFETENSORS).write_bytes((src / hf.SAFETENSORS).read_bytes()[:1000])
  assert _convert("--checkpoint", src, "--output", tmp_path / "out") == 1
  assert "unreadable HF weights" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert _convert("--checkpoint", tmp_path / "empty", "--output", tmp_path / "out") == 1
  assert "neither a .pth file nor a Hugging Face SAM directory" in capsys.readouterr().err
  assert _convert("--checkpoint", tmp / "jax", "--output", tmp_path / "out") == 1
  assert "a sam_jax checkpoint already" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_to_hf_output_is_protected(small, tmp_path, capsys):
  _, _, _, tmp = small
  out = tmp_path / "hf"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  assert _convert("--to-hf", "--checkpoint", tmp / "jax", "--output", out) == 1
  assert "exists already" in capsys.readouterr().err
  assert _convert("--to-hf", "--checkpoint", tmp / "jax", "--output", out, "--overwrite") == 1
  assert "Refusing to replace" in capsys.readouterr().err
  assert os.listdir(out) == ["notes.txt"]
  # A directory that --to-hf wrote is replaced with --overwrite.
  os.remove(out / "notes.txt")
  assert _convert("--to-hf", "--checkpoint", tmp / "jax", "--output", out) == 1
  assert _convert("--to-hf", "--checkpoint", tmp / "jax", "--output", out, "--overwrite") == 0
  assert _convert("--to-hf", "--checkpoint", tmp / "jax", "--output", out, "--overwrite") == 0
  assert sorted(os.listdir(out)) == sorted(hf.WRITTEN)


def test_non_square_model_cannot_go_to_hf(tmp_path, capsys):
  ref = reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                      image_size=128, decoder_mlp_dim=256, seed=1)
  with torch.no_grad():
    ref.image_encoder.pos_embed = torch.nn.Parameter(torch.randn(1, 8, 6, 64))
    ref.image_encoder.blocks[1].attn.rel_pos_w = torch.nn.Parameter(torch.randn(11, 32))
  _, jax_dir, _, _ = save_and_convert(ref, tmp_path)
  assert _convert("--to-hf", "--checkpoint", jax_dir, "--output", tmp_path / "hf") == 1
  assert "square inputs only" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.memory_heavy
def test_parity_full_size_vit_b(tmp_path):
  """Full-size ViT-B (HF's SamVisionConfig defaults) with every tensor random."""
  ref = hf_sam(hidden_size=768, depth=12, heads=12, global_attn_indexes=(2, 5, 8, 11),
               image_size=1024, window_size=14, decoder_mlp_dim=2048, seed=7)
  ref.save_pretrained(tmp_path / "hf")
  assert _convert("--checkpoint", tmp_path / "hf", "--output", tmp_path / "jax") == 0
  model, params = load_sam(tmp_path / "jax")
  assert model.image_encoder.embed_dim == 768 and model.image_size == (1024, 1024)
  hf_end_to_end(ref, model, params, (1024, 704), (1500, 1031), "ViT-B")
