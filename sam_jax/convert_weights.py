"""Converts SAM checkpoints (Meta's .pth, Hugging Face directories) to sam_jax ones, and back.

  python -m sam_jax.convert_weights --checkpoint sam_vit_b_01ec64.pth --output ckpt/vit_b
  python -m sam_jax.convert_weights --checkpoint sam-vit-base/ --output ckpt/vit_b   # HF, detected
  python -m sam_jax.convert_weights --to-pytorch --checkpoint ckpt/vit_b --output sam_vit_b.pth
  python -m sam_jax.convert_weights --to-hf --checkpoint ckpt/vit_b --output sam-vit-base/

A Meta checkpoint's variant and every architecture size are read from the
tensor shapes; an HF directory's from its config.json. `--model-type`
insists on one variant. Anything missing, unexpected or mis-shaped is listed
and nothing is written. docs/huggingface.md has the details.
(`python convert_weights.py` in a clone and the `sam-jax-convert-weights` script are the same.)
"""

import argparse
import os
import sys

from sam_jax import build_sam, hf
from sam_jax.checkpoint import (CheckpointError, abstract_params, is_checkpoint, load_manifest,
                                load_sam, save_sam)
from sam_jax.checkpoint import load_config as load_sam_config
from sam_jax.convert import (ConversionError, infer_config, is_torch_checkpoint,
                             params_to_state_dict, read_torch_checkpoint, state_dict_to_params,
                             torch_dtypes, write_torch_checkpoint)
from sam_jax.outputs import OutputError, check_output, folder_of


def to_jax(checkpoint: str, output: str, model_type=None, overwrite=False):
  check_output(os.path.abspath(output), overwrite, is_checkpoint, "checkpoint")  # before the work
  if hf.is_hf_checkpoint(checkpoint):
    config, params = hf.read_hf_checkpoint(checkpoint)
    if model_type and model_type != config.variant:
      raise ConversionError(f"--model-type {model_type}: the HF checkpoint is a {config.variant} "
                            f"(encoder width {config.image_encoder.embed_dim}).")
    source = dict(file=os.path.basename(os.path.abspath(checkpoint)), format="transformers")
  elif os.path.isdir(checkpoint):
    what = ("a sam_jax checkpoint already" if os.path.isdir(os.path.join(checkpoint, "params"))
            else "neither a .pth file nor a Hugging Face SAM directory (config.json with "
                 "model.safetensors or pytorch_model.bin)")
    raise ConversionError(f"{checkpoint} is a directory: it is {what}.")
  else:
    state_dict = read_torch_checkpoint(checkpoint)
    config = infer_config(state_dict, model_type)
    params = state_dict_to_params(state_dict, abstract_params(build_sam(config)))
    # Tensors that were not float32 (e.g. bfloat16) are stored widened; --to-pytorch restores them.
    source = dict(file=os.path.basename(checkpoint), torch_dtypes=torch_dtypes(checkpoint))
  save_sam(output, config, params, overwrite=overwrite, source=source)
  return config


def to_hf(checkpoint: str, output: str, overwrite=False):
  check_output(os.path.abspath(output), overwrite, folder_of(hf.WRITTEN, "--to-hf output"),
               "Hugging Face checkpoint")  # before the work
  config = load_sam_config(checkpoint)
  hf.config_to_hf(config)  # a model HF cannot build fails before the weights are read
  _, params = load_sam(checkpoint)
  hf.write_hf_checkpoint(config, params, output, overwrite)


def to_pytorch(checkpoint: str, output: str, overwrite=False):
  check_output(os.path.abspath(output), overwrite, is_torch_checkpoint, "PyTorch checkpoint")
  _, params = load_sam(checkpoint)
  dtypes = ((load_manifest(checkpoint) or {}).get("source") or {}).get("torch_dtypes")
  write_torch_checkpoint(params_to_state_dict(params), output, overwrite, dtypes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="an official .pth file or a Hugging Face SAM directory (or, with "
                           "--to-pytorch/--to-hf, a sam_jax directory)")
  parser.add_argument("--output", required=True,
                      help="the sam_jax directory to write (with --to-pytorch the .pth, with "
                           "--to-hf the HF directory)")
  parser.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h"],
                      help="insist on this variant instead of detecting it")
  direction = parser.add_mutually_exclusive_group()
  direction.add_argument("--to-pytorch", action="store_true",
                         help="write a .pth that segment_anything's sam_model_registry loads")
  direction.add_argument("--to-hf", action="store_true",
                         help="write a directory that transformers.SamModel.from_pretrained loads")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  try:
    if args.to_pytorch:
      to_pytorch(args.checkpoint, args.output, args.overwrite)
      print(f"wrote {args.output}")
    elif args.to_hf:
      to_hf(args.checkpoint, args.output, args.overwrite)
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
