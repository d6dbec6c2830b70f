"""sam_jax against Meta's reference, side by side in one process.

  python -m benchmarks.run                       # vit_b at 1024, every benchmark
  python -m benchmarks.run --quick               # a 2-block model at 256: a smoke run
  python -m benchmarks.run --only encoder --variants vit_b,vit_l --out results.json
  XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' \
    python -m benchmarks.run --only decoder,predict --torch-threads 1   # one thread each

Both sides get the same randomised weights (no released checkpoints are
needed), the same inputs, the same device (CPU for torch; JAX's default
backend, which should be the CPU too for a like-for-like row) and fp32.
Every function is warmed up first; JAX compile time is reported on its own.
Repeats alternate sam_jax, reference, sam_jax, ... so that other jobs on a
shared machine slow both alike, and the load average is recorded with the
results. `speedup` is reference time / sam_jax time (> 1: sam_jax is faster).
"""

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.models import astronaut, paired_models
from benchmarks.seed_attention import seed_attention

BENCHMARKS = ("encoder", "decoder", "predict", "amg")

# Published figures, for orientation only: other hardware, released weights.
ANCHORS = {
    "segment-anything-fast, A100, bf16 + compile (images/s)": {"vit_h": 23.6, "vit_b": 92},
    "reference segment-anything, A100, fp32 (images/s)": {"vit_h": 2.7, "vit_b": 12},
    "image encoder TFLOP per 1024x1024 image": {"vit_b": 0.97, "vit_l": 2.99, "vit_h": 5.96},
}


def _nchw(x: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _compile(fn, *args):
  """(compiled executable, seconds to trace, lower and compile)."""
  t = time.perf_counter()
  # A fresh wrapper each time: JAX caches traces by function, and a swapped
  # module (seed_attention) must be traced again.
  compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
  return compiled, time.perf_counter() - t


def _row(bench: str, metric: str, jax_side: Dict, ref_side: Dict, per_call: float = 1.0,
         **info) -> Dict[str, Any]:
  """One result: medians, `per_call` items per call turned into a rate, and the ratio."""
  row = dict(bench=bench, metric=metric, **info, sam_jax=jax_side, reference=ref_side)
  for side in (jax_side, ref_side):
    side["rate"] = per_call / side["median_s"]
  row["speedup"] = ref_side["median_s"] / jax_side["median_s"]
  return row


def bench_encoder(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  import torch
  h, w = model.image_size
  x = np.random.RandomState(0).uniform(0, 255, (args.batch, h, w, 3)).astype(np.float32)
  xt = _nchw(x)
  embed = lambda p, im: model.apply({"params": p}, im, method=model.embed_images)  # noqa: E731
  xj = jnp.asarray(x)
  compiled = {}
  compile_s = {}
  compiled["sam_jax"], compile_s["sam_jax"] = _compile(embed, params, xj)
  if args.seed_attention:
    with seed_attention():
      compiled["seed"], compile_s["seed"] = _compile(embed, params, xj)

  def reference():
    with torch.inference_mode():
      return ref.image_encoder(ref.preprocess(xt))

  fns = {name: (lambda c=c: c(params, xj)) for name, c in compiled.items()}
  fns["reference"] = reference
  res = timing.interleaved(fns, args.repeats_encoder, memory=True)
  for name, c in compiled.items():
    res[name]["compile_s"] = compile_s[name]
    mem = c.memory_analysis()
    if mem is not None:
      res[name]["xla_temp_mb"] = round(mem.temp_size_in_bytes / 2**20, 1)
  info = dict(variant=variant, image_size=[h, w], batch=args.batch)
  rows = [_row("encoder", "images/s", res["sam_jax"], res["reference"], per_call=args.batch,
               **info)]
  if args.seed_attention:
    row = _row("encoder", "images/s", res["seed"], res["reference"], per_call=args.batch,
               attention="seed (before the fast path)", **info)
    row["fast_path_speedup"] = res["seed"]["median_s"] / res["sam_jax"]["median_s"]
    rows.append(row)
  return rows


def bench_decoder(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """Prompt encoder + mask decoder on one embedding, P single-point prompts."""
  import torch
  rs = np.random.RandomState(1)
  gh, gw = model.prompt_encoder.image_embedding_size
  emb = rs.randn(1, gh, gw, model.prompt_encoder.embed_dim).astype(np.float32)
  emb_t = _nchw(emb)
  h, w = model.image_size
  decode = lambda p, e, c, lab: model.apply(  # noqa: E731
      {"params": p}, e, c, lab, multimask_output=True, method=model.decode)
  rows = []
  for n_prompts in args.prompts:
    coords = (rs.uniform(0, 1, (1, n_prompts, 1, 2)) * [w, h]).astype(np.float32)
    labels = np.ones((1, n_prompts, 1), np.int32)
    cj, lj, ej = jnp.asarray(coords), jnp.asarray(labels), jnp.asarray(emb)
    compiled, compile_s = _compile(decode, params, ej, cj, lj)
    ct, lt = torch.from_numpy(coords[0]), torch.from_numpy(labels[0])

    def reference():
      with torch.inference_mode():
        sparse, dense = ref.prompt_encoder(points=(ct, lt), boxes=None, masks=None)
        return ref.mask_decoder(image_embeddings=emb_t, image_pe=ref.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=True)

    res = timing.interleaved({"sam_jax": lambda: compiled(params, ej, cj, lj),
                              "reference": reference}, args.repeats_decoder, warmup=2)
    res["sam_jax"]["compile_s"] = compile_s
    rows.append(_row("decoder", "prompts/s", res["sam_jax"], res["reference"],
                     per_call=n_prompts, variant=variant, prompts=n_prompts,
                     multimask_output=True))
  return rows


def bench_predict(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """SamPredictor.predict for one point (masks at the original size), image set once."""
  from segment_anything import SamPredictor as RefPredictor

  from sam_jax.predictor import SamPredictor
  image = args.image
  ours, theirs = SamPredictor(model, params), RefPredictor(ref)
  set_first = {"sam_jax": timing.timed(lambda: ours.set_image(image) or ours.features),
               "reference": timing.timed(lambda: theirs.set_image(image))}
  point = np.array([[image.shape[1] * 0.4, image.shape[0] * 0.45]])
  label = np.array([1])
  res = timing.interleaved({
      "sam_jax": lambda: ours.predict(point, label, multimask_output=True),
      "reference": lambda: theirs.predict(point, label, multimask_output=True),
  }, args.repeats_predict, warmup=2)
  for name in res:
    res[name]["set_image_first_call_s"] = set_first[name]
  return [_row("predict", "predictions/s", res["sam_jax"], res["reference"], variant=variant,
               image_hw=list(image.shape[:2]), points=1, multimask_output=True)]


def bench_amg(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """SamAutomaticMaskGenerator.generate on the photo, encoder included."""
  from segment_anything import SamAutomaticMaskGenerator as RefGenerator

  from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
  settings = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch)
  ours, theirs = SamAutomaticMaskGenerator(model, params, **settings), RefGenerator(ref, **settings)
  counts = {}

  def run(name, gen):
    def go():
      masks = gen.generate(args.image)
      counts[name] = len(masks)
      return None
    return go

  res = timing.interleaved({"sam_jax": run("sam_jax", ours), "reference": run("reference", theirs)},
                           args.repeats_amg)
  for name in res:
    res[name]["masks"] = counts[name]
  return [_row("amg", "images/s", res["sam_jax"], res["reference"], variant=variant,
               image_hw=list(args.image.shape[:2]), **settings,
               note="other settings are the reference's defaults; randomised weights")]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="a 2-block 'tiny' model at 256 x 256 and few repeats: checks the harness")
  p.add_argument("--only", default=",".join(BENCHMARKS),
                 help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  p.add_argument("--variants", default=None, help="comma-separated: tiny, vit_b, vit_l, vit_h")
  p.add_argument("--image-size", type=int, default=None)
  p.add_argument("--batch", type=int, default=1, help="images per encoder call")
  p.add_argument("--prompts", default="1,16,64", help="prompts per image for the decoder")
  p.add_argument("--points-per-side", type=int, default=None,
                 help="AMG grid (the reference's default is 32)")
  p.add_argument("--points-per-batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=None, help="timed repeats for every benchmark")
  p.add_argument("--no-seed-attention", dest="seed_attention", action="store_false",
                 help="skip the encoder row with the attention before the fast path")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads for the reference (default: torch's, one per core)")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  args.only = [b for b in args.only.split(",") if b]
  unknown = set(args.only) - set(BENCHMARKS)
  if unknown:
    p.error(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHMARKS}")
  args.variants = (args.variants or ("tiny" if args.quick else "vit_b")).split(",")
  args.image_size = args.image_size or (256 if args.quick else 1024)
  args.prompts = [int(n) for n in args.prompts.split(",")] if not args.quick else [2]
  if args.points_per_side is None:
    args.points_per_side = 4 if args.quick else 16
  if args.quick:
    args.points_per_batch = min(args.points_per_batch, 8)
  r = args.repeats
  args.repeats_encoder = r or (1 if args.quick else 3)
  args.repeats_decoder = r or (2 if args.quick else 10)
  args.repeats_predict = r or (2 if args.quick else 10)
  args.repeats_amg = r or (1 if args.quick else 2)
  return args


def format_row(row: Dict[str, Any]) -> str:
  j, r = row["sam_jax"], row["reference"]
  what = {"encoder": f"batch {row.get('batch')}" + (" SEED" if "attention" in row else ""), "decoder": f"{row.get('prompts')} prompts",
          "predict": "1 point", "amg": f"{row.get('points_per_side')}^2 points"}[row["bench"]]
  extra = f"  compile {j['compile_s']:.1f}s" if "compile_s" in j else ""
  if "masks" in j:
    extra += f"  masks {j['masks']} vs {r['masks']}"
  return (f"{row['bench']:8s} {row['variant']:6s} {what:14s} sam_jax {j['median_s']*1e3:10.1f} ms"
          f"  reference {r['median_s']*1e3:10.1f} ms  speedup {row['speedup']:5.2f}x{extra}")


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.torch_threads:
    import torch
    torch.set_num_threads(args.torch_threads)
  env = timing.environment()
  env["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
  print(f"# {env['cpu']} x{env['cpu_count']}, jax {env['versions']['jax']} "
        f"({env['jax_backend']}), torch {env['versions']['torch']}, load {env['loadavg']}",
        flush=True)
  if env["jax_backend"] != "cpu":
    print("# note: JAX is not on the CPU but torch is: this is not a like-for-like row")
  image = astronaut()
  results: List[Dict[str, Any]] = []
  fns = dict(encoder=bench_encoder, decoder=bench_decoder, predict=bench_predict, amg=bench_amg)
  for variant in args.variants:
    t = time.perf_counter()
    ref, model, params = paired_models(variant, args.image_size)
    print(f"# {variant} at {args.image_size}: models built in {time.perf_counter() - t:.1f}s",
          flush=True)
    args.image = image
    for name in args.only:
      rows = fns[name](ref, model, params, variant, args)
      for row in rows:
        row["loadavg_after"] = list(os.getloadavg())
        print(format_row(row), flush=True)
      results.extend(rows)
    del ref, model, params
    gc.collect()
  report = {"environment": env, "anchors": ANCHORS, "results": results}
  print("# published anchors (other hardware, for orientation): "
        + json.dumps(ANCHORS), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, default=float)
    print(f"# wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
