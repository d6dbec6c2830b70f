"""CI runs the README's test command, so what the README promises is what CI checks."""

import os

from tests.conftest import ROOT


def test_ci_runs_the_readmes_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [line for line in f.read().splitlines() if line.startswith("python3 -m venv")]
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read().splitlines()
  assert len(ci) == 1 and ci[0] in readme, ci
