"""sam_jax checkpoints: a directory with `config.json` and an Orbax `params` tree."""

import functools
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sam_jax.build import build_sam, image_size_hw
from sam_jax.modeling.image_encoder import linear_resize_matrix
from sam_jax.modeling.sam import Sam

Params = Dict[str, Any]
CONFIG_FILE, PARAMS_DIR = "config.json", "params"


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


def abstract_params(model: Sam) -> Params:
  """The parameters' shapes and dtypes, without computing them."""
  return jax.eval_shape(functools.partial(_init, model), jax.random.key(0))


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


def check_params(params: Params, target: Params, allow_resize: bool = False) -> None:
  """Raises CheckpointError listing every missing, unexpected and mis-shaped parameter."""
  missing, unexpected, shapes = _shape_mismatches(params, target)
  if allow_resize:
    shapes = [k for k in shapes if not k.endswith(("['pos_embed']", "['rel_pos_h']", "['rel_pos_w']"))]
  if missing or unexpected or shapes:
    lines = ["The parameters do not fit the model:"]
    for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
      if names:
        lines += [f"  {len(names)} {title}:"] + [f"    {n}" for n in names]
    raise CheckpointError("\n".join(lines))


def save_sam(directory: str, config: ml_collections.ConfigDict, params: Params,
             overwrite: bool = False) -> None:
  """Writes a checkpoint directory atomically: a failed save leaves nothing behind.

  `params` are host (or fully addressable) arrays, written by the calling process
  alone: with several processes, one of them calls this (the others do not wait).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise CheckpointError(f"{directory} exists already; choose another path or pass overwrite.")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  check_params(params, abstract_params(build_sam(config)))
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory), dir=parent)
  try:
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=alone)
    ckptr.save(os.path.join(tmp, PARAMS_DIR), jax.tree_util.tree_map(np.asarray, params))
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config.to_dict(), f, indent=2)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    hint = (" It looks like a PyTorch checkpoint: convert it with "
            "`python convert_weights.py --checkpoint FILE --output DIR` first."
            if str(directory).endswith((".pth", ".pt", ".bin")) else "")
    raise CheckpointError(f"{directory} is not a sam_jax checkpoint directory (no {CONFIG_FILE}).{hint}")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f), type_safe=False)
  if isinstance(config.image_size, (list, tuple)):
    config.image_size = tuple(config.image_size)
  return config


def load_sam(directory: str, image_size: Optional[Union[int, Tuple[int, int]]] = None
             ) -> Tuple[Sam, Params]:
  """Loads `(model, params)` from a directory written by `save_sam` or the converter.

  `image_size` builds the model for another input size (e.g. 512 or (768, 1024))
  and resizes the position embeddings of a checkpoint trained at another size.
  """
  config = load_config(directory)
  if image_size is not None:
    config.image_size = image_size
    image_size_hw(config.image_size)
  model = build_sam(config)
  target = abstract_params(model)
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  try:
    stored = ckptr.metadata(path).item_metadata.tree
  except Exception as e:
    raise CheckpointError(f"Cannot read the parameters in {path}: {e}") from e
  check_params(stored, target, allow_resize=True)
  restore_target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
  params = ckptr.restore(path, restore_target)
  params = resize_params(params, target)
  return model, jax.tree_util.tree_map(jnp.asarray, params)
