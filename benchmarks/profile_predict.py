"""Where a one-point `SamPredictor.predict` spends its time, from XLA's profiler.

  python -m benchmarks.profile_predict [--variant vit_b] [--image-size 1024] [--calls 5] [--top 12]

Prints the medians of `predict` and of its two compiled parts, then, over
`--calls` profiled calls: each compiled function's span, the union of its
operations' busy intervals (a gap between them would be dispatch or idle
time), and its largest operations. Last, the rate of one 4096 x 256 by
256 x 256 product, the decoder's typical shape, in JAX and in torch.
Randomised weights, the astronaut photo (512 x 512).
"""

import argparse
import collections
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.models import astronaut, paired_models
from benchmarks.trace import busy_ms, operations
from sam_jax import predictor as predictor_lib


def executions(ops):
  """Consecutive operations of one module, split where the module changes."""
  runs = []
  for e in ops:
    module = e["args"].get("hlo_module", "?")
    if not runs or runs[-1]["module"] != module:
      runs.append(dict(module=module, ops=[]))
    runs[-1]["ops"].append(e)
  return runs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="vit_b")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--calls", type=int, default=5)
  p.add_argument("--top", type=int, default=12)
  args = p.parse_args(argv)

  _, model, params = paired_models(args.variant, args.image_size)
  image = astronaut()
  predictor = predictor_lib.SamPredictor(model, params)
  predictor.set_image(image)
  point, label = np.array([[image.shape[1] * 0.4, image.shape[0] * 0.45]]), np.array([1])
  prompts = predictor._check_prompts(0, point[None], label[None], None, None)[1:]
  coords, labels, boxes, masks = predictor._stack_padded([prompts])

  def decode():
    return predictor_lib.decode(model, predictor.prompt_params, predictor.cache, predictor.features,
                                coords, labels, boxes, masks, multimask_output=True)

  low_res, _ = decode()
  sizes = dict(input_sizes=tuple(predictor.input_sizes),
               original_sizes=tuple(predictor.original_sizes))
  res = timing.interleaved({
      "predict": lambda: predictor.predict(point, label),
      "decode": decode,
      "upscale": lambda: predictor_lib.upscale(model, low_res, **sizes)}, 30, warmup=3)
  print(", ".join(f"{k} {r['median_s'] * 1e3:.2f} ms" for k, r in res.items()) +
        " (medians of 30, interleaved)")

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.calls):
      predictor.predict(point, label)
    jax.profiler.stop_trace()
    ops = operations(trace_dir)
  per_op = collections.defaultdict(float)
  for run in executions(ops):
    span = (max(e["ts"] + e["dur"] for e in run["ops"]) - run["ops"][0]["ts"]) / 1e3
    print(f"{run['module']}: span {span:.2f} ms, busy {busy_ms(run['ops']):.2f} ms, "
          f"{len(run['ops'])} operation events")
    for e in run["ops"]:
      per_op[(run["module"], e["args"]["hlo_op"])] += e["dur"] / 1e3 / args.calls
  print(f"largest operations (ms per call, mean of {args.calls}):")
  for (module, op), ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {ms:6.2f}  {module} {op}")

  import torch  # noqa: PLC0415 - the reference's library, for the same product
  a, b = np.random.rand(4096, 256).astype(np.float32), np.random.rand(256, 256).astype(np.float32)
  matmul = jax.jit(jnp.matmul)
  ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
  # One side after the other: interleaved with torch's (which spin-wait after a
  # product), XLA's threads ran this product far slower.
  res = {**timing.interleaved({"jax": lambda: matmul(ja, jb)}, 50, warmup=5),
         **timing.interleaved({f"torch ({torch.get_num_threads()} threads)": lambda: ta @ tb},
                              50, warmup=5)}
  gflop = 2 * 4096 * 256 * 256 / 1e9
  print("4096x256 @ 256x256: " + ", ".join(f"{k} {gflop / r['median_s']:.0f} GFLOP/s"
                                            for k, r in res.items()))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
