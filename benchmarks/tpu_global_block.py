"""One ViT-H global block's training step on one TPU chip, compiled here: temporaries per attention.

  python -m benchmarks.tpu_global_block --chip v5p --batch 4 --attention splash,xla,xla_folded

A global block attends over all 64 x 64 = 4096 tokens; with XLA's attention its
(heads, N, N) scores are what the step stores. The block (ViT-H: width 1280,
16 heads, decomposed relative positions, bfloat16 compute, float32 parameters)
is compiled for one chip of the topology (libtpu's abstract devices, no TPU),
forward and backward (the gradient of its output's sum with respect to the
input and the parameters), and the compiled program's memory analysis and cost
model are printed per attention implementation. Needs `pip install -e ".[tpu]"`.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from sam_jax.modeling.image_encoder import Block, compiling_for
from sam_jax.train import compile_report

VIT_H = dict(dim=1280, num_heads=16, grid=(64, 64))
TOPOLOGIES = {"v5p": "v5p:2x2x1", "v5e": "v5e:2x2", "v6e": "v6e:2x2", "v4": "v4:2x2x1"}


def compile_block(attention: str, chip: str, batch: int, dim: int, num_heads: int, grid):
  """Memory and cost-model figures of one block's forward and backward on one chip."""
  device = compile_report.topology_devices(TOPOLOGIES[chip])[0]
  block = Block(num_heads=num_heads, window_size=0, input_size=tuple(grid), dtype=jnp.bfloat16,
                attention=attention)
  x = jax.ShapeDtypeStruct((batch, *grid, dim), jnp.bfloat16)
  params = jax.eval_shape(block.init, jax.random.key(0), x)["params"]

  def step(p, x):
    return jax.grad(lambda p, x: block.apply({"params": p}, x).astype(jnp.float32).sum(),
                    argnums=(0, 1))(p, x)

  sharding = jax.sharding.SingleDeviceSharding(device)
  t0 = time.time()
  with compiling_for("tpu"):
    compiled = jax.jit(step, in_shardings=(sharding, sharding)).lower(params, x).compile()
  ma, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(attention=attention, chip=chip, batch=batch,
              temporaries_gib=ma.temp_size_in_bytes / 2**30,
              arguments_gib=ma.argument_size_in_bytes / 2**30,
              est_ms=1e3 * cost.get("optimal_seconds", float("nan")),
              tflop=cost.get("flops", float("nan")) / 1e12,
              compile_s=time.time() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--chip", default="v5p", choices=sorted(TOPOLOGIES))
  p.add_argument("--batch", type=int, default=4, help="images per chip")
  p.add_argument("--attention", default="splash,xla,xla_folded")
  args = p.parse_args()
  rows = [compile_block(a, args.chip, args.batch, **VIT_H) for a in args.attention.split(",")]
  print(f"{'attention':<12} {'temporaries GiB':>16} {'arguments GiB':>14} {'est. ms':>8} "
        f"{'TFLOP':>7} {'compile s':>9}")
  for r in rows:
    print(f"{r['attention']:<12} {r['temporaries_gib']:>16.2f} {r['arguments_gib']:>14.3f} "
          f"{r['est_ms']:>8.2f} {r['tflop']:>7.3f} {r['compile_s']:>9.1f}")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
