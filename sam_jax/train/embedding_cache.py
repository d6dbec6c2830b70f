"""Image embeddings computed once, for training with a frozen image encoder.

When `config.freeze` freezes every parameter of the image encoder (the presets
'frozen_image_encoder' and 'decoder_only' do), the encoder never changes, so an
image's embedding is the same at every step.
`config.cache_embeddings = True` computes the embedding of every training
example once (jitted, a global batch at a time, sharded as the training batch)
into `.npy` files under WORKDIR/embeddings (or `config.embedding_cache_dir`),
then each step reads its examples' rows and runs only the prompt encoder and
the decoder (`recipe.embed` takes `batch["embeddings"]`).

Rows are keyed by the example index that the data pipeline passes to
`source.load(index, rng)`. `meta.json` records a fingerprint of everything an
embedding depends on: the encoder's config, image size and normalisation, an
exact digest of the encoder's parameters, the number of examples and the input
images of a few of them. A cache whose fingerprint differs (another checkpoint,
other data) is deleted and computed again, never used. Layout: process p of P
writes `part-p-of-P.npy`, holding rows p*L .. (p+1)*L - 1 (L = batch / P) of
each global batch of examples 0, 1, 2, ...; every process reads all parts, so a
multi-process run needs the directory on a file system that all its hosts share.
A build stopped by a preemption notice keeps the batches it computed (its
`tmp-` parts and their `.json` progress) and the next run continues it.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.build import build_sam
from sam_jax.checkpoint import abstract_params
from sam_jax.modeling.sam import Sam
from sam_jax.train import data as data_lib
from sam_jax.train import param_groups, preemption
from sam_jax.train import sharding as shard_lib

FORMAT_VERSION = 1
META = "meta.json"


def check_config(config, mcfg) -> None:
  """Refuses a cache that could not reproduce the uncached training."""
  if not param_groups.all_frozen(abstract_params(build_sam(mcfg)), config.freeze,
                                 "image_encoder"):
    raise ValueError(
        f"config.cache_embeddings needs a frozen image encoder (config.freeze matching every "
        f"'image_encoder/...' parameter, e.g. 'frozen_image_encoder'); with "
        f"freeze={config.freeze!r} the encoder trains and its embeddings change at every step. "
        "Set config.cache_embeddings=False.")
  if mcfg.image_encoder.get("drop_path_rate", 0.0) > 0:
    raise ValueError(
        f"config.cache_embeddings: the encoder's drop_path_rate is "
        f"{mcfg.image_encoder.drop_path_rate}, so an image's embedding differs at every step "
        "and cannot be cached. Set it to 0 (config.model.image_encoder.drop_path_rate, or "
        "config.model_overrides for a checkpoint) or turn the cache off.")


@jax.jit
def _digests(tree):
  """Two 32-bit sums per leaf of its bits, each mixed with the element's position.

  Integer sums wrap and are associative, so the digest is exact and the same
  however the parameters are sharded.
  """
  def leaf(x):
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).ravel()
    i = jnp.arange(bits.size, dtype=jnp.uint32)
    out = []
    for k1, k2 in ((0x9E3779B1, 0x85EBCA77), (0xC2B2AE3D, 0x27D4EB2F)):
      h = (bits ^ (i * jnp.uint32(k1))) * jnp.uint32(k2)
      out.append(jnp.sum(h ^ (h >> 15), dtype=jnp.uint32))
    return jnp.stack(out)
  return jax.tree.map(leaf, tree)


def params_digest(params) -> str:
  digests = jax.tree_util.tree_flatten_with_path(_digests(params))[0]
  h = hashlib.sha256()
  for (path, d), x in zip(digests, jax.tree.leaves(params)):
    h.update(f"{jax.tree_util.keystr(path)}{tuple(x.shape)}{x.dtype}".encode())
    h.update(np.asarray(d.addressable_data(0)).tobytes())
  return h.hexdigest()


def data_digest(source, num_samples: int = 8) -> str:
  """The number of examples and the input images of a few, evenly spaced (the images,
  resized and padded, are what the encoder sees; their masks play no part)."""
  h = hashlib.sha256(f"{len(source)}".encode())
  for i in np.unique(np.linspace(0, len(source) - 1, num_samples).astype(int)):
    h.update(np.ascontiguousarray(source.load(int(i), np.random.default_rng(0))["image"]))
  return h.hexdigest()


def fingerprint(mcfg, encoder_params, source) -> str:
  """What the embeddings depend on: encoder config and parameters, and the examples."""
  enc = {k: v for k, v in mcfg.image_encoder.to_dict().items() if k != "remat"}
  desc = dict(version=FORMAT_VERSION, image_encoder=enc, image_size=mcfg.image_size,
              dtype=mcfg.dtype, pixel_mean=list(mcfg.pixel_mean),
              pixel_std=list(mcfg.pixel_std), params=params_digest(encoder_params),
              data=data_digest(source))
  return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _part_name(p: int, count: int) -> str:
  return f"part-{p:05d}-of-{count:05d}.npy"


def _storage_dtype(dtype: np.dtype) -> np.dtype:
  """`.npy` knows no bfloat16: such arrays are stored as their bits."""
  return dtype if dtype.kind in "fiu" and dtype.isbuiltin else np.dtype(f"u{dtype.itemsize}")


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (as `put_batch` placed them)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  rows = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    rows.setdefault(start, np.asarray(shard.data))
  return np.concatenate([rows[k] for k in sorted(rows)])


class EmbeddingCache:
  """Read-only view of a complete cache: `cache[index]` is one example's embedding."""

  def __init__(self, directory: str, meta: Dict[str, Any]):
    self.directory, self.meta = directory, meta
    self.dtype = np.dtype(jnp.dtype(meta["dtype"]))
    count = meta["process_count"]
    self._parts = [np.load(os.path.join(directory, _part_name(p, count)), mmap_mode="r")
                   for p in range(count)]
    self._local = meta["global_batch"] // count

  def __len__(self) -> int:
    return self.meta["num_examples"]

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} is not in the cache of {len(self)} examples")
    k, pos = divmod(int(index), self.meta["global_batch"])
    p, r = divmod(pos, self._local)
    return np.array(self._parts[p][k * self._local + r]).view(self.dtype)


class CachedSource:
  """A training source whose examples carry their cached `embeddings` and no `image`.

  Wraps anything with `__len__` and `load(index, rng)` (data.Sa1bExamples); the
  lookup runs in the pipeline's loading threads. Other attributes pass through.
  """

  def __init__(self, source, cache: EmbeddingCache):
    self.source, self.cache = source, cache

  def __len__(self) -> int:
    return len(self.source)

  def __getattr__(self, name):
    return getattr(self.source, name)

  def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    example = dict(self.source.load(index, rng))
    example.pop("image", None)
    example["embeddings"] = self.cache[index]
    return example


def _read_meta(directory: str) -> Optional[Dict[str, Any]]:
  try:
    with open(os.path.join(directory, META)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj) -> None:
  """Written whole or not at all (a rename)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def _clear(directory: str) -> None:
  for name in os.listdir(directory):
    if name == META or name.startswith(("part-", "tmp-")):
      path = os.path.join(directory, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _progress_path(directory: str, p: int, count: int) -> str:
  return os.path.join(directory, f"tmp-{_part_name(p, count)}.json")


def _batches_done(directory: str, fp: str, pcount: int, global_batch: int) -> int:
  """How many batches a stopped build of this cache finished in every process (0: none).

  Every process reads all the progress files, so all decide alike.
  """
  done = set()
  for p in range(pcount):
    try:
      with open(_progress_path(directory, p, pcount)) as f:
        progress = json.load(f)
    except (OSError, ValueError):
      return 0
    if (progress.get("fingerprint"), progress.get("global_batch")) != (fp, global_batch):
      return 0
    done.add(progress["batches_done"])
  return done.pop() if len(done) == 1 else 0


def open_or_build(directory: str, source, model: Sam, params, mcfg, mesh, global_batch: int,
                  seed: int = 0, notice: Optional[preemption.Notice] = None) -> EmbeddingCache:
  """The cache in `directory` if its fingerprint matches, else computed anew.

  `params` are the full model parameters (sharded or not); only the image
  encoder's are used. Every process must call this. When `notice` says so the
  build stops after a batch, keeping what it computed, and raises
  `preemption.Preempted`; the next call continues it.
  """
  fp = fingerprint(mcfg, params["image_encoder"], source)
  meta = _read_meta(directory)
  if meta is not None and meta.get("fingerprint") == fp:
    print(f"Using the cached image embeddings in {directory}.", flush=True)
    return EmbeddingCache(directory, meta)
  if meta is not None:
    print(f"The embeddings cached in {directory} are stale (another encoder, config or "
          "dataset); computing them again.", flush=True)
  pcount, pindex = jax.process_count(), jax.process_index()
  if global_batch % pcount:
    raise ValueError(f"batch size {global_batch} is not divisible by {pcount} processes")
  start = _batches_done(directory, fp, pcount, global_batch) if meta is None else 0
  if pindex == 0 and not start:
    os.makedirs(directory, exist_ok=True)
    _clear(directory)
  shard_lib.sync_processes("embedding_cache_clear")

  num = len(source)
  local = global_batch // pcount
  num_batches = -(-num // global_batch)
  images_sh = shard_lib.batch_sharding(mesh, 4)
  param_sh = shard_lib.param_shardings(params, mesh)
  # As in the training step, the model computes with weights gathered over fsdp
  # (the workaround in sharding.py's docstring for an XLA partitioner bug).
  embed = jax.jit(lambda p, x: model.apply({"params": shard_lib.gather_fsdp(p, mesh)}, x, False,
                                           method=Sam.embed_images),
                  in_shardings=(param_sh, images_sh), out_shardings=images_sh)

  def load(k):
    idx = np.minimum(np.arange(k * global_batch, (k + 1) * global_batch), num - 1)
    rows = idx[pindex * local:(pindex + 1) * local]
    return data_lib.load_batch(source, rows, seed, k * global_batch + pindex * local, pool)

  part, tmp = None, os.path.join(directory, f"tmp-{_part_name(pindex, pcount)}")
  if start:
    part = np.lib.format.open_memmap(tmp, mode="r+")
    print(f"Continuing the image embeddings of {num} examples in {directory} at batch "
          f"{start} of {num_batches} ...", flush=True)
  else:
    print(f"Computing the image embeddings of {num} examples into {directory} ...", flush=True)
  with concurrent.futures.ThreadPoolExecutor(4) as pool, \
       concurrent.futures.ThreadPoolExecutor(1) as ahead, \
       jax.set_mesh(mesh), nn.logical_axis_rules(shard_lib.LOGICAL_RULES):
    params = jax.device_put(params, param_sh)
    nxt = ahead.submit(load, start)
    for k in range(start, num_batches):
      batch = nxt.result()
      if k + 1 < num_batches:
        nxt = ahead.submit(load, k + 1)  # reads the next batch while this one computes
      images = shard_lib.put_batch({"images": batch["image"]}, mesh)["images"]
      emb = _local_rows(embed(params, images))
      if part is None:
        dtype = np.dtype(emb.dtype)
        part = np.lib.format.open_memmap(tmp, mode="w+", dtype=_storage_dtype(dtype),
                                         shape=(num_batches * local, *emb.shape[1:]))
      part[k * local:(k + 1) * local] = emb.view(part.dtype)
      if notice is not None and notice.reached() and k + 1 < num_batches:
        part.flush()
        _write_json(_progress_path(directory, pindex, pcount),
                    dict(fingerprint=fp, global_batch=global_batch, batches_done=k + 1))
        shard_lib.sync_processes("embedding_cache_preempted")
        raise preemption.Preempted(
            f"the image embeddings of the first {k + 1} of {num_batches} batches in {directory}")
  part.flush()
  del part
  os.replace(tmp, os.path.join(directory, _part_name(pindex, pcount)))
  shard_lib.sync_processes("embedding_cache_parts")
  meta = dict(fingerprint=fp, version=FORMAT_VERSION, num_examples=num,
              global_batch=global_batch, process_count=pcount,
              shape=list(emb.shape[1:]), dtype=jnp.dtype(emb.dtype).name)
  if pindex == 0:
    for p in range(pcount):  # the build is complete: no part of it is to be continued
      if os.path.exists(_progress_path(directory, p, pcount)):
        os.remove(_progress_path(directory, p, pcount))
    _write_json(os.path.join(directory, META), meta)
    logging.info("Cached %d embeddings of %s in %s", num, meta["shape"], directory)
  shard_lib.sync_processes("embedding_cache_meta")
  return EmbeddingCache(directory, meta)
