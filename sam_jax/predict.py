"""Masks for a point or box prompt on one image, saved as PNGs with an overlay.

  python -m sam_jax.predict --checkpoint DIR --image IMG --output OUT \\
      --point 420,300 --point 500,380,0 [--box 100,120,600,500] [--single-mask]

Points are X,Y (foreground) or X,Y,LABEL with LABEL 1 (foreground) or 0
(background), in pixels of the image. It writes OUT/mask_<i>.png (0 or 255),
OUT/overlay.png (the best mask, with the prompts, over the image) and
OUT/predictions.json (each mask's predicted IoU and the prompt).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np


def _numbers(text: str, counts: Sequence[int], what: str) -> List[float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in counts:
    raise argparse.ArgumentTypeError(f"{what} must be {' or '.join(_forms(what))}, got {text!r}.")
  return values


def _forms(what: str) -> List[str]:
  return ["X,Y", "X,Y,LABEL"] if what == "--point" else ["X0,Y0,X1,Y1"]


def parse_point(text: str) -> List[float]:
  values = _numbers(text, (2, 3), "--point")
  if len(values) == 3 and values[2] not in (0.0, 1.0):
    raise argparse.ArgumentTypeError(
        f"--point's LABEL must be 1 (foreground) or 0 (background), got {text!r}.")
  return values if len(values) == 3 else values + [1.0]


def parse_box(text: str) -> List[float]:
  return _numbers(text, (4,), "--box")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m sam_jax.predict",
      description="Predicts masks for point and box prompts on one image with SamPredictor.")
  parser.add_argument("--checkpoint", required=True, help="A sam_jax checkpoint directory.")
  parser.add_argument("--image", required=True, help="The image file.")
  parser.add_argument("--output", required=True, help="The folder to write the masks to.")
  parser.add_argument("--point", type=parse_point, action="append", default=[],
                      help="X,Y or X,Y,LABEL (1 foreground, the default; 0 background); "
                           "repeat for several points.")
  parser.add_argument("--box", type=parse_box, default=None, help="X0,Y0,X1,Y1.")
  parser.add_argument("--single-mask", action="store_true",
                      help="One mask instead of three (better for unambiguous prompts).")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace the masks, overlay and predictions.json of an earlier run.")
  args = parser.parse_args(argv)
  if not args.point and args.box is None:
    parser.error("give at least one --point or a --box.")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except (ValueError, OSError) as e:  # bad prompts and CheckpointError are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    return 1


def _is_ours(path: str) -> Optional[str]:
  """None for a file this command writes (a PNG, or predictions.json holding JSON)."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
    if head == b"\x89PNG\r\n\x1a\n" or (path.endswith(".json") and head.startswith(b"{")):
      return None
  except OSError:
    pass
  return "it is not a file this command writes"


def _write_outputs(folder: str, files: Dict[str, bytes], overwrite: bool) -> None:
  """Checks every output before writing any; each is written beside its target, then swapped in."""
  from sam_jax.outputs import OutputError, atomic_output
  for name in files:
    path = os.path.join(folder, name)
    if os.path.lexists(path):
      if not overwrite:
        raise OutputError(f"{path} exists already: choose another --output or pass --overwrite.")
      why = _is_ours(path)
      if why:
        raise OutputError(f"Refusing to replace {path}: {why}.")
  for name, content in files.items():
    with atomic_output(os.path.join(folder, name), overwrite, _is_ours) as tmp:
      with open(tmp, "wb") as f:
        f.write(content)


def run(args: argparse.Namespace) -> int:
  from sam_jax.image_io import mask_png_bytes, png_bytes, read_rgb
  from sam_jax.checkpoint import load_sam
  from sam_jax.predictor import SamPredictor
  from sam_jax.utils.visualize import draw_prompts, overlay_masks

  image = read_rgb(args.image)
  if image is None:
    raise ValueError(f"Could not load {args.image!r} as an image.")
  model, params = load_sam(args.checkpoint)
  predictor = SamPredictor(model, params)
  predictor.set_image(image)
  points = np.array([p[:2] for p in args.point]) if args.point else None
  labels = np.array([int(p[2]) for p in args.point]) if args.point else None
  box = np.array(args.box) if args.box is not None else None
  masks, iou, _ = predictor.predict(points, labels, box, multimask_output=not args.single_mask)
  best = int(np.argmax(iou))
  overlay = draw_prompts(overlay_masks(image, [masks[best]]), points, labels, box)
  meta = json.dumps({"image": args.image, "points": args.point, "box": args.box,
                     "predicted_iou": iou.tolist(), "best": best,
                     "masks": [f"mask_{i}.png" for i in range(len(masks))]}, indent=2)
  files = {f"mask_{i}.png": mask_png_bytes(m) for i, m in enumerate(masks)}
  files["overlay.png"] = png_bytes(overlay)
  files["predictions.json"] = meta.encode()
  _write_outputs(args.output, files, args.overwrite)
  print(f"wrote {len(masks)} masks to {args.output} (best: mask_{best}.png, "
        f"predicted IoU {iou[best]:.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
