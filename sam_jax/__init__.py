"""Segment Anything in JAX and Flax."""

from sam_jax.build import build_sam, model_config
from sam_jax.checkpoint import init_params, load_sam, save_sam
from sam_jax.modeling import Sam
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.predictor import SamPredictor
from sam_jax.transforms import ResizeLongestSide
