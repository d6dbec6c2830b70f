"""Pod runs survive preemption: SIGTERM, kill -9 and restores onto other process counts.

Processes over gloo on CPU, as in test_train_multiprocess: each test starts
`train_and_evaluate` in subprocesses sharing one workdir, interrupts them, reruns,
and compares with one uninterrupted 2-process run (a module fixture).
"""

import json
import os
import shutil
import signal
import sys
import textwrap
import time

import numpy as np
import pytest

from sam_jax.checkpoint import load_sam
from sam_jax.train import preemption
from tests.conftest import Processes, cpu_env, free_port
from tests.test_train_multiprocess import _flatten, _write_model_init, small_config

pytestmark = pytest.mark.slow

TOTAL, EVERY = 24, 8
# Another mesh sums in another order: float rounding, which Adam magnifies on the
# exactly-zero gradients (see test_train_multiprocess) to a fraction of one step (lr
# 2e-3); a misplaced shard or a wrong data position would be off by the parameters'
# scale, and change the losses in their leading digits.
ELASTIC_TOLERANCE = dict(rtol=1e-6, atol=2e-3)

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import jax
    args = json.loads(sys.argv[1])
    if args["num_processes"] > 1:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(f"127.0.0.1:{args['port']}", num_processes=args["num_processes"],
                                 process_id=args["process_id"], initialization_timeout=120,
                                 heartbeat_timeout_seconds=30)
    from sam_jax.train import trainer
    from tests.test_train_restarts import restart_config
    config = restart_config(args["mesh_shape"], args.get("batch_size", 4))
    config.model_init = args["model_init"]
    if args.get("kill_after_save"):  # SIGKILL while this step's checkpoint is being written
      save = trainer.save_checkpoint
      def save_then_die(mgr, step, *a, **k):
        save(mgr, step, *a, **k)
        if step == args["kill_after_save"]:
          os.kill(os.getpid(), signal.SIGKILL)
      trainer.save_checkpoint = save_then_die
    summary = trainer.train_and_evaluate(config, args["workdir"],
                                         restart_data_order=args.get("restart_data_order", False))
    print("LOSSES", json.dumps(summary["losses"]), flush=True)
""")


def restart_config(mesh_shape=(1, 2, 2), batch_size=4):
  """small_config run for TOTAL steps, logging every step, a checkpoint every EVERY kept."""
  config = small_config()
  config.mesh_shape = tuple(mesh_shape)
  config.batch_size = batch_size
  config.total_steps, config.checkpoint_every, config.log_every = TOTAL, EVERY, 1
  config.keep_checkpoints = TOTAL // EVERY
  return config


class Run(Processes):
  """One job: `num_processes` processes with `devices` CPU devices each, on one workdir."""

  def __init__(self, tmp_path, name, workdir, model_init, num_processes=2, devices=2,
               mesh_shape=(1, 2, 2), **extra):
    self.workdir, port = str(workdir), free_port()
    # Every run of a topology compiles the same programs: once, for all the tests
    # (the session's compilation cache, conftest.compilation_cache, through the environment).
    env = cpu_env(devices)
    super().__init__(tmp_path, {
        f"{name}.{i}": [sys.executable, "-c", SCRIPT, json.dumps(dict(
            num_processes=num_processes, process_id=i, port=port, workdir=self.workdir,
            model_init=model_init, mesh_shape=mesh_shape, **extra))]
        for i in range(num_processes)}, env)
    self.names = list(self.procs)

  def log(self, i) -> str:
    return super().log(self.names[i] if isinstance(i, int) else i)

  def steps_logged(self) -> int:
    try:
      with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
        return max([json.loads(line)["step"] for line in f if line.strip()], default=0)
    except OSError:
      return 0

  def wait_for_step(self, step: int, timeout: float = 900) -> None:
    """Until process 0 has logged `step` (this run's steps start after any resume)."""
    self._wait_until(lambda: self.steps_logged() >= step, f"step {step}", timeout)

  def wait_for_checkpoint(self, step: int, timeout: float = 120) -> None:
    """Until the checkpoint of `step` is complete: Orbax finishes it in the background,
    and on a fast machine a few more steps may come first."""
    self._wait_until(lambda: step in _checkpoints(self.workdir), f"checkpoint {step}", timeout)

  def _wait_until(self, done, what: str, timeout: float) -> None:
    """Polls `done` while every process runs; a process that ended fails the test."""
    deadline = time.time() + timeout
    while not done():
      assert time.time() < deadline, f"no {what} in {timeout} s:\n{self.log(0)[-3000:]}"
      assert all(p.poll() is None for p in self.procs.values()), self.tails()
      time.sleep(0.05)

  def codes(self, timeout: float = 900) -> list:
    """The exit statuses in process order, once all have ended (or been killed at `timeout`)."""
    codes = self.wait(timeout, stop_at_failure=False)
    return [codes[n] for n in self.names]

  def finish(self, timeout: float = 900) -> dict:
    """Process 0's losses after every process exited 0."""
    codes = self.codes(timeout)
    assert codes == [0] * len(codes), f"exit statuses {codes}\n{self.tails()}"
    line = [x for x in self.log(0).splitlines() if x.startswith("LOSSES ")]
    return json.loads(line[0][len("LOSSES "):])

  def process(self, i: int):
    return self.procs[self.names[i]]


def _checkpoints(workdir) -> list:
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(x) for x in os.listdir(folder) if x.isdigit())


def _assert_same_training(losses, reference, workdir, rtol=1e-6, atol=1e-6):
  """Losses of the steps this run trained, and the export, equal the uninterrupted run's."""
  assert losses, "no steps trained"
  for step, loss in losses.items():
    np.testing.assert_allclose(loss, reference["losses"][step], rtol=rtol, err_msg=step)
  _, exported = load_sam(os.path.join(workdir, "export"))
  exported = dict(_flatten(exported))
  assert sorted(exported) == sorted(reference["export"])
  for key, ref in reference["export"].items():
    np.testing.assert_allclose(exported[key], ref, rtol=0, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 2-process run: its losses, exported parameters and workdir."""
  tmp = tmp_path_factory.mktemp("reference")
  model_init = str(tmp / "model_init")
  _write_model_init(model_init)
  losses = Run(tmp, "reference", tmp / "run", model_init).finish()
  assert sorted(map(int, losses)) == list(range(1, TOTAL + 1))
  assert _checkpoints(tmp / "run") == list(range(EVERY, TOTAL + 1, EVERY))
  _, exported = load_sam(str(tmp / "run" / "export"))
  return dict(losses=losses, export=dict(_flatten(exported)), workdir=tmp / "run",
              model_init=model_init)


def test_sigterm_saves_a_common_step_and_the_rerun_continues(tmp_path, reference):
  run = Run(tmp_path, "cut", tmp_path / "run", reference["model_init"])
  run.wait_for_step(1)
  sent = time.time()
  for p in run.procs.values():
    p.send_signal(signal.SIGTERM)
  codes = run.codes(timeout=60)
  took = time.time() - sent
  assert codes == [preemption.EXIT_CODE] * 2, run.tails()
  assert took < 30, f"exited {took:.1f} s after SIGTERM"
  saved = [int(run.log(i).split("saved the checkpoint of step ")[1].split(";")[0])
           for i in range(2)]
  assert saved[0] == saved[1] < TOTAL, saved
  assert _checkpoints(run.workdir)[-1] == saved[0]
  rerun = Run(tmp_path, "rerun", run.workdir, reference["model_init"])
  losses = rerun.finish()
  assert f"Resuming from the checkpoint of step {saved[0]}" in rerun.log(0)
  assert sorted(map(int, losses)) == list(range(1, TOTAL + 1))  # both parts, in the summary
  _assert_same_training(losses, reference, run.workdir)


def test_kill_9_of_one_process_ends_the_other_and_the_rerun_resumes(tmp_path, reference):
  run = Run(tmp_path, "cut", tmp_path / "run", reference["model_init"])
  run.wait_for_step(EVERY + 2)  # mid-step (steps are most of the run's time), with
  run.wait_for_checkpoint(EVERY)  # a complete checkpoint to resume from
  run.process(1).kill()
  killed = time.time()
  codes = run.codes(timeout=120)
  took = time.time() - killed
  # Process 0 fails its next collective with process 1 (gloo: connection closed), or its
  # heartbeats go unanswered for heartbeat_timeout_seconds (30 s here): not a hang.
  assert codes[0] not in (0, None) and took < 60, (codes, took, run.log(0)[-3000:])
  assert any(m in run.log(0) for m in ("Gloo", "crashed", "heartbeat")), run.log(0)[-3000:]
  _resume_and_compare(tmp_path, run.workdir, reference)


def test_kill_9_of_both_while_a_checkpoint_is_written(tmp_path, reference):
  run = Run(tmp_path, "cut", tmp_path / "run", reference["model_init"],
            kill_after_save=2 * EVERY)  # each SIGKILLs itself once that save has started
  codes = run.codes()
  # The first to die closes the coordination service's socket; the other may poll that
  # error and abort (SIGABRT) before it reaches its own kill: either way the job died.
  assert -signal.SIGKILL in codes, run.tails()
  assert set(codes) <= {-signal.SIGKILL, -signal.SIGABRT}, run.tails()
  _resume_and_compare(tmp_path, run.workdir, reference)


def _resume_and_compare(tmp_path, workdir, reference):
  """The rerun starts from the last complete checkpoint and ends as the uninterrupted run."""
  last = _checkpoints(workdir)[-1]  # complete ones only: Orbax renames a finished write
  assert last % EVERY == 0 and last < TOTAL, last
  rerun = Run(tmp_path, "rerun", workdir, reference["model_init"])
  losses = rerun.finish()
  assert f"Resuming from the checkpoint of step {last} " in rerun.log(0), rerun.log(0)[-3000:]
  _assert_same_training(losses, reference, workdir)


def _copy_checkpoint(workdir, step, to) -> str:
  os.makedirs(to / "checkpoints")
  shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                  to / "checkpoints" / str(step))
  return str(to)


def test_restore_onto_other_process_counts_and_meshes(tmp_path, reference):
  """2 processes x 2 devices (fsdp across them) -> 1 x 4, 1 x 2 with another mesh -> 2 x 2."""
  runs = {
      (4, (1, 4, 1)): Run(tmp_path, "one_by_4", _copy_checkpoint(
          reference["workdir"], EVERY, tmp_path / "one_by_4"), reference["model_init"],
          num_processes=1, devices=4, mesh_shape=(1, 4, 1)),
      (2, (2, 1, 1)): Run(tmp_path, "one_by_2", _copy_checkpoint(
          reference["workdir"], EVERY, tmp_path / "one_by_2"), reference["model_init"],
          num_processes=1, devices=2, mesh_shape=(2, 1, 1))}
  for (devices, mesh), run in runs.items():
    losses = run.finish()
    assert ("saved by 2 process(es) x 2 devices, mesh {'data': 1, 'fsdp': 2, 'tensor': 2}; "
            f"restored onto 1 process(es) x {devices} devices, mesh "
            f"{dict(zip(('data', 'fsdp', 'tensor'), mesh))}") in run.log(0), run.log(0)[-3000:]
    assert sorted(map(int, losses)) == list(range(EVERY + 1, TOTAL + 1))
    _assert_same_training(losses, reference, run.workdir, **ELASTIC_TOLERANCE)
  # ... and back: the 1 x 4 run's checkpoint of step 16 resumed by 2 processes.
  back = Run(tmp_path, "back", _copy_checkpoint(runs[4, (1, 4, 1)].workdir, 2 * EVERY,
                                                 tmp_path / "back"), reference["model_init"])
  losses = back.finish()
  assert "saved by 1 process(es) x 4 devices" in back.log(0)
  assert sorted(map(int, losses)) == list(range(2 * EVERY + 1, TOTAL + 1))
  _assert_same_training(losses, reference, back.workdir, **ELASTIC_TOLERANCE)
