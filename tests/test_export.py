"""python -m sam_jax.export: StableHLO and ONNX programs against sam_jax and Meta's ONNX model.

The decoder's contract is Meta's `SamOnnxModel` (segment_anything.utils.onnx,
return_single_mask=False): the exports are compared with it on the same
weights, and with sam_jax's own outputs. The ONNX tests are slow: jax2onnx's
first conversion in a process imports (and compiles) every plugin it has,
about 40 s on 2 busy cores. So are the StableHLO checks that compile one
more program each (other point counts, a fresh process).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from segment_anything.utils.onnx import SamOnnxModel

from sam_jax import export as ex
from sam_jax.transforms import ResizeLongestSide
from tests.conftest import assert_close_abs, assert_close_rel, assert_masks_agree
from tests.reference import reference_sam, save_and_convert
from tests.test_sam_vs_reference import EMB_REL, LOGIT_ABS, MASK_AGREE

ORIGINAL_HW = (300, 217)
pytestmark = pytest.mark.usefixtures("fast_compiles")  # these compare values, not speeds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  ref = reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                      image_size=128, decoder_mlp_dim=256, seed=3)
  _, directory, model, params = save_and_convert(ref, tmp)
  return ref, directory, model, params, tmp


def decoder_inputs(ref, n, seed, emb=None):
  """Meta's ONNX decoder inputs for n points (labels -1 to 3), a mask input on odd n;
  `emb` (1, C, h, w), else the reference's embedding of a random image."""
  rng = np.random.RandomState(seed)
  s = ref.image_encoder.img_size
  image = rng.uniform(0, 255, (1, 3, s, s)).astype(np.float32)  # drawn either way: same points
  if emb is None:
    with torch.no_grad():
      emb = ref.image_encoder(ref.preprocess(torch.from_numpy(image))).numpy()
  return dict(image_embeddings=emb,
              point_coords=rng.uniform(0, s, (1, n, 2)).astype(np.float32),
              point_labels=rng.randint(-1, 4, (1, n)).astype(np.float32),
              mask_input=rng.randn(1, 1, s // 4, s // 4).astype(np.float32),
              has_mask_input=np.array([n % 2], np.float32),
              orig_im_size=np.array(ORIGINAL_HW, np.float32))


def meta_outputs(ref, inputs):
  with torch.no_grad():
    masks, iou, low = SamOnnxModel(ref, return_single_mask=False)(
        **{k: torch.from_numpy(v) for k, v in inputs.items()})
  return masks.numpy(), iou.numpy(), low.numpy()


def check_decoder(ref, model, params, inputs, got_iou, got_low, got_masks, tag, ours=True):
  """Against Meta's SamOnnxModel, then (`ours`) sam_jax's own program and upscaling.

  A StableHLO program is sam_jax's, lowered: comparing it with Meta's is the check.
  """
  want_masks, want_iou, want_low = meta_outputs(ref, inputs)
  assert_close_abs(got_low, want_low, LOGIT_ABS, f"export low-res logits vs Meta ONNX ({tag})")
  assert_close_abs(got_iou, want_iou, LOGIT_ABS, f"export IoU vs Meta ONNX ({tag})")
  if not ours:
    return
  iou, low = jax.jit(ex.decoder_fn(model, params))(*[inputs[k] for k in ex.DECODER_IO[0]])
  assert_close_abs(got_low, low, LOGIT_ABS, f"export low-res logits vs sam_jax ({tag})")
  assert_close_abs(got_iou, iou, LOGIT_ABS, f"export IoU vs sam_jax ({tag})")
  if got_masks is not None:
    assert got_masks.shape == (1, 4, *ORIGINAL_HW)
    assert_masks_agree(got_masks > 0, want_masks > 0, MASK_AGREE,
                       f"export masks vs Meta ONNX, fraction differing ({tag})")
    input_hw = ResizeLongestSide.get_preprocess_shape(*ORIGINAL_HW, model.image_size[0])
    masks = model.apply({}, low, input_hw, ORIGINAL_HW, method=model.postprocess_masks)
    assert_masks_agree(got_masks > 0, np.asarray(masks) > 0, MASK_AGREE,
                       f"export masks vs sam_jax, fraction differing ({tag})")


def check_encoder(ref, model, params, run_encoder, batch, tag, rel=EMB_REL):
  """`run_encoder` against the reference and sam_jax; returns the reference's embeddings."""
  s = model.image_size[0]
  images = np.random.RandomState(batch).uniform(0, 255, (batch, s, s, 3)).astype(np.float32)
  got = np.asarray(run_encoder(images))
  with torch.no_grad():
    want = ref.image_encoder(ref.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)))
  assert_close_rel(got, want.numpy(), rel, f"export embeddings vs reference ({tag})")
  ours = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_images))(
      params, images)
  assert_close_rel(got, np.asarray(ours).transpose(0, 3, 1, 2), rel,
                   f"export embeddings vs sam_jax ({tag})")
  return want.numpy()


# ---------------------------------------------------------------------------- StableHLO

@pytest.fixture(scope="module")
def stablehlo(tiny):
  _, directory, _, _, tmp = tiny
  out = tmp / "stablehlo"
  assert ex.main(["--checkpoint", str(directory), "--output", str(out),
                  "--format", "stablehlo"]) == 0
  return out


def test_stablehlo_encoder(tiny, stablehlo):
  """Batch 1 here, 2 in test_stablehlo_runs_without_sam_jax: the batch is dynamic."""
  ref, _, model, params, _ = tiny
  check_encoder(ref, model, params, ex.load_stablehlo(stablehlo / "encoder.stablehlo"), 1,
                "StableHLO")


@pytest.mark.parametrize("n", [3, pytest.param(1, marks=pytest.mark.slow),
                               pytest.param(10, marks=pytest.mark.slow)])
def test_stablehlo_decoder_any_number_of_points(tiny, stablehlo, n):
  ref, _, model, params, _ = tiny
  inputs = decoder_inputs(ref, n, seed=n)
  decode = ex.load_stablehlo(stablehlo / "decoder.stablehlo")
  iou, low = decode(*[inputs[k] for k in ex.DECODER_IO[0]])
  check_decoder(ref, model, params, inputs, np.asarray(iou), np.asarray(low), None,
                f"StableHLO, {n} points", ours=False)


@pytest.mark.slow
def test_stablehlo_runs_without_sam_jax(tiny, stablehlo, tmp_path):
  """A fresh process with only JAX and NumPy: the files are the whole program."""
  ref, _, model, params, _ = tiny
  inputs = decoder_inputs(ref, 3, seed=0)
  np.savez(tmp_path / "inputs.npz", **inputs)
  script = textwrap.dedent(f"""
      import sys
      import jax, numpy as np
      def load(name):
        with open({str(stablehlo)!r} + "/" + name, "rb") as f:
          return jax.export.deserialize(bytearray(f.read())).call
      x = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
      iou, low = load("decoder.stablehlo")(*[x[k] for k in {ex.DECODER_IO[0]!r}])
      emb = load("encoder.stablehlo")(np.zeros((2, 128, 128, 3), np.float32))
      assert not [m for m in sys.modules if m.startswith(("sam_jax", "flax"))]
      np.savez({str(tmp_path / 'out.npz')!r}, iou=iou, low=low, emb=emb)
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
  out = np.load(tmp_path / "out.npz")
  assert out["emb"].shape == (2, 256, 8, 8)
  check_decoder(ref, model, params, inputs, out["iou"], out["low"], None, "StableHLO, fresh",
                ours=False)


def test_decoder_in_slots_equals_decoder(tiny):
  """The program the ONNX export converts: the points after slots whose values
  it ignores (random here) give the decoder's outputs."""
  ref, _, model, params, _ = tiny
  inputs = decoder_inputs(ref, 3, seed=5)
  args = [inputs[k] for k in ex.DECODER_IO[0]]
  iou, low = jax.jit(ex.decoder_fn(model, params))(*args)
  k = model.mask_decoder.num_output_tokens
  rng = np.random.RandomState(0)
  slotted = dict(zip(ex.DECODER_IO[0], args))
  slotted["point_coords"] = np.concatenate(
      [rng.uniform(0, 128, (1, k, 2)).astype(np.float32), inputs["point_coords"]], axis=1)
  slotted["point_labels"] = np.concatenate(
      [rng.randint(-2, 4, (1, k)).astype(np.float32), inputs["point_labels"]], axis=1)
  got_iou, got_low = jax.jit(ex.decoder_fn(model, params, slots=True))(
      *[slotted[k] for k in ex.DECODER_IO[0]])
  assert_close_abs(got_low, low, LOGIT_ABS, "decoder in slots vs decoder, low-res logits")
  assert_close_abs(got_iou, iou, LOGIT_ABS, "decoder in slots vs decoder, IoU")


def test_manifest(stablehlo):
  manifest = json.loads((stablehlo / ex.MANIFEST).read_text())
  assert manifest["encoder"]["inputs"]["images"]["shape"] == ["B", 128, 128, 3]
  assert manifest["decoder"]["inputs"]["point_coords"]["shape"] == [1, "N", 2]
  assert list(manifest["decoder"]["outputs"]) == ["iou_predictions", "low_res_masks"]
  assert sorted(os.listdir(stablehlo)) == sorted(ex.FILES["stablehlo"])


# ---------------------------------------------------------------------------- bad input

def test_bad_input_writes_nothing(tiny, tmp_path, capsys):
  ref, directory, _, _, _ = tiny
  out = tmp_path / "out"
  assert ex.main(["--checkpoint", str(directory), "--output", str(out), "--format", "tflite"]) == 1
  assert "Unknown format 'tflite'; choose one of stablehlo, onnx" in capsys.readouterr().err
  pth = tmp_path / "sam.pth"
  torch.save(ref.state_dict(), pth)
  for bad in (pth, tmp_path / "absent", tmp_path):
    assert ex.main(["--checkpoint", str(bad), "--output", str(out), "--format", "stablehlo"]) == 1
    assert "not a sam_jax checkpoint directory" in capsys.readouterr().err
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if "sam_jax-tmp" in p]


def test_max_points_is_gone(tiny, tmp_path, capsys):
  _, directory, _, _, _ = tiny
  out = tmp_path / "out"
  with pytest.raises(SystemExit):
    ex.main(["--checkpoint", str(directory), "--output", str(out), "--format", "onnx",
             "--max-points", "16"])
  assert "--max-points is gone: the ONNX decoder takes any number of points" in (
      capsys.readouterr().err)
  assert not out.exists()


def test_existing_output_is_kept(tiny, stablehlo, tmp_path, capsys):
  _, directory, _, _, _ = tiny
  before = {p: (stablehlo / p).read_bytes() for p in os.listdir(stablehlo)}
  args = ["--checkpoint", str(directory), "--output", str(stablehlo), "--format", "stablehlo"]
  assert ex.main(args) == 1
  assert "exists already" in capsys.readouterr().err
  assert {p: (stablehlo / p).read_bytes() for p in os.listdir(stablehlo)} == before
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  args = ["--checkpoint", str(directory), "--output", str(mine), "--format", "stablehlo"]
  assert ex.main(args + ["--overwrite"]) == 1
  assert "Refusing to replace" in capsys.readouterr().err
  assert os.listdir(mine) == ["notes.txt"]
  # An export's own directory is replaced with --overwrite.
  os.remove(mine / "notes.txt")
  (mine / "encoder.stablehlo").write_bytes(b"old")
  assert ex.main(args + ["--overwrite"]) == 0
  assert sorted(os.listdir(mine)) == sorted(ex.FILES["stablehlo"])
  assert (mine / "encoder.stablehlo").read_bytes() != b"old"


# ---------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_export(tiny):
  pytest.importorskip("jax2onnx")
  ort = pytest.importorskip("onnxruntime")
  _, directory, _, _, tmp = tiny
  out = tmp / "onnx"
  assert ex.main(["--checkpoint", str(directory), "--output", str(out), "--format", "onnx"]) == 0
  options = ort.SessionOptions()
  options.log_severity_level = 3  # not the converter's unused-constant notes
  return {name: ort.InferenceSession(str(out / f"{name}.onnx"), options)
          for name in ("encoder", "decoder")}, out


@pytest.mark.slow
def test_onnx_encoder_dynamic_batch(tiny, onnx_export):
  ref, _, model, params, _ = tiny
  sessions, _ = onnx_export
  for batch in (1, 2):
    check_encoder(ref, model, params, lambda x: sessions["encoder"].run(None, {"images": x})[0],
                  batch, "ONNX")


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3, 10, 40])
def test_onnx_decoder_meta_io(tiny, onnx_export, n):
  """Any number of points: 40 is more than the 16 that earlier exports padded to."""
  ref, _, model, params, _ = tiny
  sessions, _ = onnx_export
  decoder = sessions["decoder"]
  assert [i.name for i in decoder.get_inputs()] == ex.ONNX_DECODER_IO[0]
  assert [o.name for o in decoder.get_outputs()] == ex.ONNX_DECODER_IO[1]
  inputs = decoder_inputs(ref, n, seed=n)
  masks, iou, low = decoder.run(None, inputs)
  check_decoder(ref, model, params, inputs, iou, low, masks, f"ONNX, {n} points")


@pytest.mark.slow
def test_onnx_manifest(onnx_export):
  _, out = onnx_export
  manifest = json.loads((out / ex.MANIFEST).read_text())
  assert manifest["encoder"]["inputs"]["images"]["shape"] == ["B", 128, 128, 3]
  decoder = manifest["decoder"]
  assert decoder["inputs"]["point_coords"]["shape"] == [1, "N", 2]
  assert decoder["inputs"]["point_labels"]["shape"] == [1, "N"]
  assert list(decoder["inputs"]) == ex.ONNX_DECODER_IO[0]
  assert list(decoder["outputs"]) == ex.ONNX_DECODER_IO[1]
  assert "max_points" not in decoder
  assert sorted(os.listdir(out)) == ["decoder.onnx", "encoder.onnx", ex.MANIFEST]


@pytest.mark.slow
@pytest.mark.memory_heavy
def test_onnx_encoder_full_size_vit_b(tmp_path):
  """ViT-B at 1024 with every tensor random: the ONNX encoder against the reference."""
  ort = pytest.importorskip("onnxruntime")
  ref = reference_sam(seed=8)
  _, directory, model, params = save_and_convert(ref, tmp_path)
  out = tmp_path / "onnx"
  assert ex.main(["--checkpoint", str(directory), "--output", str(out), "--format", "onnx"]) == 0
  options = ort.SessionOptions()
  options.log_severity_level = 3
  session = ort.InferenceSession(str(out / "encoder.onnx"), options)
  emb = check_encoder(ref, model, params, lambda x: session.run(None, {"images": x})[0], 1,
                      "ONNX ViT-B")
  decoder = ort.InferenceSession(str(out / "decoder.onnx"), options)
  inputs = decoder_inputs(ref, 3, seed=1, emb=emb)  # the reference's ViT-B ran once
  masks, iou, low = decoder.run(None, inputs)
  check_decoder(ref, model, params, inputs, iou, low, masks, "ONNX ViT-B, 3 points", ours=False)
