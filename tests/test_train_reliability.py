"""Training on a hostile disk and hostile data (issue 19): corrupt data stops the run, a save
failure stops it at once, the NaN stop names a checkpoint that resumes, resume survives a
damaged latest checkpoint, and metrics.jsonl has one row per step."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from sam_jax.train import demo_data, trainer
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


class _Source:
  """What DataHealth asks of the training examples."""

  def __init__(self, n, prepared=None):
    self.n, self.skipped_at_prepare = n, dict(prepared or {})
    self.skipped_at_read, self.bad_annotations, self.description = {}, {}, "fake"

  def __len__(self):
    return self.n


def _batch(index, corrupt=(), valid=True):
  index = np.asarray(index)
  return dict(index=index, corrupt=np.isin(index, corrupt),
              valid=np.full((len(index), 2), valid))


def _dcfg(**kw):
  return dict(dict(max_empty_batches=1, max_skipped_fraction=0.25), **kw)


def test_corrupt_examples_are_counted_once_from_the_batches_used(tmp_path):
  src = _Source(200)
  src.skipped_at_read = {3: "OSError: truncated"}
  health = trainer.DataHealth(src, _dcfg(), str(tmp_path))
  for step in range(1, 6):  # the same bad example in every batch: one corrupt example
    health.update(_batch([3, 2 * step, 2 * step + 1], corrupt=[3]), step)
  assert health.num_skipped == 1
  health.write()
  listing = json.loads((tmp_path / "skipped_examples.json").read_text())
  assert listing["at_read"] == {"3": "OSError: truncated"}


def test_steps_without_a_valid_mask_stop_the_run(tmp_path):
  health = trainer.DataHealth(_Source(200), _dcfg(), str(tmp_path))
  health.update(_batch([0, 1], valid=False), 1)  # one is tolerated (max_empty_batches=1)
  with pytest.raises(trainer.DataError, match="step 2 has no valid mask"):
    health.update(_batch([2, 3], valid=False), 2)


def test_a_mostly_corrupt_dataset_stops_the_run(tmp_path):
  with pytest.raises(trainer.DataError, match="left out as corrupt when it was prepared"):
    trainer.DataHealth(_Source(2, {f"x{i}": "bad" for i in range(3)}), _dcfg(), str(tmp_path))
  health = trainer.DataHealth(_Source(8), _dcfg(max_empty_batches=100), str(tmp_path))
  health.update(_batch([0, 1, 2, 3], corrupt=[0, 1]), 1)  # too few seen to judge
  with pytest.raises(trainer.DataError, match="4 of the 8 examples seen by step 2 are corrupt"):
    health.update(_batch([4, 5, 6, 7], corrupt=[4, 5]), 2)


def test_an_unwritable_checkpoint_folder_fails_before_the_first_step(tmp_path):
  os.symlink("/proc/self/fdinfo", tmp_path / "checkpoints")  # unwritable, even for root
  with pytest.raises(trainer.CheckpointSaveError, match="Cannot write checkpoints to .*checkpoints"):
    trainer.checkpoint_manager(str(tmp_path), tiny_train_config(), check_writable=True)


def test_a_failed_save_raises_at_once_with_the_step_and_path(tmp_path):
  mgr = trainer.checkpoint_manager(str(tmp_path), tiny_train_config(), check_writable=True)
  state = dict(x=np.zeros(3, np.float32))
  trainer.save_checkpoint(mgr, 1, state, dict(step=1, data_step=1))
  mgr.wait_until_finished()
  os.rename(tmp_path / "checkpoints", tmp_path / "moved")
  os.symlink("/proc/self/fdinfo", tmp_path / "checkpoints")
  with pytest.raises(trainer.CheckpointSaveError, match="step 2 to .*checkpoints failed"):
    trainer.save_checkpoint(mgr, 2, state, dict(step=2, data_step=2))
    trainer.check_saves(mgr)
    mgr.wait_until_finished()


class _Manager:
  def wait_until_finished(self):
    pass

  def latest_step(self):
    return 4


def test_an_exploding_step_stops_before_it_is_saved():
  limits = trainer._Divergence(100.0, start_norm=30.0)
  ok = dict(loss=np.float32(2.0), param_norm=np.float32(31.0))
  assert len(trainer._check_finite([(4, ok), (5, ok), (6, ok)], _Manager(), limits)) == 3
  # lr=1e6: the loss is still finite, the parameters are already far gone.
  diverged = dict(loss=np.float32(3.0), param_norm=np.float32(2.2e8))
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"param_norm grew to 2.2e\+08 at step 7,.* step 4\."):
    trainer._check_finite([(7, diverged)], _Manager(), limits)
  spike = dict(loss=np.float32(500.0), param_norm=np.float32(31.0))
  with pytest.raises(trainer.NonFiniteLossError, match="loss jumped to 500 at step 8"):
    trainer._check_finite([(8, spike)], _Manager(), limits)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_falls_back_past_a_damaged_checkpoint_and_logs_each_step_once(tmp_path, capsys):
  config = tiny_train_config()
  workdir = str(tmp_path)
  full = trainer.train_and_evaluate(config, workdir)
  assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3, 4]
  for f in glob.glob(os.path.join(workdir, "checkpoints", "4", "**", "d", "*"), recursive=True):
    os.remove(f)
  capsys.readouterr()
  again = trainer.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "The checkpoint of step 4" in out and "unreadable" in out
  assert "Resuming from the checkpoint of step 2" in out
  assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3, 4]  # 3 and 4 not twice
  for step in ("3", "4"):
    np.testing.assert_allclose(again["losses"][step], full["losses"][step], rtol=1e-6)
  assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "unreadable" in d]


@pytest.mark.slow
def test_nan_stop_names_a_checkpoint_that_resumes(tmp_path):
  """lr=1e6 used to keep a diverged step 2 (parameter norm 2.2e8) as 'the last good one'."""
  config = tiny_train_config()
  config.checkpoint_every, config.total_steps = 1, 4
  config.optim.lr = 1e6  # the warmup's first step has lr 0: step 1 is good, step 2 diverges
  with pytest.raises(trainer.NonFiniteLossError) as stop:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert "param_norm grew to" in str(stop.value) and "good checkpoint is step 1." in str(stop.value)
  mgr = trainer.checkpoint_manager(str(tmp_path), config)
  assert mgr.all_steps() == [1]  # the diverged step 2 was not saved
  state, _ = trainer.restore_checkpoint(mgr, trainer.Trainer(config), 1)
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x)))
                           for x in jax.tree.leaves(state["params"]))))
  assert np.isfinite(norm) and norm < 1e4
  config.optim.lr = 1e-4  # the advice: lower the learning rate, rerun
  rerun = trainer.train_and_evaluate(config, str(tmp_path))  # resumes from step 1
  assert sorted(rerun["losses"]) == ["2", "3", "4"]
  assert all(np.isfinite(v) for v in rerun["losses"].values())


@pytest.mark.slow
def test_training_on_all_corrupt_data_stops_with_a_clear_error(tmp_path):
  folder = tmp_path / "data"
  demo_data.write_dataset(str(folder), 4, size=64, max_shapes=3, seed=1)
  for p in folder.glob("*.json"):  # runs that do not cover the image: nothing decodable
    record = json.loads(p.read_text())
    for a in record["annotations"]:
      a["segmentation"] = dict(size=a["segmentation"]["size"], counts=[5, 10, 3])
    p.write_text(json.dumps(record))
  config = tiny_train_config()
  config.data.generate = None
  config.data.train_dir = str(folder)
  config.data.max_empty_batches = 0
  with pytest.raises(trainer.DataError, match="step 1 has no valid mask"):
    trainer.train_and_evaluate(config, str(tmp_path / "work"))
  listing = json.loads((tmp_path / "work" / "skipped_examples.json").read_text())
  assert listing["bad_annotations"] and not os.path.exists(tmp_path / "work" / "checkpoints" / "1")
