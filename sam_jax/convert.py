"""Converting between the reference's PyTorch state dicts and sam_jax parameters.

Parameter names mirror the reference's, so the mapping is mechanical: a Flax
module `blocks_3` is PyTorch's `blocks.3`, `kernel`/`scale`/`embedding` are
`weight`, Dense kernels are transposed and convolution kernels go from
(kh, kw, in, out) to (out, in, kh, kw) (transposed convolutions from
(kh, kw, out, in) to (in, out, kh, kw), the same permutation).
"""

import os
import re
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np

from sam_jax import outputs
from sam_jax.build import VARIANTS, model_config

Params = Dict[str, Any]

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_TO_TORCH_4D = (3, 2, 0, 1)
_FROM_TORCH_4D = (2, 3, 1, 0)


class ConversionError(ValueError):
  """A checkpoint that does not fit the model; the message lists every problem."""


def torch_key(path: Tuple[str, ...]) -> str:
  """('image_encoder', 'blocks_3', 'attn', 'qkv', 'kernel') -> 'image_encoder.blocks.3.attn.qkv.weight'."""
  *modules, leaf = path
  parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(parts + [_LEAF_NAMES.get(leaf, leaf)])


def _to_torch(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    return x.T if x.ndim == 2 else x.transpose(_TO_TORCH_4D)
  return x


def _from_torch(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    return x.T if x.ndim == 2 else x.transpose(_FROM_TORCH_4D)
  return x


def _paths(tree: Params):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def params_to_state_dict(params: Params) -> Dict[str, np.ndarray]:
  """sam_jax parameters -> the reference's state dict, as NumPy arrays."""
  return {torch_key(path): np.ascontiguousarray(_to_torch(path[-1], np.asarray(x)))
          for path, x in _paths(params)}


def state_dict_to_params(state_dict: Dict[str, np.ndarray], abstract_params: Params) -> Params:
  """The reference's state dict -> parameters shaped like `abstract_params`.

  Every key must be consumed and every parameter filled; otherwise raises
  `ConversionError` naming each missing, unexpected and mis-shaped tensor.
  """
  missing, wrong_shape, used = [], [], set()
  leaves = []
  for path, target in _paths(abstract_params):
    key = torch_key(path)
    if key not in state_dict:
      missing.append(key)
      leaves.append(None)
      continue
    used.add(key)
    value = _from_torch(path[-1], np.asarray(state_dict[key]))
    if value.shape != tuple(target.shape):
      wrong_shape.append(f"{key}: checkpoint {tuple(np.asarray(state_dict[key]).shape)}, "
                         f"model expects {tuple(_to_torch(path[-1], np.empty(target.shape)).shape)}")
    leaves.append(np.ascontiguousarray(value, dtype=target.dtype))  # one pass, in C order
  unexpected = sorted(set(state_dict) - used)
  if missing or unexpected or wrong_shape:
    lines = ["The checkpoint does not fit the model:"]
    for title, names in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape)):
      if names:
        lines.append(f"  {len(names)} {title}:")
        lines += [f"    {n}" for n in names]
    raise ConversionError("\n".join(lines))
  treedef = jax.tree_util.tree_structure(abstract_params)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def infer_config(state_dict: Dict[str, np.ndarray],
                 variant: Optional[str] = None) -> ml_collections.ConfigDict:
  """The model config that a reference state dict was built with.

  The variant is read from the encoder width unless given; depth, heads,
  window, global blocks, image size and decoder sizes are read from the
  tensor shapes, so that shrunk and ablated models convert too. With
  `variant` given, a checkpoint of another variant is an error.
  """
  def shape(key, ndim=None):
    if key not in state_dict:
      raise ConversionError(f"The checkpoint has no tensor {key!r}: it is not a SAM checkpoint.")
    s = tuple(np.shape(state_dict[key]))
    if ndim is not None and len(s) != ndim:
      raise ConversionError(f"{key} has shape {s}; a SAM checkpoint's has {ndim} dimensions.")
    return s

  embed_dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight", 4)
  by_width = {dims[0]: name for name, dims in VARIANTS.items()}
  if variant is None:
    variant = by_width.get(embed_dim, "vit_b")
  elif variant not in VARIANTS:
    raise ConversionError(f"Unknown model type {variant!r}; choose one of {sorted(VARIANTS)}.")
  elif VARIANTS[variant][0] != embed_dim:
    raise ConversionError(
        f"--model-type {variant} expects an encoder width of {VARIANTS[variant][0]}, but the "
        f"checkpoint's is {embed_dim} ({by_width.get(embed_dim, 'no released variant')}).")
  config = model_config(variant)
  enc = config.image_encoder
  shape("image_encoder.blocks.0.attn.qkv.weight", 2)
  shape("mask_decoder.transformer.layers.0.self_attn.q_proj.weight", 2)
  depth = 1 + max(int(m.group(1)) for k in state_dict
                  if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
  enc.embed_dim, enc.patch_size, enc.depth = embed_dim, patch, depth
  enc.mlp_ratio = shape("image_encoder.blocks.0.mlp.lin1.weight", 2)[0] / embed_dim
  enc.qkv_bias = "image_encoder.blocks.0.attn.qkv.bias" in state_dict
  enc.use_abs_pos = "image_encoder.pos_embed" in state_dict
  enc.use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in state_dict
  if enc.use_abs_pos:
    _, gh, gw, _ = shape("image_encoder.pos_embed", 4)
    config.image_size = gh * patch if gh == gw else (gh * patch, gw * patch)
  if enc.use_rel_pos:
    tables = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h", 2)[0] for i in range(depth)]
    enc.num_heads = embed_dim // shape("image_encoder.blocks.0.attn.rel_pos_h", 2)[1]
    # Global blocks' tables span the token grid; windowed blocks' span a window.
    # Without a position embedding to give the grid, the larger tables are global.
    global_len = 2 * gh - 1 if enc.use_abs_pos else max(tables)
    enc.global_attn_indexes = tuple(i for i, n in enumerate(tables) if n == global_len)
    windowed = {n for n in tables if n != global_len}
    if len(windowed) > 1:
      raise ConversionError(f"Windowed blocks have tables of several sizes {sorted(windowed)}.")
    if windowed:
      enc.window_size = (windowed.pop() + 1) // 2
  config.prompt_embed_dim = shape("image_encoder.neck.0.weight", 4)[0]
  config.prompt_encoder.mask_in_chans = shape("prompt_encoder.mask_downscaling.3.weight", 4)[0]
  dec = config.mask_decoder
  dec.num_multimask_outputs = shape("mask_decoder.mask_tokens.weight", 2)[0] - 1
  dec.transformer_depth = 1 + max(int(m.group(1)) for k in state_dict
                                  if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k)))
  dec.transformer_mlp_dim = shape("mask_decoder.transformer.layers.0.mlp.lin1.weight", 2)[0]
  dec.attention_downsample_rate = config.prompt_embed_dim // shape(
      "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", 2)[0]
  dec.iou_head_depth = len([k for k in state_dict if re.match(
      r"mask_decoder\.iou_prediction_head\.layers\.\d+\.weight$", k)])
  dec.iou_head_hidden_dim = shape("mask_decoder.iou_prediction_head.layers.0.weight", 2)[0]
  return config


def describe_foreign(state_dict: Any, allow_hf: bool = False) -> Optional[str]:
  """Why `state_dict` is not a SAM (v1) state dict (Meta's names, or HF's with
  `allow_hf`), or None if it may be one."""
  if not isinstance(state_dict, dict):
    return f"it holds a {type(state_dict).__name__}, not a state dict of tensors"
  keys = [k for k in state_dict if isinstance(k, str)]
  if "model" in state_dict and isinstance(state_dict["model"], dict):
    inner = state_dict["model"]
    if any(k.startswith("image_encoder.trunk.") or k.startswith("memory_attention.")
           for k in inner):
      return ("it is a SAM 2 checkpoint (image_encoder.trunk / memory_attention); sam_jax "
              "implements SAM 1: use the sam_vit_b/l/h checkpoints")
    return ("it wraps its weights in a 'model' entry: extract that state dict "
            "(torch.save(ckpt['model'], path)) and convert the result")
  if any(k.startswith("vision_encoder.") for k in keys):
    if allow_hf:
      return None
    return ("it is a Hugging Face transformers SamModel checkpoint (vision_encoder.*): "
            "pass its directory (with config.json) as --checkpoint instead of the file")
  if not any(k.startswith("image_encoder.") for k in keys):
    sample = ", ".join(keys[:3]) or "no tensors"
    return f"it has no image_encoder.* tensors (first keys: {sample}); it is not a SAM checkpoint"
  return None


def read_torch_checkpoint(path: str, allow_hf: bool = False) -> Dict[str, np.ndarray]:
  """Loads a reference `.pth` state dict (or, with `allow_hf`, an HF
  `pytorch_model.bin`) as NumPy arrays, with clear errors."""
  try:
    import torch
  except ImportError as e:
    raise ConversionError(
        "Reading .pth files needs PyTorch: pip install 'sam_jax[torch]'.") from e
  if not os.path.isfile(path):
    raise ConversionError(f"{path} does not exist or is not a file.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for unreadable files
    raise ConversionError(
        f"{path} is not a readable PyTorch checkpoint (truncated, corrupt, or another "
        f"format): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  why = describe_foreign(obj, allow_hf)
  if why:
    raise ConversionError(f"Cannot convert {path}: {why}.")
  bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
         if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f"Cannot convert {path}: a state dict maps names to tensors, but "
                          f"these entries are not tensors: {', '.join(bad[:10])}.")
  # NumPy has no bfloat16: such tensors are widened (exactly) to float32.
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
          for k, v in obj.items()}


def torch_dtypes(path: str) -> Dict[str, str]:
  """{name: dtype} of a state dict's tensors that are not float32 (recorded at conversion)."""
  import torch
  obj = torch.load(path, map_location="meta", weights_only=True)
  return {k: str(v.dtype).replace("torch.", "") for k, v in obj.items()
          if v.dtype != torch.float32}


def is_torch_checkpoint(path: str) -> Optional[str]:
  """None if `path` is a file that torch.save wrote (a zip with a data.pkl), else why not."""
  import zipfile
  if os.path.islink(path) or not os.path.isfile(path):
    return "it is not a file, so not a PyTorch checkpoint"
  try:
    with zipfile.ZipFile(path) as z:
      if any(n.endswith("data.pkl") for n in z.namelist()):
        return None
  except (zipfile.BadZipFile, OSError):
    pass
  return "it is not a PyTorch checkpoint file"


def write_torch_checkpoint(state_dict: Dict[str, np.ndarray], path: str, overwrite: bool = False,
                           dtypes: Optional[Dict[str, str]] = None) -> None:
  """Saves a state dict as the official files are saved (torch.save of tensors).

  `dtypes` restores the dtypes recorded at conversion (e.g. bfloat16). With
  `overwrite`, only an existing PyTorch checkpoint file is replaced.
  """
  import collections
  import torch
  dtypes = dtypes or {}
  tensors = collections.OrderedDict()
  for k, v in state_dict.items():
    t = torch.from_numpy(np.array(v))
    tensors[k] = t.to(getattr(torch, dtypes[k])) if k in dtypes else t
  with outputs.atomic_output(path, overwrite, is_torch_checkpoint, "PyTorch checkpoint") as tmp:
    torch.save(tensors, tmp)
