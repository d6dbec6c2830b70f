"""SAM's modules, mirroring the reference's `segment_anything.modeling`."""

from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder
from sam_jax.modeling.sam import Sam
from sam_jax.modeling.transformer import TwoWayTransformer
