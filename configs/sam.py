"""The model configs of the released SAM variants, with every field overridable.

  python -m sam_jax.new_checkpoint --config configs/sam.py:vit_b --output ckpt/random_b
  python -m sam_jax.new_checkpoint --config configs/sam.py:vit_h \
      --config.image_size=512 --config.image_encoder.depth=8 --output ckpt/ablation

`arg` names the variant: vit_b (default), vit_l or vit_h. Any field can then be
changed with `--config.FIELD=VALUE` (ml_collections config flags) or in Python:
depth, width, heads, window, global block indexes, image size (an int, or a
(height, width) pair), decoder depth and widths, compute dtype, remat.
"""

from sam_jax.build import model_config


def get_config(arg: str = "vit_b"):
  return model_config(arg or "vit_b")
