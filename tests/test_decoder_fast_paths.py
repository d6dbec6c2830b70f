"""The mask decoder's reorganised arithmetic equals the straightforward one.

The parity tests against the reference cover the defaults; these check each
alternative directly (values and gradients), so that a path the default shapes
do not pick cannot rot.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.modeling.image_encoder import linear_resize_matrix
from sam_jax.modeling.mask_decoder import SubpixelConvTranspose
from sam_jax.modeling.sam import _apply_banded
from sam_jax.modeling.transformer import Attention

ORDERS = ("projected", "keys", "queries")


def _attention_inputs(rs, shared_image, tokens_attend):
  """Tokens (2, 3, 5, 32) and an image (2, 1 or 3, 40, 32); which side asks."""
  tokens = jnp.asarray(rs.randn(2, 3, 5, 32).astype(np.float32))
  image = jnp.asarray(rs.randn(2, 1 if shared_image else 3, 40, 32).astype(np.float32))
  mask = jnp.asarray(rs.rand(2, 3, 5) > 0.3).at[..., 0].set(True)
  if tokens_attend:
    return tokens, image, image, None
  return image, tokens, tokens, mask


@pytest.mark.parametrize("shared_image", [True, False])
@pytest.mark.parametrize("tokens_attend", [True, False])
def test_attention_contraction_orders_agree(shared_image, tokens_attend):
  q, k, v, mask = _attention_inputs(np.random.RandomState(0), shared_image, tokens_attend)
  attn = Attention(num_heads=4, downsample_rate=2)
  params = attn.init(jax.random.PRNGKey(0), q, k, v, mask)
  # Non-zero biases: the orders move them around differently.
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                        params)

  def loss(order):
    return lambda p, q, k, v: (attn.apply(p, q, k, v, mask, contraction=order) ** 2).sum()
  outs = {o: attn.apply(params, q, k, v, mask, contraction=o) for o in ORDERS}
  grads = {o: jax.grad(loss(o), (0, 1, 2, 3))(params, q, k, v) for o in ORDERS}
  want_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + q.shape[-2:]
  for o in ORDERS[1:]:
    assert outs[o].shape == want_shape
    np.testing.assert_allclose(outs[o], outs["projected"], rtol=1e-5, atol=1e-5, err_msg=o)
    for got, want in zip(jax.tree.leaves(grads[o]), jax.tree.leaves(grads["projected"])):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=o)


def test_attention_picks_the_cheapest_order():
  """SAM's shapes: 4096 image tokens, a few prompt tokens, 256 channels, 8 heads."""
  attn = Attention(num_heads=8, downsample_rate=2)
  x = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  image, one_prompt, many_prompts = x(1, 1, 4096, 256), x(1, 1, 7, 256), x(1, 64, 7, 256)
  assert attn.contraction(one_prompt, image, image) == "keys"
  assert attn.contraction(image, one_prompt, one_prompt) == "queries"
  # The image shared by 64 prompts is projected once: the reference's order wins.
  assert attn.contraction(many_prompts, image, image) == "projected"
  # After the first layer each prompt has its own image tokens.
  per_prompt_image = x(1, 64, 4096, 256)
  assert attn.contraction(many_prompts, per_prompt_image, per_prompt_image) == "keys"
  with pytest.raises(ValueError, match="contraction must be"):
    q = jnp.zeros((1, 3, 32))
    attn.init(jax.random.PRNGKey(0), q, q, q, contraction="sideways")


def test_subpixel_conv_transpose_equals_conv_transpose():
  x = jnp.asarray(np.random.RandomState(1).randn(2, 5, 6, 16).astype(np.float32))
  ref = nn.ConvTranspose(8, (2, 2), strides=(2, 2), transpose_kernel=True)
  params = ref.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  want = ref.apply(params, x)  # (2, 10, 12, 8)
  sub = SubpixelConvTranspose(8).apply(params, x)  # (2, 5, 6, 2, 2, 8)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, SubpixelConvTranspose(8).init(jax.random.PRNGKey(0), x))
  got = sub.transpose(0, 1, 3, 2, 4, 5).reshape(want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("low,padded,valid,original", [
    (256, 1024, 1024, 512),   # a square photo, downscaled
    (256, 1024, 683, 1500),   # the short side of a 1500 x 2250 photo, upscaled
    (64, 256, 171, 97),       # a small model, odd sizes
])
def test_banded_resize_equals_dense_matrix(low, padded, valid, original):
  matrix = linear_resize_matrix(valid, original) @ linear_resize_matrix(low, padded)[:valid]
  x = np.random.RandomState(2).randn(3, low, 5).astype(np.float32)
  got = _apply_banded(jnp.asarray(x), matrix, axis=-2)
  want = np.einsum("Hh,bhw->bHw", matrix.astype(np.float64), x)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
