"""Automatic mask generation for an image or a folder of images, as the reference's
scripts/amg.py (same options, same outputs).

  python -m sam_jax.amg --checkpoint DIR --input IMAGE_OR_FOLDER --output OUT \\
      [--convert-to-rle] [--overlay] [--points-per-side 32 ...]

For each image it writes OUT/<name>/ with one PNG per mask and metadata.csv,
or OUT/<name>.json with COCO RLEs under --convert-to-rle; --overlay adds
OUT/<name>_overlay.png showing every mask over the image.
"""

import argparse
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from sam_jax.image_io import png_bytes, read_rgb, write_mask
from sam_jax.outputs import OutputError, atomic_output

METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
                   "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")

# (flag, type, help) of the generator's settings, as the reference script has them.
AMG_SETTINGS = [
    ("points-per-side", int, "Points sampled along one side of the image (its square in all)."),
    ("points-per-batch", int, "Points run through the model at once; more is faster."),
    ("pred-iou-thresh", float, "Exclude masks with a predicted IoU below this."),
    ("stability-score-thresh", float, "Exclude masks with a stability score below this."),
    ("stability-score-offset", float, "How far to shift the cutoff for the stability score."),
    ("box-nms-thresh", float, "Box IoU above which NMS drops duplicate masks."),
    ("crop-n-layers", int, "Run again on crops: layer i has (2^i)^2 crops."),
    ("crop-nms-thresh", float, "Box IoU for NMS between masks of different crops."),
    ("crop-overlap-ratio", float, "How much crops overlap, as a fraction of the short side."),
    ("crop-n-points-downscale-factor", int, "Layer i samples points-per-side / factor^i points."),
    ("min-mask-region-area", int, "Remove holes and islands smaller than this many pixels."),
]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m sam_jax.amg",
      description="Generates masks for every image in --input with SAM's automatic mask "
                  "generator and saves them to --output.")
  parser.add_argument("--input", required=True, help="An image, or a folder of images.")
  parser.add_argument("--output", required=True,
                      help="A folder: one subfolder of PNGs (or one JSON file) per image.")
  parser.add_argument("--checkpoint", required=True, help="A sam_jax checkpoint directory.")
  parser.add_argument("--model-type", default=None,
                      choices=["default", "vit_b", "vit_l", "vit_h"],
                      help="Checked against the checkpoint's config, which already says which.")
  parser.add_argument("--device", default=None, choices=["cpu", "gpu", "cuda", "tpu"],
                      help="Where to run; JAX's default device if not given.")
  parser.add_argument("--convert-to-rle", action="store_true",
                      help="Save masks as COCO RLEs in one JSON file per image instead of PNGs.")
  parser.add_argument("--overlay", action="store_true",
                      help="Also save <name>_overlay.png with every mask over the image.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace the output of an image that was processed before.")
  group = parser.add_argument_group("AMG settings (the generator's defaults when not given)")
  for flag, kind, text in AMG_SETTINGS:
    group.add_argument(f"--{flag}", type=kind, default=None, help=text)
  return parser.parse_args(argv)


def generator_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
  """The AMG settings given on the command line (the rest keep their defaults)."""
  names = [flag.replace("-", "_") for flag, _, _ in AMG_SETTINGS]
  kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
  kwargs["output_mode"] = "coco_rle" if args.convert_to_rle else "binary_mask"
  return kwargs


def list_images(path: str) -> List[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  if not os.path.isdir(path):
    return [path]
  files = sorted(os.path.join(path, f) for f in os.listdir(path)
                 if not os.path.isdir(os.path.join(path, f)))
  if not files:
    raise FileNotFoundError(f"--input {path} is an empty folder: no images to process.")
  return files


def write_masks_to_folder(masks: List[Dict[str, Any]], path: str) -> None:
  """One PNG per mask (0 or 255) and metadata.csv, exactly as the reference script."""
  rows = [METADATA_HEADER]
  for i, record in enumerate(masks):
    write_mask(os.path.join(path, f"{i}.png"), record["segmentation"])
    row = [str(i), str(record["area"]), *[str(x) for x in record["bbox"]],
           *[str(x) for x in record["point_coords"][0]], str(record["predicted_iou"]),
           str(record["stability_score"]), *[str(x) for x in record["crop_box"]]]
    rows.append(",".join(row))
  with open(os.path.join(path, "metadata.csv"), "w") as f:
    f.write("\n".join(rows))


def _is_mask_folder(path: str) -> Optional[str]:
  """None if `path` is a folder this script wrote (N.png files and metadata.csv), else why not."""
  if os.path.islink(path) or not os.path.isdir(path):
    return "it is not a folder of masks"
  if all(re.fullmatch(r"\d+\.png|metadata\.csv", f) for f in os.listdir(path)):
    return None
  return "it holds files other than the masks (N.png) and metadata.csv this script writes"


def _is_rle_file(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      if isinstance(json.load(f), list):
        return None
  except (OSError, ValueError):
    pass
  return "it is not a JSON list of masks as this script writes"


def _is_png(path: str) -> Optional[str]:
  if os.path.isfile(path) and not os.path.islink(path):
    with open(path, "rb") as f:
      if f.read(8) == b"\x89PNG\r\n\x1a\n":
        return None
  return "it is not a PNG file"


def _outputs(base: str, args: argparse.Namespace) -> List[Tuple[str, Any]]:
  """(path, replaceable) of what this script writes for one image."""
  out = [(base + ".json", _is_rle_file) if args.convert_to_rle else (base, _is_mask_folder)]
  return out + ([(base + "_overlay.png", _is_png)] if args.overlay else [])


def _check_outputs(targets: List[str], args: argparse.Namespace) -> None:
  """Before any work: no two images may share an output, nor one replace what we did not write."""
  stems: Dict[str, List[str]] = {}
  for t in targets:
    stems.setdefault(os.path.splitext(os.path.basename(t))[0], []).append(os.path.basename(t))
  clashes = [" and ".join(names) for names in stems.values() if len(names) > 1]
  if clashes:
    raise ValueError(f"These inputs would write the same outputs (named after the file name "
                     f"without its extension): {'; '.join(clashes)}. Rename or move one of each.")
  for stem in stems:
    for path, replaceable in _outputs(os.path.join(args.output, stem), args):
      if os.path.lexists(path):
        if not args.overwrite:
          raise OutputError(f"{path} exists already: choose another --output or pass "
                            "--overwrite.")
        why = replaceable(path)
        if why:
          raise OutputError(f"Refusing to replace {path}: {why}; move it away or choose "
                            "another --output.")


def load_model(checkpoint: str, model_type: Optional[str]):
  from sam_jax.checkpoint import load_config, load_sam
  if model_type is not None and model_type != "default":
    variant = load_config(checkpoint).get("variant")
    if variant != model_type:
      raise ValueError(f"--model-type {model_type} but {checkpoint} holds a {variant} model.")
  return load_sam(checkpoint)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
  import jax

  from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
  from sam_jax.utils.mask_ops import rle_to_mask
  from sam_jax.utils.visualize import overlay_masks

  if args.device is not None:
    platform = "gpu" if args.device == "cuda" else args.device
    jax.config.update("jax_default_device", jax.devices(platform)[0])
  targets = list_images(args.input)
  _check_outputs(targets, args)
  model, params = load_model(args.checkpoint, args.model_type)
  generator = SamAutomaticMaskGenerator(model, params, **generator_kwargs(args))
  os.makedirs(args.output, exist_ok=True)
  done = 0
  for target in tqdm(targets, desc="Images", unit="image"):
    image = read_rgb(target)
    if image is None:
      tqdm.write(f"Could not load '{target}' as an image, skipping...")
      continue
    masks = generator.generate(image)
    base = os.path.join(args.output, os.path.splitext(os.path.basename(target))[0])
    (path, replaceable), *overlay = _outputs(base, args)
    with atomic_output(path, args.overwrite, replaceable, "output") as tmp:
      if args.convert_to_rle:
        with open(tmp, "w") as f:
          json.dump(masks, f)
      else:
        os.makedirs(tmp)
        write_masks_to_folder(masks, tmp)
    if overlay:
      binary = [m["segmentation"] if isinstance(m["segmentation"], np.ndarray)
                else rle_to_mask(m["segmentation"]) for m in masks]
      picture = overlay_masks(image, binary)
      with atomic_output(overlay[0][0], args.overwrite, _is_png, "overlay") as tmp:
        with open(tmp, "wb") as f:  # encoded in memory: the temporary name has no extension
          f.write(png_bytes(picture))
    tqdm.write(f"{target}: {len(masks)} masks")
    done += 1
  if not done:
    raise ValueError(f"None of the {len(targets)} files in --input {args.input} could be read "
                     "as an image.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
