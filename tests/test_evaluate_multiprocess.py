"""`train.py --mode=eval` on two processes (gloo) writes the one-process result.

Each process evaluates every other image of the held-out demo folder on its
own devices; the per-mask scores are gathered, and process 0 writes eval.json.
"""

import json
import sys

import numpy as np
import pytest

from tests.conftest import Processes, cpu_env, free_port
from tests.test_train_multiprocess import _write_model_init

FLAGS = ["--config=configs/demo.py:quick", "--config.data.generate.num_train=2",
         "--config.data.generate.num_eval=5", "--config.data.generate.size=64",
         "--config.eval.num_images=5", "--config.eval.num_clicks=2"]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
  model = str(tmp_path / "model")
  _write_model_init(model)
  port = free_port()
  commands = {}
  for name, extra in (("p0", ["--process_id=0"]), ("p1", ["--process_id=1"]), ("single", [])):
    workdir = tmp_path / ("single" if name == "single" else "shared")
    if extra:
      extra += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    commands[name] = [sys.executable, "train.py", "--mode=eval", f"--workdir={workdir}",
                      f"--checkpoint={model}", *FLAGS, *extra]
  Processes(tmp_path, commands, cpu_env(2)).succeed(timeout=300)
  with open(tmp_path / "shared" / "eval.json") as f:
    shared = json.load(f)
  with open(tmp_path / "single" / "eval.json") as f:
    single = json.load(f)
  assert shared["num_images"] == single["num_images"] == 5
  assert shared["num_masks"] == single["num_masks"] > 5
  for key, value in single.items():
    if key == "miou_points":
      np.testing.assert_allclose(list(shared[key].values()), list(value.values()), atol=1e-6)
    elif isinstance(value, float):
      np.testing.assert_allclose(shared[key], value, atol=1e-6, err_msg=key)
