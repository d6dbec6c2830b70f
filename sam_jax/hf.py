"""Hugging Face `transformers` SAM checkpoints (`SamModel`), in and out.

An HF checkpoint holds Meta's tensors under other names, in the same layouts
(the vision encoder's qkv stays one fused matrix, the relative-position tables
keep their shapes), so the conversion is Meta's mapping (`sam_jax.convert`)
followed by a rename of the keys: `meta_to_hf_names` is that rename, and both
directions use it. The differences it covers:

  image_encoder.blocks.i.norm1          vision_encoder.layers.i.layer_norm1
  image_encoder.patch_embed.proj        vision_encoder.patch_embed.projection
  image_encoder.neck.0 / 1 / 2 / 3      vision_encoder.neck.conv1 / layer_norm1 / conv2 / layer_norm2
  prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
                                        shared_image_embedding.positional_embedding
                                        (HF ties prompt_encoder.shared_embedding.positional_embedding to it)
  prompt_encoder.point_embeddings.i     prompt_encoder.point_embed.i
  prompt_encoder.mask_downscaling.0 / 1 / 3 / 4 / 6
                                        prompt_encoder.mask_embed.conv1 / layer_norm1 / conv2 / layer_norm2 / conv3
  mask_decoder.transformer...normK      mask_decoder.transformer...layer_normK (and norm_final_attn)
  mask_decoder.output_upscaling.0 / 1 / 3
                                        mask_decoder.upscale_conv1 / upscale_layer_norm / upscale_conv2
  MLP heads' layers.0 ... layers.{n-1}  proj_in, layers.0 ... layers.{n-3}, proj_out
                                        (the hypernetwork MLPs and the IoU head)

The HF config is mapped field by field (`config_from_hf`, `config_to_hf`).
Reading needs `safetensors` (or PyTorch for `pytorch_model.bin`); writing
needs `transformers` and `safetensors`: `pip install 'sam_jax[hf]'`.
"""

import json
import os
import re
from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import ml_collections
import numpy as np

from sam_jax.build import VARIANTS, build_sam, image_size_hw, model_config
from sam_jax.convert import (ConversionError, params_to_state_dict, state_dict_to_params,
                             torch_key)

Params = Dict[str, Any]
CONFIG, SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Everything `write_hf_checkpoint` may write: what --overwrite may replace.
WRITTEN = (CONFIG, SAFETENSORS, "preprocessor_config.json")
PE_KEY = "shared_image_embedding.positional_embedding"
PE_TIED_KEY = "prompt_encoder.shared_embedding.positional_embedding"

# (Meta pattern, HF replacement), applied in order to each key.
_RENAMES = (
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"\.norm(\d|_final_attn)\.", r".layer_norm\1."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", PE_KEY),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
)
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"
                  r"\.layers\.(\d+)\.(\w+)$")


def meta_to_hf_names(meta_keys: Iterable[str]) -> Dict[str, str]:
  """{Meta key: HF key} for a whole state dict's keys (MLP depths are read from them)."""
  meta_keys = list(meta_keys)
  depth: Dict[str, int] = {}
  for key in meta_keys:
    if m := _MLP.match(key):
      depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
  names = {}
  for key in meta_keys:
    hf = key
    if m := _MLP.match(key):
      prefix, i, leaf = m.group(1), int(m.group(2)), m.group(3)
      layer = ("proj_in" if i == 0 else "proj_out" if i == depth[prefix] - 1
               else f"layers.{i - 1}")
      hf = f"{prefix}.{layer}.{leaf}"
    for pattern, replacement in _RENAMES:
      hf = re.sub(pattern, replacement, hf)
    names[key] = hf
  if len(set(names.values())) != len(names):
    raise AssertionError("the HF rename maps two Meta keys to one")
  return names


# ---------------------------------------------------------------------------- configs

def _square(size, what: str) -> int:
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise ConversionError(f"{what} is {size}: transformers' SamModel supports square inputs only.")
    size = size[0]
  return int(size)


def config_from_hf(hf: Dict[str, Any]) -> ml_collections.ConfigDict:
  """The sam_jax model config of an HF `SamConfig` (its config.json as a dict)."""
  if hf.get("model_type") != "sam":
    raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}, not 'sam': it "
                          "is not a transformers SamModel (SAM 2 and SAM-HQ are other models).")
  vis, pro, dec = (hf.get(k) or {} for k in
                   ("vision_config", "prompt_encoder_config", "mask_decoder_config"))
  problems = []

  def want(section, name, value, default):
    got = section.get(name, default)
    if got != value:
      problems.append(f"{name} = {got!r} (sam_jax implements {value!r})")
  want(vis, "hidden_act", "gelu", "gelu")
  want(vis, "num_channels", 3, 3)
  want(vis, "layer_norm_eps", 1e-6, 1e-6)
  want(pro, "hidden_act", "gelu", "gelu")
  want(pro, "layer_norm_eps", 1e-6, 1e-6)
  want(pro, "num_point_embeddings", 4, 4)
  want(dec, "hidden_act", "relu", "relu")
  width = vis.get("hidden_size", 768)
  variant = {dims[0]: name for name, dims in VARIANTS.items()}.get(width, "vit_b")
  config = model_config(variant)
  enc = config.image_encoder
  image_size = _square(vis.get("image_size", 1024), "vision_config.image_size")
  patch = _square(vis.get("patch_size", 16), "vision_config.patch_size")
  dim = vis.get("output_channels", 256)
  want(pro, "image_size", image_size, image_size)
  want(pro, "patch_size", patch, patch)
  want(pro, "hidden_size", dim, dim)
  want(dec, "hidden_size", dim, 256)
  want(vis, "num_pos_feats", dim // 2, 128)
  if problems:
    raise ConversionError("The HF config describes a model that sam_jax does not implement:\n  "
                          + "\n  ".join(problems))
  config.image_size, config.prompt_embed_dim = image_size, dim
  enc.patch_size, enc.embed_dim = patch, width
  enc.depth = vis.get("num_hidden_layers", 12)
  enc.num_heads = vis.get("num_attention_heads", 12)
  enc.mlp_ratio = (vis.get("mlp_dim") or width * vis.get("mlp_ratio", 4.0)) / width
  enc.window_size = vis.get("window_size", 14)
  enc.global_attn_indexes = tuple(vis.get("global_attn_indexes", (2, 5, 8, 11)))
  enc.use_abs_pos = vis.get("use_abs_pos", True)
  enc.use_rel_pos = vis.get("use_rel_pos", True)
  enc.qkv_bias = vis.get("qkv_bias", True)
  config.prompt_encoder.mask_in_chans = pro.get("mask_input_channels", 16)
  d = config.mask_decoder
  d.num_multimask_outputs = dec.get("num_multimask_outputs", 3)
  d.iou_head_depth = dec.get("iou_head_depth", 3)
  d.iou_head_hidden_dim = dec.get("iou_head_hidden_dim", 256)
  d.transformer_depth = dec.get("num_hidden_layers", 2)
  d.transformer_num_heads = dec.get("num_attention_heads", 8)
  d.transformer_mlp_dim = dec.get("mlp_dim", 2048)
  d.attention_downsample_rate = dec.get("attention_downsample_rate", 2)
  return config


def config_to_hf(config: ml_collections.ConfigDict) -> Dict[str, Dict[str, Any]]:
  """The keyword arguments of `transformers.SamConfig` for a sam_jax config."""
  h, w = image_size_hw(config.image_size)
  if h != w:
    raise ConversionError(f"The model's input is {h}x{w}: transformers' SamModel supports "
                          "square inputs only.")
  enc, dec, dim = config.image_encoder, config.mask_decoder, config.prompt_embed_dim
  return dict(
      vision_config=dict(
          hidden_size=enc.embed_dim, output_channels=dim, num_hidden_layers=enc.depth,
          num_attention_heads=enc.num_heads, image_size=h, patch_size=enc.patch_size,
          mlp_dim=int(enc.embed_dim * enc.mlp_ratio), qkv_bias=enc.qkv_bias,
          use_abs_pos=enc.use_abs_pos, use_rel_pos=enc.use_rel_pos,
          window_size=enc.window_size, global_attn_indexes=list(enc.global_attn_indexes),
          num_pos_feats=dim // 2, layer_norm_eps=1e-6),
      prompt_encoder_config=dict(
          hidden_size=dim, image_size=h, patch_size=enc.patch_size,
          mask_input_channels=config.prompt_encoder.mask_in_chans, layer_norm_eps=1e-6),
      mask_decoder_config=dict(
          hidden_size=dim, mlp_dim=dec.transformer_mlp_dim,
          num_hidden_layers=dec.transformer_depth, num_attention_heads=dec.transformer_num_heads,
          attention_downsample_rate=dec.attention_downsample_rate,
          num_multimask_outputs=dec.num_multimask_outputs, iou_head_depth=dec.iou_head_depth,
          iou_head_hidden_dim=dec.iou_head_hidden_dim,
          # The decoder transformer's LayerNorms: Meta's (and sam_jax's) use
          # PyTorch's default 1e-5, HF's default is 1e-6; written so that the
          # HF model computes what sam_jax computes.
          layer_norm_eps=1e-5),
  )


# ---------------------------------------------------------------------------- reading

def is_hf_checkpoint(path: str) -> bool:
  """A directory with a config.json and HF weights (not a sam_jax `params` tree)."""
  return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))
          and any(os.path.isfile(os.path.join(path, f))
                  for f in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN)))


def _read_tensors(directory: str) -> Dict[str, np.ndarray]:
  join = lambda f: os.path.join(directory, f)  # noqa: E731
  try:
    if os.path.isfile(join(SAFETENSORS)) or os.path.isfile(join(SAFETENSORS_INDEX)):
      try:
        from safetensors.numpy import load_file
      except ImportError as e:
        raise ConversionError("Reading safetensors needs: pip install 'sam_jax[hf]'.") from e
      if os.path.isfile(join(SAFETENSORS)):
        return load_file(join(SAFETENSORS))
      with open(join(SAFETENSORS_INDEX)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(load_file(join(shard)))
      return tensors
    from sam_jax.convert import read_torch_checkpoint
    return read_torch_checkpoint(join(TORCH_BIN), allow_hf=True)
  except ConversionError:
    raise
  except Exception as e:  # safetensors and json raise several types for a bad file
    raise ConversionError(f"{directory} holds unreadable HF weights (truncated or corrupt?): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def hf_state_dict_to_params(tensors: Dict[str, np.ndarray], config: ml_collections.ConfigDict
                            ) -> Params:
  """HF tensors -> sam_jax parameters for `config`; every problem is listed in HF's names."""
  from sam_jax.checkpoint import abstract_params
  target = abstract_params(build_sam(config))
  meta_keys = [torch_key(tuple(k.key for k in p))
               for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]]
  to_hf = meta_to_hf_names(meta_keys)
  tensors = dict(tensors)
  if PE_TIED_KEY in tensors:  # the tied copy, which some checkpoints store as well
    tied = tensors.pop(PE_TIED_KEY)
    if PE_KEY not in tensors:
      tensors[PE_KEY] = tied
    elif not np.array_equal(tensors[PE_KEY], tied):
      raise ConversionError(f"{PE_KEY} and its tied copy {PE_TIED_KEY} differ.")
  missing = sorted(set(to_hf.values()) - set(tensors))
  unexpected = sorted(set(tensors) - set(to_hf.values()))
  if missing or unexpected:
    lines = ["The HF checkpoint does not fit the model its config.json describes:"]
    for title, names in (("missing", missing), ("unexpected", unexpected)):
      if names:
        lines += [f"  {len(names)} {title}:"] + [f"    {n}" for n in names]
    raise ConversionError("\n".join(lines))
  return state_dict_to_params({meta: tensors[hf] for meta, hf in to_hf.items()}, target)


def read_hf_checkpoint(directory: str) -> Tuple[ml_collections.ConfigDict, Params]:
  """(sam_jax config, parameters) of a transformers SAM directory."""
  try:
    with open(os.path.join(directory, CONFIG)) as f:
      hf_config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"Cannot read {os.path.join(directory, CONFIG)}: {e}") from e
  config = config_from_hf(hf_config)
  stats = hf_pixel_statistics(directory)
  if stats:
    config.pixel_mean, config.pixel_std = stats
  return config, hf_state_dict_to_params(_read_tensors(directory), config)


# ---------------------------------------------------------------------------- writing

def params_to_hf_state_dict(params: Params) -> Dict[str, np.ndarray]:
  meta = params_to_state_dict(params)
  return {hf: meta[key] for key, hf in meta_to_hf_names(meta).items()}


def write_hf_checkpoint(config: ml_collections.ConfigDict, params: Params, output: str,
                        overwrite: bool = False) -> None:
  """A directory that `transformers.SamModel.from_pretrained` loads (config.json,
  model.safetensors, preprocessor_config.json with the model's pixel statistics)."""
  try:
    from safetensors.numpy import save_file
    from transformers import SamConfig, SamImageProcessor
  except ImportError as e:
    raise ConversionError("Writing HF checkpoints needs: pip install 'sam_jax[hf]'.") from e
  from sam_jax import outputs
  hf_config = SamConfig(**config_to_hf(config))
  hf_config.architectures = ["SamModel"]
  tensors = params_to_hf_state_dict(params)
  size = image_size_hw(config.image_size)[0]
  processor = SamImageProcessor(
      image_mean=[m / 255 for m in config.pixel_mean], image_std=[s / 255 for s in config.pixel_std],
      size={"longest_edge": size}, pad_size={"height": size, "width": size},
      mask_size={"longest_edge": 4 * size // config.image_encoder.patch_size})
  with outputs.atomic_output(output, overwrite, outputs.folder_of(WRITTEN, "--to-hf output"),
                            "Hugging Face checkpoint") as tmp:
    os.makedirs(tmp)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
    hf_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)


def hf_pixel_statistics(directory: str) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
  """(pixel_mean, pixel_std) in [0, 255] from a preprocessor_config.json, if there is one."""
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    pre = json.load(f)
  if "image_mean" not in pre or "image_std" not in pre:
    return None
  scale = 1 / pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0
  # Rounded so that 123.675 / 255 * 255 reads back as 123.675.
  return (tuple(round(float(m) * scale, 6) for m in pre["image_mean"]),
          tuple(round(float(s) * scale, 6) for s in pre["image_std"]))
