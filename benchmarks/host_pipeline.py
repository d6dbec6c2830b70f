"""Images per second of the training input pipeline (sam_jax/train/data.py) on SA-1B-sized examples.

  python -m benchmarks.host_pipeline --images 8 --workers 1,2 --batches 4

Generates `--images` examples as SA-1B has them (a ~1500x2250 JPEG and ~100
COCO-RLE masks each), then times `data.train_batches` (decode, resize, pad,
mask sampling and downscaling) with each number of worker threads. Set the
result against what the chips consume (images per second per chip from the
compile report: global batch / step time / chips); docs/tpu.md. Images per
CPU-second (the process's CPU time, all threads) is the rate per busy host core,
which a loaded machine does not change much; images/s is wall time.
"""

import argparse
import io
import json
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.train import data as data_lib


def sa1b_like_record(rng: np.random.Generator, hw=(1500, 2250), num_masks: int = 100):
  """One record in TFDS `segment_anything`'s features: a photo-like JPEG and RLE masks."""
  h, w = hw
  # Smooth colour fields plus noise: JPEG sizes near a photo's (a flat image compresses to nothing).
  small = rng.integers(0, 256, (h // 50 + 1, w // 50 + 1, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int16)
  img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=90)
  yy, xx = np.mgrid[:h, :w]
  counts, sizes, areas = [], [], []
  for _ in range(num_masks):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(20, h / 4), rng.uniform(20, w / 4)
    m = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(m))
    counts.append(rle["counts"].decode())
    sizes.append([h, w])
    areas.append(float(m.sum()))
  return {"image": {"content": buf.getvalue()},
          "annotations": {"segmentation": {"counts": counts, "size": sizes}, "area": areas}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=8, help="distinct generated examples")
  p.add_argument("--workers", default="1,2", help="worker-thread counts to time")
  p.add_argument("--batch", type=int, default=4, help="images per batch (one host's rows)")
  p.add_argument("--batches", type=int, default=4, help="timed batches per worker count")
  p.add_argument("--max_masks", type=int, default=64, help="masks per image (the paper's 64)")
  p.add_argument("--output", default="", help="also write the results as JSON here")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  t0 = time.time()
  records = [sa1b_like_record(rng) for _ in range(args.images)]
  jpeg_kb = np.mean([len(r["image"]["content"]) for r in records]) / 1024
  print(f"generated {args.images} examples ({jpeg_kb:.0f} KB JPEG, 100 masks each) in "
        f"{time.time() - t0:.1f} s", flush=True)
  # ViT at 1024 x 1024; masks at the decoder's 256 x 256 (data.open_examples' sizes).
  src = data_lib.Sa1bExamples(records, 1024, 256, args.max_masks, description="generated")
  rows = []
  for workers in [int(x) for x in args.workers.split(",")]:
    it = data_lib.train_batches(src, args.batch, seed=0, start_step=0, prefetch=1,
                                num_threads=workers)
    next(it)  # warm-up (thread pool start, first decode)
    t0, c0 = time.time(), time.process_time()
    for _ in range(args.batches):
      next(it)
    dt, cpu = time.time() - t0, time.process_time() - c0
    it.close()
    n = args.batch * args.batches
    ips = n / dt
    # Images per CPU-second of this process (all its threads): what one busy host core
    # delivers, whatever else shares the machine.
    rows.append(dict(workers=workers, images_per_s=ips, images_per_s_per_worker=ips / workers,
                     images_per_cpu_second=n / cpu))
    print(f"{workers} worker thread(s): {ips:.2f} images/s ({ips / workers:.2f} per worker), "
          f"{n / cpu:.2f} images per CPU-second", flush=True)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(dict(args=vars(args), jpeg_kb=jpeg_kb, rows=rows), f, indent=2)
  return rows


if __name__ == "__main__":
  main()
