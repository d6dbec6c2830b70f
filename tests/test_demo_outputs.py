"""What the demo shows a new user: quiet data preparation, the results table, the init rule."""

import logging
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.train import demo_data, sa1b_folder, trainer


def test_preparing_a_local_folder_prints_no_tfds_download_messages(tmp_path, capfd, caplog):
  folder = tmp_path / "train"
  demo_data.write_dataset(str(folder), 3, size=64, max_shapes=2, seed=0)
  absl_level = logging.getLogger("absl").level
  with caplog.at_level(logging.WARNING):
    builder = sa1b_folder.prepare_folder(str(folder), str(tmp_path / "tfds"))
  assert len(builder.as_data_source("train")) == 3
  out, err = capfd.readouterr()
  for noise in ("Downloading and preparing", "downloaded and prepared", "Generating splits"):
    assert noise not in out + err, (out, err)
  assert not [r for r in caplog.records if r.name == "absl"], caplog.records
  assert logging.getLogger("absl").level == absl_level  # restored for everything else


def test_preparing_a_folder_leaves_no_temporary_directories(tmp_path, monkeypatch):
  folder, scratch = tmp_path / "train", tmp_path / "scratch"
  demo_data.write_dataset(str(folder), 2, size=64, max_shapes=2, seed=0)
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  builder = sa1b_folder.prepare_folder(str(folder), str(tmp_path / "tfds"))
  assert len(builder.as_data_source("train")) == 2
  assert sa1b_folder.prepare_folder(str(folder), str(tmp_path / "tfds")).is_prepared()
  assert not list(scratch.iterdir())


def test_a_corrupt_example_is_still_reported_while_tfds_is_quiet(tmp_path, caplog):
  folder = tmp_path / "train"
  demo_data.write_dataset(str(folder), 2, size=64, max_shapes=2, seed=0)
  (folder / "sa_000001.json").write_text("{not json")
  with caplog.at_level(logging.WARNING):
    builder = sa1b_folder.prepare_folder(str(folder), str(tmp_path / "tfds"))
  assert "sa_000001" in sa1b_folder.skipped(builder)
  assert any("Leaving out corrupt example sa_000001" in r.getMessage() for r in caplog.records)


def test_results_table_has_a_row_per_prompt_before_and_after():
  untrained = dict(miou_1point_default=0.1, miou_box=0.2,
                   miou_points={"1": 0.1, "2": 0.15, "3": 0.3}, num_masks=9)
  trained = dict(miou_1point_default=0.7, miou_box=0.85,
                 miou_points={"1": 0.7, "2": 0.8, "3": 0.9}, num_masks=9)
  lines = trainer.results_table(untrained, trained, 3).splitlines()
  assert "9 masks" in lines[0]
  assert lines[2].split()[-2:] == ["0.100", "0.700"]
  assert lines[3].split()[-2:] == ["0.200", "0.850"]
  assert lines[4].split()[:5] == ["1", "point", "+", "2", "clicks"]
  assert lines[4].split()[-2:] == ["0.300", "0.900"]
  # A resumed run without the untrained evaluation shows dashes, not made-up numbers.
  assert trainer.results_table({}, trained, 3).splitlines()[2].split()[-2:] == ["-", "0.700"]


def test_rescale_init_scales_only_matching_paths():
  params = {"mask_decoder": {"head_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
            "image_encoder": {"kernel": jnp.ones((2, 2))}}
  out = trainer.rescale_init(params, [("mask_decoder/head_.*/kernel", 0.0), (".*bias", 0.5)])
  np.testing.assert_array_equal(out["mask_decoder"]["head_0"]["kernel"], 0.0)
  np.testing.assert_array_equal(out["mask_decoder"]["head_0"]["bias"], 0.5)
  np.testing.assert_array_equal(out["image_encoder"]["kernel"], 1.0)
  with pytest.raises(ValueError, match="match no parameter path"):
    trainer.rescale_init(params, [("mask_decoder/typo/kernel", 0.0)])
  assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), trainer.rescale_init(params, ()),
                                   params))
