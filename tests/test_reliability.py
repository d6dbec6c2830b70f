"""What a hostile user tries: nothing of theirs is deleted, nothing corrupt loads silently,
every failure is one clear message (issue 19, outside training)."""

import glob
import json
import os
import shutil
import stat

import cv2
import numpy as np
import pytest
import torch

from sam_jax import amg as amg_cli
from sam_jax import convert_weights
from sam_jax import predict as predict_cli
from sam_jax.checkpoint import CheckpointError, load_manifest, load_sam, verify_checksums


@pytest.fixture(scope="module")
def converted(small_conversion):
  _, pth, out, _, params = small_conversion
  return pth, out, params


def _convert(*args):
  return convert_weights.main([str(a) for a in args])


def _copy(out, tmp_path, name="copy"):
  dst = tmp_path / name
  shutil.copytree(out, dst)
  return dst


# 1. --overwrite replaces only what sam_jax wrote, atomically.

def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(converted, tmp_path, capsys,
                                                            monkeypatch):
  pth, _, _ = converted
  (tmp_path / "train.py").write_text("my sources")
  monkeypatch.chdir(tmp_path)
  assert _convert("--checkpoint", pth, "--output", ".", "--overwrite") == 1
  assert "Refusing to replace" in capsys.readouterr().err
  assert (tmp_path / "train.py").read_text() == "my sources"
  notes = tmp_path / "notes.txt"
  notes.write_text("keep")
  assert _convert("--checkpoint", pth, "--output", notes, "--overwrite") == 1
  assert "Refusing to replace" in capsys.readouterr().err and notes.read_text() == "keep"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "train.py"]  # nothing left behind


def test_overwrite_swaps_a_checkpoint_or_an_empty_folder(converted, tmp_path):
  pth, out, params = converted
  target = _copy(out, tmp_path)
  (tmp_path / "empty").mkdir()
  # What a killed run left under the output's own temporary name is cleaned up.
  (tmp_path / ".copy.sam_jax-tmp").mkdir()
  (tmp_path / ".copy.sam_jax-tmp" / "junk").write_bytes(b"0" * 100)
  old = os.umask(0o022)
  try:
    for dst in (target, tmp_path / "empty"):
      assert _convert("--checkpoint", pth, "--output", dst, "--overwrite") == 0
      assert stat.S_IMODE(os.stat(dst).st_mode) == 0o755  # the umask applies, not mkdtemp's 0700
  finally:
    os.umask(old)
  assert sorted(os.listdir(tmp_path)) == ["copy", "empty"]
  _, loaded = load_sam(target)
  np.testing.assert_array_equal(loaded["mask_decoder"]["iou_token"]["embedding"],
                                params["mask_decoder"]["iou_token"]["embedding"])


def test_to_pytorch_overwrite(converted, tmp_path, capsys):
  _, out, _ = converted
  back = tmp_path / "back.pth"
  assert _convert("--to-pytorch", "--checkpoint", out, "--output", back) == 0
  assert _convert("--to-pytorch", "--checkpoint", out, "--output", back, "--overwrite") == 0
  mine = tmp_path / "mine.pth"
  mine.write_text("not written by torch")
  folder = tmp_path / "folder"
  folder.mkdir()
  for dst in (mine, folder):
    assert _convert("--to-pytorch", "--checkpoint", out, "--output", dst, "--overwrite") == 1
    assert "Refusing to replace" in capsys.readouterr().err
  assert mine.read_text() == "not written by torch" and folder.is_dir()
  # A missing parent is created; a read-only one is a clear error.
  assert _convert("--to-pytorch", "--checkpoint", out, "--output", tmp_path / "a/b.pth") == 0
  if os.geteuid() != 0:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert _convert("--to-pytorch", "--checkpoint", out, "--output", ro / "x.pth") == 1
    assert "not writable" in capsys.readouterr().err
  assert not [p for p in os.listdir(tmp_path) if "sam_jax-" in p]


def test_amg_outputs_are_checked_before_any_work(tmp_path, capsys):
  images, out = tmp_path / "in", tmp_path / "out"
  images.mkdir()
  out.mkdir()
  assert amg_cli.main(["--checkpoint", "x", "--input", str(images), "--output", str(out)]) == 1
  assert "empty folder" in capsys.readouterr().err
  (images / "x.jpg").write_bytes(b"1")
  (images / "x.png").write_bytes(b"2")
  assert amg_cli.main(["--checkpoint", "x", "--input", str(images), "--output", str(out)]) == 1
  assert "x.jpg and x.png" in capsys.readouterr().err
  os.remove(images / "x.png")
  (out / "x").mkdir()
  (out / "x" / "thesis.tex").write_text("mine")
  args = ["--checkpoint", "x", "--input", str(images), "--output", str(out), "--overwrite"]
  assert amg_cli.main(args) == 1
  assert "Refusing to replace" in capsys.readouterr().err
  assert (out / "x" / "thesis.tex").read_text() == "mine"


# 6. config.json must describe its weights.

@pytest.mark.parametrize("edit,field", [
    (lambda c: c["image_encoder"].update(window_size=2), "window_size"),
    (lambda c: c["image_encoder"].update(global_attn_indexes=[0]), "global_attn_indexes"),
    (lambda c: c["image_encoder"].update(mlp_ratio=2.0), "mlp_ratio"),
])
def test_config_contradicting_the_weights_is_refused(converted, tmp_path, edit, field):
  _, out, _ = converted
  target = _copy(out, tmp_path)
  with open(target / "config.json") as f:
    config = json.load(f)
  edit(config)
  with open(target / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match=f"contradicts the weights(.|\n)*{field}"):
    load_sam(target)


def test_only_an_explicit_new_image_size_resizes(converted):
  _, out, params = converted
  model, loaded = load_sam(out, image_size=128)  # the same size: nothing resized
  np.testing.assert_array_equal(loaded["image_encoder"]["blocks_1"]["attn"]["rel_pos_h"],
                                params["image_encoder"]["blocks_1"]["attn"]["rel_pos_h"])
  model, loaded = load_sam(out, image_size=64)
  assert model.image_size == (64, 64)
  assert loaded["image_encoder"]["pos_embed"].shape == (1, 4, 4, 64)


# 7. Checksums.

def test_flipped_bytes_are_refused_naming_the_array(converted, tmp_path):
  _, out, _ = converted
  target = _copy(out, tmp_path)
  data = max(glob.glob(str(target / "params" / "**" / "d" / "*"), recursive=True),
             key=os.path.getsize)
  raw = bytearray(open(data, "rb").read())
  raw[len(raw) // 2:len(raw) // 2 + 400] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:
                                                                      len(raw) // 2 + 400])
  open(data, "wb").write(raw)
  # The checksum names the array; bytes that no longer decompress are named by the read.
  with pytest.raises(CheckpointError, match=r"damaged(.|\n)*kernel"):
    load_sam(target)


def test_verify_false_loads_despite_a_checksum_mismatch(converted, tmp_path):
  """The opt-out, on intact bytes whose recorded checksum is wrong: flipped bytes
  may land in a compressed chunk, which no read can decode, verified or not."""
  _, out, params = converted
  target = _copy(out, tmp_path)
  with open(target / "manifest.json") as f:
    manifest = json.load(f)
  manifest["arrays"]["mask_decoder/iou_token/embedding"]["sha256"] = "0" * 64
  with open(target / "manifest.json", "w") as f:
    json.dump(manifest, f)
  with pytest.raises(CheckpointError, match="1 damaged array(.|\n)*mask_decoder/iou_token"):
    load_sam(target)
  _, loaded = load_sam(target, verify=False)
  np.testing.assert_array_equal(loaded["mask_decoder"]["iou_token"]["embedding"],
                                params["mask_decoder"]["iou_token"]["embedding"])


def test_verify_names_each_changed_array(converted):
  _, out, params = converted
  changed = jax_tree_copy(params)
  changed["prompt_encoder"]["no_mask_embed"]["embedding"] = (
      changed["prompt_encoder"]["no_mask_embed"]["embedding"] + 1)
  verify_checksums(out, params, load_manifest(out))
  with pytest.raises(CheckpointError, match="prompt_encoder/no_mask_embed/embedding"):
    verify_checksums(out, changed, load_manifest(out))


def jax_tree_copy(tree):
  return {k: jax_tree_copy(v) if isinstance(v, dict) else np.array(v) for k, v in tree.items()}


# 8. Converter errors and dtypes.

def test_bf16_state_dict_converts_and_round_trips(converted, tmp_path):
  pth, _, _ = converted
  sd = {k: v.to(torch.bfloat16) for k, v in torch.load(pth, weights_only=True).items()}
  bf16 = tmp_path / "bf16.pth"
  torch.save(sd, bf16)
  assert _convert("--checkpoint", bf16, "--output", tmp_path / "j") == 0
  assert load_manifest(tmp_path / "j")["source"]["torch_dtypes"]["mask_decoder.iou_token.weight"] \
      == "bfloat16"
  assert _convert("--to-pytorch", "--checkpoint", tmp_path / "j", "--output",
                  tmp_path / "back.pth") == 0
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  for k, v in sd.items():
    assert back[k].dtype == torch.bfloat16, k
    torch.testing.assert_close(back[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.update({"mask_decoder.note": 3}), "not tensors: 'mask_decoder.note' (int)"),
    (lambda sd: sd.update({"image_encoder.patch_embed.proj.weight": torch.zeros(64)}),
     "image_encoder.patch_embed.proj.weight has shape (64,)"),
])
def test_malformed_state_dicts_are_error_lines(converted, tmp_path, capsys, edit, message):
  pth, _, _ = converted
  sd = torch.load(pth, weights_only=True)
  edit(sd)
  bad = tmp_path / "bad.pth"
  torch.save(sd, bad)
  assert _convert("--checkpoint", bad, "--output", tmp_path / "o") == 1
  assert message in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


# 9. Damaged checkpoints.

@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"variant": "vit_b"}'])
def test_corrupt_config_json_is_an_error_line(converted, tmp_path, capsys, content):
  _, out, _ = converted
  target = _copy(out, tmp_path)
  (target / "config.json").write_text(content)
  with pytest.raises(CheckpointError, match="config.json"):
    load_sam(target)
  image = tmp_path / "img.png"
  cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
  assert predict_cli.main(["--checkpoint", str(target), "--image", str(image), "--output",
                           str(tmp_path / "p"), "--point", "1,1"]) == 1
  assert "error:" in capsys.readouterr().err


def test_deleted_data_files_are_one_clear_error(converted, tmp_path, capfd):
  _, out, _ = converted
  target = _copy(out, tmp_path)
  for f in glob.glob(str(target / "params" / "**" / "d" / "*"), recursive=True)[:2]:
    os.remove(f)
  with pytest.raises(CheckpointError, match="missing"):
    load_sam(target)
  assert "Event loop is closed" not in capfd.readouterr().err


# 10. Prompts.

def test_point_label_must_be_0_or_1(tmp_path):
  with pytest.raises(SystemExit):
    predict_cli.parse_args(["--checkpoint", "c", "--image", "i", "--output", "o",
                            "--point", "3,4,0.5"])
  assert predict_cli.parse_args(["--checkpoint", "c", "--image", "i", "--output", "o",
                                 "--point", "3,4,0"]).point == [[3.0, 4.0, 0.0]]


def test_nan_mask_input_is_refused(converted):
  from sam_jax.predictor import SamPredictor
  _, out, _ = converted
  predictor = SamPredictor(*load_sam(out))
  predictor.set_image(np.zeros((64, 96, 3), np.uint8))
  mask = np.zeros((1, 32, 32), np.float32)
  predictor.predict(mask_input=mask)
  mask[0, 3, 4] = np.nan
  with pytest.raises(ValueError, match="mask_input must be finite"):
    predictor.predict(mask_input=mask)


def test_predict_replaces_only_its_own_outputs(converted, tmp_path, capsys):
  _, out, _ = converted
  image = tmp_path / "img.png"
  cv2.imwrite(str(image), np.full((48, 64, 3), 120, np.uint8))
  dst = tmp_path / "pred"
  args = ["--checkpoint", out, "--image", str(image), "--output", str(dst), "--point", "10,10",
          "--single-mask"]
  assert predict_cli.main(args) == 0
  assert sorted(os.listdir(dst)) == ["mask_0.png", "overlay.png", "predictions.json"]
  assert predict_cli.main(args) == 1
  assert "exists already" in capsys.readouterr().err
  assert predict_cli.main(args + ["--overwrite"]) == 0
  (dst / "overlay.png").write_text("my notes")
  assert predict_cli.main(args + ["--overwrite"]) == 1
  assert "Refusing to replace" in capsys.readouterr().err
  assert (dst / "overlay.png").read_text() == "my notes"


def test_a_save_prints_nothing(converted, tmp_path, caplog):
  """The demo's export and the converter end with their own lines, not Orbax's warnings."""
  import logging
  from sam_jax.checkpoint import load_config, save_sam
  _, out, params = converted
  with caplog.at_level(logging.WARNING):
    save_sam(str(tmp_path / "again"), load_config(out), params)
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
