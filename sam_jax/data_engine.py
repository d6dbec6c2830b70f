"""The data engine (SAM paper, §4): annotates an image collection in SA-1B's layout.

  python -m sam_jax.data_engine annotate --checkpoint CKPT --input IMAGES --output OUT
  python -m sam_jax.data_engine annotate ... --existing HUMAN_JSONS   # the semi-automatic stage
  python -m sam_jax.data_engine score --auto OUT --reference GT_DIR

`annotate` runs the automatic mask generator, with the paper's fully automatic
settings unless flags say otherwise, over every jpg/png under IMAGES
(recursively) or a TFDS dataset (`--input tfds:NAME:SPLIT`), and writes
`OUT/NAME.jpg` (or `.png`, the input's bytes unchanged) beside `OUT/NAME.json`
in SA-1B's schema, which `train.py --config.data.train_dir=OUT` reads. The
images of a batch are embedded together, split over the local devices; with
several processes (`--distributed`, or the three flags spelled out, as
train.py) each takes its own disjoint share of the images. A rerun skips the
images already written (each JSON appears by an atomic rename, after its
image), SIGTERM stops after the image in hand (exit status 75, as train.py), and a corrupt image is listed
in `OUT/engine_stats.json` and skipped. See docs/data_engine.md.
"""

import argparse
import dataclasses
import io
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# SIGTERM's clean stop exits as train.py's does (docs/preemption.md).
from sam_jax.train.preemption import EXIT_CODE as PREEMPTED_EXIT

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
STATS_FILE = "engine_stats.json"
RUN_FILE = "engine_run.json"  # the settings of the run that owns OUT; a rerun must match them
TMP_SUFFIX = ".engine-tmp"
SOURCE_KEY = "source"  # where an annotation came from ("auto" or "human"); readers ignore it

# The paper's fully automatic stage (Kirillov et al., "Segment Anything", 2023,
# Appendix B, "Automatic mask generation details"): a 32x32 point grid on the
# image plus 2x2 and 4x4 overlapping crops with 16x16 and 8x8 grids; predicted
# IoU >= 88.0; stability (IoU of the masks cut at logits -1 and +1) >= 95.0;
# box NMS at 0.7 within and across crops; components and holes under 100
# pixels removed; masks covering 95% or more of the image dropped.
# (flag, type, default, help) for every `SamAutomaticMaskGenerator` setting.
GENERATOR_FLAGS = [
    ("points-per-side", int, 32, "Points along each side of the full-image grid."),
    ("points-per-batch", int, 64, "Points decoded together; more is faster, uses more memory."),
    ("pred-iou-thresh", float, 0.88, "Keep masks whose predicted IoU is above this."),
    ("stability-score-thresh", float, 0.95, "Keep masks at least this stable."),
    ("stability-score-offset", float, 1.0, "Logit offset of the stability score's two cuts."),
    ("box-nms-thresh", float, 0.7, "Box IoU above which NMS drops a duplicate within a crop."),
    ("crop-n-layers", int, 2, "Crop layers: layer i has (2^i)^2 crops (the paper's 2x2, 4x4)."),
    ("crop-nms-thresh", float, 0.7, "Box IoU for NMS between masks of different crops."),
    ("crop-overlap-ratio", float, 512 / 1500, "Crop overlap, as a fraction of the short side."),
    ("crop-n-points-downscale-factor", int, 2, "Layer i has points-per-side / factor^i points."),
    ("min-mask-region-area", int, 100, "Remove islands and fill holes under this many pixels."),
    ("crops-per-encode", int, 0, "Crops embedded per encoder call, split over the local devices "
                                 "(0: 4 per device)."),
]
MAX_MASK_FRACTION = 0.95  # the paper's last filter: masks covering this much are dropped


def generator_flag_names() -> List[str]:
  return [flag.replace("-", "_") for flag, _, _, _ in GENERATOR_FLAGS]


# --- inputs ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
  """One input image: its output name, where it came from, and how to read its bytes."""
  name: str
  where: str
  read: Callable[[], bytes]


def _is_inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_file(path: str) -> Callable[[], bytes]:
  def read() -> bytes:
    with open(path, "rb") as f:
      return f.read()
  return read


def folder_items(root: str) -> List[Item]:
  """Every jpg/png under `root`, sorted; a file's name is its path below `root`, '/' -> '__'."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--input {root} is not a folder.")
  items, seen = [], {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      stem, ext = os.path.splitext(f)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      path = os.path.join(dirpath, f)
      rel = os.path.relpath(os.path.join(dirpath, stem), root)
      name = rel.replace(os.sep, "__")
      if name in seen:
        raise ValueError(f"{seen[name]} and {path} would both be written as {name}: rename one.")
      seen[name] = path
      items.append(Item(name, path, _read_file(path)))
  return sorted(items, key=lambda it: it.name)


def tfds_items(spec: str, data_dir: Optional[str]) -> List[Item]:
  """`tfds:NAME:SPLIT`: a registered TFDS dataset, or a prepared one's directory, by index.

  The image bytes are read as stored (not decoded by TFDS): the `image`
  feature, or `image/content` in `segment_anything`'s features.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415 - only for this input
  try:
    _, name, split = spec.split(":")
  except ValueError:
    raise ValueError(f"--input {spec}: write tfds:NAME:SPLIT, e.g. tfds:segment_anything:train"
                     ) from None
  if os.path.isdir(name):
    builder = tfds.builder_from_directory(name)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
  image = builder.info.features["image"]
  if isinstance(image, tfds.features.FeaturesDict):
    decoders, content = {"image": {"content": tfds.decode.SkipDecoding()}}, ("image", "content")
  else:
    decoders, content = {"image": tfds.decode.SkipDecoding()}, ("image",)
  source = builder.as_data_source(split, decoders=decoders)
  label = re.sub(r"[^A-Za-z0-9_]", "_", f"{builder.name}_{split}")

  def reader(i: int) -> Callable[[], bytes]:
    def read() -> bytes:
      value = source[i]
      for key in content:
        value = value[key]
      return bytes(value)
    return read
  return [Item(f"{label}_{i:08d}", f"{spec}[{i}]", reader(i)) for i in range(len(source))]


def decode_image(content: bytes) -> Tuple[np.ndarray, str]:
  """Bytes -> ((H, W, 3) uint8 RGB, the extension to store them under); raises if corrupt.

  Decoded by PIL with no EXIF rotation, as the training reader decodes them,
  so that the masks line up with what training sees.
  """
  with Image.open(io.BytesIO(content)) as im:
    fmt = im.format
    rgb = np.asarray(im.convert("RGB"))
  ext = {"JPEG": ".jpg", "PNG": ".png"}.get(fmt)
  if ext is None:
    raise ValueError(f"{fmt} image: the SA-1B layout holds JPEG or PNG.")
  return rgb, ext


# --- records --------------------------------------------------------------


def sa1b_record(name: str, image_id: int, file_name: str, height: int, width: int,
                masks: Sequence[Dict[str, Any]], max_mask_fraction: float) -> Dict[str, Any]:
  """The generator's coco_rle records as SA-1B's JSON: `image` and `annotations`."""
  annotations = []
  for m in masks:
    if m["area"] >= max_mask_fraction * height * width:
      continue
    annotations.append(dict(
        id=len(annotations), segmentation=m["segmentation"], bbox=[float(x) for x in m["bbox"]],
        area=int(m["area"]), predicted_iou=float(m["predicted_iou"]),
        stability_score=float(m["stability_score"]),
        point_coords=[[float(x) for x in p] for p in m["point_coords"]],
        crop_box=[float(x) for x in m["crop_box"]], **{SOURCE_KEY: "auto"}))
  return dict(image=dict(image_id=image_id, width=width, height=height, file_name=file_name),
              annotations=annotations)


def compressed_rle(segmentation, height: int, width: int) -> Dict[str, Any]:
  """A COCO segmentation (compressed or uncompressed RLE, or polygons) as pycocotools' RLE."""
  if isinstance(segmentation, list):
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  if isinstance(segmentation.get("counts"), list):
    return mask_utils.frPyObjects(segmentation, *segmentation["size"])
  counts = segmentation["counts"]
  return dict(size=list(segmentation["size"]),
              counts=counts.encode("ascii") if isinstance(counts, str) else counts)


def mask_ious(a: Sequence[Dict], b: Sequence[Dict]) -> np.ndarray:
  """(len(a), len(b)) IoUs of two lists of compressed RLEs."""
  if not a or not b:
    return np.zeros((len(a), len(b)))
  return np.asarray(mask_utils.iou(list(a), list(b), [0] * len(b)), np.float64).reshape(
      len(a), len(b))


def merge_human(record: Dict[str, Any], human: Dict[str, Any], iou_thresh: float
                ) -> Dict[str, Any]:
  """The semi-automatic stage: every human mask as it is, plus the automatic masks that
  overlap none of them with an IoU above `iou_thresh`."""
  h, w = record["image"]["height"], record["image"]["width"]
  kept = [dict(a, **{SOURCE_KEY: "human"}) for a in human.get("annotations", [])]
  human_rles = []
  for i, a in enumerate(kept):
    rle = compressed_rle(a["segmentation"], h, w)
    if [int(s) for s in rle["size"]] != [h, w]:
      raise ValueError(f"human mask {i} is {tuple(rle['size'])} on an image of {(h, w)}")
    human_rles.append(rle)
  auto = record["annotations"]
  ious = mask_ious([compressed_rle(a["segmentation"], h, w) for a in auto], human_rles)
  next_id = 1 + max([int(a["id"]) for a in kept if "id" in a] + [-1])
  for a, row in zip(auto, ious):
    if row.size and row.max() > iou_thresh:
      continue
    kept.append(dict(a, id=next_id))
    next_id += 1
  image = dict(record["image"])
  if "image_id" in (human.get("image") or {}):
    image["image_id"] = human["image"]["image_id"]
  return dict(image=image, annotations=kept)


# --- writing --------------------------------------------------------------


def atomic_write(path: str, content: bytes) -> None:
  """Writes under a temporary name, then renames: `path` is either absent or complete."""
  tmp = path + TMP_SUFFIX
  with open(tmp, "wb") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def is_done(output: str, name: str) -> bool:
  """An image is done when its JSON exists: the JSON is renamed into place last."""
  return os.path.exists(os.path.join(output, name + ".json"))


def check_output(output: str, inputs: str, settings: Dict[str, Any], claim: bool = True) -> None:
  """OUT is new, empty, or an earlier run's with the same settings; never inside the input.

  `claim`: records the settings in OUT (one process does; the others check them).
  """
  if not inputs.startswith("tfds:") and _is_inside(output, inputs):
    raise ValueError(f"--output {output} is inside --input {inputs}: its images would be read "
                     "as input on a rerun. Choose an output folder outside the input.")
  run_file = os.path.join(output, RUN_FILE)
  if os.path.exists(run_file):
    with open(run_file) as f:
      before = json.load(f)
    diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if diff:
      raise ValueError(
          f"{output} was annotated with other settings ({', '.join(diff)}: "
          f"{[before.get(k) for k in diff]} then, {[settings.get(k) for k in diff]} now). "
          "Rerun with the same command to resume, or choose a new --output.")
  elif os.path.isdir(output) and [f for f in os.listdir(output) if not f.endswith(TMP_SUFFIX)]:
    raise ValueError(f"--output {output} holds files that the data engine did not write. "
                     "Choose a new or empty folder.")
  if claim:
    os.makedirs(output, exist_ok=True)
    atomic_write(run_file, json.dumps(settings, indent=1, sort_keys=True).encode())


def _rate(n: float, seconds: float) -> float:
  return round(n / seconds, 4) if seconds > 0 else 0.0


def process_stats(done: int, masks: int, skipped: int, corrupt: Dict[str, str],
                  seconds: float, stopped: Optional[str]) -> Dict[str, Any]:
  return dict(images=done, masks=masks, already_done=skipped, corrupt=corrupt,
              seconds=round(seconds, 3), images_per_s=_rate(done, seconds),
              masks_per_s=_rate(masks, seconds), stopped=stopped)


def merge_stats(per_process: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """Every process's figures and the total (rates over the slowest process's time)."""
  seconds = max([p["seconds"] for p in per_process.values()] + [0.0])
  images = sum(p["images"] for p in per_process.values())
  masks = sum(p["masks"] for p in per_process.values())
  corrupt = {}
  for p in per_process.values():
    corrupt.update(p["corrupt"])
  total = dict(images=images, masks=masks,
               already_done=sum(p["already_done"] for p in per_process.values()),
               corrupt=corrupt, seconds=seconds, images_per_s=_rate(images, seconds),
               masks_per_s=_rate(masks, seconds))
  return dict(processes=per_process, total=total)


def write_stats(output: str, process_index: int, process_count: int,
                stats: Dict[str, Any]) -> None:
  """This process's stats file, then (process 0) OUT/engine_stats.json from all of them."""
  atomic_write(os.path.join(output, f"engine_stats.process_{process_index}.json"),
               json.dumps(stats, indent=1).encode())
  if process_index != 0:
    return
  per_process = {}
  for f in sorted(os.listdir(output)):
    match = re.fullmatch(r"engine_stats\.process_(\d+)\.json", f)
    if match and int(match.group(1)) < process_count:  # not a larger earlier run's
      with open(os.path.join(output, f)) as fh:
        per_process[match.group(1)] = json.load(fh)
  atomic_write(os.path.join(output, STATS_FILE), json.dumps(merge_stats(per_process),
                                                            indent=1).encode())


# --- annotate -------------------------------------------------------------


class _StopOnSigterm:
  """SIGTERM sets a flag, read between images: the image in hand is finished and written.

  Not train.preemption.Notice: its processes agree on a step by numbered sync
  points, but here each process stops alone, after a different number of images.
  """

  def __init__(self):
    self.stopped = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.stopped = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
  """What decides the output: a rerun into the same OUT must give the same."""
  s = {n: getattr(args, n) for n in generator_flag_names() if n != "crops_per_encode"}
  s.update(checkpoint=os.path.abspath(args.checkpoint), point_grids=args.point_grids,
           max_mask_fraction=args.max_mask_fraction,
           existing=args.existing and os.path.abspath(args.existing),
           merge_iou_thresh=args.merge_iou_thresh if args.existing else None,
           input=args.input if args.input.startswith("tfds:") else os.path.abspath(args.input))
  return s


def _load_point_grids(path: Optional[str]) -> Optional[List[np.ndarray]]:
  if path is None:
    return None
  with np.load(path) as grids:
    return [grids[k] for k in sorted(grids.files, key=lambda k: int(re.sub(r"\D", "", k) or 0))]


def make_generator(args: argparse.Namespace, model, params, mesh):
  from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator  # noqa: PLC0415
  kwargs = {n: getattr(args, n) for n in generator_flag_names()}
  if args.point_grids is not None:
    kwargs["points_per_side"] = None
    kwargs["point_grids"] = _load_point_grids(args.point_grids)
  if not kwargs["crops_per_encode"]:
    kwargs["crops_per_encode"] = 4 * mesh.devices.size
  return SamAutomaticMaskGenerator(model, params, output_mode="coco_rle", mesh=mesh, **kwargs)


def _read_human(existing: str, name: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(existing, name + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def annotate(args: argparse.Namespace, loaded=None) -> int:
  """The `annotate` command; `loaded`: (model, params) in place of reading --checkpoint."""
  import jax  # noqa: PLC0415 - after jax.distributed is initialised

  from sam_jax.checkpoint import load_sam  # noqa: PLC0415

  items = (tfds_items(args.input, args.tfds_data_dir) if args.input.startswith("tfds:")
           else folder_items(args.input))
  if not items:
    raise ValueError(f"--input {args.input} holds no jpg or png images (searched recursively).")
  if args.existing and not os.path.isdir(args.existing):
    raise FileNotFoundError(f"--existing {args.existing} is not a folder.")
  pid, count = jax.process_index(), jax.process_count()
  # Every process checks (a bad OUT stops them all, none left waiting); process 0 claims OUT.
  check_output(args.output, args.input, _settings(args), claim=pid == 0)
  os.makedirs(args.output, exist_ok=True)
  share = items[pid::count]  # disjoint, and together every image
  todo = [it for it in share if not is_done(args.output, it.name)]
  already = len(share) - len(todo)
  index = {it.name: i for i, it in enumerate(items)}  # image_id: the position in the input

  model, params = loaded or load_sam(args.checkpoint)
  mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices(),
                       axis_types=(jax.sharding.AxisType.Auto,))
  generator = make_generator(args, model, params, mesh)
  batch = args.batch_size or jax.local_device_count()

  from tqdm import tqdm  # noqa: PLC0415
  done = masks = 0
  corrupt: Dict[str, str] = {}
  stopped = None
  start = time.perf_counter()
  bar = tqdm(total=len(todo), unit="image", desc=f"annotate (process {pid})" if count > 1
             else "annotate", disable=args.quiet)
  with _StopOnSigterm() as signals:
    for first in range(0, len(todo), batch):
      if signals.stopped:
        break
      ready = []
      for it in todo[first:first + batch]:
        try:
          content = it.read()
          image, ext = decode_image(content)
          if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError("empty image")
        except Exception as e:  # noqa: BLE001 - one bad file must never end a run
          corrupt[it.where] = f"{type(e).__name__}: {e}"
          logging.warning("Skipping %s: %s", it.where, corrupt[it.where])
          bar.update(1)
          continue
        ready.append((it, content, image, ext))
      if not ready:
        continue
      results = generator.generate_batch([image for _, _, image, _ in ready])
      for (it, content, image, ext), records in zip(ready, results):
        h, w = image.shape[:2]
        record = sa1b_record(it.name, index[it.name], it.name + ext, h, w, records,
                             args.max_mask_fraction)
        if args.existing:
          try:
            human = _read_human(args.existing, it.name)
            if human is not None:
              record = merge_human(record, human, args.merge_iou_thresh)
          except Exception as e:  # noqa: BLE001 - listed, and the image left for a rerun
            where = os.path.join(args.existing, it.name + ".json")
            corrupt[where] = f"{type(e).__name__}: {e}"
            logging.warning("Skipping %s: its human masks %s: %s", it.where, where,
                            corrupt[where])
            bar.update(1)
            continue
        atomic_write(os.path.join(args.output, it.name + ext), content)
        atomic_write(os.path.join(args.output, it.name + ".json"), json.dumps(record).encode())
        done += 1
        masks += len(record["annotations"])
        seconds = time.perf_counter() - start
        bar.set_postfix_str(f"{done / seconds:.3g} images/s, {masks / seconds:.3g} masks/s")
        bar.update(1)
        if signals.stopped:
          break
    bar.close()
  if signals.stopped and done + len(corrupt) < len(todo):
    stopped = "SIGTERM"
  stats = process_stats(done, masks, already, corrupt, time.perf_counter() - start, stopped)
  if count > 1 and stopped is None:  # process 0 merges every process's stats once all are written
    from sam_jax.train import sharding  # noqa: PLC0415
    if pid:
      write_stats(args.output, pid, count, stats)
    sharding.sync_processes("sam_jax data_engine annotated")
    if not pid:
      write_stats(args.output, pid, count, stats)
  else:  # a stopped process does not wait for the others: process 0 merges what is there
    write_stats(args.output, pid, count, stats)
  if stopped:
    print(f"Stopped by SIGTERM after {done} images, every finished one written; rerun the "
          "same command to annotate the rest.", file=sys.stderr)
    return PREEMPTED_EXIT
  print(f"{done} images annotated ({masks} masks), {already} done before, {len(corrupt)} "
        f"unreadable; {os.path.join(args.output, STATS_FILE)}", file=sys.stderr)
  return 0


# --- score ----------------------------------------------------------------

THRESHOLDS = (0.5, 0.75, 0.9)


def _load_rles(path: str) -> Tuple[List[Dict[str, Any]], Tuple[int, int]]:
  with open(path) as f:
    record = json.load(f)
  info = record.get("image") or {}
  h, w = info.get("height"), info.get("width")
  rles = []
  for a in record.get("annotations", []):
    if h is None:
      h, w = a["segmentation"]["size"]
    rles.append(compressed_rle(a["segmentation"], h, w))
  return rles, (h, w)


def score(auto: str, reference: str) -> Dict[str, Any]:
  """For each reference mask, the IoU of the best-matching automatic mask (the paper's §5)."""
  names = sorted(f[:-5] for f in os.listdir(reference)
                 if f.endswith(".json") and not f.startswith("engine_"))
  if not names:
    raise FileNotFoundError(f"--reference {reference} holds no NAME.json files.")
  best, auto_counts, ref_counts, missing = [], [], [], []
  for name in names:
    ref, size = _load_rles(os.path.join(reference, name + ".json"))
    path = os.path.join(auto, name + ".json")
    if os.path.exists(path):
      masks, auto_size = _load_rles(path)
      if masks and ref and tuple(auto_size) != tuple(size):
        raise ValueError(f"{name}: automatic masks are {auto_size}, reference masks {size}.")
    else:
      masks = []
      missing.append(name)
    ious = mask_ious(ref, masks)
    best += list(ious.max(1)) if masks else [0.0] * len(ref)
    auto_counts.append(len(masks))
    ref_counts.append(len(ref))
  best = np.asarray(best, np.float64)
  return dict(
      images=len(names), missing_images=missing, reference_masks=int(best.size),
      mean_best_iou=float(best.mean()) if best.size else 0.0,
      matched={f"{t}": float((best >= t).mean()) if best.size else 0.0 for t in THRESHOLDS},
      auto_masks_per_image=float(np.mean(auto_counts)),
      reference_masks_per_image=float(np.mean(ref_counts)))


def score_table(result: Dict[str, Any]) -> str:
  rows = [("images", f"{result['images']} ({len(result['missing_images'])} not annotated)"),
          ("reference masks", str(result["reference_masks"])),
          ("mean best IoU", f"{result['mean_best_iou']:.3f}")]
  rows += [(f"matched at IoU >= {t}", f"{v:.1%}") for t, v in result["matched"].items()]
  rows += [("masks per image (auto / reference)",
            f"{result['auto_masks_per_image']:.1f} / {result['reference_masks_per_image']:.1f}")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- a model-in-the-loop round on the demo's shapes ------------------------


def _round_config(train_dir: str, eval_dir: str, steps: int, seed: int, eval_images: int):
  from configs import demo  # noqa: PLC0415
  c = demo.get_config("quick")
  c.data.generate = None
  c.data.train_dir, c.data.eval_dir = train_dir, eval_dir
  c.total_steps, c.seed = steps, seed
  c.optim.decay_steps = (int(steps * 5 / 6),)
  c.checkpoint_every, c.export = steps, True
  c.eval.num_images, c.eval.before_training = eval_images, False
  return c


def _link_examples(src: str, dst: str) -> int:
  """Hard-links (else copies) into `dst` every example of `src` that has a mask; returns their
  number. An image without masks teaches nothing and takes a batch row from one that does."""
  import shutil  # noqa: PLC0415
  os.makedirs(dst, exist_ok=True)
  n = 0
  for f in sorted(os.listdir(src)):
    stem, ext = os.path.splitext(f)
    ann = os.path.join(src, stem + ".json")
    if ext.lower() not in IMAGE_EXTENSIONS or not os.path.exists(ann):
      continue
    if not _read_json(ann)["annotations"]:
      continue
    for g in (f, stem + ".json"):
      if not os.path.exists(os.path.join(dst, g)):
        try:
          os.link(os.path.join(src, g), os.path.join(dst, g))
        except OSError:
          shutil.copy(os.path.join(src, g), os.path.join(dst, g))
    n += 1
  return n


def engine_round(args: argparse.Namespace) -> Dict[str, Any]:
  """Train on the labelled shapes; annotate the unlabelled ones; retrain on both; compare.

  Every arm trains from scratch for the same steps with the same seed, and is
  scored on the same held-out images (the trainer's 1-point, box and 5-click mIoU).
  """
  import jax  # noqa: PLC0415

  from sam_jax.train import demo_data, trainer  # noqa: PLC0415
  w = os.path.abspath(args.workdir)
  if not jax.config.jax_compilation_cache_dir:  # the arms' training steps compile once
    jax.config.update("jax_compilation_cache_dir", os.path.join(w, "jax_cache"))
  d = os.path.join(w, "data")
  labelled, unlabelled_gt = os.path.join(d, "labelled"), os.path.join(d, "unlabelled_gt")
  unlabelled, heldout = os.path.join(d, "unlabelled_images"), os.path.join(d, "heldout")
  size, shapes = 128, 5  # as configs/demo.py
  demo_data.write_dataset(labelled, args.num_labelled, size, shapes, seed=10, prefix="lab_")
  demo_data.write_dataset(unlabelled_gt, args.num_unlabelled, size, shapes, seed=11,
                          prefix="unl_")
  demo_data.write_dataset(heldout, args.num_heldout, size, shapes, seed=12, prefix="held_")
  os.makedirs(unlabelled, exist_ok=True)
  for f in os.listdir(unlabelled_gt):
    if f.endswith(".jpg") and not os.path.exists(os.path.join(unlabelled, f)):
      os.link(os.path.join(unlabelled_gt, f), os.path.join(unlabelled, f))

  def train(name: str, train_dir: str) -> Dict[str, Any]:
    config = _round_config(train_dir, heldout, args.steps, args.seed, args.num_heldout)
    summary = trainer.train_and_evaluate(config, os.path.join(w, name))
    t = summary["trained"]
    return dict(train_images=sum(f.endswith(".json") for f in os.listdir(train_dir)),
                miou_1point=t["miou_1point_default"],
                miou_box=t["miou_box"], miou_5clicks=t["miou_points"][max(t["miou_points"], key=int)],
                heldout_masks=t["num_masks"])

  # Arms that do not depend on the engine's flags are reused (resumed, then only
  # evaluated) by a rerun with other flags; the engine's own get a folder per flag set.
  import hashlib  # noqa: PLC0415
  tag = hashlib.sha256(" ".join(args.engine_flags).encode()).hexdigest()[:8]
  results: Dict[str, Any] = {"engine flags": " ".join(args.engine_flags)}
  results["labelled only"] = train("labelled", labelled)
  engine_out = os.path.join(w, f"engine_{tag}")
  flags = ["--checkpoint", os.path.join(w, "labelled", "export"), "--input", unlabelled,
           "--output", engine_out, "--quiet", *args.engine_flags]
  if main(["annotate", *flags]) != 0:
    raise RuntimeError("annotate failed; see above")
  results["engine masks vs withheld ground truth"] = score(engine_out, unlabelled_gt)
  results["engine stats"] = _read_json(os.path.join(engine_out, STATS_FILE))["total"]
  both = os.path.join(d, f"labelled_plus_engine_{tag}")
  _link_examples(labelled, both)
  if _link_examples(engine_out, both):
    results["labelled + engine masks"] = train(f"labelled_plus_engine_{tag}", both)
  else:  # nothing to add: the same training set, so the same run
    results["labelled + engine masks"] = dict(
        results["labelled only"], note="the engine kept no mask: labelled only, unchanged")
  if args.oracle:
    oracle = os.path.join(d, "labelled_plus_ground_truth")
    _link_examples(labelled, oracle)
    _link_examples(unlabelled_gt, oracle)
    results["labelled + ground truth (oracle)"] = train("labelled_plus_ground_truth", oracle)
  atomic_write(os.path.join(w, f"round_{tag}.json"), json.dumps(results, indent=1).encode())
  return results


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def round_table(results: Dict[str, Any]) -> str:
  lines = [f"Engine flags: {results['engine flags'] or '(the defaults)'}", "",
           "| trained on | images | 1-point mIoU | box mIoU | 5-click mIoU |",
           "|---|---:|---:|---:|---:|"]
  for name, r in results.items():
    if isinstance(r, dict) and "miou_1point" in r:
      lines.append(f"| {name} | {r['train_images']} | {r['miou_1point']:.3f} | "
                   f"{r['miou_box']:.3f} | {r['miou_5clicks']:.3f} |")
  s = results["engine masks vs withheld ground truth"]
  lines += ["", "Engine masks against the withheld ground truth:", "", score_table(s)]
  return "\n".join(lines)


# --- command line ---------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m sam_jax.data_engine",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  a = sub.add_parser("annotate", help="Automatic masks for every image, in SA-1B's layout.")
  a.add_argument("--checkpoint", required=True, help="A sam_jax checkpoint directory.")
  a.add_argument("--input", required=True,
                 help="A folder (every jpg/png below it) or tfds:NAME:SPLIT (NAME may be a "
                      "prepared dataset's directory).")
  a.add_argument("--tfds-data-dir", default=None, help="TFDS's data_dir for tfds:NAME:SPLIT.")
  a.add_argument("--output", required=True, help="Where NAME.jpg + NAME.json go.")
  a.add_argument("--existing", default=None,
                 help="A folder of human NAME.json files (SA-1B schema) to merge with.")
  a.add_argument("--merge-iou-thresh", type=float, default=0.5,
                 help="With --existing: an automatic mask overlapping a human one with an IoU "
                      "above this is dropped.")
  a.add_argument("--max-mask-fraction", type=float, default=MAX_MASK_FRACTION,
                 help="Drop masks covering at least this fraction of the image.")
  a.add_argument("--batch-size", type=int, default=0,
                 help="Images read and embedded per step (0: one per local device).")
  a.add_argument("--point-grids", default=None,
                 help="An .npz of point grids in [0, 1]^2, one per crop layer (arr_0, arr_1, "
                      "...), in place of --points-per-side.")
  a.add_argument("--quiet", action="store_true", help="No progress bar.")
  group = a.add_argument_group("generator settings (defaults: the paper's fully automatic stage)")
  for flag, kind, default, text in GENERATOR_FLAGS:
    group.add_argument(f"--{flag}", type=kind, default=default, help=f"{text} [{default:.4g}]")
  dist = a.add_argument_group("several processes (as train.py)")
  dist.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() first, from the cluster's environment or "
                         "the three flags below.")
  dist.add_argument("--coordinator_address", default=None, help="Process 0's HOST:PORT.")
  dist.add_argument("--num_processes", type=int, default=None, help="How many processes.")
  dist.add_argument("--process_id", type=int, default=None, help="This process, 0 .. N-1.")

  s = sub.add_parser("score", help="Automatic masks against reference masks, image by image.")
  s.add_argument("--auto", required=True, help="An annotate output folder.")
  s.add_argument("--reference", required=True, help="A folder of reference NAME.json files.")
  s.add_argument("--json", default=None, help="Also write the result here.")

  r = sub.add_parser("round", help="A model-in-the-loop round on the demo's shapes, on CPU.")
  r.add_argument("--workdir", required=True)
  r.add_argument("--num-labelled", type=int, default=100)
  r.add_argument("--num-unlabelled", type=int, default=300)
  r.add_argument("--num-heldout", type=int, default=48)
  r.add_argument("--steps", type=int, default=400, help="Training steps of every arm.")
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--oracle", action="store_true",
                 help="Also train on the unlabelled images' true masks: the upper bound.")
  r.add_argument("--engine-flags", nargs=argparse.REMAINDER, default=[],
                 help="annotate's generator flags (last on the line).")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    if args.command == "round":
      print(round_table(engine_round(args)))
      return 0
    if args.command == "score":
      result = score(args.auto, args.reference)
      print(score_table(result))
      if args.json:
        atomic_write(args.json, json.dumps(result, indent=1).encode())
      return 0
    if args.distributed or args.coordinator_address:
      import jax  # noqa: PLC0415
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs use NCCL
      jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return annotate(args)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
