"""sam_jax checkpoints: a directory with `config.json` and an Orbax `params` tree."""

import functools
import hashlib
import json
import logging
import os
import re
from typing import Any, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sam_jax import outputs
from sam_jax.build import build_sam, image_size_hw
from sam_jax.modeling.image_encoder import linear_resize_matrix
from sam_jax.modeling.sam import Sam

Params = Dict[str, Any]
CONFIG_FILE, PARAMS_DIR, MANIFEST_FILE = "config.json", "params", "manifest.json"
MANIFEST_FORMAT = "sam_jax checkpoint 1"


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read, or does not fit the model."""


def example_inputs(model: Sam):
  """Inputs that touch every parameter: a point, a box and a mask prompt."""
  h, w = model.image_size
  gh, gw = model.prompt_encoder.image_embedding_size
  return dict(
      images=jnp.zeros((1, h, w, 3), jnp.float32),
      point_coords=jnp.zeros((1, 1, 1, 2), jnp.float32),
      point_labels=jnp.ones((1, 1, 1), jnp.int32),
      boxes=jnp.zeros((1, 1, 4), jnp.float32),
      mask_inputs=jnp.zeros((1, 1, 4 * gh, 4 * gw), jnp.float32),
  )


def _touch_all(module: Sam, images, point_coords, point_labels, boxes, mask_inputs):
  embeddings = module.embed_images(images)
  # With and without a mask prompt: each uses parameters the other doesn't.
  module.decode(embeddings, point_coords, point_labels, boxes, mask_inputs)
  return module.decode(embeddings, point_coords, point_labels, boxes)


def _init(model: Sam, rng: jax.Array) -> Params:
  return model.init(rng, **example_inputs(model), method=_touch_all)["params"]


def init_params(model: Sam, rng: jax.Array) -> Params:
  """Freshly initialised parameters for `model`."""
  return jax.jit(functools.partial(_init, model))(rng)


@functools.lru_cache(maxsize=8)  # tracing ViT-H takes seconds; converting, saving and loading ask
def _abstract_params(model: Sam, mesh) -> Params:
  del mesh  # a key only: under a mesh, the shapes carry its shardings
  return jax.eval_shape(functools.partial(_init, model), jax.random.key(0))


def abstract_params(model: Sam) -> Params:
  """The parameters' shapes and dtypes, without computing them (shared: do not modify)."""
  mesh = jax.sharding.get_abstract_mesh()
  try:
    hash((model, mesh))
  except TypeError:  # a field that is a list: not cached
    return _abstract_params.__wrapped__(model, mesh)
  return _abstract_params(model, mesh)


def _shape_mismatches(params: Params, target: Params) -> Tuple[list, list, list]:
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  shapes = sorted(k for k in set(want) & set(flat) if tuple(flat[k].shape) != tuple(want[k].shape))
  return missing, unexpected, shapes


def resize_params(params: Params, target: Params) -> Params:
  """Adapts parameters to another image size (shapes of `target`).

  The absolute position embedding is resized bicubically over the token grid;
  the relative-position tables of the global blocks linearly, as the
  reference resizes them at run time. Any other shape difference is an error.
  """
  def adapt(path, x, want):
    if tuple(x.shape) == tuple(want.shape):
      return x
    name = path[-1].key
    if name == "pos_embed":
      return jax.image.resize(jnp.asarray(x), want.shape, "cubic").astype(want.dtype)
    if name in ("rel_pos_h", "rel_pos_w") and x.shape[1:] == want.shape[1:]:
      return jnp.asarray(linear_resize_matrix(x.shape[0], want.shape[0])) @ jnp.asarray(x)
    raise CheckpointError(
        f"{jax.tree_util.keystr(path)} has shape {tuple(x.shape)}, the model expects "
        f"{tuple(want.shape)}; only position embeddings adapt to a new image size.")
  return jax.tree_util.tree_map_with_path(adapt, params, target)


def check_params(params: Params, target: Params) -> None:
  """Raises CheckpointError listing every missing, unexpected and mis-shaped parameter."""
  missing, unexpected, shapes = _shape_mismatches(params, target)
  if missing or unexpected or shapes:
    lines = ["The parameters do not fit the model:"]
    for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
      if names:
        lines += [f"  {len(names)} {title}:"] + [f"    {n}" for n in names]
    raise CheckpointError("\n".join(lines))


def _array_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def checksums(params: Params) -> Dict[str, Dict[str, Any]]:
  """{name: shape, dtype and sha256 of the bytes} of every array, as the manifest records them."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.ascontiguousarray(np.asarray(x))
    out[_array_name(path)] = dict(shape=list(x.shape), dtype=str(x.dtype),
                                  sha256=hashlib.sha256(x.data).hexdigest())
  return out


def is_checkpoint(directory: str) -> Optional[str]:
  """None if `directory` is a sam_jax checkpoint (or empty), else why not.

  A checkpoint holds exactly what `save_sam` writes: `config.json`, `params/`
  and (since checksums) `manifest.json`; anything else in it is not ours.
  """
  if os.path.islink(directory) or not os.path.isdir(directory):
    return "it is not a folder, so not a sam_jax checkpoint"
  names = set(os.listdir(directory))
  if not names:
    return None
  if {CONFIG_FILE, PARAMS_DIR} <= names <= {CONFIG_FILE, PARAMS_DIR, MANIFEST_FILE}:
    return None
  return ("it is not a sam_jax checkpoint (one holds only config.json, params/ and "
          "manifest.json)")


# The save is synchronous and nothing touches the arrays meanwhile, so Orbax's defensive
# copy of each host array (as much memory again as the model) is not needed.
_SAVE_HANDLERS = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.ArrayHandler()))  # without it, Orbax warns on every save


def save_sam(directory: str, config: ml_collections.ConfigDict, params: Params,
             overwrite: bool = False, source: Optional[Dict[str, Any]] = None) -> None:
  """Writes a checkpoint directory atomically: a failed save leaves nothing behind.

  With `overwrite`, only an existing sam_jax checkpoint (or an empty folder) is
  replaced, by a swap once the new one is complete. `manifest.json` records
  each array's sha256, which `load_sam` verifies, and `source` (e.g. the
  dtypes of a converted state dict). `params` are host (or fully addressable)
  arrays, written by the calling process alone: with several processes, one of
  them calls this (the others do not wait).
  """
  check_params(params, abstract_params(build_sam(config)))
  params = jax.tree_util.tree_map(np.asarray, params)
  manifest = dict(format=MANIFEST_FORMAT, arrays=checksums(params), source=source or {})
  with outputs.atomic_output(directory, overwrite, is_checkpoint, "checkpoint") as tmp:
    os.makedirs(tmp)
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=alone,
                                          type_handler_registry=_SAVE_HANDLERS)
    ocp.Checkpointer(handler, multiprocessing_options=alone).save(
        os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    manifest["files"] = _file_sizes(os.path.join(tmp, PARAMS_DIR))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config.to_dict(), f, indent=2)
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
      json.dump(manifest, f, indent=1)


def load_config(directory: str) -> ml_collections.ConfigDict:
  """A checkpoint's model config; a missing, corrupt or incomplete one is a CheckpointError."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    hint = (" It looks like a PyTorch checkpoint: convert it with "
            "`python convert_weights.py --checkpoint FILE --output DIR` first."
            if str(directory).endswith((".pth", ".pt", ".bin")) else "")
    raise CheckpointError(f"{directory} is not a sam_jax checkpoint directory (no {CONFIG_FILE}).{hint}")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the converter "
                          "or the run that wrote the checkpoint.") from e
  if not isinstance(raw, dict):
    raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a model config.")
  config = ml_collections.ConfigDict(raw, type_safe=False)
  if isinstance(config.get("image_size"), (list, tuple)):
    config.image_size = tuple(config.image_size)
  try:
    build_sam(config)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path} does not describe a model: {type(e).__name__}: {e}") from e
  return config


def load_manifest(directory: str) -> Optional[Dict[str, Any]]:
  """The checkpoint's manifest.json, or None for a checkpoint written before manifests."""
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}): the checkpoint is damaged.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
    raise CheckpointError(f"{path} is not a sam_jax manifest: the checkpoint is damaged.")
  return manifest


def _file_sizes(params_dir: str) -> Dict[str, int]:
  out = {}
  for root, _, files in os.walk(params_dir):
    for f in files:
      full = os.path.join(root, f)
      out[os.path.relpath(full, params_dir)] = os.path.getsize(full)
  return out


def check_files(directory: str, manifest: Dict[str, Any]) -> None:
  """Raises CheckpointError naming the data files that are missing or truncated.

  Checked before Orbax reads anything: it reports missing files late and noisily.
  """
  params_dir = os.path.join(directory, PARAMS_DIR)
  bad = []
  for name, size in sorted(manifest.get("files", {}).items()):
    full = os.path.join(params_dir, name)
    if not os.path.isfile(full):
      bad.append(f"  {PARAMS_DIR}/{name}: missing")
    elif os.path.getsize(full) != size:
      bad.append(f"  {PARAMS_DIR}/{name}: {os.path.getsize(full)} bytes, {size} when saved")
  if bad:
    raise CheckpointError(f"{directory} is incomplete: its data files do not match "
                          f"manifest.json:\n" + "\n".join(bad) +
                          "\nRestore the checkpoint from a good copy.")


def verify_checksums(directory: str, params: Params, manifest: Dict[str, Any]) -> None:
  """Raises CheckpointError naming every array whose bytes differ from the manifest's."""
  want, got = manifest.get("arrays", {}), checksums(params)
  bad = sorted(k for k in set(want) | set(got)
               if want.get(k, {}).get("sha256") != got.get(k, {}).get("sha256"))
  if bad:
    raise CheckpointError(
        f"The parameters in {directory} do not match the checksums of its manifest.json: the "
        f"checkpoint is corrupt. {len(bad)} damaged array(s):\n" +
        "\n".join(f"  {k}" for k in bad[:50]) +
        "\nRestore it from a good copy (or pass verify=False to load it anyway).")


# Which config.json field decides the shape of a parameter (first match wins).
_FIELDS = [
    (r"image_encoder/pos_embed", "image_size / image_encoder.patch_size"),
    (r"image_encoder/blocks_(\d+)/attn/rel_pos", "image_encoder.window_size / "
     "image_encoder.global_attn_indexes / image_size"),
    (r"image_encoder/blocks_\d+/mlp", "image_encoder.mlp_ratio / embed_dim"),
    (r"image_encoder/blocks_(\d+)/", "image_encoder.depth / embed_dim / num_heads"),
    (r"image_encoder/patch_embed", "image_encoder.patch_size / embed_dim"),
    (r"image_encoder/neck", "prompt_embed_dim / image_encoder.embed_dim"),
    (r"image_encoder", "image_encoder.*"),
    (r"prompt_encoder/mask_downscaling", "prompt_encoder.mask_in_chans / prompt_embed_dim"),
    (r"prompt_encoder", "prompt_embed_dim"),
    (r"mask_decoder/iou_prediction_head", "mask_decoder.iou_head_depth / iou_head_hidden_dim"),
    (r"mask_decoder/transformer", "mask_decoder.transformer_* / attention_downsample_rate"),
    (r"mask_decoder", "mask_decoder.* / prompt_embed_dim"),
]


def _field(name: str) -> str:
  for pattern, field in _FIELDS:
    if re.match(pattern, name):
      return field
  return "the model config"


def check_config_fits(stored: Params, target: Params, path: str) -> None:
  """Raises CheckpointError when config.json contradicts the stored parameter shapes.

  Every difference names the config field that decides that shape: a config
  that does not describe its weights never loads (it would change the outputs).
  """
  flat = {_array_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
  want = {_array_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  lines = []
  for name in sorted(set(want) | set(flat)):
    if name not in flat:
      lines.append(f"  {name}: in the model config.json describes, not in the weights "
                   f"(check {_field(name)})")
    elif name not in want:
      lines.append(f"  {name}: in the weights, not in the model config.json describes "
                   f"(check {_field(name)})")
    elif tuple(flat[name].shape) != tuple(want[name].shape):
      lines.append(f"  {name}: weights {tuple(flat[name].shape)}, config.json implies "
                   f"{tuple(want[name].shape)} (check {_field(name)})")
  if lines:
    raise CheckpointError(f"{path}: config.json contradicts the weights; fix the field(s) "
                          f"named below:\n" + "\n".join(lines))


def load_sam(directory: str, image_size: Optional[Union[int, Tuple[int, int]]] = None,
             verify: bool = True) -> Tuple[Sam, Params]:
  """Loads `(model, params)` from a directory written by `save_sam` or the converter.

  config.json must describe the weights exactly; `image_size` (e.g. 512 or
  (768, 1024)) builds the model for another input size and resizes the
  position embeddings, the only parameters that may change shape. With
  `verify` (the default), each array's sha256 is checked against manifest.json.
  """
  config = load_config(directory)
  manifest = load_manifest(directory)
  stored_target = abstract_params(build_sam(config))
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise CheckpointError(f"{directory} has no {PARAMS_DIR}/ folder: the weights are missing.")
  if manifest is not None:
    check_files(directory, manifest)
  ckptr = ocp.StandardCheckpointer()
  try:
    metadata = ckptr.metadata(path).item_metadata
    if metadata is None:
      raise CheckpointError(f"{path} has no readable parameter metadata (files missing?).")
    stored = metadata.tree
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged directory
    raise CheckpointError(f"Cannot read the parameters in {path}: {type(e).__name__}: {e}") from e
  check_config_fits(stored, stored_target, directory)
  restore_target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
  try:
    params = ckptr.restore(path, restore_target)
  except Exception as e:  # noqa: BLE001 - missing or truncated data files
    raise CheckpointError(
        f"Cannot read the parameters in {path} (data files missing or damaged?): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  if verify:
    if manifest is None:
      logging.warning("%s has no manifest.json (written before checksums): its bytes are "
                      "not verified. Save it again to add them.", directory)
    else:
      verify_checksums(directory, params, manifest)
  model = build_sam(config)
  if image_size is not None:
    image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size
  if image_size is not None and image_size_hw(config.image_size) != image_size_hw(image_size):
    config.image_size = image_size
    try:
      model = build_sam(config)
    except ValueError as e:
      raise CheckpointError(f"image_size {image_size}: {e}") from e
    params = resize_params(params, abstract_params(model))
  return model, jax.tree_util.tree_map(jnp.asarray, params)
