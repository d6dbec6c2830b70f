"""Model FLOPs of a function, devices' peak FLOP/s, and model FLOPs utilisation (MFU).

Model FLOPs are counted on the function's jaxpr: 2 x multiply-adds of every
matmul (`dot_general`) and convolution, a scan's body times its length, a
cond's most expensive branch. Elementwise work (norms, softmax, GELU, the
optimizer update) is left out, as in the usual MFU definition (PaLM, app. B).

Why the jaxpr and not XLA's cost analysis of the compiled step: XLA's
`cost_analysis()` (lowered or compiled) counts a while loop's body once,
whatever its trip count (so a rolled `lax.scan` over the prompt rounds, or the
CPU's chunked attention, is counted once), counts a custom call such as cuDNN's
flash attention as zero, and the compiled module is per device after SPMD
partitioning and includes what remat recomputes. And not the forward pass x3:
with a frozen encoder nothing flows back through the encoder (1x, not 3x), and
inputs such as images need no gradient. The jaxpr of `value_and_grad` holds
exactly the forward and the backward that the step needs; remat recomputation
is kept out by counting on a twin of the model built without remat (and with
XLA attention, whose matmuls are visible), see `counting_model_config`.
"""

import logging
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

_H100_SXM = {"bfloat16": 989e12, "float32": 494.5e12}
# Dense (no sparsity) peak FLOP/s of one JAX device, by `device_kind` (lowercase) and
# compute dtype. "float32" is what a float32 matmul runs at under JAX's default
# precision: TF32 tensor cores on NVIDIA Ampere and newer, one bfloat16 pass on TPUs.
# float16 runs at the bfloat16 rate on all of these. Others: set `config.peak_flops`.
PEAK_FLOPS: Dict[str, Dict[str, float]] = {
    "nvidia h100 80gb hbm3": _H100_SXM,  # H100 SXM5
    "nvidia h100 sxm5 80gb": _H100_SXM,
    "nvidia h200": _H100_SXM,  # same compute as H100 SXM, more and faster memory
    "nvidia h100 pcie": {"bfloat16": 756e12, "float32": 378e12},
    "nvidia a100-sxm4-80gb": {"bfloat16": 312e12, "float32": 156e12},
    "nvidia a100-sxm4-40gb": {"bfloat16": 312e12, "float32": 156e12},
    "nvidia a100-pcie-40gb": {"bfloat16": 312e12, "float32": 156e12},
    "nvidia a100 80gb pcie": {"bfloat16": 312e12, "float32": 156e12},
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "tpu v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
}


def peak_flops(device_kind: str, dtype, override: Optional[float] = None) -> Optional[float]:
  """One device's dense peak FLOP/s for `dtype`; `override` wins; None when unknown."""
  if override:
    return float(override)
  name = jnp.dtype(dtype).name
  name = "bfloat16" if name == "float16" else name
  return PEAK_FLOPS.get(device_kind.strip().lower(), {}).get(name)


def _dot_general_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  k = np.prod([lhs[d] for d in lhs_contract], dtype=np.float64)
  return 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * k


def _conv_flops(eqn) -> float:
  """2 x (output elements) x (kernel taps x input channels per group).

  An lhs dilation (a transposed convolution) inserts zeros between inputs;
  only 1 / prod(dilation) of the taps meet a real input, and only those count.
  """
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  rhs_out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  per_output = np.prod(rhs, dtype=np.float64) / rhs[rhs_out_dim]
  dilation = np.prod(eqn.params.get("lhs_dilation") or (1,), dtype=np.float64)
  return 2.0 * np.prod(out, dtype=np.float64) * per_output / dilation


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
  """Matmul and convolution FLOPs of a (closed) jaxpr, loops and calls included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      if name == "while":
        logging.warning("A while loop's trip count is unknown; its body is counted once.")
      for value in eqn.params.values():  # pjit, remat, custom_jvp/vjp, while, ...
        for sub in _sub_jaxprs(value):
          total += jaxpr_flops(sub)
  return float(total)


def count_flops(fn, *args, **kwargs) -> float:
  """Model FLOPs of one call of `fn(*args, **kwargs)`; args may be ShapeDtypeStructs.

  Only traces (no compilation), so it is cheap even for ViT-H.
  """
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


def counting_model_config(mcfg):
  """The model config to count on: no remat (its recomputation is not model
  work) and XLA attention (cuDNN's flash attention is one opaque call)."""
  mcfg = mcfg.copy_and_resolve_references()
  mcfg.image_encoder.remat = False
  mcfg.image_encoder.attention = "xla"
  mcfg.image_encoder.window_attention = "xla"
  return mcfg


_STEP_FLOPS: Dict[str, float] = {}


def train_step_flops(mcfg, config, params, batch: Dict[str, Any]) -> float:
  """Model FLOPs of one training step (forward and backward of every prompt round)
  on `batch` (global shapes; `images` or precomputed `embeddings`)."""
  from sam_jax.build import build_sam  # noqa: PLC0415 - keeps this module light
  from sam_jax.train import recipe  # noqa: PLC0415
  abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
  params, batch = jax.tree.map(abstract, params), jax.tree.map(abstract, batch)
  # What the count depends on (a resumed or re-run config in the same process counts once).
  key = repr((mcfg.to_json_best_effort(sort_keys=True),
              config.prompts.to_json_best_effort(sort_keys=True),
              config.loss.to_json_best_effort(sort_keys=True), config.freeze, params, batch))
  if key not in _STEP_FLOPS:
    model = build_sam(counting_model_config(mcfg))
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.remat_rounds = False

    def loss_and_grads(p, b, rng):
      return jax.value_and_grad(
          lambda p: recipe.simulate(p, model, b, rng, config, train=True), has_aux=True)(p)
    _STEP_FLOPS[key] = count_flops(loss_and_grads, params, batch, jax.random.key(0))
  return _STEP_FLOPS[key]


def utilization(flops: Optional[float], seconds: float, peak_per_device: Optional[float],
                num_devices: int) -> Dict[str, Optional[float]]:
  """`model_tflops_per_s` (all devices together) and `mfu` for `flops` done in
  `seconds`; either is None (null in JSON) when it cannot be known."""
  if not flops or seconds <= 0:
    return dict(model_tflops_per_s=None, mfu=None)
  rate = flops / seconds
  mfu = rate / (peak_per_device * num_devices) if peak_per_device else None
  return dict(model_tflops_per_s=rate / 1e12, mfu=mfu)
