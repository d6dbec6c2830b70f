"""The training loop on two processes (2 CPU devices each, gloo collectives) equals one process.

Both processes run `train_and_evaluate` into one shared workdir, as hosts with
a shared file system would: process 0 writes the demo dataset and the metrics,
each process reads only its own rows of every batch, both write their shards
of the checkpoints, and process 0 exports the parameters gathered from both.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest

from sam_jax.checkpoint import load_sam
from sam_jax.train import trainer
from tests.conftest import (Processes, cpu_env, free_port, one_block_train_config,
                            write_random_checkpoint)


def small_config():
  """one_block_train_config, two steps, a checkpoint at step 2 and an export, on a
  (1, 2, 2) mesh."""
  config = one_block_train_config()
  config.mesh_shape = (1, 2, 2)  # fsdp across the two processes, tensor within each
  config.total_steps, config.checkpoint_every = 2, 2
  config.export = True
  return config


def worker(process_id: int, port: int, workdir: str, model_init: str) -> None:
  """One process of the run (`process_id` -1: the single process with all 4 devices)."""
  if process_id >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
  assert jax.device_count() == 4 and jax.local_device_count() == (2 if process_id >= 0 else 4)
  config = small_config()
  config.model_init = model_init  # read by every process
  summary = trainer.train_and_evaluate(config, workdir)
  spec = summary["state"]["params"]["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"].sharding
  assert tuple(spec.spec) == ("fsdp", "tensor"), spec
  assert spec.is_fully_addressable == (process_id < 0), spec  # split over both processes
  print("LOSSES", json.dumps(summary["losses"]), flush=True)


def _write_model_init(directory: str) -> None:
  """Random parameters of `small_config`'s model, as a checkpoint (no init compile)."""
  write_random_checkpoint(directory, small_config().model)


def _losses(stdout: str) -> dict:
  line = [x for x in stdout.splitlines() if x.startswith("LOSSES ")]
  assert line, stdout[-3000:]
  return json.loads(line[0][len("LOSSES "):])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  model_init = str(tmp_path / "model_init")
  _write_model_init(model_init)
  port = free_port()
  commands = {name: [sys.executable, "-m", "tests.test_train_multiprocess", str(pid), str(port),
                     str(tmp_path / ("single" if pid < 0 else "shared")), model_init]
              for name, pid in (("p0", 0), ("p1", 1), ("single", -1))}
  runs = Processes(tmp_path, commands, cpu_env(2), envs=dict(single=cpu_env(4)))
  runs.succeed(timeout=300)
  out = {name: _losses(runs.log(name)) for name in commands}

  # The single process ran the same partitioned program on the same (1, 2, 2) mesh of
  # 4 local devices; only the collectives' transport (gloo between the processes)
  # differs. Measured: losses and exported parameters bitwise equal. Allowed: float
  # rounding of a 4-way sum in another order (rtol 1e-6 on the losses), and on the
  # parameters a 20th of the one non-zero Adam step (lr 2e-3 at step 2): Adam
  # magnifies rounding noise on the exactly-zero gradients (k_proj biases) to a few %
  # of lr, while a wrong or missing shard in the export would be off by a whole step
  # or the parameters' scale. Equal losses also mean the two processes' rows made up
  # the single process's global batch (a repeated or missing row would change them).
  assert sorted(out["p0"]) == ["1", "2"]
  assert out["p0"] == out["p1"]
  for step in out["p0"]:
    np.testing.assert_allclose(out["p0"][step], out["single"][step], rtol=1e-6)

  shared = tmp_path / "shared"
  assert sorted(os.listdir(shared / "checkpoints")) == ["2"]
  with open(shared / "metrics.jsonl") as f:  # process 0's lines only
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  _, exported = load_sam(str(shared / "export"))
  _, reference = load_sam(str(tmp_path / "single" / "export"))
  exported, reference = dict(_flatten(exported)), dict(_flatten(reference))
  assert sorted(exported) == sorted(reference)
  for key, ref in reference.items():
    np.testing.assert_allclose(exported[key], ref, rtol=0, atol=1e-4, err_msg=key)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _flatten(tree[k], f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
