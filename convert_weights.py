"""Converts Meta's SAM checkpoints to sam_jax checkpoint directories, and back.

  python convert_weights.py --checkpoint sam_vit_b_01ec64.pth --output ckpt/vit_b
  python convert_weights.py --to-pytorch --checkpoint ckpt/vit_b --output sam_vit_b.pth

The variant and every architecture size are read from the tensor shapes;
`--model-type` insists on one variant. Anything missing, unexpected or
mis-shaped is listed and nothing is written.
"""

import argparse
import os
import sys

from sam_jax import build_sam
from sam_jax.checkpoint import (CheckpointError, abstract_params, is_checkpoint, load_manifest,
                                load_sam, save_sam)
from sam_jax.convert import (ConversionError, infer_config, is_torch_checkpoint,
                             params_to_state_dict, read_torch_checkpoint, state_dict_to_params,
                             torch_dtypes, write_torch_checkpoint)
from sam_jax.outputs import OutputError, check_output


def to_jax(checkpoint: str, output: str, model_type=None, overwrite=False):
  check_output(os.path.abspath(output), overwrite, is_checkpoint, "checkpoint")  # before the work
  state_dict = read_torch_checkpoint(checkpoint)
  config = infer_config(state_dict, model_type)
  params = state_dict_to_params(state_dict, abstract_params(build_sam(config)))
  # Tensors that were not float32 (e.g. bfloat16) are stored widened; --to-pytorch restores them.
  save_sam(output, config, params, overwrite=overwrite,
           source=dict(file=os.path.basename(checkpoint), torch_dtypes=torch_dtypes(checkpoint)))
  return config


def to_pytorch(checkpoint: str, output: str, overwrite=False):
  check_output(os.path.abspath(output), overwrite, is_torch_checkpoint, "PyTorch checkpoint")
  _, params = load_sam(checkpoint)
  dtypes = ((load_manifest(checkpoint) or {}).get("source") or {}).get("torch_dtypes")
  write_torch_checkpoint(params_to_state_dict(params), output, overwrite, dtypes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="an official .pth file (or, with --to-pytorch, a sam_jax directory)")
  parser.add_argument("--output", required=True,
                      help="the sam_jax directory to write (or, with --to-pytorch, the .pth)")
  parser.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h"],
                      help="insist on this variant instead of detecting it")
  parser.add_argument("--to-pytorch", action="store_true",
                      help="write a .pth that segment_anything's sam_model_registry loads")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  try:
    if args.to_pytorch:
      to_pytorch(args.checkpoint, args.output, args.overwrite)
      print(f"wrote {args.output}")
    else:
      config = to_jax(args.checkpoint, args.output, args.model_type, args.overwrite)
      print(f"wrote {args.output} ({config.variant}, image size {config.image_size})")
  except (ConversionError, CheckpointError, OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # e.g. a full disk or a folder made read-only while writing
    print(f"error: {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
