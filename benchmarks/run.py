"""sam_jax against Meta's reference, side by side in one process.

  python -m benchmarks.run                       # vit_b at 1024, every benchmark
  python -m benchmarks.run --quick               # a 2-block model at 256: a smoke run
  python -m benchmarks.run --only encoder --variants vit_b,vit_l --out results.json
  python -m benchmarks.run --variants vit_h --dtype bfloat16 --batch 1,8   # on a GPU
  XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' \
    python -m benchmarks.run --only decoder,predict --torch-threads 1   # one thread each

Both sides get the same randomised weights (no released checkpoints are
needed), the same inputs, the same device (torch follows JAX's default
backend: CUDA when JAX is on a GPU) and the same precision (`--dtype` is the
image encoder's; the decoders run in float32 on both sides).
Every function is warmed up first; JAX compile time is reported on its own.
Repeats alternate sam_jax, reference, sam_jax, ... so that other jobs on a
shared machine slow both alike, and the load average is recorded with the
results. `speedup` is reference time / sam_jax time (> 1: sam_jax is faster).
"""

import argparse
import gc
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.models import astronaut, jax_model, paired_models
from sam_jax.train import compile_report

BENCHMARKS = ("encoder", "attention", "decoder", "predict", "amg", "engine", "train")

# Published figures, for orientation only: other hardware, released weights.
ANCHORS = {
    "segment-anything-fast, A100, bf16 + compile (images/s)": {"vit_h": 23.6, "vit_b": 92},
    "reference segment-anything, A100, fp32 (images/s)": {"vit_h": 2.7, "vit_b": 12},
    "image encoder TFLOP per 1024x1024 image": {"vit_b": 0.97, "vit_l": 2.99, "vit_h": 5.96},
}


def _nchw(x: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(timing.torch_device())


def _torch_dtype(dtype: str):
  import torch
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _torch_peak_mb(fn) -> Optional[float]:
  """Peak CUDA memory torch allocates during fn() beyond what it held before."""
  import torch
  if timing.torch_device() != "cuda":
    return None
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  before = torch.cuda.memory_allocated()
  timing.block(fn())
  return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def _xla_memory_mb(compiled) -> Dict[str, float]:
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  return {"xla_temp_mb": round(mem.temp_size_in_bytes / 2**20, 1),
          "xla_output_mb": round(mem.output_size_in_bytes / 2**20, 1)}


def _compile(fn, *args):
  """(compiled executable, seconds to trace, lower and compile)."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
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
  import copy

  import torch
  h, w = model.image_size
  embed = lambda p, im: model.apply({"params": p}, im, method=model.embed_images)  # noqa: E731
  ref_encoder, ref_dtype = ref, _torch_dtype(args.dtype)
  if ref_dtype != torch.float32:
    ref_encoder = copy.deepcopy(ref).to(ref_dtype)
  rows = []
  for batch in args.batch:
    x = np.random.RandomState(0).uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
    xt = _nchw(x).to(ref_dtype)
    xj = jnp.asarray(x)
    compiled, compile_s = _compile(embed, params, xj)

    def reference():
      with torch.inference_mode():
        return ref_encoder.image_encoder(ref_encoder.preprocess(xt))

    on_cpu = timing.torch_device() == "cpu"
    res = timing.interleaved({"sam_jax": lambda: compiled(params, xj), "reference": reference},
                             args.repeats_encoder, warmup=1 if on_cpu else 3, memory=on_cpu)
    res["sam_jax"]["compile_s"] = compile_s
    res["sam_jax"].update(_xla_memory_mb(compiled))
    peak = _torch_peak_mb(reference)
    if peak is not None:
      res["reference"]["cuda_peak_mb"] = peak
    info = dict(variant=variant, image_size=[h, w], batch=batch, dtype=args.dtype,
                attention=_attention_of(model))
    rows.append(_row("encoder", "images/s", res["sam_jax"], res["reference"], per_call=batch,
                     **info))
  return rows


def _attention_of(model) -> str:
  from sam_jax.modeling.image_encoder import resolve_attention
  enc = model.image_encoder
  return (f"global {resolve_attention(enc.attention, enc.dtype)}, "
          f"windows {resolve_attention(enc.window_attention, enc.dtype)}")


def bench_attention(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """One global and one windowed encoder block, forward and forward + backward,
  per attention implementation, against the reference's Block (own random
  weights each: timing only; the implementations' outputs are compared)."""
  import torch
  from segment_anything.modeling.image_encoder import Block as RefBlock

  from sam_jax.modeling.image_encoder import Block
  enc = model.image_encoder
  dim, heads, grid = enc.embed_dim, enc.num_heads, enc.grid_size
  batch = max(args.batch)
  ref_dtype, dev = _torch_dtype(args.dtype), timing.torch_device()
  x = np.random.RandomState(2).randn(batch, *grid, dim).astype(np.float32)
  xj = jnp.asarray(x, enc.dtype)
  rows = []
  for kind, window in (("global", 0), ("window", enc.window_size)):
    ref_block = RefBlock(dim, heads, use_rel_pos=True, window_size=window,
                         input_size=grid if window == 0 else (window, window))
    ref_block = ref_block.to(dev, ref_dtype)
    xt = torch.from_numpy(x).to(dev, ref_dtype)
    outputs = {}
    for impl in args.attention_impls:
      block = Block(heads, window_size=window, input_size=grid, dtype=enc.dtype, attention=impl)
      try:
        p = jax.jit(block.init)(jax.random.key(0), xj)["params"]
      except Exception as e:  # e.g. cuDNN missing or unsupported on this device
        print(f"# attention {kind} {impl}: {type(e).__name__}: {e}"[:400], flush=True)
        continue
      p = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), p)
      fwd = lambda p, x, block=block: block.apply({"params": p}, x)  # noqa: E731
      grad = jax.grad(lambda p, x, fwd=fwd: fwd(p, x).astype(jnp.float32).sum(), (0, 1))
      for mode, fn in (("forward", fwd), ("forward+backward", grad)):
        try:
          compiled, compile_s = _compile(fn, p, xj)
        except Exception as e:  # e.g. cuDNN missing or unsupported on this device
          print(f"# attention {kind} {impl} {mode}: {type(e).__name__}: {e}"[:400], flush=True)
          continue
        if mode == "forward":
          outputs[impl] = np.asarray(compiled(p, xj), np.float32)

        def reference(mode=mode):
          if mode == "forward":
            with torch.inference_mode():
              return ref_block(xt)
          xr = xt.detach().requires_grad_(True)
          ref_block.zero_grad(set_to_none=True)
          ref_block(xr).float().sum().backward()
          return xr.grad

        res = timing.interleaved({"sam_jax": lambda c=compiled: c(p, xj),
                                  "reference": reference}, args.repeats_attention, warmup=2)
        res["sam_jax"]["compile_s"] = compile_s
        res["sam_jax"].update(_xla_memory_mb(compiled))
        rows.append(_row("attention", "blocks/s", res["sam_jax"], res["reference"],
                         variant=variant, block=kind, tokens=grid[0] * grid[1],
                         window=window, mode=mode, implementation=impl, batch=batch,
                         dtype=args.dtype))
    if "xla" in outputs:  # how far the other implementations are from XLA's
      scale = float(np.abs(outputs["xla"]).max())
      for row in rows:
        if row["block"] == kind and row["mode"] == "forward" and row["implementation"] in outputs:
          diff = np.abs(outputs[row["implementation"]] - outputs["xla"]).max()
          row["max_abs_diff_vs_xla"] = float(diff)
          row["max_abs_output"] = scale
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
    dev = timing.torch_device()
    ct, lt = torch.from_numpy(coords[0]).to(dev), torch.from_numpy(labels[0]).to(dev)

    def reference():
      with torch.inference_mode():
        sparse, dense = ref.prompt_encoder(points=(ct, lt), boxes=None, masks=None)
        return ref.mask_decoder(image_embeddings=emb_t, image_pe=ref.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=True)

    res = timing.interleaved({"sam_jax": lambda: compiled(params, ej, cj, lj),
                              "reference": reference}, args.repeats_decoder, warmup=2)
    res["sam_jax"]["compile_s"] = compile_s
    res["sam_jax"].update(_xla_memory_mb(compiled))
    rows.append(_row("decoder", "prompts/s", res["sam_jax"], res["reference"],
                     per_call=n_prompts, variant=variant, prompts=n_prompts,
                     multimask_output=True))
  return rows


def _photos(args):
  """The photo at each `--photos` size, resized where that is not its own."""
  import cv2
  for h, w in args.photos:
    image = args.image
    if image.shape[:2] != (h, w):
      image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    yield h, w, image


def bench_predict(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """SamPredictor.predict for one point (masks at the original size), image set once;
  a row per `--photos` size."""
  from segment_anything import SamPredictor as RefPredictor

  from sam_jax.predictor import SamPredictor
  ours, theirs = SamPredictor(model, params), RefPredictor(ref)
  rows = []
  for h, w, image in _photos(args):
    set_first = {"sam_jax": timing.timed(lambda: ours.set_image(image) or ours.features),
                 "reference": timing.timed(lambda: theirs.set_image(image))}
    point = np.array([[w * 0.4, h * 0.45]])
    label = np.array([1])
    res = timing.interleaved({
        "sam_jax": lambda: ours.predict(point, label, multimask_output=True),
        "reference": lambda: theirs.predict(point, label, multimask_output=True),
    }, args.repeats_predict, warmup=2)
    for name in res:
      res[name]["set_image_first_call_s"] = set_first[name]
    rows.append(_row("predict", "predictions/s", res["sam_jax"], res["reference"],
                     variant=variant, image_hw=[h, w], points=1, multimask_output=True))
  return rows


def bench_amg(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """SamAutomaticMaskGenerator.generate on the photo, encoder included; a row per
  `--photos` size."""
  from segment_anything import SamAutomaticMaskGenerator as RefGenerator

  from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
  settings = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch)
  ours, theirs = SamAutomaticMaskGenerator(model, params, **settings), RefGenerator(ref, **settings)
  rows = []
  for h, w, image in _photos(args):
    counts = {}

    def run(name, gen, image=image):
      def go():
        counts[name] = len(gen.generate(image))
      return go

    res = timing.interleaved({"sam_jax": run("sam_jax", ours),
                              "reference": run("reference", theirs)}, args.repeats_amg)
    for name in res:
      res[name]["masks"] = counts[name]
    rows.append(_row("amg", "images/s", res["sam_jax"], res["reference"], variant=variant,
                     image_hw=[h, w], **settings,
                     note="other settings are the reference's defaults; randomised weights"))
  return rows


ENGINE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # skimage's, at their own sizes


def bench_engine(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """`data_engine annotate` over a folder of photos (reading, generating, writing SA-1B
  JSONs) against the reference generator looped over the same files, same settings."""
  import tempfile

  from PIL import Image
  from segment_anything import SamAutomaticMaskGenerator as RefGenerator
  from skimage import data as photos

  from sam_jax import data_engine
  with tempfile.TemporaryDirectory(prefix="engine_bench_") as root:  # photos and outputs
    folder = os.path.join(root, "photos")
    os.makedirs(folder)
    names = ENGINE_PHOTOS[1:2] if args.quick else ENGINE_PHOTOS
    for name in names:
      Image.fromarray(getattr(photos, name)()).save(os.path.join(folder, f"{name}.jpg"), quality=95)
    flags = ["--points-per-side", str(args.points_per_side), "--points-per-batch",
             str(args.points_per_batch), "--crop-n-layers", str(args.crop_n_layers),
             # Randomised weights pass the paper's confidence and stability cuts rarely: keep
             # every mask the NMS keeps, so that both sides encode and post-process masks.
             "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    engine_args = data_engine.parse_args(["annotate", "--checkpoint", "(in memory)", "--input",
                                          folder, "--output", "", "--quiet", *flags])
    settings = {n: getattr(engine_args, n) for n in data_engine.generator_flag_names()
                if n != "crops_per_encode"}
    theirs = RefGenerator(ref, output_mode="coco_rle", **settings)
    files = sorted(os.listdir(folder))
    counts, runs = {}, [0]

    def ours():
      runs[0] += 1
      engine_args.output = os.path.join(root, f"out_{runs[0]}")
      assert data_engine.annotate(engine_args, (model, params)) == 0
      with open(os.path.join(engine_args.output, data_engine.STATS_FILE)) as f:
        counts["sam_jax"] = json.load(f)["total"]["masks"]

    def reference():
      import torch
      runs[0] += 1
      out = os.path.join(root, f"ref_{runs[0]}")
      os.makedirs(out)
      masks = 0
      for f in files:
        with Image.open(os.path.join(folder, f)) as im:
          image = np.asarray(im.convert("RGB"))
        with torch.no_grad():
          records = theirs.generate(image)
        # The engine's last filter (the paper's), which the generator does not have.
        cut = engine_args.max_mask_fraction * image.shape[0] * image.shape[1]
        records = [r for r in records if r["area"] < cut]
        masks += len(records)
        with open(os.path.join(out, os.path.splitext(f)[0] + ".json"), "w") as fh:
          json.dump(dict(annotations=records), fh)
      counts["reference"] = masks

    res = timing.interleaved({"sam_jax": ours, "reference": reference}, args.repeats_amg)
    for name in res:
      res[name]["masks"] = counts[name]
      res[name]["masks_per_s"] = counts[name] / res[name]["median_s"]
    sizes = [list(getattr(photos, n)().shape[:2]) for n in names]
    return [_row("engine", "images/s", res["sam_jax"], res["reference"], per_call=len(files),
                 variant=variant, images=len(files), image_hws=sizes, **settings,
                 note="the data engine's defaults (the paper's) but for the settings named; "
                      "randomised weights")]


def synthetic_batch(batch: int, image_size, low_res, max_masks: int, seed: int = 0):
  """Images and rectangular object masks of varied size on the low-res grid."""
  rs = np.random.RandomState(seed)
  h, w = image_size
  masks = np.zeros((batch, max_masks, *low_res), bool)
  for b in range(batch):
    for m in range(max_masks):
      y0, x0 = rs.randint(0, low_res[0] // 2), rs.randint(0, low_res[1] // 2)
      y1 = y0 + rs.randint(2, low_res[0] // 2)
      x1 = x0 + rs.randint(2, low_res[1] // 2)
      masks[b, m, y0:y1, x0:x1] = True
  return dict(images=rs.uniform(0, 255, (batch, h, w, 3)).astype(np.float32),
              masks=masks, valid=np.ones((batch, max_masks), bool))


def _peak_memory_gb() -> Optional[float]:
  stats = jax.devices()[0].memory_stats() or {}
  return round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None


def _step_memory_gb(trainer, batch, batch_per_device: int) -> float:
  """Device memory of one training step per XLA's compiled program: arguments,
  outputs not donated into them, and temporaries (activations kept for the
  backward pass, workspace), per device."""
  shapes = {k: jax.ShapeDtypeStruct((batch_per_device * jax.device_count(), *v.shape[1:]),
                                    v.dtype) for k, v in batch.items()}
  m = trainer.compile_step(shapes).memory_analysis()
  used = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return round(used / 2**30, 3)


def _largest_batch(trainer, state, batch, args, start_gb: float) -> Dict[str, Any]:
  """The batch search: compiled, not run, at each size, from `start_gb` (the
  compiled memory at --train-batch); then two timed steps at the largest that
  fits, which show that it does."""
  limit_gb = args.memory_limit_gb or jax.devices()[0].memory_stats()["bytes_limit"] / 2**30

  def memory_gb(b):
    gb = _step_memory_gb(trainer, batch, b)
    print(f"# batch search: {b} per device, {gb} GB of {limit_gb:.3g}", flush=True)  # if cut off
    return gb

  best, totals = compile_report.batch_search(memory_gb, limit_gb, most=args.train_batch_max,
                                             known={args.train_batch: start_gb})
  tried = [dict(batch_per_device=b, compiled_memory_gb=gb, fits=gb is not None and gb <= limit_gb)
           for b, gb in sorted(totals.items())]
  out = dict(memory_limit_gb=round(limit_gb, 2), batch_search=tried,
             largest_batch_per_device=best or None)
  if best > args.train_batch:
    big = synthetic_batch(best * jax.device_count(), trainer.model.image_size,
                          batch["masks"].shape[-2:], args.train_masks)
    times = []
    for _ in range(2):  # compiled by the search; the first also allocates the larger buffers
      t = time.perf_counter()
      state, metrics = trainer.train_step(state, big)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t)
    out["largest_batch_step"] = dict(times_s=times, rate=best * jax.device_count() / min(times),
                                     loss=float(metrics["loss"]),
                                     device_peak_memory_gb=_peak_memory_gb())
  return out


def bench_train(ref, model, params, variant, args) -> List[Dict[str, Any]]:
  """One step of the paper's recipe (configs/pretrain.py) on synthetic data:
  step time, images/s, model FLOPs and MFU, device memory measured and as XLA
  compiled it, and with --train-batch-max the largest batch that fits. No
  reference: Meta released no training code."""
  from configs import pretrain
  from sam_jax.checkpoint import init_params
  from sam_jax.train import flops, recipe
  from sam_jax.train.trainer import Trainer
  enc = model.image_encoder
  cfg = pretrain.get_config(variant if variant in pretrain.RECIPES else "vit_b")
  cfg.model.image_size = args.image_size
  cfg.model.image_encoder.update(dict(
      embed_dim=enc.embed_dim, depth=enc.depth, num_heads=enc.num_heads,
      global_attn_indexes=tuple(enc.global_attn_indexes), remat=args.remat,
      attention=enc.attention, window_attention=enc.window_attention))
  cfg.model.dtype = args.dtype
  cfg.data.max_masks = args.train_masks
  cfg.batch_size = args.train_batch * jax.device_count()
  if args.quick:  # compiles in a fraction of the full recipe's time on a small CPU
    cfg.prompts.num_rounds, cfg.prompts.num_no_point_rounds = 2, 0
    cfg.remat_rounds = False
  trainer = Trainer(cfg)
  low_res = recipe.low_res_size(trainer.model)
  batch = synthetic_batch(cfg.batch_size, trainer.model.image_size, low_res, args.train_masks)
  # Progress lines: a row cut off by gpu.sh's time limit still shows how far it got.
  t = time.perf_counter()
  # Counted on the step's jaxpr (forward and backward of every round, no remat).
  model_flops = flops.train_step_flops(trainer.mcfg, cfg, trainer.abstract_params, batch)
  print(f"# train: FLOPs counted in {time.perf_counter() - t:.1f}s", flush=True)

  t = time.perf_counter()
  params = init_params(trainer.model, jax.random.key(0))
  state = trainer.init_state(params)
  del params
  jax.block_until_ready(state)
  print(f"# train: parameters initialised in {time.perf_counter() - t:.1f}s", flush=True)
  t = time.perf_counter()
  state, metrics = trainer.train_step(state, batch)  # compiles
  jax.block_until_ready(metrics["loss"])
  first_s = time.perf_counter() - t
  print(f"# train: first step (compiling) {first_s:.1f}s", flush=True)
  times = []
  for _ in range(args.repeats_train):
    t = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  peak = flops.peak_flops(jax.devices()[0].device_kind, args.dtype)
  row = dict(bench="train", metric="images/s", variant=variant, dtype=args.dtype,
             image_size=list(trainer.model.image_size), batch_per_device=args.train_batch,
             devices=jax.device_count(), masks_per_image=args.train_masks,
             prompt_rounds=cfg.prompts.num_rounds, remat=args.remat,
             attention=_attention_of(trainer.model),
             sam_jax=dict(first_call_s=first_s, times_s=times, median_s=median,
                          min_s=min(times), rate=cfg.batch_size / median,
                          loss=float(metrics["loss"])),
             model_parameters=sum(x.size for x in jax.tree.leaves(trainer.abstract_params)),
             model_tflop_per_step=model_flops / 1e12,
             model_tflop_per_s=model_flops / median / 1e12,
             peak_tflop_per_s=peak / 1e12 if peak else None,
             mfu=model_flops / median / (peak * jax.device_count()) if peak else None,
             device_peak_memory_gb=_peak_memory_gb(),
             # XLA's account at the timed batch, beside the measured peak: how
             # far the estimates of the batch search below can be trusted.
             compiled_memory_gb=_step_memory_gb(trainer, batch, args.train_batch))
  if args.train_batch_max:
    row.update(_largest_batch(trainer, state, batch, args, row["compiled_memory_gb"]))
  return [row]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="a 2-block 'tiny' model at 256 x 256 and few repeats: checks the harness")
  p.add_argument("--only", default=",".join(BENCHMARKS),
                 help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  p.add_argument("--variants", default=None, help="comma-separated: tiny, vit_b, vit_l, vit_h")
  p.add_argument("--image-size", type=int, default=None)
  p.add_argument("--batch", default="1", help="images per encoder call, comma-separated")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="the image encoder's compute dtype, on both sides")
  p.add_argument("--precision", default="highest", choices=("highest", "tf32"),
                 help="float32 matmuls on GPUs: full float32 (both sides) or TF32 (both sides)")
  p.add_argument("--attention", default="auto",
                 help="the sam_jax encoder's attention: IMPL or GLOBAL,WINDOW (auto, xla, cudnn)")
  p.add_argument("--attention-impls", default=None,
                 help="implementations the attention benchmark compares (default: xla, "
                      "plus cudnn on GPUs)")
  p.add_argument("--train-batch", type=int, default=None, help="training images per device")
  p.add_argument("--train-masks", type=int, default=None, help="masks per training image")
  p.add_argument("--train-batch-max", type=int, default=None,
                 help="also find the largest per-device batch that fits, up to this: "
                      "compiled only, from --train-batch (the TPU compile mode's search), "
                      "then two steps at the largest")
  p.add_argument("--memory-limit-gb", type=float, default=None,
                 help="device memory for the batch search (default: the device's own limit)")
  p.add_argument("--no-remat", dest="remat", action="store_false",
                 help="train without rematerialising the encoder blocks")
  p.add_argument("--prompts", default="1,16,64", help="prompts per image for the decoder")
  p.add_argument("--photos", default="512x512,1500x2250",
                 help="HxW sizes the photo is resized to for predict and amg, comma-separated; "
                      "the masks are made at that size (--quick: the first only)")
  p.add_argument("--points-per-side", type=int, default=None,
                 help="AMG grid (the reference's default is 32)")
  p.add_argument("--points-per-batch", type=int, default=64)
  p.add_argument("--crop-n-layers", type=int, default=None,
                 help="for engine: crop layers (the paper's 2; 0 with --quick)")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats for every benchmark")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads for the reference (default: torch's, one per core)")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--keep-going", action="store_true",
                 help="record a failing benchmark as an error row and go on")
  args = p.parse_args(argv)
  args.only = [b for b in args.only.split(",") if b]
  unknown = set(args.only) - set(BENCHMARKS)
  if unknown:
    p.error(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHMARKS}")
  args.variants = (args.variants or ("tiny" if args.quick else "vit_b")).split(",")
  args.batch = [int(b) for b in args.batch.split(",")]
  impls = args.attention.split(",")
  if len(impls) not in (1, 2):
    p.error("--attention is IMPL or GLOBAL,WINDOW")
  args.attention = (impls[0], impls[-1])
  gpu = jax.default_backend() == "gpu"
  args.attention_impls = (args.attention_impls.split(",") if args.attention_impls else
                          ["xla", "cudnn"] if gpu and args.dtype != "float32" else ["xla"])
  args.train_batch = args.train_batch or (2 if args.quick else 4)
  if (args.train_batch_max and not args.memory_limit_gb
      and "bytes_limit" not in (jax.devices()[0].memory_stats() or {})):
    p.error(f"--train-batch-max: {jax.devices()[0].device_kind} reports no memory limit; "
            "give one with --memory-limit-gb")
  args.train_masks = args.train_masks or (2 if args.quick else 64)
  args.image_size = args.image_size or (256 if args.quick else 1024)
  args.prompts = [int(n) for n in args.prompts.split(",")] if not args.quick else [2]
  sizes = [re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", s) for s in args.photos.split(",")]
  if not all(sizes):
    p.error(f"--photos takes HxW sizes such as 512x512,1500x2250, got {args.photos!r}")
  args.photos = [(int(m[1]), int(m[2])) for m in sizes]
  if args.quick:
    args.photos = args.photos[:1]
  if args.points_per_side is None:
    args.points_per_side = 4 if args.quick else 16
  if args.quick:
    args.points_per_batch = min(args.points_per_batch, 8)
  if args.crop_n_layers is None:
    args.crop_n_layers = 0 if args.quick else 2
  r = args.repeats
  args.repeats_encoder = r or (1 if args.quick else 3)
  args.repeats_decoder = r or (2 if args.quick else 10)
  args.repeats_predict = r or (2 if args.quick else 10)
  args.repeats_amg = r or (1 if args.quick else 2)
  args.repeats_attention = r or (2 if args.quick else 10)
  args.repeats_train = r or (2 if args.quick else 5)
  return args


def format_row(row: Dict[str, Any]) -> str:
  if "error" in row:
    return f"{row['bench']:9s} {row['variant']:6s} FAILED: {row['error']}"[:600]
  j, r = row["sam_jax"], row.get("reference")
  what = {"encoder": lambda: f"batch {row['batch']} {row['dtype']}",
          "attention": lambda: f"{row['block']} {row['mode']} {row['implementation']}",
          "decoder": lambda: f"{row['prompts']} prompts",
          "predict": lambda: "1 point, {}x{}".format(*row["image_hw"]),
          "amg": lambda: f"{row['points_per_side']}^2 points",
          "engine": lambda: (f"{row['images']} photos, {row['points_per_side']}^2 points, "
                             f"{row['crop_n_layers']} crop layers"),
          "train": lambda: f"batch {row['batch_per_device']} {row['dtype']}"}[row["bench"]]()
  extra = f"  compile {j['compile_s']:.1f}s" if "compile_s" in j else ""
  if "masks" in j:
    extra += f"  masks {j['masks']} vs {r['masks']}"
  if "masks_per_s" in j:
    extra += f"  masks/s {j['masks_per_s']:.1f} vs {r['masks_per_s']:.1f}"
  if "max_abs_diff_vs_xla" in row:
    extra += f"  |diff vs xla| {row['max_abs_diff_vs_xla']:.2e} of {row['max_abs_output']:.2e}"
  if r is None:
    mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
    return (f"{row['bench']:9s} {row['variant']:6s} {what:30s} sam_jax {j['median_s']*1e3:10.1f} ms"
            f"  {j['rate']:.2f} images/s  {row['model_tflop_per_s']:.1f} TFLOP/s  MFU {mfu}"
            f"  peak memory {row['device_peak_memory_gb']} GB"
            f" (XLA's {row['compiled_memory_gb']} GB)"
            f"  first step {j['first_call_s']:.1f}s"
            + (f"  largest batch {row['largest_batch_per_device']} in {row['memory_limit_gb']} GB"
               if "batch_search" in row else ""))
  return (f"{row['bench']:9s} {row['variant']:6s} {what:30s} sam_jax {j['median_s']*1e3:10.2f} ms"
          f"  reference {r['median_s']*1e3:10.2f} ms  speedup {row['speedup']:5.2f}x{extra}")


def _set_precision(precision: str) -> None:
  """Float32 matmuls on GPUs: both sides full float32, or both TF32."""
  if jax.default_backend() != "gpu":
    return
  import torch
  tf32 = precision == "tf32"
  jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.torch_threads:
    import torch
    torch.set_num_threads(args.torch_threads)
  _set_precision(args.precision)
  env = timing.environment()
  env["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
  env["precision"] = args.precision
  print(f"# {env['cpu']} x{env['cpu_count']}, jax {env['versions']['jax']} "
        f"({env['jax_backend']}: {env['jax_device_kind']}), torch {env['versions']['torch']} "
        f"({env['torch_device_name']}), load {env['loadavg']}", flush=True)
  image = astronaut()
  results: List[Dict[str, Any]] = []
  report = {"environment": env, "anchors": ANCHORS, "results": results}

  def write():
    if args.out:
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=float)

  fns = dict(encoder=bench_encoder, attention=bench_attention, decoder=bench_decoder,
             predict=bench_predict, amg=bench_amg, engine=bench_engine, train=bench_train)
  overrides = {"dtype": args.dtype, "image_encoder.attention": args.attention[0],
               "image_encoder.window_attention": args.attention[1]}
  for variant in args.variants:
    t = time.perf_counter()
    if args.only == ["train"]:  # no reference to compare with, no weights to share
      ref, model, params = None, jax_model(variant, args.image_size, **overrides), None
    else:
      ref, model, params = paired_models(variant, args.image_size, **overrides)
      ref = ref.to(timing.torch_device())
      # On the device once: host arrays would be copied to it at every call.
      params = jax.device_put(params)
    print(f"# {variant} at {args.image_size}: models built in {time.perf_counter() - t:.1f}s",
          flush=True)
    args.image = image
    for name in args.only:
      try:
        rows = fns[name](ref, model, params, variant, args)
      except Exception as e:  # noqa: BLE001 -- with --keep-going, one failure is a row
        if not args.keep_going:
          raise
        rows = [dict(bench=name, variant=variant, error=f"{type(e).__name__}: {e}")]
      for row in rows:
        row["loadavg_after"] = list(os.getloadavg())
        print(format_row(row), flush=True)
      results.extend(rows)
      write()
    del ref, model, params
    gc.collect()
  print("# published anchors (other hardware, for orientation): "
        + json.dumps(ANCHORS), flush=True)
  write()
  if args.out:
    print(f"# wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
