"""The training loop end to end on a tiny model: resume, NaN stop, export, metrics."""

import json
import math
import os

import jax
import numpy as np
import pytest

from sam_jax.checkpoint import load_sam
from sam_jax.train import trainer
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
  config = tiny_train_config()
  config.export = True
  full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  trainer.train_and_evaluate(config, str(tmp_path / "cut"), stop_at=2)
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["2"]
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "cut"))
  assert sorted(full["losses"]) == ["1", "2", "3", "4"]
  for step in ("1", "2", "3", "4"):
    np.testing.assert_allclose(resumed["losses"][step], full["losses"][step], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(full["state"]["params"]),
               jax.device_get(resumed["state"]["params"]))
  # Retention: the latest checkpoints only; metrics: every log step, all parts present.
  assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["2", "4"]
  rows = _metrics(tmp_path / "full")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("loss", "focal", "dice", "iou_mse", "lr", "grad_norm", "images_per_s"):
    assert all(math.isfinite(r[key]) for r in rows), key
  assert len(rows[0]["iou_per_round"]) == config.prompts.num_rounds
  # The export reads back with load_sam, equal to the final parameters.
  _, exported = load_sam(str(tmp_path / "full" / "export"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               exported, jax.device_get(full["state"]["params"]))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_train_config()  # the resume test's program: one compilation serves both
  config.total_steps, config.checkpoint_every = 5, 1
  clean = trainer.data_lib.train_batches

  def corrupt_third(*args, **kwargs):
    """The data with NaN pixels in the third batch, as a broken image would give."""
    batches = clean(*args, **kwargs)
    try:
      for step, batch in enumerate(batches, start=1):
        if step == 3:
          batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        yield batch
    finally:
      batches.close()

  monkeypatch.setattr(trainer.data_lib, "train_batches", corrupt_third)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"The loss and param_norm became nan at step 3;.* last good checkpoint is step 2\."):
    trainer.train_and_evaluate(config, str(tmp_path))
  mgr = trainer.checkpoint_manager(str(tmp_path), config)
  assert mgr.all_steps() == [1, 2][-config.keep_checkpoints:]
  state, _ = trainer.restore_checkpoint(mgr, trainer.Trainer(config), 2)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


class _Manager:
  """What `_check_finite` asks of a checkpoint manager."""

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return 7


def test_non_finite_parameters_stop_the_run_even_with_a_finite_loss():
  good = dict(loss=np.float32(0.5), param_norm=np.float32(3.0))
  assert [s for s, _ in trainer._check_finite([(8, good)], _Manager())] == [8]
  # An overflowing update: the loss (computed before it) is finite, the new parameters are not.
  bad = dict(loss=np.float32(0.5), param_norm=np.float32(np.inf))
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"param_norm became inf at step 9;.* last good checkpoint is step 7\."):
    trainer._check_finite([(8, good), (9, bad)], _Manager())
