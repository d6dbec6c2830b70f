"""The data pipeline: TFDS `segment_anything` and SA-1B-layout folders, one reader.

A tiny dataset is written in SA-1B's layout, and the same files are prepared
as a TFDS `segment_anything` dataset (array_record, no TensorFlow); both paths
must give the same examples, shard per process, keep a seeded order, resume
at a data position and skip corrupt files.
"""

import json
import os
import tempfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sam_jax.train import data, demo_data, sa1b_folder

MEAN = (123.675, 116.28, 103.53)


class FakeSegmentAnything(sa1b_folder.Sa1bFolder, skip_registration=True):
  """Writes a folder as the catalog's `segment_anything` (same features, same name)."""
  name = "segment_anything"


def _write_wide_example(directory, name, rng):
  """A 40x64 image (not square) with its shapes' masks, in SA-1B's layout."""
  img, masks = demo_data.make_example(rng, 64, 4)
  img, masks = img[:40], [m[:40] for m in masks if m[:40].mean() >= 0.01]
  Image.fromarray(img).save(os.path.join(directory, name + ".jpg"), quality=95)
  record = dict(image=dict(image_id=99, width=64, height=40, file_name=name + ".jpg"),
                annotations=[demo_data.annotation(m, j) for j, m in enumerate(masks)])
  with open(os.path.join(directory, name + ".json"), "w") as f:
    json.dump(record, f)


def _as_segment_anything(folder, data_dir):
  FakeSegmentAnything(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))


def _dcfg(**kw):
  return ml_collections.ConfigDict(dict(dict(train_dir="", eval_dir="", tfds_name="",
                                             tfds_data_dir="", max_mask_fraction=0.9), **kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  folder = root / "folder"
  demo_data.write_dataset(str(folder), 7, size=64, max_shapes=4, seed=3)
  _write_wide_example(str(folder), "sa_wide", np.random.default_rng(7))
  _as_segment_anything(folder, root / "tfds")
  return root


def _open(root, via, image_size=32, mask_size=8, max_masks=3):
  if via == "tfds":
    dcfg = _dcfg(tfds_name="segment_anything", tfds_data_dir=str(root / "tfds"))
    folder = None
  else:
    dcfg, folder = _dcfg(train_dir=str(root / "folder")), str(root / "folder")
  return data.open_examples(dcfg, "train", folder, str(root / "work"), image_size, mask_size,
                            max_masks, MEAN)


def test_tfds_and_folder_give_the_same_examples(tiny):
  via_tfds, via_folder = _open(tiny, "tfds"), _open(tiny, "folder")
  assert len(via_tfds) == len(via_folder) == 8
  for i in range(8):
    a = via_tfds.load(i, np.random.default_rng(i))
    b = via_folder.load(i, np.random.default_rng(i))
    for k in ("image", "masks", "valid"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} of example {i}")
    assert a["valid"].any()
  assert via_tfds.num_skipped == via_folder.num_skipped == 0
  # The 40x64 image: resized to 20x32 and padded with the pixel mean; masks on 5x8 of 8x8.
  wide = via_folder.load(7, np.random.default_rng(0))  # sa_wide sorts last
  assert wide["image"].shape == (32, 32, 3)
  np.testing.assert_allclose(wide["image"][20:], np.broadcast_to(MEAN, (12, 32, 3)), atol=1e-4)
  assert not np.allclose(wide["image"][19], MEAN)
  assert wide["masks"][:, 5:].sum() == 0 and wide["masks"][wide["valid"]].any()


def test_a_height_width_image_size(tiny):
  examples = _open(tiny, "folder", image_size=(32, 48), mask_size=(8, 12))
  square = examples.load(0, np.random.default_rng(0))  # 64x64 -> 32x32, padded to 32x48
  assert square["image"].shape == (32, 48, 3) and square["masks"].shape == (3, 8, 12)
  np.testing.assert_allclose(square["image"][:, 32:], np.broadcast_to(MEAN, (32, 16, 3)),
                             atol=1e-4)
  assert square["masks"][:, :, 8:].sum() == 0 and square["valid"].any()
  wide = examples.load(7, np.random.default_rng(0))  # 40x64 -> 30x48 (fits 32x48)
  assert not np.allclose(wide["image"][29, 47], MEAN)
  np.testing.assert_allclose(wide["image"][30:], np.broadcast_to(MEAN, (2, 48, 3)), atol=1e-4)
  assert wide["masks"][:, 8:].sum() == 0  # 30 x 0.25 rounds to 8 rows
  with pytest.raises(ValueError, match="not image size"):
    _open(tiny, "folder", image_size=(32, 48), mask_size=(8, 8))


def test_processes_read_disjoint_rows_that_make_the_one_process_batch(tiny):
  examples = _open(tiny, "folder")
  one = data.train_batches(examples, 4, seed=5, start_step=0)
  two = [data.train_batches(examples, 4, seed=5, start_step=0, process_index=p,
                            process_count=2) for p in range(2)]
  for step in range(3):
    whole, halves = next(one), [next(t) for t in two]
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
    rows = [data.batch_indices(8, 4, 5, step)[data.host_rows(4, p, 2)] for p in range(2)]
    assert not set(rows[0]) & set(rows[1])
  for it in [one, *two]:
    it.close()
  with pytest.raises(ValueError, match="not divisible"):
    data.host_rows(4, 0, 3)


def test_order_is_seeded_covers_each_epoch_and_resumes(tiny):
  epoch = np.concatenate([data.batch_indices(8, 4, 1, s) for s in range(2)])
  assert sorted(epoch) == list(range(8))
  assert not np.array_equal(epoch, np.concatenate([data.batch_indices(8, 4, 2, s)
                                                   for s in range(2)]))
  examples = _open(tiny, "folder")
  run = data.train_batches(examples, 4, seed=1, start_step=0)
  first = [next(run) for _ in range(4)]
  run.close()
  again = data.train_batches(examples, 4, seed=1, start_step=0)
  resumed = data.train_batches(examples, 4, seed=1, start_step=3)  # the data_step of a checkpoint
  a, r = next(again), next(resumed)
  for k in first[0]:
    np.testing.assert_array_equal(a[k], first[0][k])
    np.testing.assert_array_equal(r[k], first[3][k])
  again.close()
  resumed.close()


def test_corrupt_images_and_annotations_are_skipped_and_counted(tmp_path):
  folder = tmp_path / "folder"
  demo_data.write_dataset(str(folder), 6, size=64, max_shapes=3, seed=1)
  (folder / "sa_000001.json").write_text('{"annotations": [')  # cut-off json
  (folder / "sa_000002.jpg").write_bytes(b"not a jpeg")  # not an image at all
  jpg = (folder / "sa_000003.jpg").read_bytes()
  (folder / "sa_000003.jpg").write_bytes(jpg[:len(jpg) // 2])  # truncated: fails on decoding
  os.rename(folder / "sa_000005.jpg", tmp_path / "elsewhere.jpg")
  os.symlink(tmp_path / "elsewhere.jpg", folder / "sa_000005.jpg")  # a link out of the folder
  os.symlink("sa_000004.jpg", folder / "sa_000006.jpg")  # a link within it is fine
  os.symlink("sa_000004.json", folder / "sa_000006.json")
  _as_segment_anything(folder, tmp_path / "tfds")
  for via in ("folder", "tfds"):
    examples = _open(tmp_path, via)
    assert len(examples) == 4  # sa_000001, sa_000002 and sa_000005 were left out when prepared
    assert sorted(examples.skipped_at_prepare) == ["sa_000001", "sa_000002", "sa_000005"]
    assert "JSONDecodeError" in examples.skipped_at_prepare["sa_000001"]
    assert "outside the folder" in examples.skipped_at_prepare["sa_000005"]
    # One epoch: every example once, the truncated one empty (without a reading-ahead thread).
    batch = data.load_batch(examples, data.batch_indices(4, 4, 0, 0), 0, 0)
    assert len(examples.skipped_at_read) == 1 and examples.num_skipped == 4
    assert batch["valid"].any(axis=1).sum() == 3
    assert batch["corrupt"].sum() == 1 and sorted(batch["index"]) == [0, 1, 2, 3]
    data.load_batch(examples, data.batch_indices(4, 4, 0, 0), 0, 0)  # a second epoch
    assert examples.num_skipped == 4  # distinct examples, not skip events


def test_malformed_annotations_are_skipped_and_counted_never_decoded(tmp_path):
  """An RLE whose runs do not cover the image made pycocotools read uninitialised memory."""
  folder = tmp_path / "folder"
  folder.mkdir()
  Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "sa_1.jpg")
  good = np.zeros((64, 64), np.uint8)
  good[10:30, 5:40] = 1
  ok = demo_data.annotation(good, 0)
  anns = [ok,
          dict(ok, id=1, segmentation=dict(size=[64, 64], counts=[5, 10, 3]), area=10),
          dict(ok, id=2, segmentation=dict(size=[64, 64], counts="garbage!!")),
          dict(ok, id=3, area=5),  # the area contradicts the mask
          dict(ok, id=4, bbox=[0, 0, 64, 64])]  # so does the box
  with open(folder / "sa_1.json", "w") as f:
    json.dump(dict(image=dict(image_id=1, width=64, height=64, file_name="sa_1.jpg"),
                   annotations=anns), f)
  examples = _open(tmp_path, "folder", image_size=64, mask_size=64, max_masks=6)
  first = examples.load(0, np.random.default_rng(0))
  again = examples.load(0, np.random.default_rng(1))
  assert first["valid"].sum() == again["valid"].sum() == 1
  np.testing.assert_array_equal(first["masks"][first["valid"]][0], good)
  assert sorted(i for _, i in examples.bad_annotations) == [1, 2, 3, 4]
  reasons = " ".join(examples.bad_annotations.values())
  for word in ("sum to 18", "alphabet", "area 5", "bbox"):
    assert word in reasons, word
  with pytest.raises(ValueError, match="size"):  # (a folder leaves such an example out)
    data.check_annotation(ok["segmentation"]["counts"], [32, 128], ok["area"], None, 64, 64)


def test_config_mistakes_are_clear_errors(tiny, tmp_path, monkeypatch):
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # TFDS's lookups leave dirs there
  cut_off = tmp_path / "cut_off" / "segment_anything" / "1.0.0.incomplete1A2B"  # a build stopped
  cut_off.mkdir(parents=True)
  (cut_off / "segment_anything-train.array_record-00000-of-00001").write_bytes(b"")
  # missing; without the dataset; with a build that did not finish
  for data_dir in (tiny / "nothing_here", tiny / "folder", tmp_path / "cut_off"):
    with pytest.raises(FileNotFoundError, match="not prepared under .*--file_format=array_record"):
      data.tfds_records("segment_anything", "train", str(data_dir))
  assert not os.listdir(scratch)
  asked = []  # a bucket's folder is not looked at here: TFDS reads it

  def no_bucket(name, data_dir):
    asked.append(data_dir)
    raise FileNotFoundError("no network")
  monkeypatch.setattr(tfds, "builder", no_bucket)
  with pytest.raises(FileNotFoundError, match="no network"):
    data.tfds_records("segment_anything", "train", "gs://bucket/tensorflow_datasets")
  assert asked == ["gs://bucket/tensorflow_datasets"]
  both = _dcfg(tfds_name="segment_anything", train_dir=str(tiny / "folder"))
  with pytest.raises(ValueError, match="set only one"):
    data.open_examples(both, "train", str(tiny / "folder"), str(tiny), 32, 8, 3, MEAN)
  with pytest.raises(ValueError, match="No training data"):
    data.open_examples(_dcfg(), "train", None, str(tiny), 32, 8, 3, MEAN)
  assert data.open_examples(_dcfg(), "eval", None, str(tiny), 32, 32, 3, MEAN) is None
