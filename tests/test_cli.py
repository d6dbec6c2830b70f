"""`python -m sam_jax.amg` and `python -m sam_jax.predict` end to end on a tiny checkpoint."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data

from sam_jax import amg as amg_cli
from sam_jax import image_io
from sam_jax import predict as predict_cli
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.predictor import SamPredictor
from sam_jax.utils.mask_ops import rle_to_mask
from tests.reference import AMG_TEST_SETTINGS

SETTINGS = ["--points-per-side", "8", "--pred-iou-thresh", "0.3", "--stability-score-thresh",
            "0.6", "--stability-score-offset", "0.1", "--box-nms-thresh", "0.999"]
GENERATOR_SETTINGS = AMG_TEST_SETTINGS


@pytest.fixture(scope="module")
def checkpoint(tiny_sam):
  _, directory, model, params = tiny_sam
  return directory, model, params


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Two photos (PNG and JPEG) and a file that is not an image."""
  folder = tmp_path_factory.mktemp("images")
  cv2.imwrite(str(folder / "cat.png"), cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR))
  cv2.imwrite(str(folder / "coffee.jpg"),
              cv2.cvtColor(np.ascontiguousarray(skimage.data.coffee()[::2, ::2]),
                           cv2.COLOR_RGB2BGR))
  (folder / "notes.txt").write_text("not an image")
  return folder


@pytest.fixture(scope="module")
def amg_output(checkpoint, images, tmp_path_factory):
  out = tmp_path_factory.mktemp("amg")
  assert amg_cli.main(["--checkpoint", checkpoint[0], "--input", str(images), "--output",
                       str(out), "--overlay", *SETTINGS]) == 0
  return out


def test_amg_cli_writes_pngs_and_metadata(checkpoint, images, amg_output):
  _, model, params = checkpoint
  generator = SamAutomaticMaskGenerator(model, params, **GENERATOR_SETTINGS)
  assert sorted(os.listdir(amg_output)) == ["cat", "cat_overlay.png", "coffee",
                                            "coffee_overlay.png"]
  for name, filename in (("cat", "cat.png"), ("coffee", "coffee.jpg")):
    image = image_io.read_rgb(str(images / filename))
    records = generator.generate(image)
    folder = amg_output / name
    assert len(records) > 0
    assert sorted(os.listdir(folder)) == sorted([f"{i}.png" for i in range(len(records))] +
                                                ["metadata.csv"])
    with open(folder / "metadata.csv") as f:
      rows = list(csv.reader(f))
    assert ",".join(rows[0]) == amg_cli.METADATA_HEADER
    assert len(rows) == len(records) + 1
    for i, (row, record) in enumerate(zip(rows[1:], records)):
      png = cv2.imread(str(folder / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
      np.testing.assert_array_equal(png, record["segmentation"] * 255)
      expected = [i, record["area"], *record["bbox"], *record["point_coords"][0],
                  record["predicted_iou"], record["stability_score"], *record["crop_box"]]
      np.testing.assert_allclose([float(v) for v in row], expected, rtol=1e-6)
    overlay = cv2.imread(str(amg_output / f"{name}_overlay.png"))
    assert overlay.shape == image.shape
    assert not np.array_equal(overlay[..., ::-1], image)  # the masks are drawn


@pytest.mark.slow
def test_amg_cli_coco_rle_and_overwrite(checkpoint, images, amg_output, tmp_path, capsys):
  args = ["--checkpoint", checkpoint[0], "--input", str(images / "cat.png"), "--output",
          str(tmp_path), "--convert-to-rle", *SETTINGS]
  assert amg_cli.main(args) == 0
  with open(tmp_path / "cat.json") as f:
    records = json.load(f)
  assert len(records) == len(os.listdir(amg_output / "cat")) - 1
  for i, record in enumerate(records):
    assert isinstance(record["segmentation"]["counts"], str)
    png = cv2.imread(str(amg_output / "cat" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(rle_to_mask(record["segmentation"]), png > 0)
  assert amg_cli.main(args) == 1  # would overwrite
  assert "--overwrite" in capsys.readouterr().err
  assert amg_cli.main(args + ["--overwrite", "--device", "cpu"]) == 0


def test_amg_cli_errors(checkpoint, tmp_path, capsys):
  (tmp_path / "photo.png").write_bytes(b"")
  assert amg_cli.main(["--checkpoint", checkpoint[0], "--input", str(tmp_path / "missing.png"),
                       "--output", str(tmp_path)]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert amg_cli.main(["--checkpoint", str(tmp_path), "--input", str(tmp_path),
                       "--output", str(tmp_path / "out")]) == 1
  assert "not a sam_jax checkpoint" in capsys.readouterr().err
  assert amg_cli.main(["--checkpoint", checkpoint[0], "--model-type", "vit_h", "--input",
                       str(tmp_path), "--output", str(tmp_path / "out")]) == 1
  assert "vit_h" in capsys.readouterr().err


def test_predict_cli(checkpoint, images, tmp_path):
  directory, model, params = checkpoint
  image_path = str(images / "cat.png")
  assert predict_cli.main(["--checkpoint", directory, "--image", image_path, "--output",
                           str(tmp_path), "--point", "200,150", "--point", "300,100,0",
                           "--box", "100,50,400,280"]) == 0
  predictor = SamPredictor(model, params)
  image = image_io.read_rgb(image_path)
  predictor.set_image(image)
  masks, iou, _ = predictor.predict(np.array([[200, 150], [300, 100]]), np.array([1, 0]),
                                    np.array([100, 50, 400, 280]))
  with open(tmp_path / "predictions.json") as f:
    meta = json.load(f)
  np.testing.assert_allclose(meta["predicted_iou"], iou, rtol=1e-6)
  assert meta["best"] == int(np.argmax(iou))
  for i, mask in enumerate(masks):
    png = cv2.imread(str(tmp_path / f"mask_{i}.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(png, mask * 255)
  overlay = cv2.imread(str(tmp_path / "overlay.png"))
  assert overlay.shape == image.shape and not np.array_equal(overlay[..., ::-1], image)


def test_predict_cli_errors(checkpoint, images, tmp_path, capsys):
  base = ["--checkpoint", checkpoint[0], "--image", str(images / "cat.png"), "--output",
          str(tmp_path)]
  assert predict_cli.main(base + ["--point", "900,10"]) == 1
  assert "outside" in capsys.readouterr().err
  assert predict_cli.main(base[:3] + [str(images / "notes.txt")] + base[4:] +
                          ["--point", "1,1"]) == 1
  assert "Could not load" in capsys.readouterr().err
  for bad in (["--point", "1,2,3,4"], ["--box", "1,2"], []):
    with pytest.raises(SystemExit):
      predict_cli.main(base + bad)


@pytest.mark.slow
@pytest.mark.parametrize("module, option", [("sam_jax.amg", "--convert-to-rle"),
                                            ("sam_jax.predict", "--point")])
def test_modules_run_as_scripts(module, option):
  result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0 and option in result.stdout
