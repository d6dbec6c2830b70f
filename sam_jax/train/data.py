"""SA-1B-layout folders (`NAME.jpg` + `NAME.json`) as fixed-shape training batches.

Everything here runs on the host in NumPy; no TensorFlow touches the devices.
Batch `k` of a run is a pure function of (seed, k), so resuming at a step
reproduces the same data, and each process reads only its own rows of it.
"""

import concurrent.futures
import json
import logging
import os
import queue
import threading
from typing import Dict, Iterator, List, Optional, Sequence

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

Example = Dict[str, np.ndarray]


def list_examples(directory: str) -> List[str]:
  """Sorted names that have both a `.jpg` and a `.json` in `directory`."""
  files = set(os.listdir(directory))
  names = sorted(f[:-5] for f in files if f.endswith(".json") and f[:-5] + ".jpg" in files)
  if not names:
    raise FileNotFoundError(f"No NAME.jpg + NAME.json pairs (SA-1B layout) in {directory}.")
  return names


def resized_hw(h: int, w: int, longest: int):
  """The size with the longest side `longest`, as the reference's ResizeLongestSide."""
  scale = longest / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


class Sa1bFolder:
  """Reads examples of an SA-1B-layout folder into padded, fixed-shape arrays.

  Each example: `image` (S, S, 3) float32 RGB, resized so its longest side is
  S and padded with the pixel mean (which the model normalises to zero, as its
  own zero padding); `masks` (max_masks, m, m) uint8 at `mask_size` (the
  decoder's low-res grid for training, S for evaluation); `valid` (max_masks,).
  Masks covering more than `max_mask_fraction` of the image are dropped; up to
  `max_masks` of the rest are drawn at random (seeded by the example's draw).
  """

  def __init__(self, directory: str, image_size: int, mask_size: int, max_masks: int,
               max_mask_fraction: float = 0.9,
               pixel_mean: Sequence[float] = (123.675, 116.28, 103.53)):
    self.directory = directory
    self.names = list_examples(directory)
    self.image_size, self.mask_size, self.max_masks = image_size, mask_size, max_masks
    self.max_mask_fraction = max_mask_fraction
    self.pixel_mean = np.asarray(pixel_mean, np.float32)
    self.num_skipped = 0  # corrupt examples replaced by empty ones, so far
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.names)

  def empty(self) -> Example:
    s, m = self.image_size, self.mask_size
    return dict(image=np.broadcast_to(self.pixel_mean, (s, s, 3)).copy(),
                masks=np.zeros((self.max_masks, m, m), np.uint8),
                valid=np.zeros((self.max_masks,), bool))

  def load(self, index: int, rng: np.random.Generator) -> Example:
    """Example `index`; a corrupt one is logged, counted and returned empty (no valid masks)."""
    name = self.names[index]
    try:
      return self._load(name, rng)
    except Exception as e:  # noqa: BLE001 - one bad file must never end a long run
      with self._lock:
        self.num_skipped += 1
      logging.warning("Skipping corrupt example %s: %s", name, e)
      return self.empty()

  def _load(self, name: str, rng: np.random.Generator) -> Example:
    with open(os.path.join(self.directory, name + ".json")) as f:
      record = json.load(f)
    with Image.open(os.path.join(self.directory, name + ".jpg")) as im:
      image = np.asarray(im.convert("RGB"))
    h0, w0 = image.shape[:2]
    h1, w1 = resized_hw(h0, w0, self.image_size)
    out = self.empty()
    out["image"][:h1, :w1] = cv2.resize(image, (w1, h1), interpolation=cv2.INTER_LINEAR)

    anns = [a for a in record["annotations"]
            if a.get("area", 1) <= self.max_mask_fraction * h0 * w0]
    chosen = rng.permutation(len(anns))[:self.max_masks]
    scale = self.mask_size / self.image_size
    hm, wm = max(int(h1 * scale + 0.5), 1), max(int(w1 * scale + 0.5), 1)
    for slot, i in enumerate(chosen):
      seg = anns[i]["segmentation"]
      if isinstance(seg.get("counts"), list):  # uncompressed RLE
        seg = mask_utils.frPyObjects(seg, *seg["size"])
      m = mask_utils.decode(seg)
      if m.shape != (h0, w0):
        raise ValueError(f"mask of {m.shape} on an image of {(h0, w0)}")
      if m.mean() > self.max_mask_fraction:  # `area` may be absent or stale
        continue
      # Area interpolation then a 0.5 threshold: a cell is in the mask when mostly covered.
      small = cv2.resize(m.astype(np.float32), (wm, hm), interpolation=cv2.INTER_AREA)
      out["masks"][slot, :hm, :wm] = small >= 0.5
      out["valid"][slot] = out["masks"][slot].any()
    return out


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, global_batch: int, seed: int, step: int,
                  shuffle: bool = True) -> np.ndarray:
  """The example indices of global batch `step`: epochs of seeded permutations, end to end."""
  flat = np.arange(step * global_batch, (step + 1) * global_batch)
  epochs, pos = flat // num_examples, flat % num_examples
  if not shuffle:
    return pos
  return np.array([epoch_order(num_examples, seed, e)[p] for e, p in zip(epochs, pos)])


def load_batch(source: Sa1bFolder, indices: np.ndarray, seed: int, first_row: int,
               pool: Optional[concurrent.futures.Executor] = None) -> Example:
  """Stacks the examples `indices`, rows first_row, first_row + 1, ... of the run.

  Each row's mask draw is seeded by its global row number, so any number of
  processes reads exactly the data that one process would.
  """
  rngs = [np.random.default_rng([seed, first_row + r]) for r in range(len(indices))]
  load = lambda args: source.load(*args)  # noqa: E731
  items = list((pool.map if pool else map)(load, zip(indices, rngs)))
  return {k: np.stack([x[k] for x in items]) for k in items[0]}


def train_batches(source: Sa1bFolder, global_batch: int, seed: int, start_step: int,
                  process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2, num_threads: int = 4) -> Iterator[Example]:
  """Yields this process's rows of global batches start_step, start_step + 1, ...

  A background thread reads ahead `prefetch` batches. Each process reads only
  its contiguous `global_batch / process_count` rows of every batch.
  """
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  q: "queue.Queue" = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def produce():
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      step = start_step
      while not stop.is_set():
        idx = batch_indices(len(source), global_batch, seed, step)
        rows = idx[process_index * local:(process_index + 1) * local]
        first_row = step * global_batch + process_index * local
        batch = load_batch(source, rows, seed, first_row, pool)
        while not stop.is_set():
          try:
            q.put(batch, timeout=0.1)
            break
          except queue.Full:
            continue
        step += 1

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      yield q.get()
  finally:
    stop.set()


def eval_examples(source: Sa1bFolder, num: int, seed: int = 0) -> Example:
  """The first `num` examples in file order, as one stacked batch (masks drawn with `seed`)."""
  idx = np.arange(min(num, len(source)))
  return load_batch(source, idx, seed, 0)
