"""The mask decoder's reorganised arithmetic equals the straightforward one.

The parity tests against the reference cover the defaults; these check each
alternative directly (values and gradients), so that a path the default shapes
do not pick cannot rot.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import tiny_model
from sam_jax.build import build_sam
from sam_jax.modeling.image_encoder import linear_resize_matrix
from sam_jax.modeling.mask_decoder import SubpixelConvTranspose
from sam_jax.modeling.sam import _apply_banded
from sam_jax.modeling.transformer import OUTPUTS, SCORES, Attention, Heads

PAIRS = list(itertools.product(SCORES, OUTPUTS))


def _attention_inputs(rs, shared_image, tokens_attend):
  """Tokens (2, 3, 5, 32) and an image (2, 1 or 3, 40, 32); which side asks."""
  tokens = jnp.asarray(rs.randn(2, 3, 5, 32).astype(np.float32))
  image = jnp.asarray(rs.randn(2, 1 if shared_image else 3, 40, 32).astype(np.float32))
  mask = jnp.asarray(rs.rand(2, 3, 5) > 0.3).at[..., 0].set(True)
  if tokens_attend:
    return tokens, image, image, None
  return image, tokens, tokens, mask


def _attention(rs, shared_image, tokens_attend):
  q, k, v, mask = _attention_inputs(rs, shared_image, tokens_attend)
  attn = Attention(32, num_heads=4, downsample_rate=2)
  params = attn.init(jax.random.PRNGKey(0), q, k, v, mask)
  # Non-zero biases: the orders move them around differently.
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                        params)
  return attn, params, (q, k, v, mask)


@pytest.mark.slow
@pytest.mark.parametrize("shared_image", [True, False])
@pytest.mark.parametrize("tokens_attend", [True, False])
def test_attention_contraction_orders_agree(shared_image, tokens_attend):
  attn, params, (q, k, v, mask) = _attention(np.random.RandomState(0), shared_image,
                                             tokens_attend)

  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(order, p, q, k, v):
    loss = lambda *a: (attn.apply(*a, mask, contraction=order) ** 2).sum()  # noqa: E731
    return attn.apply(p, q, k, v, mask, contraction=order), jax.grad(loss, (0, 1, 2, 3))(
        p, q, k, v)
  outs, grads = {}, {}
  for o in PAIRS:
    outs[o], grads[o] = out_and_grads(o, params, q, k, v)
  want_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + q.shape[-2:]
  reference_order = ("project", "project")
  for o in PAIRS:
    assert outs[o].shape == want_shape
    np.testing.assert_allclose(outs[o], outs[reference_order], rtol=1e-5, atol=1e-5,
                               err_msg=str(o))
    wants = jax.tree.leaves(grads[reference_order])
    # Float32 sums of terms up to a few hundred: the rounding scales with the
    # largest gradient (the key bias's is zero but for that rounding).
    atol = 1e-6 * max(float(np.abs(w).max()) for w in wants)
    for got, want in zip(jax.tree.leaves(grads[o]), wants):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=str(o))


@pytest.mark.parametrize("given", ["q", "k", "v", "kv", "qkv"])
def test_attention_takes_sides_projected_beforehand(given):
  """`Heads` from `project` in place of any side, in every order that allows it."""
  attn, params, (q, k, v, mask) = _attention(np.random.RandomState(1), True, False)
  want = attn.apply(params, q, k, v, mask)
  sides = dict(q=q, k=k, v=v)
  for which in given:
    sides[which] = attn.apply(params, sides[which], which, method=Attention.project)
    assert isinstance(sides[which], Heads)
  needs_raw = {"fold_wk": "k", "fold_wq": "q", "fold_wv": "v"}
  for order in PAIRS:
    if any(o in needs_raw and needs_raw[o] in given for o in order):
      with pytest.raises(ValueError, match="needs that side unprojected"):
        attn.apply(params, sides["q"], sides["k"], sides["v"], mask, contraction=order)
      continue
    got = attn.apply(params, sides["q"], sides["k"], sides["v"], mask, contraction=order)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(order))


def test_attention_picks_the_cheapest_order():
  """SAM's shapes: 4096 image tokens, a few prompt tokens, 256 channels, 8 heads."""
  attn = Attention(256, num_heads=8, downsample_rate=2)
  x = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  image, one_prompt, many_prompts = x(1, 1, 4096, 256), x(1, 1, 7, 256), x(1, 64, 7, 256)
  # Tokens attending to the image never project it; the image attending to
  # tokens never projects its queries or its output.
  assert attn.contraction(one_prompt, image, image) == ("fold_wk", "fold_wv")
  assert attn.contraction(image, one_prompt, one_prompt) == ("fold_wq", "fold_wo")
  # The image shared by 64 prompts is projected once: the reference's order wins.
  assert attn.contraction(many_prompts, image, image) == ("project", "project")
  # After the first layer each prompt has its own image tokens.
  per_prompt_image = x(1, 64, 4096, 256)
  assert attn.contraction(many_prompts, per_prompt_image, per_prompt_image) == (
      "fold_wk", "fold_wv")
  # Image projections kept from an earlier call cost nothing.
  heads = Heads(x(1, 1, 8, 4096, 32))
  assert attn.contraction(one_prompt, heads, heads) == ("project", "project")
  assert attn.contraction(heads, one_prompt, one_prompt) == ("project", "fold_wo")
  with pytest.raises(ValueError, match="contraction must be"):
    q = jnp.zeros((1, 3, 256))
    attn.init(jax.random.PRNGKey(0), q, q, q, contraction=("sideways", "project"))


@pytest.mark.slow
def test_decode_on_a_cached_image_equals_decode():
  """`Sam.cache_image` kept across calls changes nothing, mask prompts included."""
  model = build_sam(tiny_model(64))
  rs = np.random.RandomState(3)
  emb_shape = (2, *model.prompt_encoder.image_embedding_size, model.prompt_encoder.embed_dim)
  emb = jnp.asarray(rs.randn(*emb_shape).astype(np.float32))
  coords = jnp.asarray(rs.uniform(0, model.image_size[0], (2, 3, 2, 2)).astype(np.float32))
  labels = jnp.asarray(rs.randint(-1, 2, (2, 3, 2)))
  masks = jnp.asarray(rs.randn(2, 3, *model.prompt_encoder.mask_input_size).astype(np.float32))

  def decoder_only(m, *args):  # the encoder's parameters are not needed here
    return m.decode(*args), m.cache_image(args[0])
  # Random parameters of the right shapes: compiling `init` takes ten seconds.
  shapes = jax.eval_shape(functools.partial(model.init, method=decoder_only),
                          jax.random.key(0), emb, coords, labels, None, masks)["params"]
  params = jax.tree.map(lambda x: jnp.asarray(0.2 * rs.randn(*x.shape), x.dtype), shapes)
  cache = jax.jit(functools.partial(model.apply, method=model.cache_image))(
      {"params": params}, emb)
  decode = jax.jit(functools.partial(model.apply, method=model.decode))
  for mask_inputs in (None, masks):
    want = decode({"params": params}, emb, coords, labels, None, mask_inputs)
    got = decode({"params": params}, emb, coords, labels, None, mask_inputs, cache=cache)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("input_size,original_size", [((128, 96), (300, 225)), ((70, 128), (41, 75))])
def test_postprocess_equals_both_dense_matrices(input_size, original_size):
  """The columns' matmul, then the rows' gathers: R x C^T in float64, per mask."""
  model = build_sam(tiny_model(128))
  low_res = np.random.RandomState(5).randn(2, 3, 32, 40).astype(np.float32)
  got = model.apply({}, jnp.asarray(low_res), input_size, original_size,
                    method=model.postprocess_masks)
  matrix = lambda low, valid, original: (  # noqa: E731
      linear_resize_matrix(valid, original) @ linear_resize_matrix(low, 128)[:valid])
  rows, cols = matrix(32, input_size[0], original_size[0]), matrix(40, input_size[1],
                                                                   original_size[1])
  want = np.einsum("Hh,...hw,Ww->...HW", rows, low_res.astype(np.float64), cols)
  assert got.shape == want.shape == (2, 3, *original_size)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.slow  # compiles the decoder four times (two dtypes, a jaxpr, a gradient)
def test_decoder_in_bfloat16_keeps_its_per_prompt_tensors_in_bfloat16():
  """`mask_decoder.dtype = "bfloat16"` (the recipes'): the image-sized per-prompt
  tensors are bfloat16, the masks and IoUs float32 and close to the float32 decoder's."""
  config = tiny_model(64)
  f32 = build_sam(config)
  config.mask_decoder.dtype = "bfloat16"
  bf16 = build_sam(config)
  rs = np.random.RandomState(4)
  emb = jnp.asarray(rs.randn(2, *f32.prompt_encoder.image_embedding_size,
                             f32.prompt_encoder.embed_dim).astype(np.float32))
  coords = jnp.asarray(rs.uniform(0, f32.image_size[0], (2, 3, 2, 2)).astype(np.float32))
  labels = jnp.asarray(rs.randint(0, 2, (2, 3, 2)))
  masks = jnp.asarray(rs.randn(2, 3, *f32.prompt_encoder.mask_input_size).astype(np.float32))
  shapes = jax.eval_shape(functools.partial(f32.init, method=f32.decode), jax.random.key(0),
                          emb, coords, labels, None, masks)["params"]
  params = jax.tree.map(lambda x: jnp.asarray(0.2 * rs.randn(*x.shape), x.dtype), shapes)

  def run(model, p):
    return model.apply({"params": p}, emb, coords, labels, None, masks, method=model.decode)
  (want, want_iou), (got, got_iou) = (jax.jit(run, static_argnums=0)(m, params)
                                      for m in (f32, bf16))
  assert got.dtype == got_iou.dtype == jnp.float32
  for g, w in ((got, want), (got_iou, want_iou)):
    assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 0.03
  # The largest arrays inside the decoder (the image keys per prompt, the upscaled
  # features) are bfloat16; float32 only where the masks come out.
  jaxpr = jax.make_jaxpr(lambda p: run(bf16, p))(params)
  per_prompt = [v.aval for e in jaxpr.eqns for v in e.outvars
                if v.aval.size >= 3 * emb[0].size and v.aval.ndim >= 4]
  big = max(a.size for a in per_prompt)
  assert {str(a.dtype) for a in per_prompt if a.size == big} == {"bfloat16"}
  # The parameters' gradients still reach every leaf, in float32.
  grads = jax.jit(jax.grad(lambda p: run(bf16, p)[0].mean()))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
