"""Preemption notices: a SIGTERM makes every process save at one common step and exit.

Cloud TPU VMs, spot GPUs, Kubernetes and SLURM announce a preemption with
SIGTERM and send SIGKILL a grace period later. `Notice.reached()` is asked at
the same points in every process (the end of each training step, each batch of
the embedding-cache build); once it says True the caller saves what it has and
raises `Preempted`, which ends the program with `EXIT_CODE`.

- Several processes: `jax.distributed.initialize` starts JAX's preemption
  notifier, which takes SIGTERM in whichever process gets it and tells all the
  others; `multihost_utils.reached_preemption_sync_point` then names the same
  call (the next one that no process has made yet) in every process.
- One process: a SIGTERM handler sets a flag, read at the next call.
"""

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"):
# unlike 1 (an error) or 143 (killed by SIGTERM before saving), it says the
# checkpoint is saved and the same command resumes.
EXIT_CODE = 75


class Preempted(SystemExit):
  """Raised once `saved` is on disk; uncaught, it exits the program with `EXIT_CODE`."""

  def __init__(self, saved: str):
    super().__init__(EXIT_CODE)
    self.message = (f"Preempted (SIGTERM): saved {saved}; rerun the same command to resume. "
                    f"Exiting with status {EXIT_CODE}.")

  def __str__(self) -> str:
    return self.message


class Notice:
  """Whether a preemption notice asks the run to stop here; a context manager.

  Every process must call `reached()` at the same points, the same number of
  times: the calls are numbered, and the processes agree on a call number.
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self._calls = 0
    self._received = False
    self._previous = None

  def __enter__(self) -> "Notice":
    # With several processes JAX's notifier owns SIGTERM; a Python handler would replace it.
    if not self.multi_process:
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      else:
        logging.warning("Not in the main thread: a SIGTERM will not save the run.")
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received = True

  def reached(self) -> bool:
    """True at the one call (the same in every process) where the run should save and stop."""
    if self.multi_process:
      self._calls += 1
      return multihost_utils.reached_preemption_sync_point(self._calls)
    return self._received
