"""`python -m sam_jax.data_engine`: annotate (SA-1B schema, resume, bad input, SIGTERM, merge),
score, and two processes sharing one folder.

A tiny randomised model at 64 pixels keeps each run to seconds; the thresholds
are opened (0 keeps every mask) so that random weights keep masks at all.
"""

import inspect
import json
import os
import shutil
import signal
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from configs.demo import tiny_model
from sam_jax import data_engine
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.train import data as train_data
from sam_jax.train import demo_data
from tests.conftest import Processes, cpu_env, free_port, write_random_checkpoint

# Runs are compared, not timed: compiled without XLA's optimisations.
pytestmark = pytest.mark.usefixtures("fast_compiles")

OPEN = ["--points-per-side", "4", "--crop-n-layers", "0", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0", "--min-mask-region-area", "0", "--box-nms-thresh", "0.9",
        "--max-mask-fraction", "1.01", "--quiet"]
NUM_IMAGES = 5


def tiny_model_config():
  m = tiny_model(64)
  m.image_encoder.update(dict(depth=1, global_attn_indexes=()))
  m.mask_decoder.transformer_depth = 1
  return m


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"),
                                 tiny_model_config())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  """(images folder, ground-truth folder): generated shapes, 64 and 48 x 80 pixels, jpg and png."""
  root = tmp_path_factory.mktemp("shapes")
  gt = str(root / "gt")
  names = demo_data.write_dataset(gt, NUM_IMAGES, size=64, max_shapes=3, seed=1)
  images = root / "images"
  os.makedirs(images / "sub")
  for i, name in enumerate(names):
    if i == 1:  # one png, one in a subfolder: both found, png bytes kept
      Image.open(os.path.join(gt, name + ".jpg")).save(images / f"{name}.png")
    elif i == 2:
      shutil.copy(os.path.join(gt, name + ".jpg"), images / "sub" / f"{name}.jpg")
    else:
      shutil.copy(os.path.join(gt, name + ".jpg"), images / f"{name}.jpg")
  return str(images), gt


def expected_names(images):
  return sorted(it.name for it in data_engine.folder_items(images))


def annotate(checkpoint, images, out, *extra):
  return data_engine.main(["annotate", "--checkpoint", checkpoint, "--input", images,
                           "--output", str(out), *OPEN, *extra])


def outputs(out):
  files = os.listdir(out)
  return sorted(f[:-5] for f in files if f.endswith(".json") and not f.startswith("engine_"))


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_every_generator_parameter_is_a_flag():
  params = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters)
  params -= {"self", "model", "params", "output_mode", "mesh"}  # output is SA-1B's coco_rle
  flags = set(data_engine.generator_flag_names()) | {"point_grids"}
  assert params == flags


def test_annotate_writes_sa1b_that_the_training_reader_reads(checkpoint, shapes, tmp_path):
  images, _ = shapes
  out = tmp_path / "out"
  assert annotate(checkpoint, images, out, "--batch-size", "2") == 0
  names = expected_names(images)
  assert outputs(out) == names
  assert any("__" in n for n in names)  # the subfolder's image, flattened
  total = 0
  for i, name in enumerate(names):
    record = read_json(out / f"{name}.json")
    assert sorted(record) == ["annotations", "image"]
    image = record["image"]
    assert sorted(image) == ["file_name", "height", "image_id", "width"]
    assert os.path.exists(out / image["file_name"]) and image["image_id"] == i
    with Image.open(out / image["file_name"]) as im:
      assert im.size == (image["width"], image["height"])
    for a in record["annotations"]:
      assert sorted(a) == sorted(["id", "segmentation", "bbox", "area", "predicted_iou",
                                  "stability_score", "point_coords", "crop_box",
                                  data_engine.SOURCE_KEY])
      assert a["segmentation"]["size"] == [image["height"], image["width"]]
      rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
      assert a["area"] == int(mask_utils.area(rle))
      np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle), atol=1)
    total += len(record["annotations"])
  assert total > 0, "no masks kept: the test would prove nothing about them"
  png = [n for n in names if os.path.exists(out / f"{n}.png")]
  assert len(png) == 1 and (out / f"{png[0]}.png").read_bytes() == (
      open(os.path.join(images, png[0] + ".png"), "rb").read())

  stats = read_json(out / data_engine.STATS_FILE)
  assert stats["total"]["images"] == NUM_IMAGES and stats["total"]["masks"] == total
  assert stats["processes"]["0"]["images_per_s"] > 0 and stats["total"]["corrupt"] == {}

  # The training reader, unchanged: the folder through TFDS's segment_anything features.
  records, skipped = train_data.folder_records(str(out), str(tmp_path / "tfds"))
  assert skipped == {} and len(records) == NUM_IMAGES
  examples = train_data.Sa1bExamples(records, 64, 16, max_masks=64, max_mask_fraction=1.0)
  valid = [examples.example(records[i], np.random.default_rng(0))["valid"].sum()
           for i in range(NUM_IMAGES)]
  assert examples.num_skipped == 0 and sum(valid) > 0


def test_rerun_skips_finished_images_and_a_kill_loses_nothing(checkpoint, shapes, tmp_path,
                                                              monkeypatch):
  images, _ = shapes
  out = tmp_path / "out"
  writes = []
  real_write = data_engine.atomic_write

  def killed_at_the_third_json(path, content):
    if path.endswith(".json") and not os.path.basename(path).startswith("engine_"):
      writes.append(path)
      if len(writes) == 3:  # killed mid-write: the temporary file is there, not the JSON
        with open(path + data_engine.TMP_SUFFIX, "wb") as f:
          f.write(content[:10])
        raise KeyboardInterrupt
    real_write(path, content)

  monkeypatch.setattr(data_engine, "atomic_write", killed_at_the_third_json)
  with pytest.raises(KeyboardInterrupt):
    annotate(checkpoint, images, out)
  monkeypatch.setattr(data_engine, "atomic_write", real_write)
  first = outputs(out)
  assert len(first) == 2
  mtimes = {n: os.stat(out / f"{n}.json").st_mtime_ns for n in first}

  assert annotate(checkpoint, images, out) == 0
  names = expected_names(images)
  assert outputs(out) == names
  assert {n: os.stat(out / f"{n}.json").st_mtime_ns for n in first} == mtimes  # not redone
  stats = read_json(out / data_engine.STATS_FILE)["total"]
  assert (stats["images"], stats["already_done"]) == (NUM_IMAGES - 2, 2)
  for name in names:  # every JSON whole; image copies one per name
    read_json(out / f"{name}.json")
  images_out = [f for f in os.listdir(out) if f.endswith((".jpg", ".png"))]
  assert sorted(os.path.splitext(f)[0] for f in images_out) == names
  assert annotate(checkpoint, images, out) == 0  # a third run has nothing left to do
  assert read_json(out / data_engine.STATS_FILE)["total"]["already_done"] == NUM_IMAGES


def test_sigterm_finishes_the_image_in_hand_and_stops(checkpoint, shapes, tmp_path, monkeypatch,
                                                      capsys):
  images, _ = shapes
  out = tmp_path / "out"
  real_record = data_engine.sa1b_record

  def record_then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first image is in hand
    return real_record(*args, **kwargs)

  monkeypatch.setattr(data_engine, "sa1b_record", record_then_sigterm)
  assert annotate(checkpoint, images, out) == data_engine.PREEMPTED_EXIT == 75
  assert "Stopped by SIGTERM after 1 images" in capsys.readouterr().err
  assert len(outputs(out)) == 1
  stats = read_json(out / data_engine.STATS_FILE)["processes"]["0"]
  assert stats["stopped"] == "SIGTERM" and stats["images"] == 1
  assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
  monkeypatch.setattr(data_engine, "sa1b_record", real_record)
  assert annotate(checkpoint, images, out) == 0
  assert outputs(out) == expected_names(images)


def test_corrupt_images_are_listed_and_skipped(checkpoint, shapes, tmp_path):
  images, _ = shapes
  mixed = tmp_path / "mixed"
  shutil.copytree(images, mixed)
  (mixed / "garbage.jpg").write_bytes(b"not an image at all")
  good = open(os.path.join(images, "sa_000000.jpg"), "rb").read()
  (mixed / "truncated.jpg").write_bytes(good[:len(good) // 2])
  out = tmp_path / "out"
  assert annotate(checkpoint, str(mixed), out) == 0
  assert outputs(out) == expected_names(images)
  corrupt = read_json(out / data_engine.STATS_FILE)["total"]["corrupt"]
  assert sorted(os.path.basename(p) for p in corrupt) == ["garbage.jpg", "truncated.jpg"]


def test_bad_folders_get_a_message_and_exit_1(checkpoint, shapes, tmp_path, capsys):
  images, _ = shapes
  empty = tmp_path / "empty"
  os.makedirs(empty / "sub")
  (empty / "notes.txt").write_text("no images")
  assert annotate(checkpoint, str(empty), tmp_path / "out") == 1
  assert "holds no jpg or png images" in capsys.readouterr().err
  assert annotate(checkpoint, images, os.path.join(images, "out")) == 1
  assert "is inside --input" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(images, "out"))
  foreign = tmp_path / "foreign"
  os.makedirs(foreign)
  (foreign / "mine.txt").write_text("someone's")
  assert annotate(checkpoint, images, foreign) == 1
  assert "did not write" in capsys.readouterr().err
  out = tmp_path / "out"
  assert annotate(checkpoint, images, out) == 0
  assert annotate(checkpoint, images, out, "--points-per-side", "3") == 1  # OPEN has 4 first
  assert "other settings (points_per_side" in capsys.readouterr().err


def _square(h, w, y0, x0, y1, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


def test_merge_keeps_every_human_mask():
  h, w = 20, 30
  human = dict(image=dict(image_id=7), annotations=[
      dict(demo_data.annotation(_square(h, w, 0, 0, 10, 10), 3), note="kept as is"),
      # polygons and an uncompressed RLE are kept as they are too
      dict(id=5, segmentation=[[20.0, 10.0, 29.0, 10.0, 29.0, 19.0, 20.0, 19.0]]),
      dict(id=6, segmentation=dict(size=[h, w], counts=[0, 5, 15, h * w - 20]))])
  auto_masks = [_square(h, w, 0, 0, 10, 9),  # IoU 0.9 with human 3: dropped
                _square(h, w, 0, 0, 10, 20),  # IoU 0.5 with human 3: kept (not above 0.5)
                _square(h, w, 12, 0, 20, 10)]  # overlaps nothing: kept
  auto = dict(image=dict(image_id=0, width=w, height=h, file_name="x.jpg"),
              annotations=[dict(demo_data.annotation(m, i), source="auto")
                           for i, m in enumerate(auto_masks)])
  merged = data_engine.merge_human(auto, human, iou_thresh=0.5)
  anns = merged["annotations"]
  for original, kept in zip(human["annotations"], anns[:3]):
    assert kept == dict(original, source="human")
  assert [a["source"] for a in anns] == ["human"] * 3 + ["auto"] * 2
  assert [a["id"] for a in anns[3:]] == [7, 8]
  assert [a["bbox"] for a in anns[3:]] == [auto["annotations"][1]["bbox"],
                                           auto["annotations"][2]["bbox"]]
  assert merged["image"]["image_id"] == 7


def test_annotate_existing_merges_human_masks(checkpoint, shapes, tmp_path):
  images, gt = shapes
  out = tmp_path / "out"
  assert annotate(checkpoint, images, out, "--existing", gt) == 0
  for name in expected_names(images):
    record = read_json(out / f"{name}.json")
    if not os.path.exists(os.path.join(gt, f"{name}.json")):  # the subfolder's image
      assert all(a["source"] == "auto" for a in record["annotations"])
      continue
    human = read_json(os.path.join(gt, f"{name}.json"))
    kept = [a for a in record["annotations"] if a["source"] == "human"]
    assert [dict(a, source=None) for a in kept] == [
        dict(a, source=None) for a in human["annotations"]]
    h, w = record["image"]["height"], record["image"]["width"]
    humans = [data_engine.compressed_rle(a["segmentation"], h, w) for a in kept]
    for a in record["annotations"]:
      if a["source"] == "auto":
        rle = data_engine.compressed_rle(a["segmentation"], h, w)
        assert data_engine.mask_ious([rle], humans).max(initial=0) <= 0.5


def _write(folder, name, masks, h, w):
  os.makedirs(folder, exist_ok=True)
  record = dict(image=dict(image_id=0, width=w, height=h, file_name=name + ".jpg"),
                annotations=[demo_data.annotation(m, i) for i, m in enumerate(masks)])
  with open(os.path.join(folder, name + ".json"), "w") as f:
    json.dump(record, f)


def test_score_on_known_masks(tmp_path, capsys):
  h, w = 10, 10
  ref, auto = tmp_path / "ref", tmp_path / "auto"
  # a: 10x4 ref vs 10x4 exact (1.0) and 10x2 inside it (0.5); b: 5x10 vs 4x10 (0.8)
  _write(ref, "a", [_square(h, w, 0, 0, 10, 4)], h, w)
  _write(auto, "a", [_square(h, w, 0, 0, 10, 2), _square(h, w, 0, 0, 10, 4)], h, w)
  _write(ref, "b", [_square(h, w, 0, 0, 5, 10), _square(h, w, 5, 0, 10, 2)], h, w)
  _write(auto, "b", [_square(h, w, 0, 0, 4, 10)], h, w)
  _write(ref, "c", [_square(h, w, 0, 0, 3, 3)], h, w)  # not annotated: best IoU 0
  result = data_engine.score(str(auto), str(ref))
  assert result["missing_images"] == ["c"]
  np.testing.assert_allclose(result["mean_best_iou"], (1.0 + 0.8 + 0.0 + 0.0) / 4)
  assert result["matched"] == {"0.5": 0.5, "0.75": 0.5, "0.9": 0.25}
  assert result["auto_masks_per_image"] == 1.0 and result["reference_masks_per_image"] == 4 / 3
  assert data_engine.main(["score", "--auto", str(auto), "--reference", str(ref), "--json",
                           str(tmp_path / "score.json")]) == 0
  assert "mean best IoU" in capsys.readouterr().out
  assert read_json(tmp_path / "score.json") == result


def test_tfds_input(checkpoint, shapes, tmp_path):
  """--input tfds:DIR:train over a prepared SA-1B-layout dataset: the stored bytes, annotated."""
  _, gt = shapes
  from sam_jax.train import sa1b_folder
  builder = sa1b_folder.prepare_folder(gt, str(tmp_path / "tfds"))
  out = tmp_path / "out"
  assert annotate(checkpoint, f"tfds:{builder.data_dir}:train", out) == 0
  names = outputs(out)
  assert len(names) == NUM_IMAGES and all(n.startswith("sa1b_folder_train_") for n in names)
  first = read_json(out / f"{names[0]}.json")["image"]["file_name"]
  assert (out / first).read_bytes() == open(os.path.join(gt, "sa_000000.jpg"), "rb").read()


@pytest.mark.slow
def test_two_processes_annotate_disjoint_halves(checkpoint, shapes, tmp_path):
  images, _ = shapes
  out = tmp_path / "out"
  port = free_port()
  Processes(tmp_path, {f"p{pid}": [
      sys.executable, "-m", "sam_jax.data_engine", "annotate", "--checkpoint", checkpoint,
      "--input", images, "--output", str(out), *OPEN, "--coordinator_address",
      f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(pid)] for pid in (0, 1)},
            cpu_env(2, xla_flags="")).succeed(timeout=300)
  names = expected_names(images)
  assert outputs(out) == names
  stats = read_json(out / data_engine.STATS_FILE)
  shares = [len(names[0::2]), len(names[1::2])]
  assert [stats["processes"][k]["images"] for k in ("0", "1")] == shares
  assert stats["total"]["images"] == NUM_IMAGES
  assert stats["total"]["masks"] == sum(
      len(read_json(out / f"{n}.json")["annotations"]) for n in names)


def test_generate_batch_equals_generate_image_by_image(checkpoint, shapes):
  """Crops of several images embedded 3 at a time, over a mesh, give each image's own records."""
  from sam_jax.checkpoint import load_sam
  images, _ = shapes
  model, params = load_sam(checkpoint)
  pictures = [data_engine.decode_image(it.read())[0]
              for it in data_engine.folder_items(images)[:2]]
  settings = dict(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0,
                  crop_n_layers=1, output_mode="coco_rle")
  one = SamAutomaticMaskGenerator(model, params, **settings)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batched = SamAutomaticMaskGenerator(model, params, crops_per_encode=3, mesh=mesh, **settings)
  expected = [one.generate(p) for p in pictures]
  got = list(batched.generate_batch(pictures))
  assert [len(r) for r in got] == [len(r) for r in expected] and len(expected[0]) > 0
  for ours, theirs in zip(got, expected):
    for a, b in zip(ours, theirs):
      assert a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"]
      np.testing.assert_allclose(a["predicted_iou"], b["predicted_iou"], atol=1e-5)


@pytest.mark.slow
def test_round_runs_end_to_end(tmp_path, capsys):
  """The model-in-the-loop round, shrunk to 2 steps an arm: every arm trained and scored."""
  work = tmp_path / "round"
  assert data_engine.main([
      "round", "--workdir", str(work), "--num-labelled", "4", "--num-unlabelled", "3",
      "--num-heldout", "2", "--steps", "2", "--engine-flags", *OPEN]) == 0
  table = capsys.readouterr().out
  assert "| labelled only | 4 |" in table and "| labelled + engine masks |" in table
  (result,) = [f for f in os.listdir(work) if f.startswith("round_")]
  result = read_json(work / result)
  assert result["engine masks vs withheld ground truth"]["images"] == 3
  assert result["engine stats"]["images"] == 3
