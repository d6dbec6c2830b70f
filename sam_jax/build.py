"""Model configs for the SAM variants, and building a model from one."""

from typing import Tuple

import jax.numpy as jnp
import ml_collections

from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder
from sam_jax.modeling.sam import Sam
from sam_jax.transforms import Size

# (embed_dim, depth, num_heads, global_attn_indexes) of the released encoders.
VARIANTS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def model_config(variant: str = "vit_b") -> ml_collections.ConfigDict:
  """The reference's hyperparameters for `variant`; override any field."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  embed_dim, depth, num_heads, global_attn_indexes = VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      variant=variant,
      image_size=1024,  # an int, or (height, width) for a non-square input
      prompt_embed_dim=256,
      dtype="float32",  # the image encoder's compute dtype; parameters stay float32
      image_encoder=dict(
          patch_size=16,
          embed_dim=embed_dim,
          depth=depth,
          num_heads=num_heads,
          mlp_ratio=4.0,
          window_size=14,
          global_attn_indexes=global_attn_indexes,
          use_abs_pos=True,
          use_rel_pos=True,
          qkv_bias=True,
          drop_path_rate=0.0,
          remat=False,
          # "auto": cuDNN flash attention on GPUs in bf16/fp16, XLA otherwise.
          attention="auto",  # the global blocks
          window_attention="auto",
      ),
      prompt_encoder=dict(mask_in_chans=16),
      mask_decoder=dict(
          num_multimask_outputs=3,
          iou_head_depth=3,
          iou_head_hidden_dim=256,
          transformer_depth=2,
          transformer_num_heads=8,
          transformer_mlp_dim=2048,
          attention_downsample_rate=2,
          dtype="float32",  # its per-prompt tensors' compute dtype (MaskDecoder.dtype)
      ),
      pixel_mean=(123.675, 116.28, 103.53),
      pixel_std=(58.395, 57.12, 57.375),
  ), type_safe=False)  # image_size may become a (height, width) pair


def image_size_hw(size: Size) -> Tuple[int, int]:
  """(height, width) of an image size given as one side or as a pair (`config.image_size`)."""
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_sam(config: ml_collections.ConfigDict) -> Sam:
  """The `Sam` module that `config` describes (parameters come separately)."""
  size = image_size_hw(config.image_size)
  enc = config.image_encoder.to_dict()
  if size[0] % enc["patch_size"] or size[1] % enc["patch_size"]:
    raise ValueError(f"image_size {size} must be a multiple of patch_size {enc['patch_size']}.")
  enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
  grid = (size[0] // enc["patch_size"], size[1] // enc["patch_size"])
  dim = config.prompt_embed_dim
  return Sam(
      image_encoder=ImageEncoderViT(
          image_size=size, out_chans=dim, dtype=jnp.dtype(config.dtype), **enc),
      prompt_encoder=PromptEncoder(
          embed_dim=dim, image_embedding_size=grid, input_image_size=size,
          **config.prompt_encoder),
      mask_decoder=MaskDecoder(transformer_dim=dim, **config.mask_decoder),
      pixel_mean=tuple(config.pixel_mean),
      pixel_std=tuple(config.pixel_std),
  )
