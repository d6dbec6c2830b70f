"""Shared fixtures; the parity maxima measured by the run are printed at the end."""

import collections

import jax
import numpy as np
import pytest

PARITY = collections.defaultdict(float)


@pytest.fixture(autouse=True, scope="session")
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for the session: the training tests build new jitted
  steps for the same programs (a resumed run, a second Trainer) and compile once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(keys[1], 1.0)
  jax.config.update(keys[2], -1)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules that compare runs, not speeds: without XLA's optimisations the
  tiny test model's training step compiles sooner."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def record(name: str, value: float) -> float:
  """Keeps the largest value seen for `name` (printed in the terminal summary)."""
  PARITY[name] = max(PARITY[name], float(value))
  return float(value)


def assert_close_rel(actual, expected, rel: float, name: str) -> None:
  """max|a - e| / max|e| <= rel: relative to the tensor's scale, not per element."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  if actual.size == 0:
    return
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert record(name, err) <= rel, f"{name}: relative error {err:.3g} > {rel}"


def assert_close_abs(actual, expected, atol: float, name: str) -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = np.abs(actual - expected).max()
  assert record(name, err) <= atol, f"{name}: absolute error {err:.3g} > {atol}"


def assert_masks_agree(actual, expected, fraction: float, name: str) -> None:
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  disagree = float(np.mean(actual != expected))
  record(name, disagree)
  assert disagree <= 1 - fraction, f"{name}: {disagree:.3%} of mask pixels differ"


def pytest_terminal_summary(terminalreporter):
  if PARITY:
    terminalreporter.section("parity with the reference: largest errors measured")
    for name in sorted(PARITY):
      terminalreporter.write_line(f"{name:55s} {PARITY[name]:.3g}")


def pytest_sessionfinish(session):
  """Under pytest-xdist, hands this worker's maxima to the controller."""
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["parity"] = dict(PARITY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  for name, value in getattr(node, "workeroutput", {}).get("parity", {}).items():
    record(name, value)
