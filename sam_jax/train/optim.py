"""AdamW with warmup + step decay, layer-wise lr decay and freezing options."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

FREEZE_OPTIONS = ("full", "frozen_image_encoder", "decoder_only")
# Never trained: a random buffer in the reference (PositionEmbeddingRandom).
FROZEN_BUFFERS = ("positional_encoding_gaussian_matrix",)
NO_DECAY = ("pos_embed", "rel_pos_h", "rel_pos_w", "embedding")


def _names(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)


def trainable_labels(params, freeze: str):
  """'train' or 'freeze' per parameter, for `optax.multi_transform`."""
  if freeze not in FREEZE_OPTIONS:
    raise ValueError(f"freeze={freeze!r}; choose one of {FREEZE_OPTIONS}")

  def label(path, _):
    names = _names(path)
    if names[-1] in FROZEN_BUFFERS:
      return "freeze"
    if freeze == "frozen_image_encoder" and names[0] == "image_encoder":
      return "freeze"
    if freeze == "decoder_only" and names[0] != "mask_decoder":
      return "freeze"
    return "train"
  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params):
  """Decay matrices and kernels; not biases, norms, embeddings or position tables."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and _names(path)[-1] not in NO_DECAY, params)


def layer_lr_scales(params, depth: int, decay: float):
  """Layer-wise lr decay (BEiT/MAE): block i gets decay**(depth - i), the patch
  embedding and position embedding decay**(depth + 1), the rest (neck, prompt
  encoder, decoder) 1."""
  def scale(path, _):
    names = _names(path)
    if names[0] != "image_encoder" or decay == 1.0:
      return 1.0
    if names[1].startswith("blocks_"):
      return decay ** (depth - int(names[1].split("_")[1]))
    if names[1] in ("patch_embed", "pos_embed"):
      return decay ** (depth + 1)
    return 1.0
  return jax.tree_util.tree_map_with_path(scale, params)


def lr_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then x `decay_factor` at each of `decay_steps`."""
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  steps = optax.piecewise_constant_schedule(
      cfg.lr, {int(s) - cfg.warmup_steps: cfg.decay_factor for s in cfg.decay_steps})
  return optax.join_schedules([warmup, steps], [cfg.warmup_steps])


def scale_by_tree(factors) -> optax.GradientTransformation:
  """Multiplies each update by its own constant factor."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg, params: Any, encoder_depth: int, freeze: str):
  """The optimizer and its schedule. `params` may be abstract (shapes only)."""
  schedule = lr_schedule(cfg)
  adamw = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.get("grad_clip") else optax.identity(),
      optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
      optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask(params)),
      optax.scale_by_learning_rate(schedule))
  tx = optax.chain(
      optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()},
                            trainable_labels(params, freeze)),
      # After the lr: a per-layer factor on the whole AdamW step, weight decay included.
      scale_by_tree(layer_lr_scales(params, encoder_depth, cfg.layer_decay)))
  return tx, schedule
