"""One process: a SIGTERM saves the run at the end of the step; the data position on restore."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from sam_jax.train import embedding_cache, preemption, trainer
from tests.conftest import tiny_train_config as tiny_config
from tests.test_train_embedding_cache import small_config as cached_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_sigterm_sets_the_notice_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Notice() as notice:
    assert not notice.reached()
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread before the next line
    assert notice.reached()
  assert signal.getsignal(signal.SIGTERM) == before
  err = preemption.Preempted("the checkpoint of step 3")
  assert err.code == preemption.EXIT_CODE == 75 and "step 3" in str(err)


def test_ctrl_c_during_the_untrained_evaluation_does_not_wait_for_the_compile(
    tmp_path, monkeypatch):
  config = tiny_config()
  config.eval.num_images = 2
  compiling, release, interrupted_at = threading.Event(), threading.Event(), []

  def slow_compile(self, batch):  # a compile that takes 30 s
    compiling.set()
    release.wait(30)

  def interrupted(*args):
    assert compiling.wait(30)
    interrupted_at.append(time.monotonic())
    raise KeyboardInterrupt
  monkeypatch.setattr(trainer.Trainer, "compile_step", slow_compile)
  monkeypatch.setattr(trainer, "evaluate_before_training", interrupted)
  try:
    with pytest.raises(KeyboardInterrupt):
      trainer.train_and_evaluate(config, str(tmp_path))
    assert time.monotonic() - interrupted_at[0] < 10
  finally:
    release.set()


def test_the_background_compile_gives_its_result_or_its_error():
  assert trainer._Background(lambda x: x + 1, 1).result() == 2

  def fails():
    raise ValueError("no such batch")
  with pytest.raises(ValueError, match="no such batch"):  # in the caller's thread
    trainer._Background(fails).result()


def _sigterm_after_save_of(step, monkeypatch):
  """SIGTERM to this process just after the save of `step` started (its write in flight)."""
  save = trainer.save_checkpoint

  def save_then_sigterm(mgr, s, *args, **kwargs):
    save(mgr, s, *args, **kwargs)
    if s == step:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(trainer, "save_checkpoint", save_then_sigterm)


@pytest.mark.slow
def test_sigterm_during_a_save_saves_the_next_step_and_the_rerun_continues(
    tmp_path, monkeypatch, capsys):
  config = tiny_config()
  full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  cut = str(tmp_path / "cut")
  with monkeypatch.context() as m:
    _sigterm_after_save_of(2, m)
    with pytest.raises(preemption.Preempted) as err:
      trainer.train_and_evaluate(config, cut)
  assert err.value.code == preemption.EXIT_CODE
  assert "saved the checkpoint of step 3" in str(err.value)
  # The save in flight at the SIGTERM completed, and the preemption's own save too.
  assert sorted(os.listdir(os.path.join(cut, "checkpoints"))) == ["2", "3"]
  mgr = trainer.checkpoint_manager(cut, config)
  for step in (2, 3):
    state, meta = trainer.restore_checkpoint(mgr, trainer.Trainer(config), step)
    assert int(state["step"]) == step and meta["data_step"] == step
  resumed = trainer.train_and_evaluate(config, cut)
  assert "Resuming from the checkpoint of step 3" in capsys.readouterr().out
  assert sorted(resumed["losses"]) == ["1", "2", "3", "4"]
  for step in resumed["losses"]:
    np.testing.assert_allclose(resumed["losses"][step], full["losses"][step], rtol=1e-6)

  # Another global batch size: the data position means other examples; refused...
  config.batch_size, config.total_steps = 8, 5
  with pytest.raises(ValueError, match="restart_data_order"):
    trainer.train_and_evaluate(config, cut)
  # ... unless the data order restarts: data position 0 at step 4.
  trainer.train_and_evaluate(config, cut, restart_data_order=True)
  assert "restarting the data order" in capsys.readouterr().out
  mgr = trainer.checkpoint_manager(cut, config)
  _, meta = trainer.restore_checkpoint(mgr, trainer.Trainer(config), 5)
  assert (meta["data_step"], meta["global_batch"]) == (1, 8)


@pytest.mark.slow
def test_sigterm_in_the_embedding_cache_build_keeps_the_batches_built(tmp_path, monkeypatch):
  config = cached_config(tmp_path)
  config.cache_embeddings = True
  cut = str(tmp_path / "cut")
  local_rows = embedding_cache._local_rows

  def rows_then_sigterm(x):  # SIGTERM while the first batch is computed
    if not calls:
      os.kill(os.getpid(), signal.SIGTERM)
    calls.append(1)
    return local_rows(x)
  calls = []
  with monkeypatch.context() as m:
    m.setattr(embedding_cache, "_local_rows", rows_then_sigterm)
    with pytest.raises(preemption.Preempted, match="first 1 of 2 batches"):
      trainer.train_and_evaluate(config, cut)
  assert len(calls) == 1
  cache_dir = os.path.join(cut, "embeddings")
  assert not os.path.exists(os.path.join(cache_dir, "meta.json"))
  with open(os.path.join(cache_dir, "tmp-part-00000-of-00001.npy.json")) as f:
    assert json.load(f)["batches_done"] == 1

  calls.clear()
  with monkeypatch.context() as m:
    m.setattr(embedding_cache, "_local_rows", rows_then_sigterm)
    calls.append(0)  # no more SIGTERMs: count the batches computed
    trainer.train_and_evaluate(config, cut, stop_at=1)
  assert len(calls) == 2  # the second batch only
  assert sorted(os.listdir(cache_dir)) == ["meta.json", "part-00000-of-00001.npy"]
  # Equal to a cache built in one go.
  with open(os.path.join(cache_dir, "meta.json")) as f:
    cache = embedding_cache.EmbeddingCache(cache_dir, json.load(f))
  t = trainer.Trainer(config)
  src = trainer.data_lib.open_examples(config.data, "train", config.data.train_dir, cut,
                                       64, 16, 2, t.mcfg.pixel_mean)
  whole = embedding_cache.open_or_build(str(tmp_path / "whole"), src, t.model,
                                        trainer.initial_params(config, t.model), t.mcfg,
                                        t.mesh, config.batch_size, config.seed)
  for i in range(len(src)):
    np.testing.assert_array_equal(cache[i], whole[i])
