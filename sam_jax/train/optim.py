"""AdamW (optionally Muon for the dense and convolution kernels) with warmup + step (or cosine)
decay, layer-wise lr decay and parameter groups.

Which parameters train, and their lr and weight-decay multipliers, are set by
regular expressions over parameter paths (`param_groups`): `config.freeze`,
`config.optim.lr_mults` and `config.optim.wd_mults`.
"""

import math
import operator
import re
from typing import Any, Callable, List, Tuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from sam_jax.train import param_groups

# Decay matrices and kernels; not biases, norms, embeddings or position tables.
DEFAULT_WD_MULTS = ((".*/kernel", 1.0),)
# With `muon_lr` > 0, which kernels Muon steps (the dense layers', and with `muon_convs`
# the convolutions'): all of them.
DEFAULT_MUON_PARAMS = (".*",)
# The decoder's transposed convolutions keep their kernels as (kh, kw, out, in)
# (`SubpixelConvTranspose`); every other 4-D kernel is nn.Conv's (kh, kw, in, out).
TRANSPOSED_CONV_KERNEL = re.compile(r"mask_decoder/output_upscaling_\d+/kernel")


def layer_lr_scales(params, depth: int, decay: float):
  """Layer-wise lr decay (BEiT/MAE): block i gets decay**(depth - i), the patch
  embedding and position embedding decay**(depth + 1), the rest (neck, prompt
  encoder, decoder) 1."""
  def scale(path, _):
    names = param_groups.path_name(path).split("/")
    if names[0] != "image_encoder" or decay == 1.0:
      return 1.0
    if names[1].startswith("blocks_"):
      return decay ** (depth - int(names[1].split("_")[1]))
    if names[1] in ("patch_embed", "pos_embed"):
      return decay ** (depth + 1)
    return 1.0
  return jax.tree_util.tree_map_with_path(scale, params)


def lr_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then by `cfg.schedule`:
    "step" (the paper's): x `decay_factor` at each of `decay_steps`;
    "cosine": a half cosine from `lr` down to `lr * decay_factor`, reached at the
      last of `decay_steps` and held after it.
  """
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  kind = cfg.get("schedule", "step")
  if kind == "step":
    after = optax.piecewise_constant_schedule(
        cfg.lr, {int(s) - cfg.warmup_steps: cfg.decay_factor for s in cfg.decay_steps})
  elif kind == "cosine":
    if not cfg.decay_steps or max(cfg.decay_steps) <= cfg.warmup_steps:
      raise ValueError(f"config.optim.schedule 'cosine' ends at the last of decay_steps "
                       f"{tuple(cfg.decay_steps)}, which must come after the "
                       f"{cfg.warmup_steps} warmup steps.")
    after = optax.cosine_decay_schedule(cfg.lr, max(cfg.decay_steps) - cfg.warmup_steps,
                                        alpha=cfg.decay_factor)
  else:
    raise ValueError(f"config.optim.schedule is {kind!r}; the schedules are 'step' and "
                     "'cosine'.")
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def per_value(make: Callable[[float], optax.GradientTransformation], values,
              skip: float) -> List[optax.GradientTransformation]:
  """`make(v)` masked to the parameters whose value is v, for each v other than `skip`."""
  distinct = sorted({v for v in jax.tree.leaves(values) if v != skip})
  return [optax.masked(make(v), jax.tree.map(lambda x, v=v: x == v, values))
          for v in distinct]


def weight_decay_mults(params, cfg):
  return param_groups.first_match_values(
      params, cfg.get("wd_mults", DEFAULT_WD_MULTS), "config.optim.wd_mults", 0.0)


def lr_mults(params, cfg, encoder_depth: int):
  """Each parameter's lr factor: its layer-decay scale times its `lr_mults` entry."""
  mults = param_groups.first_match_values(params, cfg.get("lr_mults", ()),
                                          "config.optim.lr_mults", 1.0)
  return jax.tree.map(operator.mul, layer_lr_scales(params, encoder_depth, cfg.layer_decay),
                      mults)


def muon_params(params, patterns=DEFAULT_MUON_PARAMS, convs: bool = False):
  """True for the parameters Muon updates: the kernels of dense layers (2-D) and,
  with `convs`, of convolutions (4-D), whose path matches one of `patterns`
  (`config.optim.muon_params`, `muon_convs`)."""
  chosen = param_groups.first_match_values(params, [(p, 1.0) for p in patterns],
                                           "config.optim.muon_params", 0.0)
  ranks = (2, 4) if convs else (2,)
  return jax.tree_util.tree_map_with_path(
      lambda path, c, x: bool(c) and len(x.shape) in ranks
      and param_groups.path_name(path).endswith("/kernel"), chosen, params)


def matrix_shape(shape) -> Tuple[int, int]:
  """The matrix Muon orthogonalises for a dense (in, out) or convolution (kh, kw, c, c')
  kernel: (in, out) or (kh kw c, c') (which of c, c' is the input does not change
  the orthogonalised matrix)."""
  return math.prod(shape[:-1]), shape[-1]


def muon_fans(name: str, shape) -> Tuple[int, int]:
  """(fan_in, fan_out) of a dense or convolution kernel."""
  if TRANSPOSED_CONV_KERNEL.fullmatch(name):
    return matrix_shape(shape)[::-1]
  return matrix_shape(shape)


def scale_by_muon_stacked(**muon_kwargs) -> optax.GradientTransformation:
  """optax's `contrib.scale_by_muon` on the kernels, each as its `matrix_shape`,
  with the Newton-Schulz iterations of all kernels of one matrix shape run as one
  batched product.

  The state is optax's (one momentum per kernel, so it shards and checkpoints as
  the parameters do); only the update is stacked. One kernel at a time, the
  iterations are thousands of small products (the larger part of Muon's cost
  on a small model).
  """
  inner = contrib.scale_by_muon(
      weight_dimension_numbers=lambda tree: jax.tree.map(
          lambda _: contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2), tree),
      **muon_kwargs)
  masked = lambda x: isinstance(x, optax.transforms.MaskedNode)  # noqa: E731

  def groups(leaves):
    """{matrix shape: indices of the leaves of that shape}, MaskedNodes left out."""
    out = {}
    for i, x in enumerate(leaves):
      if not masked(x):
        out.setdefault(matrix_shape(x.shape), []).append(i)
    return out

  def stack(leaves, by_shape):
    return {f"{a}x{b}": jnp.stack([leaves[i].reshape(a, b) for i in idx])
            for (a, b), idx in by_shape.items()}

  def unstack(stacked, like, by_shape):
    leaves = list(like)
    for (a, b), idx in by_shape.items():
      for j, i in enumerate(idx):
        leaves[i] = stacked[f"{a}x{b}"][j].reshape(like[i].shape)
    return leaves

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates, is_leaf=masked)
    mu = jax.tree.leaves(state.mu, is_leaf=masked)
    by_shape = groups(leaves)
    new, stacked_state = inner.update(stack(leaves, by_shape),
                                      state._replace(mu=stack(mu, by_shape)))
    return (jax.tree.unflatten(treedef, unstack(new, leaves, by_shape)),
            stacked_state._replace(mu=jax.tree.unflatten(
                treedef, unstack(stacked_state.mu, mu, by_shape))))

  return optax.GradientTransformation(inner.init, update_fn)


def direction(cfg, params) -> optax.GradientTransformation:
  """Adam's update, or with `muon_lr` > 0 Muon's (orthogonalised momentum) for
  the dense kernels (and with `muon_convs` the convolutions', each as its
  (fan_in, fan_out) matrix) and Adam's for the rest.

  Muon's update has unit spectral norm, so it has its own peak rate `muon_lr`
  (the schedule's shape, scaled by `muon_lr / lr`), times sqrt(fan_out / fan_in)
  for kernels wider out than in, as optax's `muon` does. Weight decay stays
  AdamW's (`weight_decay` x the schedule's lr) for every parameter.
  """
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  muon_lr = cfg.get("muon_lr", 0.0)
  if not muon_lr:
    return adam
  is_muon = muon_params(params, cfg.get("muon_params", DEFAULT_MUON_PARAMS),
                        cfg.get("muon_convs", False))

  def factor(path, m, x):
    if not m:
      return 1.0
    fan_in, fan_out = muon_fans(param_groups.path_name(path), x.shape)
    return muon_lr / cfg.lr * max(1.0, fan_out / fan_in) ** 0.5
  scale = jax.tree_util.tree_map_with_path(factor, is_muon, params)
  return optax.chain(
      optax.multi_transform(
          {"muon": scale_by_muon_stacked(), "adam": adam},
          jax.tree.map(lambda m: "muon" if m else "adam", is_muon)),
      *per_value(optax.scale, scale, skip=1.0))


def make_optimizer(cfg, params: Any, encoder_depth: int, freeze):
  """The optimizer and its schedule. `params` may be abstract (shapes only);
  `freeze` is `config.freeze` (see `param_groups`)."""
  schedule = lr_schedule(cfg)
  labels = jax.tree.map(lambda f: "freeze" if f else "train",
                        param_groups.frozen_mask(params, freeze))
  step = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.get("grad_clip") else optax.identity(),
      direction(cfg, params),
      *per_value(lambda m: optax.add_decayed_weights(cfg.weight_decay * m),
                 weight_decay_mults(params, cfg), skip=0.0),
      optax.scale_by_learning_rate(schedule))
  tx = optax.chain(
      # Clipping and Adam see only the parameters that train.
      optax.multi_transform({"train": step, "freeze": optax.set_to_zero()}, labels),
      # After the lr: a per-parameter factor on the whole AdamW step, weight decay included.
      *per_value(optax.scale, lr_mults(params, cfg, encoder_depth), skip=1.0))
  return tx, schedule
