"""Every command runs as `python -m sam_jax.<name>` and as its `[project.scripts]` script."""

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def module_name(script: str) -> str:
  """`sam-jax-convert-weights` runs as `python -m sam_jax.convert_weights`."""
  assert script.startswith("sam-jax-"), script
  return "sam_jax." + script[len("sam-jax-"):].replace("-", "_")


def test_every_script_is_a_module_function_with_a_python_m_form():
  found = scripts()
  for name in ("train", "convert-weights", "new-checkpoint", "predict", "amg"):
    assert f"sam-jax-{name}" in found
  for script, target in found.items():
    module, function = target.split(":")
    # Read, not imported: two absl commands in one process would define their flags twice.
    with open(importlib.util.find_spec(module).origin) as f:
      defined = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    assert function in defined, target
    spec = importlib.util.find_spec(module_name(script))
    assert spec is not None, f"{script} has no module {module_name(script)}"
    if spec.submodule_search_locations:  # a package runs its __main__
      assert importlib.util.find_spec(module_name(script) + ".__main__") is not None, script


@pytest.mark.slow
@pytest.mark.parametrize("command, option", [
    (["-m", "sam_jax.train"], "--workdir"),
    (["train.py"], "--workdir"),
    (["-m", "sam_jax.convert_weights"], "--to-pytorch"),
    (["convert_weights.py"], "--to-pytorch"),
    (["-m", "sam_jax.new_checkpoint"], "--output"),
])
def test_commands_and_the_top_level_wrappers_run(command, option):
  result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True,
                          cwd=ROOT)
  assert option in result.stdout + result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
