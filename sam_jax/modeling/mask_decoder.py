"""SAM's mask decoder: output tokens, two-way transformer, upscaling and heads."""

from typing import Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import gelu, layer_norm_2d
from sam_jax.modeling.transformer import Heads, TwoWayTransformer


class MLP(nn.Module):
  """`num_layers` linear layers (`layers_i`) with ReLU between them."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                   name=f"layers_{i}")(x)
      x = x if last else nn.relu(x)
    return x


class SubpixelConvTranspose(nn.Module):
  """A 2x2 transposed convolution with stride 2, output left as subpixels.

  (..., Cin) -> (..., 2, 2, features): output pixel (2i + a, 2j + b) of input
  pixel (i, j) is at [..., a, b, :]. Parameters are those of
  `nn.ConvTranspose(features, (2, 2), strides=(2, 2), transpose_kernel=True)`.
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum("...i,abfi->...abf", x, kernel) + bias


class ImageCache(NamedTuple):
  """What the decoder computes from the image alone, for prompts that share a dense embedding.

  Made by `MaskDecoder.cache_image`; a caller that decodes many prompts on
  one image (the predictor, the automatic mask generator) keeps it.
  """
  image_pe: jax.Array  # (1, h, w, C)
  src: jax.Array  # (B, 1, h, w, C): the image embeddings plus the dense prompt embedding
  first_layer: Dict[str, Heads]  # the transformer's first projections of src


class MaskDecoder(nn.Module):
  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  # The compute dtype of the per-prompt tensors (parameters stay float32; the
  # masks and IoUs come out float32): "bfloat16" halves the decoder's memory
  # traffic, most of a training step's (docs/tpu.md, where the time goes).
  dtype: str = "float32"

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1

  @property
  def num_output_tokens(self) -> int:
    """The IoU token and the mask tokens, ahead of every prompt's own tokens."""
    return 1 + self.num_mask_tokens

  def setup(self):
    dim, dt = self.transformer_dim, jnp.dtype(self.dtype)
    self.iou_token = nn.Embed(1, dim)
    self.mask_tokens = nn.Embed(self.num_mask_tokens, dim)
    self.transformer = TwoWayTransformer(
        dim, self.transformer_depth, self.transformer_num_heads, self.transformer_mlp_dim,
        self.attention_downsample_rate, dt)
    # Names follow the reference's nn.Sequential indexes (activations hold 2 and 4).
    self.output_upscaling_0 = SubpixelConvTranspose(dim // 4, dt)
    self.output_upscaling_1 = layer_norm_2d(None, dt)
    self.output_upscaling_3 = SubpixelConvTranspose(dim // 8, dt)
    self.output_hypernetworks_mlps = [MLP(dim, dim // 8, 3, dt)
                                      for _ in range(self.num_mask_tokens)]
    self.iou_prediction_head = MLP(self.iou_head_hidden_dim, self.num_mask_tokens,
                                   self.iou_head_depth, dt)

  def cache_image(self, image_embeddings: jax.Array, image_pe: jax.Array,
                  dense_prompt_embeddings: jax.Array) -> ImageCache:
    """image_embeddings (B, h, w, C) with a dense embedding (B, P, h, w, C) or
    (B or 1, 1, h, w, C) shared by every prompt: see `__call__`."""
    src = image_embeddings[:, None] + dense_prompt_embeddings
    return ImageCache(image_pe, src, self.transformer.image_heads(src, image_pe))

  def __call__(
      self,
      image_embeddings: jax.Array,
      image_pe: jax.Array,
      sparse_prompt_embeddings: jax.Array,
      dense_prompt_embeddings: jax.Array,
      multimask_output: bool,
      sparse_prompt_mask: Optional[jax.Array] = None,
  ) -> Tuple[jax.Array, jax.Array]:
    """Predicts masks for P prompts on each of B images.

    Args:
      image_embeddings: (B, h, w, C), one per image.
      image_pe: (1, h, w, C) positional encoding of the embedding grid.
      sparse_prompt_embeddings: (B, P, T, C).
      dense_prompt_embeddings: (B, P, h, w, C), or (B or 1, 1, h, w, C) when
        every prompt has the same (no mask prompts): then the transformer's
        first image projections are computed once per image, not per prompt.
      multimask_output: the three ambiguity-aware masks, or the single one
        (or "all": the single one, then the three).
      sparse_prompt_mask: (B, P, T), False for padding tokens; None means all real.

    Returns:
      mask logits (B, P, M, 4h, 4w) and predicted IoUs (B, P, M), M = 3 or 1.
    """
    src = image_embeddings[:, None] + dense_prompt_embeddings
    return self._decode(src, image_pe, None, sparse_prompt_embeddings, multimask_output,
                        sparse_prompt_mask)

  def decode_cached(self, cache: ImageCache, sparse_prompt_embeddings: jax.Array,
                    multimask_output: bool, sparse_prompt_mask: Optional[jax.Array] = None
                    ) -> Tuple[jax.Array, jax.Array]:
    """`__call__` on an image kept by `cache_image`: its first projections are not redone."""
    return self._decode(cache.src, cache.image_pe, cache.first_layer, sparse_prompt_embeddings,
                        multimask_output, sparse_prompt_mask)

  def output_tokens(self) -> jax.Array:
    """The IoU token, then the mask tokens: (num_output_tokens, C)."""
    return jnp.concatenate([self.iou_token.embedding, self.mask_tokens.embedding], 0)

  def _decode(self, src, image_pe, first_layer, sparse_prompt_embeddings, multimask_output,
              sparse_prompt_mask):
    b, p = sparse_prompt_embeddings.shape[:2]
    output_tokens = self.output_tokens()
    tokens = jnp.concatenate(
        [jnp.broadcast_to(output_tokens, (b, p, *output_tokens.shape)), sparse_prompt_embeddings],
        axis=2)
    token_mask = None
    if sparse_prompt_mask is not None:
      token_mask = jnp.concatenate(
          [jnp.ones((b, p, self.num_output_tokens), bool), sparse_prompt_mask.astype(bool)],
          axis=2)
    return self.decode_tokens(src, image_pe, first_layer, tokens, token_mask, multimask_output)

  def decode_tokens(self, src, image_pe, first_layer, tokens, token_mask, multimask_output
                    ) -> Tuple[jax.Array, jax.Array]:
    """`__call__` on the whole token array, `output_tokens()` first, then the prompt's.

    src: the image embeddings plus the dense prompt embedding, (B, P or 1, h, w, C);
    first_layer: as `ImageCache.first_layer`, or None; tokens (B, P, T, C) and
    token_mask (B, P, T) or None. The ONNX export builds the tokens itself, so
    that no shape it traces is the prompt's length plus a constant.
    """
    dim, n_masks = self.transformer_dim, self.num_mask_tokens
    b, p = tokens.shape[:2]
    h, w = src.shape[-3:-1]
    hs, src = self.transformer(src, image_pe, tokens, token_mask, first_layer,
                               num_outputs=1 + n_masks)
    iou_token_out, mask_tokens_out = hs[..., 0, :], hs[..., 1:1 + n_masks, :]

    # The two 2x2 stride-2 transposed convolutions do not overlap, so each is a
    # matmul to (2, 2, features) per pixel; the pixels are put in place once,
    # on the final masks (one channel) rather than on 64- and 32-channel maps.
    x = src.reshape(b, p, h, w, dim)
    x = self.output_upscaling_0(x)  # (..., a, e, C/4)
    x = gelu(self.output_upscaling_1(x))
    upscaled = gelu(self.output_upscaling_3(x))  # (..., a, e, c, f, C/8)

    # "all": every token's mask, the single-mask one first (Meta's ONNX decoder returns these).
    keep = (slice(None) if isinstance(multimask_output, str) and multimask_output == "all"
            else slice(1, None) if multimask_output else slice(0, 1))
    # Every hypernetwork runs (a few thousand FLOPs each), so that every
    # parameter exists whichever output `init` traces; only the kept masks are made.
    hyper_in = jnp.stack([mlp(mask_tokens_out[..., i, :])
                          for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=-2)
    # Row 4i + 2a + c, column 4j + 2e + f of the mask is subpixel (a, e), then (c, f), of (i, j).
    with jax.named_scope("mask_product"):  # its own part in the compile report (hlo_costs)
      masks = jnp.einsum("npmk,npijaecfk->npmiacjef", hyper_in[:, :, keep], upscaled,
                         preferred_element_type=jnp.float32)
    masks = masks.reshape(b, p, -1, 4 * h, 4 * w)
    return masks, self.iou_prediction_head(iou_token_out)[..., keep].astype(jnp.float32)
