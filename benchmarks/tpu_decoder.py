"""One click round of the mask decoder, trained, on one TPU chip, compiled here: where its time goes.

  python -m benchmarks.tpu_decoder --chip v5p --masks 64 --dtype float32,bfloat16

The paper's recipe decodes 64 masks per image 11 times a step, and those
decodes are most of a training step's memory traffic (docs/tpu.md, "Where the
time goes"). This compiles one round as the recipe runs it (the prompt encoder
on points and a mask prompt, the decoder's single output, a loss on its
logits; forward and backward, with respect to the parameters) for one image's
masks on one chip (libtpu's abstract devices, no TPU), per decoder dtype, and
prints the cost model's estimate, the temporaries and the parts
(`hlo_costs.breakdown`). A full-size step takes 10 minutes to compile; this takes
under one, so it is where to try a change to the decoder first.
Needs `pip install -e ".[tpu]"`.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from sam_jax.build import build_sam, model_config
from sam_jax.modeling.image_encoder import compiling_for
from sam_jax.modeling.sam import Sam
from sam_jax.train import compile_report, hlo_costs

TOPOLOGIES = {"v5p": "v5p:2x2x1", "v5e": "v5e:2x2", "v6e": "v6e:2x2", "v4": "v4:2x2x1"}


def compile_round(dtype: str, chip: str, images: int, masks: int, points: int = 3,
                  image_size: int = 1024):
  """Figures of one decoder round's forward and backward for `images` x `masks` prompts
  on `image_size`-pixel images (the token grid and the masks scale with it)."""
  device = compile_report.topology_devices(TOPOLOGIES[chip])[0]
  config = model_config("vit_b")  # the decoder and prompt encoder are the same for every size
  config.image_size = image_size
  config.mask_decoder.dtype = dtype
  model = build_sam(config)
  grid, dim = model.prompt_encoder.image_embedding_size, model.prompt_encoder.embed_dim
  emb = jax.ShapeDtypeStruct((images, *grid, dim), jnp.bfloat16)
  coords = jax.ShapeDtypeStruct((images, masks, points, 2), jnp.float32)
  labels = jax.ShapeDtypeStruct((images, masks, points), jnp.int32)
  mask_in = jax.ShapeDtypeStruct((images, masks, *model.prompt_encoder.mask_input_size),
                                 jnp.float32)
  gt = jax.ShapeDtypeStruct((images, masks, 4 * grid[0], 4 * grid[1]), jnp.bool_)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(emb.shape),
                                             jnp.zeros(coords.shape), jnp.zeros(labels.shape,
                                                                                jnp.int32),
                                             None, jnp.zeros(mask_in.shape),
                                             method=Sam.decode))["params"]

  def loss(p, emb, coords, labels, mask_in, gt):
    logits, iou = model.apply({"params": p}, emb, coords, labels, None, mask_in, False,
                              method=Sam.decode)
    target = gt[:, :, None].astype(jnp.float32)
    return (jnp.logaddexp(0.0, logits) - logits * target).mean() + (iou ** 2).mean()

  sharding = jax.sharding.SingleDeviceSharding(device)
  t0 = time.time()
  with compiling_for("tpu"):
    compiled = jax.jit(jax.grad(loss), in_shardings=sharding).lower(
        params, emb, coords, labels, mask_in, gt).compile()
  ma, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  parts = hlo_costs.breakdown(compiled.as_text())
  return dict(dtype=dtype, chip=chip, images=images, masks=masks,
              temporaries_gib=ma.temp_size_in_bytes / 2**30,
              est_ms=1e3 * cost.get("optimal_seconds", float("nan")),
              hbm_gb=cost.get("bytes accessed", float("nan")) / 1e9,
              compile_s=time.time() - t0,
              parts={k: round(v["share_of_cycles"], 4) for k, v in parts.items()})


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--chip", default="v5p", choices=sorted(TOPOLOGIES))
  p.add_argument("--images", type=int, default=1, help="images per chip")
  p.add_argument("--masks", type=int, default=64, help="masks per image")
  p.add_argument("--dtype", default="float32,bfloat16", help="decoder dtypes to compare")
  args = p.parse_args()
  rows = [compile_round(d, args.chip, args.images, args.masks) for d in args.dtype.split(",")]
  print(f"{'dtype':<10} {'temporaries GiB':>16} {'est. ms':>8} {'XLA HBM GB':>10} {'compile s':>9}")
  for r in rows:
    print(f"{r['dtype']:<10} {r['temporaries_gib']:>16.2f} {r['est_ms']:>8.2f} "
          f"{r['hbm_gb']:>10.2f} {r['compile_s']:>9.1f}")
    print("  " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["parts"].items() if v >= 0.01))
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
