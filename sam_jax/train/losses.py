"""SAM's mask and IoU losses, per mask (averaging is the caller's choice)."""

import jax
import jax.numpy as jnp


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Focal loss (Lin et al. 2017) averaged over the last two (pixel) axes."""
  targets = targets.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  # log(1 + exp(-|x|)) form: stable for large logits.
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
  return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
  """1 - soft Dice over the last two axes, with +1 smoothing as in DETR/SAM ports."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  inter = (p * t).sum(axis=(-2, -1))
  return 1 - (2 * inter + smooth) / (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + smooth)


def mask_iou(pred: jax.Array, gt: jax.Array) -> jax.Array:
  """IoU of boolean masks over the last two axes; two empty masks count as 1."""
  inter = (pred & gt).sum(axis=(-2, -1)).astype(jnp.float32)
  union = (pred | gt).sum(axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def mask_losses(logits: jax.Array, gt: jax.Array, iou_pred: jax.Array, cfg):
  """Per-output losses of masks (..., M, L, L) against gt (..., L, L).

  Returns (mask_loss, focal, dice, iou_mse, true_iou), each (..., M); the mask
  loss is `focal_weight * focal + dice_weight * dice` (20:1 in the paper).
  """
  gt = jnp.broadcast_to(gt[..., None, :, :], logits.shape)
  focal = sigmoid_focal_loss(logits, gt, cfg.focal_alpha, cfg.focal_gamma)
  dice = dice_loss(logits, gt)
  # The IoU head regresses the IoU of the mask actually predicted (logits > 0).
  true_iou = jax.lax.stop_gradient(mask_iou(logits > 0, gt.astype(bool)))
  iou_mse = (iou_pred.astype(jnp.float32) - true_iou) ** 2
  return cfg.focal_weight * focal + cfg.dice_weight * dice, focal, dice, iou_mse, true_iou


def select_best(losses: jax.Array) -> jax.Array:
  """One-hot (..., M) of the lowest-loss output: the only one that gets gradient."""
  return jax.nn.one_hot(jnp.argmin(losses, axis=-1), losses.shape[-1], dtype=losses.dtype)
