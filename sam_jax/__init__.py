"""Segment Anything in JAX and Flax."""

from sam_jax.build import build_sam, model_config
from sam_jax.checkpoint import init_params, load_sam, save_sam
from sam_jax.modeling import Sam
