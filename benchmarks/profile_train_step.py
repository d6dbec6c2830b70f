"""Where one training step spends its time, from XLA's profiler.

  python -m benchmarks.profile_train_step --config configs/demo.py [--config.X=...] \\
      [--steps 15] [--calls 3] [--top 15]

Builds the step exactly as train.py does (`trainer.Trainer`) on a synthetic
batch of the config's shapes, prints its median time over `--steps` steps,
then, over `--calls` profiled steps: the operations' busy time and the sum of
their durations (above the busy time where operations overlap), split by
model part and pass (forward, backward; `hlo_costs.part` and `phase`, the
compile report's names), by kind of operation, and the largest operations.
"""

import collections
import re
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from benchmarks.run import synthetic_batch
from benchmarks.trace import busy_ms, control_flow, op_names, operations
from sam_jax.train import hlo_costs, recipe, trainer as trainer_lib


def parse_flags(argv):
  """Flags of their own (not absl's global ones, which train.py's module also defines)."""
  fv, argv = flags.FlagValues(), ["profile_train_step", *argv]
  config_flags.DEFINE_config_file("config", "configs/demo.py",
                                  "A configs/*.py file (optionally :arg).", flag_values=fv,
                                  sys_argv=argv)  # the --config.X overrides are read from it
  flags.DEFINE_integer("steps", 15, "timed steps (after 3 warm-up steps)", flag_values=fv)
  flags.DEFINE_integer("calls", 3, "profiled steps", flag_values=fv)
  flags.DEFINE_integer("top", 15, "largest operations to list", flag_values=fv)
  if {"-h", "--help"} & set(argv):
    print(f"{__doc__}\nFlags:\n{fv.get_help()}")
    raise SystemExit(0)
  try:
    fv(argv)
  except flags.Error as e:
    raise SystemExit(f"profile_train_step: {e} (--help lists the flags)") from None
  return fv


def _table(title: str, rows, calls: int, top: int = 0) -> None:
  """rows: {name: [total µs, events]} over `calls` steps, printed per step, largest first."""
  total = sum(us for us, _ in rows.values()) or 1
  print(title)
  ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
  for name, (us, n) in ranked[:top or None]:
    print(f"  {us / 1e3 / calls:9.2f} ms {us / total:7.1%} {n / calls:7.0f} ops  {name}")


def main(argv=None) -> int:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  config = args.config
  trainer = trainer_lib.Trainer(config)
  state = trainer.init_state(trainer_lib.initial_params(config, trainer.model))
  low_res = recipe.target_size(trainer.model, config)
  batch = synthetic_batch(config.batch_size, trainer.model.image_size, low_res,
                          config.data.max_masks)
  t = time.perf_counter()
  compiled = trainer.compile_step(batch)
  print(f"compiled in {time.perf_counter() - t:.1f} s")
  hlo = compiled.as_text()
  names, loops = op_names(hlo), control_flow(hlo)

  def step():
    nonlocal state
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)

  for _ in range(3):
    step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  print(f"step: median {median * 1e3:.1f} ms of {args.steps} (min {min(times) * 1e3:.1f}), "
        f"{config.batch_size / median:.3g} images/s")

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.calls):
      step()
    jax.profiler.stop_trace()
    ops = [e for e in operations(trace_dir) if e["args"]["hlo_op"] not in loops]
  if not ops:
    print("The trace has no HLO operation events on this backend.")
    return 1
  calls = args.calls
  print(f"busy {busy_ms(ops) / calls:.1f} ms per step; the operations' durations add up to "
        f"{sum(e['dur'] for e in ops) / 1e3 / calls:.1f} ms in {len(ops) // calls} events")
  by_part, by_kind, by_op = (collections.defaultdict(lambda: [0.0, 0]) for _ in range(3))
  for e in ops:
    op = e["args"]["hlo_op"]
    scope = names.get(op, "")
    for table, key in ((by_part, f"{hlo_costs.part(scope)}, {hlo_costs.phase(scope)}"),
                       (by_kind, re.sub(r"\.\d+$", "", op)),
                       (by_op, f"{op}  {scope[-90:]}")):
      table[key][0] += e["dur"]
      table[key][1] += 1
  _table("by part and pass (ms per step, share of the durations, events):", by_part, calls)
  _table("by kind of operation:", by_kind, calls, args.top)
  _table("largest operations:", by_op, calls, args.top)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
