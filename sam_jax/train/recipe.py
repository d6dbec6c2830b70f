"""The SAM training objective: interactive prompt simulation + the loss terms.

One call simulates every round for every mask of the batch inside the jitted
step; the rounds run under `lax.scan`, so shapes never depend on the prompts.
"""

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from sam_jax.modeling.image_encoder import linear_resize_matrix
from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, PADDING
from sam_jax.modeling.sam import Sam
from sam_jax.train import losses, param_groups, prompts

Terms = Dict[str, jax.Array]


def low_res_size(model: Sam) -> Tuple[int, int]:
  gh, gw = model.prompt_encoder.image_embedding_size
  return 4 * gh, 4 * gw


def target_size(model: Sam, config) -> Tuple[int, int]:
  """Where the masks are scored: the low-res grid times `config.loss_upsample`.

  1 scores the decoder's own low-res logits; 4 upsamples them to the input
  resolution first, as SAM 2's released training code does, so that the loss
  sees boundaries finer than a low-res cell (`upsample`).
  """
  factor = int(config.get("loss_upsample", 1))
  if factor < 1:
    raise ValueError(f"config.loss_upsample is {factor}; it must be a whole number >= 1 "
                     "(1: the decoder's low-res grid, 4: the input resolution).")
  return tuple(factor * s for s in low_res_size(model))


def upsample(logits: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """Logits (..., h, w) -> (..., H, W), bilinear with half-pixel centres (as the
  predictor upscales them); the identity when the sizes agree."""
  h, w = logits.shape[-2:]
  if (h, w) == tuple(size):
    return logits
  rows, cols = linear_resize_matrix(h, size[0]), linear_resize_matrix(w, size[1])
  return jnp.einsum("Hh,...hw,Ww->...HW", rows, logits, cols,
                    precision=jax.lax.Precision.HIGHEST)  # thresholded at 0: no TF32


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
  """The identity; on CPU its gradient is computed once and stored.

  Without it, XLA:CPU fuses the loss's gradient into each consumer of the mask
  logits' gradient and computes it again per channel of the upscaled maps that
  made them (docs/demo.md, "A shorter step, and more images"). A product with the identity
  is an operation it does not fuse through (it drops `optimization_barrier`).
  """
  return x


def _stored_on_cpu(g: jax.Array) -> jax.Array:
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  stored = lambda g: jnp.einsum("...ij,jk->...ik", g, eye,  # noqa: E731
                                precision=jax.lax.Precision.HIGHEST)
  return jax.lax.platform_dependent(g, cpu=stored, default=lambda g: g)


gradient_barrier.defvjp(lambda x: (x, None), lambda _, g: (_stored_on_cpu(g),))


def embed(model: Sam, params, batch, key, train: bool) -> jax.Array:
  """Image embeddings: precomputed ones if the batch has them, else the encoder's."""
  if "embeddings" in batch:
    return batch["embeddings"]
  return model.apply({"params": params}, batch["images"], train, method=Sam.embed_images,
                     rngs={"dropout": key} if train else {})


def most_confident(iou_pred: jax.Array) -> jax.Array:
  """One-hot (..., M) of the output with the highest predicted IoU."""
  return jax.nn.one_hot(jnp.argmax(iou_pred, -1), iou_pred.shape[-1], dtype=bool)


@jax.named_scope("prompt_simulation")
def first_prompt(key, gt, cfg, stride: float, image_size: Tuple[int, int], num_slots: int):
  """Round 0's sparse prompt per mask: a uniform point or a jittered box, equal odds.

  Returns coords (B, N, T, 2), labels (B, N, T) with T = num_slots, and is_box (B, N).
  Slots 0-1 hold the first prompt (a point uses slot 0), slots 2.. the clicks.
  """
  k_point, k_choice, k_box = jax.random.split(key, 3)
  point, _ = prompts.point_from_mask(k_point, gt, stride)
  box = prompts.jitter_box(k_box, prompts.box_from_mask(gt, stride), cfg.box_noise_frac,
                           cfg.box_noise_max_px, image_size)
  is_box = jax.random.uniform(k_choice, gt.shape[:-2]) < cfg.box_prob
  as_point = jnp.stack([point, jnp.zeros_like(point)], axis=-2)
  coords = jnp.where(is_box[..., None, None], box.reshape(*box.shape[:-1], 2, 2), as_point)
  labels = jnp.where(is_box[..., None], jnp.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]),
                     jnp.array([FOREGROUND, PADDING]))
  lead = gt.shape[:-2]
  coords = jnp.concatenate([coords, jnp.zeros((*lead, num_slots - 2, 2), jnp.float32)], -2)
  labels = jnp.concatenate([labels, jnp.full((*lead, num_slots - 2), PADDING)], -1)
  return coords, labels.astype(jnp.int32), is_box


def first_round(decode: Callable, score: Callable, coords, labels,
                is_box) -> Tuple[Terms, jax.Array]:
  """Round 0: the terms per mask, and the logits (B, N, L, L) passed to round 1.

  A single point is ambiguous: it gets three outputs and only the lowest-loss one
  trains (every output's IoU prediction does). A box gets the single output. The
  prediction passed on is the output with the highest *predicted* IoU, and its
  true IoU is reported (appendix A): only the loss may look at the ground truth.
  """
  # One decode gives both: the single output and the three share the transformer's pass.
  both, both_iou = decode(coords, labels, None, "all")
  single, multi = both[:, :, :1], both[:, :, 1:]
  single_iou, multi_iou = both_iou[..., :1], both_iou[..., 1:]
  m, s = score(multi, multi_iou), score(single, single_iou)
  best = losses.select_best(m["mask_loss"])
  chosen = most_confident(multi_iou).astype(multi.dtype)

  def of_point(name):
    if name in losses.IOU_TERMS:
      return m[name].mean(-1)
    return (m[name] * (chosen if name == "true_iou" else best)).sum(-1)

  terms = {name: jnp.where(is_box, s[name][..., 0], of_point(name)) for name in m}
  prev = jnp.where(is_box[..., None, None], single[:, :, 0],
                   (multi * chosen[..., None, None]).sum(2))
  return terms, prev


@jax.named_scope("prompt_simulation")
def add_click(key, prev_logits, gt, stride: float, coords, labels, adds, slot):
  """A click drawn from the error region of the previous mask into this round's slot:
  foreground where it missed the object, background where it spilled over; a
  round that `adds` nothing fills the slot with PADDING."""
  pred = upsample(prev_logits, gt.shape[-2:]) > 0
  c, lab = prompts.point_from_error(key, pred, gt, stride)
  lab = jnp.where(adds, lab, PADDING)
  coords = jnp.where(slot[:, None], c[..., None, :], coords)
  labels = jnp.where(slot, lab[..., None], labels)
  return coords, labels


def click_rounds(decode: Callable, score: Callable, coords, labels, prev, gt, stride: float,
                 plan_key, click_key, config) -> Terms:
  """Rounds 1 .. R-1: each adds a click (or none) to the prompts so far and feeds the
  previous logits back as the mask prompt; the single output trains. Terms (R-1, B, N)."""
  rounds = config.prompts.num_rounds

  def round_fn(carry, xs):
    coords, labels, prev = carry
    k, adds, slot = xs
    prev = jax.lax.stop_gradient(prev)
    coords, labels = add_click(k, prev, gt, stride, coords, labels, adds, slot)
    logits, iou = decode(coords, labels, prev, False)
    terms = {name: t[..., 0] for name, t in score(logits, iou).items()}
    return (coords, labels, logits[:, :, 0]), terms

  if config.get("remat_rounds", False):
    round_fn = jax.checkpoint(round_fn)
  # The last round and num_no_point_rounds - 1 random others add no click.
  adds = prompts.no_point_rounds(plan_key, rounds, config.prompts.num_no_point_rounds)
  slots = jax.nn.one_hot(jnp.arange(2, rounds + 1), rounds + 1, dtype=bool)
  keys = jax.random.split(click_key, rounds - 1)
  # Unrolled by default: XLA:CPU runs the backward of a rolled loop several times slower.
  _, terms = jax.lax.scan(round_fn, (coords, labels, prev), (keys, adds, slots),
                          unroll=config.get("unroll_rounds", True))
  return terms


@jax.named_scope("losses")
def average(per_round: Terms, valid: jax.Array, weights) -> Tuple[jax.Array, Terms]:
  """The loss (mean over rounds of the weighted terms, each averaged over valid masks)
  and the metrics; `per_round` holds (R, B, N) terms."""
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  r = {name: (t * w).sum(axis=(1, 2)) / n for name, t in per_round.items()}  # (R,)
  total = r["mask_loss"]
  for name in losses.iou_term_names(weights):
    if weights[name]:  # weight 0: logged, not trained on
      total = total + weights[name] * r[name]
  loss = total.mean()
  metrics = dict(loss=loss, mask_loss=r["mask_loss"].mean(),
                 **{name: r[name].mean() for name in weights},
                 iou_per_round=r["true_iou"], num_masks=w.sum())
  return loss, metrics


def simulate(params, model: Sam, batch: Dict[str, jax.Array], key: jax.Array, config,
             train: bool = True) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SAM's training algorithm (appendix A) on a batch: the mean loss and metrics.

  For every mask: 1. a first prompt, a point drawn uniformly from the mask or its
  jittered box; 2. `num_rounds - 1` more rounds, each adding a click drawn from
  the error region of the previous round's mask and feeding that mask's logits
  back as the mask prompt; 3. among them the last round and `num_no_point_rounds
  - 1` others add no click: the model refines from its own mask. Every round's
  masks are scored against the ground truth by the terms of `config.loss`.

  batch: `images` (B, S, S, 3) or `embeddings` (B, h, w, C); `masks` (B, N, L, L)
  on the grid of `target_size` (the logits are upsampled to it to be scored, and
  clicks are drawn on it); `valid` (B, N).
  """
  weights, loss_params = config.loss, config.get("loss_params", None) or {}
  losses.check_config(weights, loss_params)
  # Frozen parameters (config.freeze) get no gradient: their backward pass is dropped.
  params = param_groups.stop_frozen_gradients(params, config.freeze)
  gt = batch["masks"].astype(bool)
  valid = batch["valid"] & gt.any(axis=(-2, -1))
  image_size = tuple(model.image_size)  # (H, W)
  stride = image_size[1] / gt.shape[-1]  # input pixels per cell of the masks' grid
  k_embed, k_first, k_plan, k_rounds = jax.random.split(key, 4)
  emb = embed(model, params, batch, k_embed, train)
  num_slots = config.prompts.num_rounds + 1  # two for the first prompt, one per click
  coords, labels, is_box = first_prompt(k_first, gt, config.prompts, stride, image_size,
                                        num_slots)

  def decode(coords, labels, mask_inputs, multimask):
    # As at inference, where a box is given as a box: no not-a-point token with it.
    return model.apply({"params": params}, emb, coords, labels, None, mask_inputs, multimask,
                       pad=~is_box, method=Sam.decode)

  @jax.named_scope("losses")  # named scopes let the compile report attribute the ops
  def score(logits, iou_pred):
    logits = gradient_barrier(logits)
    return losses.mask_losses(upsample(logits, gt.shape[-2:]), gt, iou_pred, weights,
                              loss_params)

  first, prev = first_round(decode, score, coords, labels, is_box)
  later = click_rounds(decode, score, coords, labels, prev, gt, stride,
                       k_plan, k_rounds, config)
  per_round = {name: jnp.concatenate([first[name][None], later[name]], 0) for name in first}
  return average(per_round, valid, weights)
