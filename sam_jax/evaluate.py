"""The SAM paper's prompt evaluation of checkpoints on datasets: one table, one plot.

  python -m sam_jax.evaluate --checkpoint RUN_A/export RUN_B/export \
      --data coco:instances_val2017.json:val2017 /data/sa1b_eval --output OUT

For every (dataset, checkpoint): mIoU after 1, 2, 3, 5 and 9 points (at one
point the default and the oracle of the 3 outputs), NoC@85 and NoC@90 (capped
at 20 clicks), box mIoU from the ground-truth boxes and, with `--boxes
dets.json` (a detector's boxes in COCO results format), COCO mask AP. Writes
OUT/results.json (every number with the protocol's settings) and
OUT/miou_vs_points.png, and prints a table. The protocol is
`sam_jax.train.evaluate`, the code that training evaluates with; see
docs/evaluation.md.

A checkpoint is a sam_jax checkpoint directory (`train.py` exports one to
WORKDIR/export; `convert_weights.py` writes one from SAM's .pth), or
`random:VARIANT` (vit_b, vit_l, vit_h) for randomly initialised weights, to
measure speed.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

PLOT = "miou_vs_points.png"
RESULTS = "results.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m sam_jax.evaluate", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", nargs="+", required=True,
                 help="sam_jax checkpoint directories (or random:VARIANT).")
  p.add_argument("--data", nargs="+", required=True,
                 help="coco:ANN.json:IMAGES_DIR, an SA-1B-layout folder (or sa1b:DIR), or "
                      "tfds:NAME:SPLIT[:DATA_DIR].")
  p.add_argument("--output", required=True, help="Folder for results.json and the plot.")
  p.add_argument("--boxes", nargs="+", default=None,
                 help="A detector's boxes in COCO results format (JSON list of image_id, "
                      "category_id, bbox [x, y, w, h], score): COCO mask AP, per --data entry "
                      "(one file per --data entry, COCO datasets only; '-' for none).")
  p.add_argument("--max_images", type=int, default=None,
                 help="Evaluate a seeded random subset of this many images per dataset.")
  p.add_argument("--max_masks", type=int, default=None,
                 help="At most this many masks per image (a seeded random subset).")
  p.add_argument("--seed", type=int, default=0, help="Seed of both subsamplings.")
  p.add_argument("--points", default="1,2,3,5,9", help="Numbers of points to report mIoU after.")
  p.add_argument("--max_clicks", type=int, default=20, help="NoC's cap.")
  p.add_argument("--images_per_call", type=int, default=None,
                 help="Images per encoder call (default: 4, or the device count if more).")
  p.add_argument("--overwrite", action="store_true",
                 help="Replace an earlier results.json and plot in --output.")
  return p.parse_args(argv)


def _protocol(args, num_devices: int):
  from sam_jax.train.evaluate import Protocol
  try:
    points = tuple(sorted({int(x) for x in args.points.split(",")}))
  except ValueError as e:
    raise ValueError(f"--points is a comma-separated list of integers, got {args.points!r}") from e
  if not points or points[0] < 1:
    raise ValueError(f"--points must be positive numbers of points, got {args.points!r}")
  per_call = args.images_per_call or max(4, num_devices)
  return Protocol(points=points, max_clicks=args.max_clicks, images_per_call=per_call)


def _load(checkpoint: str):
  """(model, params, label) of a checkpoint directory or of `random:VARIANT`."""
  import jax
  from sam_jax.build import build_sam, model_config
  from sam_jax.checkpoint import init_params, load_sam
  if checkpoint.startswith("random:"):
    variant = checkpoint.split(":", 1)[1]
    model = build_sam(model_config(variant))
    return model, init_params(model, jax.random.key(0)), checkpoint
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"The checkpoint {checkpoint} does not exist (a sam_jax checkpoint "
                            "directory, e.g. a training run's WORKDIR/export, or random:VARIANT).")
  model, params = load_sam(checkpoint)
  return model, params, checkpoint


def _detections(path: str, dataset) -> List[Dict]:
  from sam_jax.train.eval_data import CocoDataset
  if not isinstance(dataset, CocoDataset):
    raise ValueError(f"--boxes {path}: mask AP needs a COCO dataset (coco:ANN.json:IMAGES_DIR), "
                     f"not {dataset.description}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"The detections file {path} does not exist.")
  with open(path) as f:
    try:
      dets = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON ({e}).") from e
  need = ("image_id", "category_id", "bbox", "score")
  if not isinstance(dets, list) or not all(isinstance(d, dict) and all(k in d for k in need)
                                           for d in dets):
    raise ValueError(f"{path} is not in COCO results format: a JSON list of objects with "
                     f"{', '.join(need)}.")
  return dets


def _label(path: str, others: Sequence[str]) -> str:
  """A short name: the last folder names that tell the paths apart."""
  parts = os.path.normpath(path).split(os.sep)
  for n in range(1, len(parts) + 1):
    short = os.sep.join(parts[-n:])
    if sum(os.sep.join(os.path.normpath(o).split(os.sep)[-n:]) == short for o in others) == 1:
      return short
  return path


def table(runs: List[Dict], points: Sequence[int]) -> str:
  """The printed table: a row per (dataset, checkpoint)."""
  head = (["dataset", "checkpoint", "masks", "1pt", "1pt-oracle"] + [f"{k}pt" for k in points
                                                                       if k > 1]
          + ["NoC85", "NoC90", "box", "AP"])
  rows = []
  for r in runs:
    m = r["metrics"]
    ap = r.get("mask_ap")
    rows.append([r["dataset_label"], r["checkpoint_label"], str(m["num_masks"]),
                 f"{m['miou_1point_default']:.3f}", f"{m['miou_1point_oracle']:.3f}"]
                + [f"{m['miou_points'][str(k)]:.3f}" for k in points if k > 1]
                + [f"{m['noc85']:.2f}", f"{m['noc90']:.2f}", f"{m['miou_box']:.3f}",
                   "-" if ap is None else f"{ap['AP']:.3f}"])
  widths = [max(len(x) for x in col) for col in zip(head, *rows)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(path: str, runs: List[Dict], points: Sequence[int]) -> None:
  """mIoU against the number of points: a line per (dataset, checkpoint), oracle at 1 marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for r in runs:
    m = r["metrics"]
    line, = ax.plot(points, [m["miou_points"][str(k)] for k in points], marker="o",
                    label=f"{r['checkpoint_label']} on {r['dataset_label']}")
    ax.plot([1], [m["miou_1point_oracle"]], marker="*", markersize=10, color=line.get_color(),
            linestyle="none")
  ax.set_xlabel("number of points")
  ax.set_ylabel("mIoU")
  ax.set_xticks(list(points))
  ax.set_title("mIoU vs points (star: oracle of 3 at 1 point)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
  args = parse_args(argv)
  outputs = [os.path.join(args.output, f) for f in (RESULTS, PLOT)]
  if not args.overwrite and any(os.path.exists(f) for f in outputs):
    raise FileExistsError(f"{args.output} already holds results; pass --overwrite to replace "
                          "them, or choose another --output.")
  if args.boxes and len(args.boxes) != len(args.data):
    raise ValueError(f"--boxes takes one file per --data entry ({len(args.data)}), got "
                     f"{len(args.boxes)}.")
  import jax
  from sam_jax.predictor import SamPredictor
  from sam_jax.train import eval_data, evaluate

  protocol = _protocol(args, jax.local_device_count())
  # Every input is checked before the first (slow) evaluation.
  datasets = [eval_data.open_dataset(s, args.max_masks, args.seed) for s in args.data]
  subsets = [eval_data.subsample(len(d), args.max_images, args.seed) for d in datasets]
  for d, idx in zip(datasets, subsets):
    eval_data.check_not_empty(d, idx)
  dets = [None if b in (None, "-") else _detections(b, d)
          for b, d in zip(args.boxes or [None] * len(datasets), datasets)]
  for c in args.checkpoint:
    if not c.startswith("random:") and not os.path.isdir(c):
      raise FileNotFoundError(f"The checkpoint {c} does not exist (a sam_jax checkpoint "
                              "directory, e.g. a training run's WORKDIR/export, or random:VARIANT).")
  devices = jax.local_devices()
  mesh = None
  if len(devices) > 1:
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))

  runs = []
  for c in args.checkpoint:
    model, params, _ = _load(c)
    predictor = SamPredictor(model, params, mesh=mesh)
    for spec, d, idx, det in zip(args.data, datasets, subsets, dets):
      print(f"{c} on {d.description} ({len(idx)} of {len(d)} images)", flush=True)
      t0 = time.time()
      scores = evaluate.run(predictor, d, protocol, idx, progress=True)
      seconds = time.time() - t0
      if not len(scores["image"]):
        raise ValueError(f"{d.description} has no masks to evaluate in its {len(idx)} images.")
      run = dict(checkpoint=c, dataset=dict(spec=spec, description=d.description, size=len(d),
                                            evaluated_images=len(idx)),
                 metrics=evaluate.summarize(scores, protocol), seconds=seconds,
                 images_per_s=len(idx) / seconds,
                 masks_per_s=len(scores["image"]) / seconds)
      if det is not None:
        run["mask_ap"] = evaluate.mask_ap(predictor, d, d.coco, det, idx,
                                          protocol.images_per_call, progress=True)
      runs.append(run)
  for r in runs:
    r["checkpoint_label"] = _label(r["checkpoint"], args.checkpoint)
    r["dataset_label"] = _label(r["dataset"]["spec"], args.data)
  result = dict(protocol=dict(protocol.settings(), seed=args.seed, max_images=args.max_images,
                              max_masks=args.max_masks),
                devices=f"{len(devices)} x {devices[0].device_kind}", runs=runs)
  if jax.process_index() == 0:
    os.makedirs(args.output, exist_ok=True)
    with open(outputs[0], "w") as f:
      json.dump(result, f, indent=2)
    plot(outputs[1], runs, protocol.points)
    print(table(runs, protocol.points))
    for r in runs:
      print(f"{r['checkpoint_label']} on {r['dataset_label']}: {r['seconds']:.1f} s, "
            f"{r['images_per_s']:.3g} images/s, {r['masks_per_s']:.3g} masks/s")
    print(f"Wrote {outputs[0]} and {outputs[1]}")
  return result


def cli() -> None:
  try:
    main()
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli()
