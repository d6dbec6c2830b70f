"""Sizing a TPU run from a CPU machine: compile the real step for a TPU topology.

  python train.py --config configs/pretrain.py:vit_h --mode=compile --topology=v5p-128 \\
      --workdir /tmp/size_vit_h

compiles exactly the training step that `train.py` runs (`Trainer.compile_step`),
with the config's mesh, for abstract TPU devices (`jax.experimental.topologies`;
libtpu must be installed, no TPU needed), and reports per chip memory, whether
it fits the chip's HBM, the model FLOPs of a step, the XLA cost model's
estimated step time and the MFU that estimate implies, and the collectives in
the compiled program. `--batch_search` finds the largest per-chip batch that
fits by compiling; the image encoder's forward (serving) is sized alike.
The MaxText anchor is its `train_compile.py`. See docs/tpu.md.
"""

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.train import hlo_costs

INSTALL_LIBTPU = 'pip install "jax[tpu]==' + jax.__version__ + '"  (or: pip install -e ".[tpu]")'

# Generation as pods are sold -> (libtpu's name, whether N counts TensorCores
# (2 per chip, one JAX device per chip in megacore mode) or chips, 3-D torus).
GENERATIONS = {
    "v4": ("v4", True, True),
    "v5p": ("v5p", True, True),
    "v5e": ("v5e", False, False),
    "v6e": ("v6e", False, False),
}
# HBM of one chip, bytes, by JAX device_kind (the vendor's figures).
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5": 95 * 2**30,  # v5p
    "TPU v5p": 95 * 2**30,
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v6 lite": 32 * 2**30,  # v6e
}
# HBM bandwidth of one chip, bytes/s, by JAX device_kind (the vendor's figures).
HBM_BANDWIDTH = {
    "TPU v4": 1.2e12,
    "TPU v5": 2.765e12,  # v5p
    "TPU v5p": 2.765e12,
    "TPU v5 lite": 0.819e12,  # v5e
    "TPU v6 lite": 1.64e12,  # v6e
}
# Single-slice 2-D shapes of v5e/v6e by chip count (as provisioned).
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
       128: (8, 16), 256: (16, 16)}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class CompileError(ValueError):
  """Bad input to the compile mode (topology, mesh, missing libtpu): a message, no traceback."""


def _torus_3d(chips: int) -> Tuple[int, int, int]:
  """v4/v5p slice shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (double the smallest)."""
  if chips < 4 or chips & (chips - 1):
    raise CompileError(f"{chips} chips is not a v4/v5p slice size (4, 8, 16, ... chips, i.e. "
                       f"v5p-8, v5p-16, ...); or give the shape, e.g. v5p:2x2x4.")
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    i = max(j for j in range(3) if dims[j] == min(dims))
    dims[i] *= 2
  return tuple(dims)


def libtpu_topology(name: str) -> Tuple[str, str]:
  """(libtpu topology name, generation) for 'v5p-128' (as sold) or 'v5p:4x4x4' (libtpu's)."""
  m = re.fullmatch(r"(v\d+[a-z]*)[:-](.+)", name.strip().lower())
  if not m or m.group(1) not in GENERATIONS:
    raise CompileError(f"Unknown TPU topology {name!r}: use a name as sold (v4-N, v5p-N with N "
                       f"TensorCores; v5e-N, v6e-N with N chips) or libtpu's form such as "
                       f"v5p:4x4x4 or v5e:2x2. Generations: {', '.join(GENERATIONS)}.")
  gen, rest = m.groups()
  libname, counts_cores, is_3d = GENERATIONS[gen]
  if ":" in name:
    dims = rest.split("x")
    if len(dims) != (3 if is_3d else 2) or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise CompileError(f"Unknown TPU topology {name!r}: {gen} shapes are "
                         f"{'XxYxZ, e.g. v5p:2x2x4' if is_3d else 'XxY, e.g. v5e:2x4'}.")
    return f"{libname}:{rest}", gen
  if not rest.isdigit() or int(rest) == 0:
    raise CompileError(f"Unknown TPU topology {name!r}: the part after '-' is a count "
                       f"(e.g. {gen}-{'128' if counts_cores else '64'}).")
  n = int(rest)
  chips = n // 2 if counts_cores else n
  if counts_cores and n % 2:
    raise CompileError(f"{name}: {gen}-N counts TensorCores, 2 per chip; N must be even.")
  if is_3d:
    dims = _torus_3d(chips)
  elif chips in _2D:
    dims = _2D[chips]
  else:
    raise CompileError(f"{name}: {gen} slices have {sorted(_2D)} chips; or give the shape, "
                       f"e.g. {gen}:4x8.")
  return f"{libname}:{'x'.join(map(str, dims))}", gen


def topology_devices(name: str, num_slices: int = 1) -> List[Any]:
  """Abstract (compile-only) TPU devices of `num_slices` slices of topology `name`."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no real TPU here to contend for
  libname, gen = libtpu_topology(name)
  try:
    import libtpu  # noqa: F401, PLC0415 - only to say how to install it
  except ImportError:
    raise CompileError(f"Compiling for TPU needs libtpu, which is not installed. Install it "
                       f"with: {INSTALL_LIBTPU}") from None
  from jax.experimental import topologies  # noqa: PLC0415
  kwargs = dict(num_slices=num_slices) if num_slices > 1 else {}
  if GENERATIONS[gen][1]:
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as jax.devices() on a pod
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=libname,
                                             **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - libtpu's errors are long; say what was asked
    raise CompileError(f"libtpu could not make topology {libname!r} (from {name!r}, "
                       f"{num_slices} slice(s)): {str(e).splitlines()[0]}") from None


def make_mesh(mesh_shape: Sequence[int], devices) -> jax.sharding.Mesh:
  """The config's (data, fsdp, tensor) mesh over `devices`, as training makes it."""
  from sam_jax.train import sharding as shard_lib  # noqa: PLC0415
  try:
    return shard_lib.make_mesh(mesh_shape, devices)
  except ValueError as e:
    raise CompileError(str(e)) from None


def _bytes(shape, dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def per_chip_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  return int(sum(_bytes(x.sharding.shard_shape(x.shape), x.dtype) for x in jax.tree.leaves(tree)))


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """{kind: {count, bytes}} of the collectives in a compiled module's text.

  Bytes are each op's largest array (the result: gathered for an all-gather).
  A loop's body is counted once, whatever its trip count.
  """
  out = {k: dict(count=0, bytes=0) for k in COLLECTIVES}
  for op in hlo_costs.ops(hlo_text):
    kind = op.opcode.removesuffix("-start")  # an async collective counts at its start
    if kind in out:
      out[kind]["count"] += 1
      out[kind]["bytes"] += op.largest_result
  return out


def _hbm(device) -> Optional[int]:
  return HBM_BYTES.get(device.device_kind)


@dataclasses.dataclass
class Compiled:
  """One compiled program's per-chip figures."""
  memory: Dict[str, Optional[int]]
  cost: Dict[str, Optional[float]]
  collectives: Dict[str, Dict[str, int]]
  compile_seconds: float
  # Where the work goes, by model part (hlo_costs.breakdown).
  parts: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)


def _summarise(compiled, state_like, batch_like, seconds: float) -> Compiled:
  ma = compiled.memory_analysis()
  args = int(ma.argument_size_in_bytes)
  temps = int(ma.temp_size_in_bytes)
  code = int(ma.generated_code_size_in_bytes)
  # Donated arguments alias their outputs: count them once.
  total = args + int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes) + temps + code
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  text = compiled.as_text()
  memory = dict(batch=per_chip_bytes(batch_like), temporaries=temps, generated_code=code,
                arguments=args, outputs=int(ma.output_size_in_bytes),
                aliased=int(ma.alias_size_in_bytes), total=total)
  memory.update(state_like)
  return Compiled(memory=memory,
                  cost=dict(flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
                            optimal_seconds=valid_seconds(cost.get("optimal_seconds")),
                            optimal_seconds_reported=cost.get("optimal_seconds")),
                  collectives=collectives(text), compile_seconds=seconds,
                  parts=hlo_costs.breakdown(text))


def valid_seconds(x: Optional[float]) -> Optional[float]:
  """The cost model's time, or None where it gave none or a meaningless one (libtpu
  0.0.42's v6e model answers negative times)."""
  return x if x is not None and x > 0 else None


def _scaled(c: Compiled, factor: float) -> Compiled:
  """`c` with its FLOPs, HBM bytes and estimated time times `factor` (memory as compiled)."""
  if factor == 1:
    return c
  counts = ("cycles", "hbm_bytes", "bytes", "backward_hbm_bytes")
  return dataclasses.replace(
      c, cost={k: (v * factor if v is not None else None) for k, v in c.cost.items()},
      parts={p: {k: (v * factor if k in counts else v) for k, v in row.items()}
             for p, row in c.parts.items()})


def costs_at_fitting_batch(compile_at, global_batch: int, ways: int) -> Tuple[Compiled, int]:
  """`compile_at(global_batch)`, or where the compiler runs out of HBM, the largest halved
  batch that compiles, its costs scaled up to `global_batch` (linear in the batch: the
  per-step parts that are not, the parameters' gathers and the update, are small
  beside the activations' traffic); (that, the batch compiled)."""
  batch = global_batch
  while True:
    try:
      return _scaled(compile_at(batch), global_batch / batch), batch
    except Exception as e:  # noqa: BLE001 - only running out of memory is retried
      if not _out_of_memory(e) or batch // ways <= 1:
        raise
      batch = (batch // ways // 2) * ways


def _cost_note(source: Optional[Dict[str, Any]]) -> str:
  """What the report's costs are, from its `cost_source`."""
  note = "cost_model_* are the XLA TPU compiler's cost-model estimates, not measurements; "
  if source is None:
    return note + "a loop body's costs and collectives count once"
  note += ("the train step's costs and collectives are those of the same step with its "
           "prompt rounds unrolled (a loop body counts once in XLA's cost analysis)")
  if source["scaled_by"] != 1:
    note += (f", compiled at {source['per_chip_batch']} per chip (unrolled, the config's "
             f"batch does not fit) and scaled by {source['scaled_by']:g}")
  return note


def rounds_rolled(config) -> bool:
  """Whether the step's click rounds run as a loop (several iterations, not unrolled)."""
  return not config.get("unroll_rounds", True) and config.prompts.num_rounds > 2


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  c.update(fields)
  return c


def batch_ways(mesh) -> int:
  """How many ways the batch is split: data x fsdp (see sharding.batch_sharding)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def compile_train_step(trainer, global_batch: int) -> Compiled:
  """The training step of `trainer` (on a TPU mesh) compiled at `global_batch`."""
  from sam_jax.modeling.image_encoder import compiling_for  # noqa: PLC0415
  from sam_jax.train import sharding as shard_lib  # noqa: PLC0415
  batch = trainer.abstract_batch(global_batch)
  t0 = time.time()
  with compiling_for("tpu"):
    compiled = trainer.compile_step(batch)
  seconds = time.time() - t0
  state = trainer.abstract_state
  sharded = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard_lib.batch_sharding(
      trainer.mesh, v.ndim)) for k, v in batch.items()}
  return _summarise(compiled, dict(params=per_chip_bytes(state["params"]),
                                   optimizer_state=per_chip_bytes(state["opt_state"])),
                    sharded, seconds)


def compile_encoder(trainer, global_batch: int) -> Compiled:
  """The image encoder's forward (inference: images to embeddings) compiled at `global_batch`."""
  from sam_jax.build import image_size_hw  # noqa: PLC0415
  from sam_jax.modeling.image_encoder import compiling_for  # noqa: PLC0415
  from sam_jax.train import sharding as shard_lib  # noqa: PLC0415
  mesh, model = trainer.mesh, trainer.model
  h, w = image_size_hw(trainer.mcfg.image_size)
  images = jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32,
                                sharding=shard_lib.batch_sharding(mesh, 4))
  params = trainer.abstract_state["params"]
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_images),
               out_shardings=shard_lib.batch_sharding(mesh, 4))
  t0 = time.time()
  with compiling_for("tpu"), jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
    compiled = fn.lower(params, images).compile()
  return _summarise(compiled, dict(params=per_chip_bytes(params), optimizer_state=0),
                    dict(images=images), time.time() - t0)


def time_bounds(cost: Dict[str, Optional[float]], device_kind: str,
                peak_flops: Optional[float]) -> Dict[str, Optional[float]]:
  """Where the cost model's time goes: the program's FLOPs at the chip's peak and its
  HBM bytes at full bandwidth, each a lower bound on the step (both from XLA's cost
  analysis, which does not see inside Pallas kernels)."""
  bandwidth = HBM_BANDWIDTH.get(device_kind)
  flops, moved = cost.get("flops"), cost.get("bytes_accessed")
  compute = flops / peak_flops if flops and peak_flops else None
  memory = moved / bandwidth if moved and bandwidth else None
  bound = None if compute is None or memory is None else (
      "memory" if memory > compute else "compute")
  return dict(compute_seconds=compute, hbm_seconds=memory, bound=bound,
              hbm_bandwidth=bandwidth)


def _fits(c: Compiled, hbm: Optional[int]) -> Optional[bool]:
  return None if hbm is None else c.memory["total"] <= hbm


def _out_of_memory(e: Exception) -> bool:
  """Whether a compile failed for want of device memory (XLA's RESOURCE_EXHAUSTED)."""
  return re.search(r"RESOURCE_EXHAUSTED|\bout of memory\b", str(e), re.IGNORECASE) is not None


def batch_search(total_at: Callable[[int], float], limit: float,
                 known: Optional[Dict[int, float]] = None,
                 most: int = 4096) -> Tuple[int, Dict[int, Optional[float]]]:
  """Largest per-device batch <= `most` whose memory fits in `limit`, by compiling;
  (it, {batch: memory or None}), 0 if not even 1 fits.

  `total_at(b)`: the compiled program's memory per device at b per device (any
  unit, the same as `limit`). Memory is close to linear in the batch (state,
  plus activations per image): a line through the two nearest compiles
  predicts the largest batch, and the compiles at the prediction and next to
  it confirm it, so a search seeded with one compile (`known`: {batch:
  memory}) takes about three more; where memory is not linear, the bracket
  still closes one batch at a time. None: the compiler ran out of memory.
  """
  totals: Dict[int, Optional[float]] = dict(known or {})

  def fits(b: int) -> bool:
    if b not in totals:
      try:
        totals[b] = total_at(b)
      except Exception as e:  # noqa: BLE001 - a compile that runs out of memory also says no
        if not _out_of_memory(e):
          raise
        totals[b] = None
    return totals[b] is not None and totals[b] <= limit

  def predicted(lo: int) -> Optional[int]:
    """Where the line through the two measured batches nearest `lo` meets `limit`."""
    near = sorted((b for b, t in totals.items() if t is not None), key=lambda b: abs(b - lo))
    if len(near) < 2:
      return None
    (b0, t0), (b1, t1) = ((b, totals[b]) for b in near[:2])
    slope = (t1 - t0) / (b1 - b0)
    return int(b0 + (limit - t0) // slope) if slope > 0 else None

  lo = max((b for b in list(totals) if fits(b)), default=0)
  hi = min((b for b in list(totals) if b > lo and not fits(b)), default=None)
  if lo == 0:
    if hi == 1 or not fits(1):
      return 0, totals
    lo = 1
  while hi is None or hi - lo > 1:
    guess = predicted(lo)
    if guess is None and lo > 1 and lo // 2 not in totals:
      fits(lo // 2)  # a second point for the line, below lo: it fits
      continue
    b = 2 * lo if guess is None else guess
    b = min(max(b, lo + 1), most if hi is None else hi - 1)
    if b <= lo:  # lo is `most`
      break
    if fits(b):
      lo = b
    else:
      hi = b
  return lo, totals


def report(config, topology: str, num_slices: int = 1, do_batch_search: bool = False,
           inference_batch: Optional[int] = None) -> Dict[str, Any]:
  """Compiles `config`'s training step (and the encoder's forward) for `topology`; the report."""
  from sam_jax.train import flops as flops_lib  # noqa: PLC0415
  from sam_jax.train.trainer import Trainer  # noqa: PLC0415
  devices = topology_devices(topology, num_slices)
  mesh = make_mesh(config.mesh_shape, devices)
  ways = batch_ways(mesh)
  if config.batch_size % ways:
    raise CompileError(f"batch_size {config.batch_size} does not split over the mesh's "
                       f"data x fsdp = {ways} ways; set --config.batch_size to a multiple "
                       f"of {ways}.")
  trainer = Trainer(config, mesh=mesh)
  kind, hbm, n = devices[0].device_kind, _hbm(devices[0]), len(devices)
  train = compile_train_step(trainer, config.batch_size)
  costed, cost_batch = trainer, config.batch_size
  if rounds_rolled(config):
    # XLA's cost analysis counts a loop body once: the costs come from the same
    # step with its rounds unrolled, the memory from the program that trains.
    costed = Trainer(_with(config, unroll_rounds=True), mesh=mesh)
    unrolled, cost_batch = costs_at_fitting_batch(
        lambda b: compile_train_step(costed, b), config.batch_size, ways)
    train = dataclasses.replace(train, cost=unrolled.cost, collectives=unrolled.collectives,
                                parts=unrolled.parts,
                                compile_seconds=train.compile_seconds + unrolled.compile_seconds)
  model_flops = flops_lib.train_step_flops(trainer.mcfg, config, trainer.abstract_params,
                                           trainer.abstract_batch(config.batch_size))
  peak = flops_lib.peak_flops(kind, trainer.mcfg.dtype, config.get("peak_flops"))
  est = train.cost["optimal_seconds"]
  mfu = (model_flops / n / est / peak) if (est and peak) else None
  bounds = time_bounds(train.cost, kind, peak)
  floor = max([t for t in (bounds.get("compute_seconds"), bounds.get("hbm_seconds")) if t],
              default=None)
  source = None if costed is trainer else dict(
      unroll_rounds=True, per_chip_batch=cost_batch // ways,
      scaled_by=config.batch_size / cost_batch)
  out: Dict[str, Any] = dict(
      topology=topology, num_slices=num_slices, device_kind=kind, chips=n,
      mesh=dict(mesh.shape), hbm_per_chip=hbm, global_batch=config.batch_size,
      per_chip_batch=config.batch_size / ways, dtype=str(trainer.mcfg.dtype),
      train=dict(dataclasses.asdict(train), fits=_fits(train, hbm), time_bounds=bounds),
      model_flops_per_step=model_flops, peak_flops_per_chip=peak,
      cost_model_step_seconds=est, cost_model_mfu=mfu,
      # Where the cost model gives no time, the lower bounds still cap the MFU.
      mfu_upper_bound=(model_flops / n / floor / peak) if (floor and peak) else None,
      cost_source=source, note=_cost_note(source))
  if do_batch_search and hbm:
    seed = {config.batch_size // ways: train.memory["total"]} if train.memory["total"] else {}
    best, totals = batch_search(
        lambda b: compile_train_step(trainer, b * ways).memory["total"], hbm, seed)
    out["train"]["max_per_chip_batch"] = best
    out["train"]["batch_search"] = {str(b): dict(total=t, fits=t is not None and t <= hbm)
                                    for b, t in sorted(totals.items())}
  if inference_batch is not None:
    b = inference_batch * ways
    enc = compile_encoder(trainer, b)
    out["inference"] = dict(dataclasses.asdict(enc), global_batch=b,
                            per_chip_batch=inference_batch, fits=_fits(enc, hbm),
                            time_bounds=time_bounds(enc.cost, kind, peak))
    if do_batch_search and hbm:
      best, _ = batch_search(lambda b: compile_encoder(trainer, b * ways).memory["total"], hbm,
                             {inference_batch: enc.memory["total"]} if enc.memory["total"] else {})
      out["inference"]["max_per_chip_batch"] = best
  return out


def _gib(x) -> str:
  if x is None:
    return "-"
  return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def format_table(r: Dict[str, Any]) -> str:
  """The report as aligned text lines."""
  rows = [("topology", f"{r['topology']} x{r['num_slices']} slice(s): {r['chips']} chips "
                       f"({r['device_kind']}), mesh {r['mesh']}"),
          ("batch", f"global {r['global_batch']}, {r['per_chip_batch']:g} per chip, {r['dtype']}")]
  sections = [("train step", r["train"])]
  if "inference" in r:
    sections.append(("encoder forward", r["inference"]))
  for title, s in sections:
    m = s["memory"]
    rows += [(f"{title}: per chip", ""),
             ("  parameters", _gib(m["params"])), ("  optimizer state", _gib(m["optimizer_state"])),
             ("  batch", _gib(m["batch"])), ("  temporaries", _gib(m["temporaries"])),
             ("  total (args+outputs-aliased+temps+code)", _gib(m["total"])),
             ("  chip HBM", _gib(r["hbm_per_chip"])),
             ("  fits", {True: "yes", False: "NO", None: "unknown HBM"}[s["fits"]]),
             ("  compile time here", f"{s['compile_seconds']:.0f} s")]
    if "max_per_chip_batch" in s:
      rows.append(("  largest per-chip batch that fits", str(s["max_per_chip_batch"])))
    if s["cost"]["optimal_seconds"]:
      rows.append(("  cost model's step time (estimate)", f"{s['cost']['optimal_seconds']:.4g} s"))
    elif s["cost"].get("optimal_seconds_reported") is not None:
      rows.append(("  cost model's step time (estimate)",
                   f"none (it reported {s['cost']['optimal_seconds_reported']:.4g} s)"))
    bounds = s.get("time_bounds") or {}
    if bounds.get("compute_seconds"):
      rows.append(("  XLA's FLOPs at peak (lower bound)", f"{bounds['compute_seconds']:.4g} s"))
    if bounds.get("hbm_seconds"):
      rows.append(("  HBM bytes at full bandwidth (lower bound)",
                   f"{bounds['hbm_seconds']:.4g} s ({s['cost']['bytes_accessed'] / 1e12:.3g} TB"
                   f"; {bounds['bound']}-bound)"))
    for k, v in s["collectives"].items():
      if v["count"]:
        rows.append((f"  {k}", f"{v['count']} ops, {v['bytes'] / 2**20:.1f} MiB"))
    if s.get("parts"):
      rows.append(("  where the time goes", "share of the compiler's per-op estimates, HBM traffic"))
      rows += [(f"    {name}", f"{100 * p['share_of_cycles']:.1f}%, {p['hbm_bytes'] / 1e9:.3g} GB")
               for name, p in s["parts"].items() if p["share_of_cycles"] >= 0.005]
  rows += [("model FLOPs per step", f"{r['model_flops_per_step'] / 1e12:.4g} TFLOP"),
           ("cost model's MFU (estimate)",
            "-" if r["cost_model_mfu"] is None else f"{100 * r['cost_model_mfu']:.1f}%"),
           ("MFU at most (at the larger lower bound)",
            "-" if r.get("mfu_upper_bound") is None else f"{100 * r['mfu_upper_bound']:.1f}%")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + f"\n({r['note']})"


def run(config, workdir: str, topology: str, num_slices: int = 1, do_batch_search: bool = False,
        inference_batch: Optional[int] = 1) -> Dict[str, Any]:
  """The compile mode: writes WORKDIR/compile_report.json, prints the table, returns the report."""
  if not topology:
    raise CompileError("--mode=compile needs --topology, e.g. --topology=v5p-128.")
  r = report(config, topology, num_slices, do_batch_search, inference_batch)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "compile_report.json")
  with open(path, "w") as f:
    json.dump(r, f, indent=2)
  print(format_table(r), flush=True)
  print(f"Wrote {path}", flush=True)
  return r
