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
    """Predicts masks for B prompts.

    Args:
      image_embeddings: (B, h, w, C), or (1, h, w, C) shared by every prompt.
      image_pe: (1, h, w, C) positional encoding of the embedding grid.
      sparse_prompt_embeddings: (B, T, C).
      dense_prompt_embeddings: (B, h, w, C).
      multimask_output: the three ambiguity-aware masks, or the single one.
      sparse_prompt_mask: (B, T), False for padding tokens; None means all real.

    Returns:
      mask logits (B, M, 4h, 4w) and predicted IoUs (B, M), M = 3 or 1.
    """
    dim, n_masks = self.transformer_dim, self.num_mask_tokens
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.concatenate(
        [nn.Embed(1, dim, name="iou_token").embedding,
         nn.Embed(n_masks, dim, name="mask_tokens").embedding], axis=0)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(output_tokens, (b, *output_tokens.shape)), sparse_prompt_embeddings],
        axis=1)
    token_mask = None
    if sparse_prompt_mask is not None:
      token_mask = jnp.concatenate(
          [jnp.ones((b, 1 + n_masks), bool), sparse_prompt_mask.astype(bool)], axis=1)

    src = image_embeddings + dense_prompt_embeddings
    pos_src = jnp.broadcast_to(image_pe, src.shape)
    _, h, w, _ = src.shape
    hs, src = TwoWayTransformer(
        self.transformer_depth, self.transformer_num_heads, self.transformer_mlp_dim,
        self.attention_downsample_rate, name="transformer")(src, pos_src, tokens, token_mask)
    iou_token_out, mask_tokens_out = hs[:, 0], hs[:, 1:1 + n_masks]

    # Names follow the reference's nn.Sequential indexes (activations hold 2 and 4).
    x = src.reshape(b, h, w, dim)
    x = nn.ConvTranspose(dim // 4, (2, 2), strides=(2, 2), transpose_kernel=True,
                         name="output_upscaling_0")(x)
    x = gelu(layer_norm_2d("output_upscaling_1")(x))
    x = nn.ConvTranspose(dim // 8, (2, 2), strides=(2, 2), transpose_kernel=True,
                         name="output_upscaling_3")(x)
    upscaled = gelu(x)

    hyper_in = jnp.stack(
        [MLP(dim, dim // 8, 3, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i])
         for i in range(n_masks)], axis=1)
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, upscaled)
    iou_pred = MLP(self.iou_head_hidden_dim, n_masks, self.iou_head_depth,
                   name="iou_prediction_head")(iou_token_out)
    keep = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, keep], iou_pred[:, keep]
