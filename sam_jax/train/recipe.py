"""The SAM training objective: interactive prompt simulation + focal/dice/IoU losses.

One call simulates every round for every mask of the batch inside the jitted
step; the rounds run under `lax.scan`, so shapes never depend on the prompts.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, PADDING
from sam_jax.modeling.sam import Sam
from sam_jax.train import losses, prompts

FROZEN_ENCODER = ("frozen_image_encoder", "decoder_only")


def low_res_size(model: Sam) -> Tuple[int, int]:
  gh, gw = model.prompt_encoder.image_embedding_size
  return 4 * gh, 4 * gw


def embed(model: Sam, params, batch, key, train: bool, freeze: str) -> jax.Array:
  """Image embeddings: precomputed ones if the batch has them, else the encoder's."""
  if "embeddings" in batch:
    return batch["embeddings"]
  emb = model.apply({"params": params}, batch["images"], train, method=Sam.embed_images,
                    rngs={"dropout": key} if train else {})
  # A frozen encoder needs no backward pass: stopping here lets XLA drop it.
  return jax.lax.stop_gradient(emb) if freeze in FROZEN_ENCODER else emb


def most_confident(iou_pred: jax.Array) -> jax.Array:
  """One-hot (..., M) of the output with the highest predicted IoU."""
  return jax.nn.one_hot(jnp.argmax(iou_pred, -1), iou_pred.shape[-1], dtype=bool)


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


def simulate(params, model: Sam, batch: Dict[str, jax.Array], key: jax.Array, config,
             train: bool = True) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The mean loss over valid masks and rounds, and metrics.

  batch: `images` (B, S, S, 3) or `embeddings` (B, h, w, C); `masks` (B, N, L, L)
  on the low-res grid; `valid` (B, N).
  """
  pcfg, lcfg = config.prompts, config.loss
  gt = batch["masks"].astype(bool)
  valid = batch["valid"] & gt.any(axis=(-2, -1))
  image_size = tuple(model.image_size)  # (H, W)
  stride = image_size[1] / gt.shape[-1]  # the low-res grid is 4x the tokens on both axes
  rounds = pcfg.num_rounds
  k_embed, k_first, k_plan, k_rounds = jax.random.split(key, 4)
  emb = embed(model, params, batch, k_embed, train, config.freeze)

  def decode(coords, labels, mask_inputs, multimask):
    return model.apply({"params": params}, emb, coords, labels, None, mask_inputs, multimask,
                       method=Sam.decode)

  # Round 0: the ambiguous single point gets three outputs and only the best is
  # trained; a box is unambiguous and gets the single output.
  coords, labels, is_box = first_prompt(k_first, gt, pcfg, stride, image_size, rounds + 1)
  multi, multi_iou = decode(coords, labels, None, True)
  single, single_iou = decode(coords, labels, None, False)
  m_parts = losses.mask_losses(multi, gt, multi_iou, lcfg)
  s_parts = losses.mask_losses(single, gt, single_iou, lcfg)
  best = losses.select_best(m_parts[0])
  pick = lambda m, s: jnp.where(is_box, s[..., 0], (m * best).sum(-1))  # noqa: E731
  mask_loss, focal, dice = (pick(m, s) for m, s in zip(m_parts[:3], s_parts[:3]))
  iou_mse = jnp.where(is_box, s_parts[3][..., 0], m_parts[3].mean(-1))
  # Only the loss uses the lowest-loss output (it needs the ground truth). As in
  # the paper (appendix A), the output with the highest *predicted* IoU is the
  # prediction: it is passed to the next round, and its true IoU is reported.
  chosen = most_confident(multi_iou).astype(multi.dtype)
  true_iou = jnp.where(is_box, s_parts[4][..., 0], (m_parts[4] * chosen).sum(-1))
  prev = jnp.where(is_box[..., None, None], single[:, :, 0],
                   (multi * chosen[..., None, None]).sum(2))
  first = (mask_loss, focal, dice, iou_mse, true_iou)

  # Rounds 1 .. R-1: a click from the previous error region (or none), with the
  # previous logits as the mask prompt and the single output.
  def round_fn(carry, xs):
    coords, labels, prev = carry
    k, adds, slot = xs
    prev = jax.lax.stop_gradient(prev)
    c, lab = prompts.point_from_error(k, prev > 0, gt, stride)
    lab = jnp.where(adds, lab, PADDING)
    coords = jnp.where(slot[:, None], c[..., None, :], coords)
    labels = jnp.where(slot, lab[..., None], labels)
    logits, iou = decode(coords, labels, prev, False)
    parts = tuple(p[..., 0] for p in losses.mask_losses(logits, gt, iou, lcfg))
    return (coords, labels, logits[:, :, 0]), parts

  if config.get("remat_rounds", False):
    round_fn = jax.checkpoint(round_fn)
  adds = prompts.no_point_rounds(k_plan, rounds, pcfg.num_no_point_rounds)
  slots = jax.nn.one_hot(jnp.arange(2, rounds + 1), rounds + 1, dtype=bool)
  keys = jax.random.split(k_rounds, rounds - 1)
  # Unrolled by default: XLA:CPU runs the backward of a rolled loop several times slower.
  _, later = jax.lax.scan(round_fn, (coords, labels, prev), (keys, adds, slots),
                          unroll=config.get("unroll_rounds", True))
  parts = [jnp.concatenate([f[None], l], 0) for f, l in zip(first, later)]  # (R, B, N)

  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  per_round = lambda x: (x * w).sum(axis=(1, 2)) / n  # noqa: E731
  mask_loss, focal, dice, iou_mse, true_iou = (per_round(p) for p in parts)
  loss = (mask_loss + lcfg.iou_weight * iou_mse).mean()
  metrics = dict(loss=loss, mask_loss=mask_loss.mean(), focal=focal.mean(), dice=dice.mean(),
                 iou_mse=iou_mse.mean(), iou_per_round=true_iou, num_masks=w.sum())
  return loss, metrics
