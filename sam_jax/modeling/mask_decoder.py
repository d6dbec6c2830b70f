"""SAM's mask decoder: output tokens, two-way transformer, upscaling and heads."""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import gelu, layer_norm_2d
from sam_jax.modeling.transformer import TwoWayTransformer


class MLP(nn.Module):
  """`num_layers` linear layers (`layers_i`) with ReLU between them."""
  hidden_dim: int
  output_dim: int
  num_layers: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.output_dim if last else self.hidden_dim, name=f"layers_{i}")(x)
      x = x if last else nn.relu(x)
    return x


class SubpixelConvTranspose(nn.Module):
  """A 2x2 transposed convolution with stride 2, output left as subpixels.

  (..., Cin) -> (..., 2, 2, features): output pixel (2i + a, 2j + b) of input
  pixel (i, j) is at [..., a, b, :]. Parameters are those of
  `nn.ConvTranspose(features, (2, 2), strides=(2, 2), transpose_kernel=True)`.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return jnp.einsum("...i,abfi->...abf", x, kernel) + bias


class MaskDecoder(nn.Module):
  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  attention_downsample_rate: int = 2

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1

  @nn.compact
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
      multimask_output: the three ambiguity-aware masks, or the single one.
      sparse_prompt_mask: (B, P, T), False for padding tokens; None means all real.

    Returns:
      mask logits (B, P, M, 4h, 4w) and predicted IoUs (B, P, M), M = 3 or 1.
    """
    dim, n_masks = self.transformer_dim, self.num_mask_tokens
    b, p = sparse_prompt_embeddings.shape[:2]
    output_tokens = jnp.concatenate(
        [nn.Embed(1, dim, name="iou_token").embedding,
         nn.Embed(n_masks, dim, name="mask_tokens").embedding], axis=0)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(output_tokens, (b, p, *output_tokens.shape)), sparse_prompt_embeddings],
        axis=2)
    token_mask = None
    if sparse_prompt_mask is not None:
      token_mask = jnp.concatenate(
          [jnp.ones((b, p, 1 + n_masks), bool), sparse_prompt_mask.astype(bool)], axis=2)

    src = image_embeddings[:, None] + dense_prompt_embeddings
    hs, src = TwoWayTransformer(
        self.transformer_depth, self.transformer_num_heads, self.transformer_mlp_dim,
        self.attention_downsample_rate, name="transformer")(src, image_pe, tokens, token_mask)
    iou_token_out, mask_tokens_out = hs[..., 0, :], hs[..., 1:1 + n_masks, :]

    # The two 2x2 stride-2 transposed convolutions do not overlap, so each is a
    # matmul to (2, 2, features) per pixel; the pixels are put in place once,
    # on the final masks (one channel) rather than on 64- and 32-channel maps.
    # Names follow the reference's nn.Sequential indexes (activations hold 2 and 4).
    h, w = image_embeddings.shape[1:3]
    x = src.reshape(b, p, h, w, dim)
    x = SubpixelConvTranspose(dim // 4, name="output_upscaling_0")(x)  # (..., a, e, C/4)
    x = gelu(layer_norm_2d("output_upscaling_1")(x))
    x = SubpixelConvTranspose(dim // 8, name="output_upscaling_3")(x)  # (..., a, e, c, f, C/8)
    upscaled = gelu(x)

    hyper_in = jnp.stack(
        [MLP(dim, dim // 8, 3, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[..., i, :])
         for i in range(n_masks)], axis=-2)
    # Row 4i + 2a + c, column 4j + 2e + f of the mask is subpixel (a, e), then (c, f), of (i, j).
    masks = jnp.einsum("npmk,npijaecfk->npmiacjef", hyper_in, upscaled)
    masks = masks.reshape(b, p, n_masks, 4 * h, 4 * w)
    iou_pred = MLP(self.iou_head_hidden_dim, n_masks, self.iou_head_depth,
                   name="iou_prediction_head")(iou_token_out)
    keep = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, :, keep], iou_pred[..., keep]
