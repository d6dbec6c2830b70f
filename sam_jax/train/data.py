"""SA-1B examples, from TFDS or from a local folder, as fixed-shape training batches.

Two sources, one pipeline. Both are TFDS datasets with the features of the
catalog's `segment_anything` (SA-1B) in the `array_record` format, read by
random access with `builder.as_data_source` (NumPy decoding, no TensorFlow):

* `config.data.tfds_name = "segment_anything"`: SA-1B as TFDS prepares it
  (`tfds build segment_anything --file_format=array_record`), under
  `config.data.tfds_data_dir`, split `config.data.train_split` (slicing works:
  `"train[:-1000]"`). Any dataset with the same features works too.
* `config.data.train_dir`, `eval_dir`: folders in SA-1B's layout (`NAME.jpg` +
  `NAME.json`), prepared once into TFDS by `sa1b_folder.Sa1bFolder` (under
  `tfds_data_dir`, else WORKDIR/tfds) and read the same way.

Everything here runs on the host in NumPy. Images are decoded with PIL,
resized to fit the model's (H, W) input (the longest side, for a square one)
as `ResizeLongestSide` resizes them at inference, and padded with the pixel
mean; masks are decoded with pycocotools. Batch `k` of a run is a pure
function of (seed, k), so resuming at a data position reproduces the same
data, and each process reads only its own rows of it. A corrupt example is
logged, counted and replaced by one without masks; it never ends a run.
"""

import concurrent.futures
import functools
import glob
import io
import logging
import os
import queue
import re
import threading
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import cv2
import jax
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.build import image_size_hw
from sam_jax.transforms import ResizeLongestSide, Size

Example = Dict[str, np.ndarray]


def _image_decoders():
  """Keeps the image bytes: PIL decodes them (any mode to RGB) when the example is built."""
  import tensorflow_datasets as tfds
  return {"image": {"content": tfds.decode.SkipDecoding()}}


def _check_features(features, what: str) -> None:
  try:
    features["image"]["content"]
    features["annotations"]["segmentation"]["counts"]
    features["annotations"]["area"]
  except (KeyError, TypeError) as e:
    raise ValueError(
        f"{what} does not have the features of TFDS's `segment_anything` (image/content, "
        f"annotations/segmentation/counts and size, annotations/area); missing {e}.") from e


def tfds_records(name: str, split: str = "train", data_dir: Optional[str] = None):
  """Random access to a prepared TFDS dataset: (source, {name: reason} skipped at preparation)."""
  import tensorflow_datasets as tfds
  from sam_jax.train import sa1b_folder
  def not_prepared(where):
    return FileNotFoundError(
        f"The TFDS dataset {name!r} is not prepared under {where}. For SA-1B, "
        "prepare it once in the array_record format: `tfds build segment_anything "
        "--manual_dir=DIR_WITH_segment_anything_links.txt --file_format=array_record "
        "--data_dir=DATA_DIR` (see TFDS's segment_anything page), then set "
        "config.data.tfds_data_dir=DATA_DIR.")
  # TFDS's builder for a dataset not prepared looks for it on its bucket and leaves an
  # empty temporary directory behind: a local folder without a finished build (TFDS
  # writes dataset_info.json last) is answered here. Remote ones (gs://) are TFDS's.
  if (data_dir and "://" not in data_dir
      and not glob.glob(os.path.join(glob.escape(data_dir), re.split(r"[/:]", name)[0], "**",
                                     "dataset_info.json"), recursive=True)):
    raise not_prepared(data_dir)
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise not_prepared(builder.data_dir)
  formats = [str(f.value) for f in builder.info.available_file_formats()]
  if "array_record" not in formats:
    raise ValueError(
        f"The TFDS dataset {name!r} under {builder.data_dir} is stored as {formats}; random "
        "access (what makes the order seeded, the per-host sharding exact and resuming "
        "possible) needs array_record. Prepare it again with --file_format=array_record.")
  _check_features(builder.info.features, f"The TFDS dataset {name!r}")
  source = builder.as_data_source(split, file_format="array_record",
                                  decoders=_image_decoders())
  return source, sa1b_folder.skipped(builder)


def folder_records(directory: str, data_dir: str):
  """A folder in SA-1B's layout through its TFDS builder: (source, skipped at preparation).

  With several processes, process 0 prepares the folder first; a process that
  then does not see the prepared copy (`data_dir` not shared) prepares its own.
  """
  from sam_jax.train import sa1b_folder
  if jax.process_count() > 1:
    from sam_jax.train import sharding  # noqa: PLC0415
    if jax.process_index() == 0:
      sa1b_folder.prepare_folder(directory, data_dir)
    sharding.sync_processes(f"sam_jax prepared {os.path.abspath(directory)}")
  builder = sa1b_folder.prepare_folder(directory, data_dir)
  source = builder.as_data_source("train", decoders=_image_decoders())
  return source, sa1b_folder.skipped(builder)


def rle_counts(counts: Union[str, bytes]) -> np.ndarray:
  """The run lengths of a compressed COCO RLE string, as pycocotools' rleFrString reads them.

  Raises ValueError on a string that pycocotools would misread (characters
  outside its alphabet, a truncated number, a negative run).
  """
  b = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else bytes(counts),
                    np.uint8).astype(np.int64) - 48
  if b.size == 0:
    return np.zeros((0,), np.int64)
  if b.min() < 0 or b.max() > 63:
    raise ValueError("counts hold characters outside COCO's compressed-RLE alphabet")
  more = (b & 0x20) != 0
  if more[-1]:
    raise ValueError("counts end in the middle of a number")
  group = np.concatenate([[0], np.cumsum(~more[:-1])])
  starts = np.concatenate([[0], np.flatnonzero(~more)[:-1] + 1])
  k = np.arange(b.size) - starts[group]
  if k.max() > 6:
    raise ValueError("counts hold a number too large for a run length")
  x = np.zeros(len(starts), np.int64)
  np.add.at(x, group, (b & 0x1F) << (5 * k))
  ends = np.flatnonzero(~more)
  negative = (b[ends] & 0x10) != 0
  x[negative] -= np.left_shift(1, 5 * (k[ends][negative] + 1))
  # Runs past the third are stored as differences to the run two before.
  x[1::2], x[2::2] = np.cumsum(x[1::2]), np.cumsum(x[2::2])
  if (x < 0).any():
    raise ValueError("counts hold a negative run length")
  return x


def check_annotation(counts, size, area: float, bbox, h: int, w: int) -> Dict[str, Any]:
  """The RLE of one annotation, validated before pycocotools decodes it; ValueError if bad.

  pycocotools trusts its input: runs that do not sum to h*w make it read
  uninitialised memory (a different mask each time) or write past its buffer.
  The size must be the image's, and `area` and the normalised (ymin, xmin,
  ymax, xmax) `bbox` must agree with the mask.
  """
  size = [int(s) for s in np.asarray(size).reshape(-1)]
  if tuple(size) != (h, w):
    raise ValueError(f"mask of size {tuple(size)} on an image of {(h, w)}")
  if isinstance(counts, (list, tuple, np.ndarray)) and not isinstance(counts, bytes):
    runs = np.asarray(counts, np.int64).reshape(-1)
    if (runs < 0).any():
      raise ValueError("negative run length")
    rle = mask_utils.frPyObjects(dict(size=size, counts=[int(r) for r in runs]), h, w)
  else:
    runs = rle_counts(counts)
    rle = dict(size=size, counts=counts)
  if int(runs.sum()) != h * w:
    raise ValueError(f"run lengths sum to {int(runs.sum())}, not {h}x{w}={h * w}")
  true_area = int(runs[1::2].sum())
  if abs(float(area) - true_area) > 1 + 0.01 * true_area:
    raise ValueError(f"area {area} but the mask has {true_area} pixels")
  if bbox is not None and true_area:
    x, y, bw, bh = mask_utils.toBbox(rle)
    want = np.array([y / h, x / w, (y + bh) / h, (x + bw) / w])
    tol = np.array([1.5 / h, 1.5 / w, 1.5 / h, 1.5 / w])
    if np.any(np.abs(np.asarray(bbox, np.float64).reshape(-1) - want) > tol):
      raise ValueError(f"bbox {np.round(np.asarray(bbox).reshape(-1), 4).tolist()} does not "
                       f"enclose the mask ({np.round(want, 4).tolist()})")
  return rle


class Sa1bExamples:
  """Random-access SA-1B records as padded, fixed-shape arrays.

  Each example: `image` (H, W, 3) float32 RGB, resized to fit (H, W) =
  `image_size` and padded with the pixel mean (which the model normalises to
  zero, as its own zero padding); `masks` (max_masks, h, w) uint8 at
  `mask_size` (the decoder's low-res grid for training, the image size for
  evaluation), on the same scale as the image; `valid` (max_masks,). Masks
  covering more than `max_mask_fraction` of the image are dropped (as in the
  SAM paper); up to `max_masks` of the rest are drawn at random with the
  given rng, and a mask that vanishes on the mask grid gives its slot to the next.

  Every annotation is validated before it is decoded (`check_annotation`); a
  bad one is skipped and recorded in `bad_annotations` ({(index, i): reason}).
  A corrupt example (unreadable image, ...) becomes `empty()` and is recorded
  in `skipped_at_read` ({index: reason}): each distinct example once, however
  often it is read. `num_skipped` adds those left out when a folder was
  prepared (`skipped_at_prepare`, {name: reason}). Each loaded example carries
  its `index` and `corrupt` flag, so that a consumer counts what it used.
  """

  def __init__(self, records, image_size: Size, mask_size: Size, max_masks: int,
               max_mask_fraction: float = 0.9,
               pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
               skipped_at_prepare: Optional[Dict[str, str]] = None, description: str = ""):
    self.records = records
    self.image_hw, self.mask_hw = image_size_hw(image_size), image_size_hw(mask_size)
    ratios = (self.mask_hw[0] / self.image_hw[0], self.mask_hw[1] / self.image_hw[1])
    if abs(ratios[0] - ratios[1]) > 1e-9:
      raise ValueError(f"mask size {self.mask_hw} is not image size {self.image_hw} scaled")
    self.mask_scale = ratios[0]
    self.max_masks, self.max_mask_fraction = max_masks, max_mask_fraction
    self.pixel_mean = np.asarray(pixel_mean, np.float32)
    self.skipped_at_prepare = dict(skipped_at_prepare or {})
    self.description = description or repr(records)
    self.skipped_at_read: Dict[int, str] = {}
    self.bad_annotations: Dict[Tuple[int, int], str] = {}
    self._lock = threading.Lock()
    if self.skipped_at_prepare:
      logging.warning("%d corrupt examples of %s were left out when it was prepared: %s",
                      len(self.skipped_at_prepare), self.description,
                      ", ".join(sorted(self.skipped_at_prepare)[:20]))

  @property
  def num_skipped(self) -> int:
    """Corrupt examples so far: met while reading, and left out at preparation."""
    return len(self.skipped_at_read) + len(self.skipped_at_prepare)

  def __len__(self) -> int:
    return len(self.records)

  def empty(self) -> Example:
    (h, w), (mh, mw) = self.image_hw, self.mask_hw
    return dict(image=np.broadcast_to(self.pixel_mean, (h, w, 3)).copy(),
                masks=np.zeros((self.max_masks, mh, mw), np.uint8),
                valid=np.zeros((self.max_masks,), bool),
                index=np.int64(-1), corrupt=np.bool_(False))

  def load(self, index: int, rng: np.random.Generator) -> Example:
    """Example `index`; a corrupt one is logged, recorded and returned empty (no valid masks)."""
    bad: list = []
    try:
      out = self.example(self.records[int(index)], rng, bad)
    except Exception as e:  # noqa: BLE001 - one bad file must never end a long run
      reason = f"{type(e).__name__}: {e}"
      with self._lock:
        new = int(index) not in self.skipped_at_read
        self.skipped_at_read[int(index)] = reason
      if new:
        logging.warning("Skipping corrupt example %d of %s: %s", index, self.description, reason)
      out = self.empty()
      out["corrupt"] = np.bool_(True)
    for i, reason in bad:
      with self._lock:
        new = (int(index), i) not in self.bad_annotations
        self.bad_annotations[(int(index), i)] = reason
      if new:
        logging.warning("Skipping annotation %d of example %d of %s: %s", i, index,
                        self.description, reason)
    out["index"] = np.int64(index)
    return out

  def example(self, record: Dict[str, Any], rng: np.random.Generator,
              bad: Optional[list] = None) -> Example:
    """The arrays of one record in `segment_anything`'s features (image bytes undecoded).

    Annotations that fail validation are skipped and appended to `bad` as (i, reason).
    """
    with Image.open(io.BytesIO(record["image"]["content"])) as im:
      im = im.convert("RGB")
      w0, h0 = im.size
      h1, w1 = ResizeLongestSide.get_preprocess_shape(h0, w0, self.image_hw)
      resized = np.asarray(im.resize((w1, h1), Image.BILINEAR) if (h1, w1) != (h0, w0) else im)
    out = self.empty()
    out["image"][:h1, :w1] = resized

    anns = record["annotations"]
    counts, sizes = anns["segmentation"]["counts"], anns["segmentation"]["size"]
    areas = np.asarray(anns["area"], np.float64).reshape(-1)
    boxes = anns.get("bbox") if hasattr(anns, "get") else None
    keep = np.flatnonzero(areas <= self.max_mask_fraction * h0 * w0)
    hm = max(int(h1 * self.mask_scale + 0.5), 1)
    wm = max(int(w1 * self.mask_scale + 0.5), 1)
    slot = 0
    for i in keep[rng.permutation(len(keep))]:
      if slot == self.max_masks:
        break
      try:
        rle = check_annotation(counts[i], sizes[i], areas[i],
                               None if boxes is None else boxes[i], h0, w0)
      except (ValueError, TypeError, OverflowError) as e:
        if bad is not None:
          bad.append((int(i), str(e)))
        continue
      if mask_utils.area(rle) > self.max_mask_fraction * h0 * w0:  # `area` may be rounded
        continue
      # Area interpolation then a 0.5 threshold: a cell is in the mask when mostly covered
      # (on 0/255 bytes, where OpenCV's area resize is several times faster than on floats).
      m = mask_utils.decode(rle) * np.uint8(255)
      small = cv2.resize(m, (wm, hm), interpolation=cv2.INTER_AREA) >= 128
      if not small.any():
        continue
      out["masks"][slot, :hm, :wm] = small
      out["valid"][slot] = True
      slot += 1
    return out


def open_examples(dcfg, split: str, folder: Optional[str], workdir: str, image_size: Size,
                  mask_size: Size, max_masks: int,
                  pixel_mean: Sequence[float]) -> Optional[Sa1bExamples]:
  """The `train` or `eval` examples that `config.data` names; None for no eval data.

  A folder (`train_dir`/`eval_dir`, or the demo's generated one, passed as
  `folder`) wins for its split; otherwise `tfds_name` with `train_split` or
  `eval_split`. Folders are prepared under `tfds_data_dir`, else WORKDIR/tfds.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split is 'train' or 'eval', not {split!r}")
  name, data_dir = dcfg.get("tfds_name"), dcfg.get("tfds_data_dir") or None
  tfds_split = dcfg.get(f"{split}_split", "train" if split == "train" else "")
  if folder and name and split == "train":
    raise ValueError(f"config.data names both a folder ({folder}) and the TFDS dataset "
                     f"{name!r} to train on; set only one of train_dir and tfds_name.")
  if folder:
    records, skipped = folder_records(folder, data_dir or os.path.join(workdir, "tfds"))
    what = folder
  elif name and tfds_split:
    records, skipped = tfds_records(name, tfds_split, data_dir)
    what = f"{name}/{tfds_split}"
  elif split == "eval":
    return None
  else:
    raise ValueError("No training data: set config.data.train_dir (a folder in SA-1B's "
                     "layout) or config.data.tfds_name (e.g. 'segment_anything').")
  return Sa1bExamples(records, image_size, mask_size, max_masks,
                      dcfg.get("max_mask_fraction", 0.9), pixel_mean, skipped, what)


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The seeded permutation of one epoch (cached: a batch reads one or two epochs)."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def batch_indices(num_examples: int, global_batch: int, seed: int, step: int,
                  shuffle: bool = True) -> np.ndarray:
  """The example indices of global batch `step`: epochs of seeded permutations, end to end."""
  flat = np.arange(step * global_batch, (step + 1) * global_batch)
  epochs, pos = flat // num_examples, flat % num_examples
  if not shuffle:
    return pos
  return np.array([epoch_order(num_examples, seed, int(e))[p] for e, p in zip(epochs, pos)])


def load_batch(source: Sa1bExamples, indices: np.ndarray, seed: int, first_row: int,
               pool: Optional[concurrent.futures.Executor] = None) -> Example:
  """Stacks the examples `indices`, rows first_row, first_row + 1, ... of the run.

  Each row's mask draw is seeded by its global row number, so any number of
  processes reads exactly the data that one process would.
  """
  rngs = [np.random.default_rng([seed, first_row + r]) for r in range(len(indices))]
  load = lambda args: source.load(*args)  # noqa: E731
  items = list((pool.map if pool else map)(load, zip(indices, rngs)))
  return {k: np.stack([x[k] for x in items]) for k in items[0]}


def host_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous rows of every global batch."""
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_batches(source: Sa1bExamples, global_batch: int, seed: int, start_step: int,
                  process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2, num_threads: int = 4) -> Iterator[Example]:
  """Yields this process's rows of global batches start_step, start_step + 1, ...

  `start_step` is the data position (a checkpoint's `data_step`). A background
  thread reads ahead `prefetch` batches. Each process reads only its
  contiguous `global_batch / process_count` rows of every batch.
  """
  rows = host_rows(global_batch, process_index, process_count)
  q: "queue.Queue" = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def produce():
    try:
      with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        step = start_step
        while not stop.is_set():
          idx = batch_indices(len(source), global_batch, seed, step)[rows]
          put(load_batch(source, idx, seed, step * global_batch + rows.start, pool))
          step += 1
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, never a silent hang
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()

