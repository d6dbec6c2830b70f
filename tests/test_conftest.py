"""The suite's own machinery: the module order for xdist, and the command CI runs."""

import os

from tests.conftest import LONGEST_MODULES, ROOT


def test_the_longest_modules_exist():
  """A renamed module would drop out of the order silently, and run last again."""
  missing = [m for m in LONGEST_MODULES if not os.path.exists(os.path.join(ROOT, "tests", m))]
  assert not missing, f"conftest.LONGEST_MODULES names modules that do not exist: {missing}"


def test_ci_runs_the_readmes_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [line for line in f.read().splitlines() if line.startswith("python3 -m venv")]
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read().splitlines()
  assert len(ci) == 1 and ci[0] in readme, ci
  assert "--no-loadscope-reorder" in ci[0]  # else xdist sorts modules by their test counts
