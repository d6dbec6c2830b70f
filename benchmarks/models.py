"""Paired models for benchmarks: a randomised reference (PyTorch) SAM and the
sam_jax model converted from its state dict in memory (no checkpoint files)."""

from typing import Any, Dict, Tuple

import numpy as np

from sam_jax.build import build_sam
from sam_jax.checkpoint import abstract_params
from sam_jax.convert import infer_config, state_dict_to_params

# (embed_dim, depth, num_heads, global_attn_indexes), as sam_jax.build.VARIANTS,
# plus "tiny": a 2-block encoder for the quick smoke run.
SIZES = {
    "tiny": (64, 2, 2, (1,)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def paired_models(variant: str, image_size: int = 1024, seed: int = 0, **overrides
                  ) -> Tuple[Any, Any, Dict[str, Any]]:
  """(reference torch Sam, sam_jax Sam, params) with the same random weights.

  `overrides` update the sam_jax model's config (e.g. dtype="bfloat16").
  """
  ref = reference_model(variant, image_size, seed)
  state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
  config = infer_config(state_dict)
  _override(config, overrides)
  model = build_sam(config)
  params = state_dict_to_params(state_dict, abstract_params(model))
  return ref, model, params


def reference_model(variant: str, image_size: int = 1024, seed: int = 0) -> Any:
  """The reference (torch) Sam of `variant`'s sizes with seeded random weights."""
  from tests.reference import reference_sam  # torch and segment_anything: import late
  embed_dim, depth, heads, global_idx = SIZES[variant]
  return reference_sam(embed_dim=embed_dim, depth=depth, num_heads=heads,
                       global_attn_indexes=global_idx, image_size=image_size, seed=seed)


def jax_model(variant: str, image_size: int = 1024, **overrides) -> Any:
  """The sam_jax model alone (no reference, no weights), for benchmarks that need no pair."""
  from sam_jax.build import model_config
  embed_dim, depth, heads, global_idx = SIZES[variant]
  config = model_config("vit_b")
  config.image_size = image_size
  config.image_encoder.update(dict(embed_dim=embed_dim, depth=depth, num_heads=heads,
                                   global_attn_indexes=global_idx))
  _override(config, overrides)
  return build_sam(config)


def _override(config, overrides: Dict[str, Any]) -> None:
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value


def astronaut() -> np.ndarray:
  """skimage's astronaut photo, (512, 512, 3) uint8 RGB."""
  from skimage import data
  return np.ascontiguousarray(data.astronaut())
