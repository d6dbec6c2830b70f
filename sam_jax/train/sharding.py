"""Device mesh (data, fsdp, tensor) and shardings derived from parameter paths.

The model modules declare no logical axes, so this file names each parameter's
axes from its path and shape, then maps those names to mesh axes with Flax's
logical axis rules. A mesh axis that does not divide a dimension is dropped
for that dimension (it stays replicated), so any parameter fits any mesh.

FSDP parameters are gathered where they are used (`gather_fsdp`): the step
computes with every parameter replicated over `fsdp` (still split over
`tensor`), and their gradients are reduce-scattered back onto `fsdp`. This is
FSDP, and it also avoids an XLA SPMD partitioner miscompile (jax 0.10.2) of
`y + y @ w` on meshes with data, fsdp and tensor all above 1, which
tests/test_train_sharding.py catches (the story: docs/training.md, "Sharding").
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Logical name -> mesh axes. FSDP shards the model's width, tensor parallelism
# the MLP/heads dimension; the batch spans both data and fsdp.
LOGICAL_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
)
# Activations carry logical names too (modeling/image_encoder.py): batch,
# tokens (height, width on a grid), heads and mlp; names absent from the rules
# (the token axes here) stay replicated. Override all
# of this with `config.sharding_rules` (see `rules_from_config`).


def rules_from_config(config) -> Tuple[Tuple[str, Any], ...]:
  """`config.sharding_rules` (a sequence of (logical name, mesh axes)), else LOGICAL_RULES."""
  rules = config.get("sharding_rules") if hasattr(config, "get") else None
  if not rules:
    return LOGICAL_RULES
  out = []
  for rule in rules:
    name, axes = rule
    for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())):
      if a not in MESH_AXES:
        raise ValueError(f"config.sharding_rules maps {name!r} to {a!r}, not a mesh axis "
                         f"{MESH_AXES}.")
    out.append((name, axes if axes is None or isinstance(axes, str) else tuple(axes)))
  return tuple(out)


# Dense layers whose input is the wide (mlp/heads) side.
OUTPUT_PROJECTIONS = ("proj", "lin2", "out_proj")


def sync_processes(name: str) -> None:
  """With several processes: waits until every one has reached the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) with its one -1 entry (if any) taking the remaining devices."""
  shape = list(shape)
  if len(shape) != 3 or shape.count(-1) > 1:
    raise ValueError(f"config.mesh_shape {tuple(shape)}: three entries (data, fsdp, tensor), "
                     "at most one of them -1.")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = num_devices // rest if num_devices % rest == 0 else 0
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"config.mesh_shape {tuple(shape)} does not fit the {num_devices} devices: "
                     f"the product of (data, fsdp, tensor) must be {num_devices}; e.g. "
                     f"--config.mesh_shape='(-1,{min(num_devices, 8)},1)'.")
  return tuple(shape)


def num_slices(devices) -> int:
  """How many TPU slices (joined over DCN) `devices` span; 1 elsewhere."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices.

  Over several slices the data axis spans them (only its gradient all-reduce
  crosses DCN); fsdp and tensor stay inside a slice.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(shape, len(devices))
  slices = num_slices(devices)
  if slices > 1:
    if shape[0] % slices:
      raise ValueError(f"{slices} slices split the data axis over DCN, but the mesh's data axis "
                       f"is {shape[0]}; make it a multiple of {slices}.")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]),
                                                (slices, 1, 1), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  except NotImplementedError:
    # An axis that is no product of the torus' sides (8 on a 4x4x4 v5p) spans
    # parts of two of them: allowed, at some cost in the collectives' links.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_axes(path, x) -> Tuple:
  """Logical axis names of one parameter, from its module path and shape."""
  names = [getattr(p, "key", str(p)) for p in path]
  leaf, module = names[-1], (names[-2] if len(names) > 1 else "")
  if leaf == "kernel" and x.ndim == 2 and module == "qkv" and "attn" in names:
    return ("embed", None)  # the encoder's (q|k|v) x heads columns: see image_encoder.QKV
  if leaf == "kernel" and x.ndim == 2:
    return ("mlp", "embed") if module in OUTPUT_PROJECTIONS else ("embed", "mlp")
  if leaf == "kernel" and x.ndim == 4:  # convolutions (and transposed ones), HWIO
    return (None, None, "embed", "mlp")
  if leaf == "pos_embed":
    return (None,) * (x.ndim - 1) + ("embed",)
  return (None,) * x.ndim  # biases, norms, small tables: replicated


def _fit(spec: P, shape, mesh) -> P:
  """Drops mesh axes that do not divide their dimension."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in axes:
      if dim % (mesh.shape[a] * int(np.prod([mesh.shape[k] for k in kept]))) == 0:
        kept.append(a)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def param_specs(params, mesh, rules=LOGICAL_RULES):
  """PartitionSpecs for a (possibly abstract) parameter tree."""
  def spec(path, x):
    return _fit(nn.logical_to_mesh_axes(logical_axes(path, x), rules), x.shape, mesh)
  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh, rules=LOGICAL_RULES):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                      is_leaf=lambda s: isinstance(s, P))


def without_axis(spec: P, axis: str) -> P:
  """`spec` with mesh axis `axis` removed (that dimension replicated over it)."""
  out = []
  for axes in spec:
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != axis)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*out)


def gather_fsdp(params, mesh, rules=LOGICAL_RULES):
  """Inside a jitted function: `params` all-gathered over `fsdp`, as a step computes with them.

  The gradients of the result flow back through the constraint, so XLA
  reduce-scatters them onto the parameters' `fsdp` shards. See the module
  docstring for why the model must never see `fsdp`-sharded weights.
  """
  if mesh.shape["fsdp"] == 1:
    return params
  def gather(x, spec):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, without_axis(spec, "fsdp")))
  return jax.tree.map(gather, params, param_specs(params, mesh, rules),
                      is_leaf=lambda s: isinstance(s, P))


def state_shardings(abstract_state, params_sharding, mesh):
  """Shardings of a train state: optimizer moments follow their parameters.

  Leaves of the optimizer state with a parameter's shape (at the same path
  suffix) take that parameter's sharding; scalars (counts) are replicated.
  """
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]:
    by_path[jax.tree_util.keystr(path)] = s
  replicated = NamedSharding(mesh, P())

  def pick(path, x):
    key = jax.tree_util.keystr(path)
    for p, s in by_path.items():
      if key.endswith(p) and len(s.spec) <= x.ndim:
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  """The leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def put_batch(batch, mesh):
  """This process's rows of a global batch, as globally sharded arrays."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}
