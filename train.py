"""Trains SAM: `python train.py --config configs/demo.py --workdir /tmp/sam_demo`.

`--mode=eval` instead reports the prompt mIoUs of a trained checkpoint.

Flags only; the job lives in `sam_jax.train.trainer.train_and_evaluate`.
`--config path:arg` passes `arg` to the config's `get_config`, and
`--config.some.field=value` overrides single fields.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (optionally :arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where data, checkpoints, metrics and exports go.")
flags.DEFINE_integer("stop_at", None, "Stop after this step (checkpointed), to resume later.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "eval: 1-point, box and k-click mIoU of WORKDIR/export (or --checkpoint, "
                  "or config.model_init) on the config's held-out data.")
flags.DEFINE_string("checkpoint", None, "For --mode=eval: a sam_jax checkpoint directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from sam_jax.train import trainer  # import JAX after absl parsed the flags
  f = flags.FLAGS
  if f.mode == "eval":
    trainer.evaluate_only(f.config, f.workdir, f.checkpoint)
  else:
    trainer.train_and_evaluate(f.config, f.workdir, f.stop_at)


if __name__ == "__main__":
  app.run(main)
