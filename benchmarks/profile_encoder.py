"""Where one image-encoder call spends its time, from XLA's profiler.

  python -m benchmarks.profile_encoder [--variant vit_h] [--dtype bfloat16] [--batch 8] \\
      [--image-size 1024] [--attention auto] [--calls 3] [--top 15]

Prints the call's median time, then, over `--calls` profiled calls: the
operations' busy time, split by the part of the model each comes from (read
from its HLO metadata: the global and the windowed blocks' qkv, attention,
proj, MLP and norms, the patch embedding, the neck; a fusion of several
parts' products is named after all of them), and the largest operations.
Randomised weights; sam_jax alone (`benchmarks.run` compares).
"""

import argparse
import collections
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.models import SIZES, jax_model
from benchmarks.trace import busy_ms, control_flow, op_names, operations, product_names
from sam_jax.checkpoint import init_params

_BLOCK = re.compile(r"/blocks_(\d+)/(?:attn/(qkv|proj)|(attn|mlp|norm1|norm2))")


def model_part(op_name: str, global_blocks) -> str:
  """'window mlp', 'global attention', 'patch_embed', ... for an op's metadata path."""
  m = _BLOCK.search(op_name)
  if m:
    kind = "global" if int(m.group(1)) in global_blocks else "window"
    part = m.group(2) or m.group(3)
    return f"{kind} {'attention' if part == 'attn' else part}"
  for part in ("patch_embed", "neck", "pos_embed"):
    if f"/{part}" in op_name:
      return part
  return "other"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="vit_b", choices=sorted(SIZES))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--attention", default="auto", help="the encoder's attention implementation")
  p.add_argument("--calls", type=int, default=3)
  p.add_argument("--top", type=int, default=15)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  model = jax_model(args.variant, args.image_size, dtype=args.dtype,
                    **{"image_encoder.attention": args.attention})
  params = jax.device_put(init_params(model, jax.random.key(0)))
  images = jnp.asarray(np.random.RandomState(0).uniform(
      0, 255, (args.batch, *model.image_size, 3)).astype(np.float32))
  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_images))
  compiled = embed.lower(params, images).compile()
  hlo = compiled.as_text()
  names, products, loops = op_names(hlo), product_names(hlo), control_flow(hlo)
  res = timing.interleaved({"encoder": lambda: compiled(params, images)}, 5, warmup=2)
  median = res["encoder"]["median_s"]
  print(f"{args.variant} {args.dtype} batch {args.batch} at {args.image_size}: "
        f"{median * 1e3:.1f} ms per call, {args.batch / median:.3g} images/s (median of 5)")

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.calls):
      timing.block(compiled(params, images))
    jax.profiler.stop_trace()
    ops = [e for e in operations(trace_dir) if e["args"]["hlo_op"] not in loops]
  if not ops:
    print("The trace has no HLO operation events on this backend.")
    return 1
  global_blocks = set(SIZES[args.variant][3])
  per_op, per_part = collections.defaultdict(float), collections.defaultdict(float)
  for e in ops:
    ms = e["dur"] / 1e3 / args.calls
    op = e["args"]["hlo_op"]
    per_op[op] += ms
    # A fusion counts for every part whose products it computes, named together.
    parts = {model_part(n, global_blocks) for n in products.get(op, [])}
    per_part[" + ".join(sorted(parts)) or model_part(names.get(op, ""), global_blocks)] += ms
  print(f"busy {busy_ms(ops) / args.calls:.1f} ms per call, {len(ops) // args.calls} "
        "operation events; by part of the model (ms per call, share of the operations' time):")
  total = sum(per_part.values())
  for part, ms in sorted(per_part.items(), key=lambda kv: -kv[1]):
    print(f"  {part:18s} {ms:9.2f} {ms / total:7.1%}")
  print(f"largest operations (ms per call, mean of {args.calls}):")
  for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {ms:9.2f}  {op}  {names.get(op, '')[-90:]}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
