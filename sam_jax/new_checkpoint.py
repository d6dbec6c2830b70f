"""Writes a randomly initialised sam_jax checkpoint for a model config.

  python -m sam_jax.new_checkpoint --config configs/sam.py:vit_b --output ckpt/random_b

For trying the tools without the official weights, and as the starting point
of training from scratch. Overrides: `--config.image_encoder.depth=4` etc.
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from sam_jax.build import build_sam
from sam_jax.checkpoint import init_params, save_sam

_CONFIG = config_flags.DEFINE_config_file("config", None, "a model config, e.g. configs/sam.py:vit_b")
_OUTPUT = flags.DEFINE_string("output", None, "the checkpoint directory to write")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation seed")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing directory")


def _run(argv):
  del argv
  config = _CONFIG.value
  params = init_params(build_sam(config), jax.random.key(_SEED.value))
  save_sam(_OUTPUT.value, config, params, overwrite=_OVERWRITE.value)
  print(f"wrote {_OUTPUT.value} ({config.variant}, randomly initialised, seed {_SEED.value})")


def main(argv=None):
  flags.mark_flags_as_required(["config", "output"])
  app.run(_run, argv=argv)


if __name__ == "__main__":
  main()
