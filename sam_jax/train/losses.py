"""SAM's loss terms by name, per mask (averaging is the caller's choice).

`config.loss` weights terms by name ({"focal": 20, "dice": 1, "iou_mse": 1} in
the paper) and `config.loss_params` passes a term its keyword arguments
({"focal": {"alpha": 0.25, "gamma": 2.0}}). A new term is one function in
`MASK_TERMS` or `IOU_TERMS` and one line of `config.loss`; a term weighted 0 is
computed and logged but adds nothing to the loss.
"""

from typing import Callable, Dict, Mapping

import jax
import jax.numpy as jnp
import optax


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


def bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-pixel sigmoid cross-entropy averaged over the last two axes (not in the paper)."""
  return optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), targets.astype(jnp.float32)).mean(axis=(-2, -1))


def iou_mse(iou_pred: jax.Array, true_iou: jax.Array) -> jax.Array:
  """The IoU head's squared error against the IoU of the mask it predicts."""
  return (iou_pred.astype(jnp.float32) - true_iou) ** 2


# Terms of a mask: (logits, gt, **params) -> (..., M). Their weighted sum picks
# the output that trains when a prompt is ambiguous.
MASK_TERMS: Dict[str, Callable[..., jax.Array]] = {
    "focal": sigmoid_focal_loss,
    "dice": dice_loss,
    "bce": bce_loss,
}
# Terms of the IoU prediction: (iou_pred, true_iou, **params) -> (..., M),
# averaged over every output (each output's IoU prediction trains).
IOU_TERMS: Dict[str, Callable[..., jax.Array]] = {
    "iou_mse": iou_mse,
}


def check_config(weights: Mapping[str, float], params: Mapping[str, Mapping] = None) -> None:
  """Unknown term names (in `config.loss` or `config.loss_params`) are errors."""
  known = sorted({**MASK_TERMS, **IOU_TERMS})
  for where, names in (("config.loss", weights), ("config.loss_params", params or {})):
    unknown = [n for n in names if n not in known]
    if unknown:
      raise ValueError(f"{where} names unknown loss terms {unknown}; the known terms are "
                       f"{known} (add one to losses.MASK_TERMS or losses.IOU_TERMS).")
  if not any(weights.get(n) for n in MASK_TERMS):
    raise ValueError(f"config.loss {dict(weights)} gives no mask term a weight; SAM needs one "
                     f"of {sorted(MASK_TERMS)} to pick the output that trains.")


def mask_iou(pred: jax.Array, gt: jax.Array) -> jax.Array:
  """IoU of boolean masks over the last two axes; two empty masks count as 1."""
  inter = (pred & gt).sum(axis=(-2, -1)).astype(jnp.float32)
  union = (pred | gt).sum(axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def mask_losses(logits: jax.Array, gt: jax.Array, iou_pred: jax.Array,
                weights: Mapping[str, float], params: Mapping[str, Mapping] = None
                ) -> Dict[str, jax.Array]:
  """Per-output terms of masks (..., M, L, L) against gt (..., L, L), each (..., M).

  The dict holds every term of `weights` by its name, `mask_loss` (the weighted
  sum of the mask terms, which picks the output to train) and `true_iou` (the
  IoU of each predicted mask, the IoU head's target).
  """
  params = params or {}
  gt = jnp.broadcast_to(gt[..., None, :, :], logits.shape)
  # In the registries' order, whatever the config's: the same sums, bit for bit.
  mask_names = [n for n in MASK_TERMS if n in weights]
  terms = {n: MASK_TERMS[n](logits, gt, **dict(params.get(n, {}))) for n in mask_names}
  # The IoU head regresses the IoU of the mask actually predicted (logits > 0).
  true_iou = jax.lax.stop_gradient(mask_iou(logits > 0, gt.astype(bool)))
  terms.update({n: IOU_TERMS[n](iou_pred, true_iou, **dict(params.get(n, {})))
                for n in IOU_TERMS if n in weights})
  mask_loss = None
  for name in mask_names:
    if weights[name]:  # weight 0: logged, not trained on
      term = weights[name] * terms[name]
      mask_loss = term if mask_loss is None else mask_loss + term
  return dict(terms, mask_loss=mask_loss, true_iou=true_iou)


def iou_term_names(weights: Mapping[str, float]):
  return [n for n in IOU_TERMS if n in weights]


def select_best(losses: jax.Array) -> jax.Array:
  """One-hot (..., M) of the lowest-loss output: the only one that gets gradient."""
  return jax.nn.one_hot(jnp.argmin(losses, axis=-1), losses.shape[-1], dtype=losses.dtype)
