"""Trains SAM: `python -m sam_jax.train --config configs/demo.py --workdir /tmp/sam_demo`.

(`python train.py` in a clone and the `sam-jax-train` script are the same.)

`--mode=eval` instead reports the prompt mIoUs of a trained checkpoint.
`--mode=compile --topology=v5p-128` compiles the training step for a TPU pod on
this machine (libtpu, no TPU) and reports whether it fits (docs/tpu.md).

Flags only; the job lives in `sam_jax.train.trainer.train_and_evaluate`.
`--config path:arg` passes `arg` to the config's `get_config`, and
`--config.some.field=value` overrides single fields.

Several processes (hosts): run the same command on each with `--distributed`,
which calls `jax.distributed.initialize` (cluster auto-detection on TPU pods,
SLURM and Open MPI), or with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` spelled out; WORKDIR must be a directory they all share.

A SIGTERM (a preemption notice) saves a checkpoint and exits with status 75;
the same command resumes (docs/preemption.md).
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (optionally :arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where data, checkpoints, metrics and exports go.")
flags.DEFINE_integer("stop_at", None, "Stop after this step (checkpointed), to resume later.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "compile"],
                  "eval: 1-point, box and k-click mIoU of WORKDIR/export (or --checkpoint, "
                  "or config.model_init) on the config's held-out data. compile: size the "
                  "run for --topology (WORKDIR/compile_report.json).")
flags.DEFINE_bool("restart_data_order", False, "Resume with another config.batch_size, reading "
                  "the data from its start again (else refused).")
flags.DEFINE_string("checkpoint", None, "For --mode=eval: a sam_jax checkpoint directory.")
flags.DEFINE_string("topology", None, "For --mode=compile: a TPU slice as sold (v5p-128, "
                    "v5e-64, v4-32, v6e-16) or libtpu's form (v5p:4x4x4).")
flags.DEFINE_integer("num_slices", 1, "For --mode=compile: slices joined over DCN (data axis).")
flags.DEFINE_bool("batch_search", False, "For --mode=compile: find the largest per-chip batch "
                  "that fits, by compiling.")
flags.DEFINE_integer("inference_batch", 1, "For --mode=compile: per-chip batch of the image "
                     "encoder's forward to size (0: skip).")
flags.DEFINE_bool("distributed", False, "Multi-process: jax.distributed.initialize() first, "
                  "from the cluster's environment or the three flags below.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: process 0's HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0 .. N-1.")


def _run(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.distributed or f.coordinator_address:
    import jax  # noqa: PLC0415 - after absl parsed the flags
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs use NCCL
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  if f.mode == "compile":
    from sam_jax.train import compile_report  # noqa: PLC0415
    try:
      compile_report.run(f.config, f.workdir, f.topology, f.num_slices, f.batch_search,
                         f.inference_batch or None)
    except compile_report.CompileError as e:
      raise SystemExit(f"error: {e}") from None
    return
  from sam_jax.train import trainer  # import JAX after absl parsed the flags
  if f.mode == "eval":
    trainer.evaluate_only(f.config, f.workdir, f.checkpoint)
  else:
    trainer.train_and_evaluate(f.config, f.workdir, f.stop_at, f.restart_data_order)


def main(argv=None):
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_run, argv=argv)
