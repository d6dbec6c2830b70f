"""Shared fixtures; the parity maxima measured by the run are printed at the end."""

import collections

import numpy as np
import pytest

PARITY = collections.defaultdict(float)


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
