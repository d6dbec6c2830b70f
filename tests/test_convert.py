"""sam_jax.convert_weights: both directions, and loud failures that write nothing."""

import os

import pytest
import torch

from sam_jax import convert_weights
from sam_jax.checkpoint import CheckpointError, load_sam


@pytest.fixture(scope="module")
def converted(small_conversion):
  ref, pth, out, _, _ = small_conversion
  return ref, pth, out


def _convert(*args):
  return convert_weights.main([str(a) for a in args])


def test_round_trip_is_exact(converted, tmp_path):
  ref, pth, out = converted
  back = tmp_path / "back.pth"
  assert _convert("--to-pytorch", "--checkpoint", out, "--output", back) == 0
  original = torch.load(pth, weights_only=True)
  again = torch.load(back, weights_only=True)
  assert set(original) == set(again)
  for k in original:
    assert original[k].dtype == again[k].dtype, k
    torch.testing.assert_close(again[k], original[k], rtol=0, atol=0, msg=k)
  # and the reference loads it into the same architecture
  ref.load_state_dict(again)


def test_detects_architecture(converted):
  _, _, out = converted
  model, _ = load_sam(out)
  enc = model.image_encoder
  assert (enc.embed_dim, enc.depth, enc.num_heads, tuple(enc.global_attn_indexes)) == (
      64, 2, 2, (1,))
  assert model.image_size == (128, 128)


def _edited(pth, tmp_path, edit):
  sd = torch.load(pth, weights_only=True)
  sd = edit(sd) or sd
  path = tmp_path / "edited.pth"
  torch.save(sd, path)
  return path


@pytest.mark.parametrize("edit,expected", [
    (lambda sd: [sd.pop("mask_decoder.iou_token.weight"), None][1],
     "missing:\n    mask_decoder.iou_token.weight"),
    (lambda sd: sd.update({"mask_decoder.extra.weight": torch.zeros(3)}),
     "unexpected:\n    mask_decoder.extra.weight"),
    (lambda sd: sd.update({"mask_decoder.iou_token.weight": torch.zeros(1, 7)}),
     "mask_decoder.iou_token.weight: checkpoint (1, 7), model expects (1, 256)"),
])
def test_mismatches_are_listed_and_nothing_written(converted, tmp_path, capsys, edit, expected):
  _, pth, _ = converted
  out = tmp_path / "out"
  assert _convert("--checkpoint", _edited(pth, tmp_path, edit), "--output", out) == 1
  err = capsys.readouterr().err
  assert expected in err
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_bad_files(converted, tmp_path, capsys):
  _, pth, _ = converted
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(open(pth, "rb").read()[:5000])
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  sam2 = tmp_path / "sam2.pt"
  torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1),
                        "memory_attention.layers.0.norm1.weight": torch.zeros(1)}}, sam2)
  hf = tmp_path / "pytorch_model.bin"
  torch.save({"vision_encoder.patch_embed.projection.weight": torch.zeros(1)}, hf)
  cases = [(truncated, "not a readable PyTorch checkpoint"),
           (text, "not a readable PyTorch checkpoint"),
           (sam2, "SAM 2 checkpoint"),
           (hf, "Hugging Face transformers"),
           (tmp_path / "absent.pth", "does not exist")]
  for path, message in cases:
    out = tmp_path / f"out-{path.name}"
    assert _convert("--checkpoint", path, "--output", out) == 1, path
    assert message in capsys.readouterr().err, path
    assert not out.exists()


def test_model_type_must_match(converted, tmp_path, capsys):
  _, pth, _ = converted
  assert _convert("--checkpoint", pth, "--output", tmp_path / "o", "--model-type", "vit_h") == 1
  assert "--model-type vit_h expects an encoder width of 1280" in capsys.readouterr().err


def test_existing_output_is_kept(converted, tmp_path, capsys):
  _, pth, out = converted
  before = sorted(os.listdir(out))
  assert _convert("--checkpoint", pth, "--output", out) == 1
  assert "exists already" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == before
  back = tmp_path / "x.pth"
  back.write_bytes(b"keep me")
  assert _convert("--to-pytorch", "--checkpoint", out, "--output", back) == 1
  assert back.read_bytes() == b"keep me"


def test_load_sam_errors(tmp_path, converted):
  _, pth, _ = converted
  with pytest.raises(CheckpointError, match="convert it with"):
    load_sam(pth)
  with pytest.raises(CheckpointError, match="not a sam_jax checkpoint directory"):
    load_sam(tmp_path)


def test_abstract_params_are_cached_per_model_and_mesh():
  """Converting, saving and loading share one trace; under a mesh the shapes carry its
  shardings, so a cached answer from outside one is not given inside it, nor back."""
  import jax
  from configs import demo
  from sam_jax import build_sam
  from sam_jax.checkpoint import abstract_params
  model = build_sam(demo.tiny_model())
  outside = abstract_params(model)
  assert abstract_params(build_sam(demo.tiny_model())) is outside  # an equal model
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
    inside = abstract_params(model)
  assert all(x.sharding is not None for x in jax.tree.leaves(inside))
  assert all(x.sharding is None for x in jax.tree.leaves(abstract_params(model)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), inside) == jax.tree.map(
      lambda x: (x.shape, x.dtype), outside)
