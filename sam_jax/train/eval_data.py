"""Evaluation datasets: images at their original size with every ground-truth mask and box.

A dataset has `__len__`, `__getitem__(i)` -> `evaluate.Item` (image (H, W, 3)
uint8 RGB, masks (P, H, W) bool, boxes (P, 4) (x0, y0, x1, y1) pixels),
`image(i)`, `image_ids` and `description`. Three kinds, named by a spec:

* `coco:ANN.json:IMAGES_DIR`: COCO instance segmentation (polygons, RLE or
  uncompressed RLE; `iscrowd` annotations are skipped), read with pycocotools;
* a folder in SA-1B's layout (`NAME.jpg` + `NAME.json`), or `sa1b:DIR`;
* `tfds:NAME:SPLIT[:DATA_DIR]`: a prepared TFDS dataset with SA-1B's features.

Subsampling is seeded: `subsample` picks images, and `max_masks` keeps a
random subset of each image's masks, drawn from (seed, image index) alone, so
a subset does not change when other images are added or left out.
"""

import contextlib
import io
import json
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.train import data as data_lib

SPEC_HELP = ("a dataset is coco:ANN.json:IMAGES_DIR, tfds:NAME:SPLIT[:DATA_DIR], or a folder in "
             "SA-1B's layout (NAME.jpg + NAME.json files, optionally written sa1b:DIR)")


def _pick(num: int, max_masks: Optional[int], seed: int, index: int) -> np.ndarray:
  if not max_masks or num <= max_masks:
    return np.arange(num)
  return np.sort(np.random.default_rng([seed, index]).choice(num, max_masks, replace=False))


def subsample(num_images: int, max_images: Optional[int], seed: int = 0) -> List[int]:
  """The evaluated image indices: all, or a seeded random `max_images` of them in order."""
  if not max_images or num_images <= max_images:
    return list(range(num_images))
  return sorted(np.random.default_rng(seed).choice(num_images, max_images, replace=False).tolist())


def _decode_image(content: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(content)) as im:
    return np.asarray(im.convert("RGB"))


class Sa1bRecords:
  """Records in the features of TFDS's `segment_anything` (a TFDS source, or a folder's)."""

  def __init__(self, records, description: str, max_masks: Optional[int] = None, seed: int = 0):
    self.records, self.description = records, description
    self.max_masks, self.seed = max_masks, seed

  def __len__(self) -> int:
    return len(self.records)

  @property
  def image_ids(self) -> List[int]:
    return list(range(len(self)))

  def image(self, i: int) -> np.ndarray:
    return _decode_image(self.records[i]["image"]["content"])

  def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
    record = self.records[i]
    image = _decode_image(record["image"]["content"])
    h, w = image.shape[:2]
    anns = record["annotations"]
    if isinstance(anns, dict):  # TFDS sources give columns; a folder's records a list
      seg = anns["segmentation"]
      anns = [dict(segmentation=dict(counts=c, size=s), bbox=b, area=a)
              for c, s, b, a in zip(seg["counts"], seg["size"], anns["bbox"], anns["area"])]
    masks, boxes = [], []
    for j, a in enumerate(anns):
      try:  # training's checks, before pycocotools trusts the RLE
        rle = data_lib.check_annotation(a["segmentation"]["counts"], a["segmentation"]["size"],
                                        a["area"], a["bbox"], h, w)
      except ValueError as e:
        raise ValueError(f"{self.description}, image {i}, mask {j}: {e}") from e
      m = mask_utils.decode(rle).astype(bool)
      if m.any():
        masks.append(m)
        ymin, xmin, ymax, xmax = np.asarray(a["bbox"], np.float64)  # TFDS: normalised
        boxes.append([xmin * w, ymin * h, xmax * w, ymax * h])
    return _item(image, masks, boxes, _pick(len(masks), self.max_masks, self.seed, i))


def _item(image, masks, boxes, keep) -> Dict[str, np.ndarray]:
  h, w = image.shape[:2]
  return dict(image=image,
              masks=np.stack([masks[k] for k in keep]) if len(keep) else np.zeros((0, h, w), bool),
              boxes=np.array([boxes[k] for k in keep], np.float32).reshape(-1, 4))


class FolderRecords:
  """An SA-1B-layout folder's examples in `segment_anything`'s features, read as asked."""

  def __init__(self, directory: str):
    from sam_jax.train import sa1b_folder
    self.directory, self._read = directory, sa1b_folder.folder_example
    self.files = sa1b_folder.list_examples(directory)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int):
    name, image_file = self.files[i]
    return self._read(self.directory, name, image_file, i)


class CocoDataset:
  """COCO instance segmentation: every non-crowd annotation of each image, at full size."""

  def __init__(self, ann_file: str, images_dir: str, max_masks: Optional[int] = None,
               seed: int = 0):
    from pycocotools.coco import COCO
    _need_file(ann_file, "the COCO annotation file")
    if not os.path.isdir(images_dir):
      raise FileNotFoundError(f"The COCO images folder {images_dir} does not exist.")
    try:
      with open(ann_file) as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{ann_file} is not JSON ({e}); {SPEC_HELP}.") from e
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or k not in data]
    if missing:
      raise ValueError(f"{ann_file} is not a COCO instance-segmentation file: no "
                       f"{', '.join(missing)}. It needs images, annotations and categories.")
    self.coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
      self.coco.dataset = data
      self.coco.createIndex()
    self.images_dir, self.max_masks, self.seed = images_dir, max_masks, seed
    self.image_ids = sorted(self.coco.getImgIds())
    absent = [self._path(i) for i in self.image_ids if not os.path.exists(self._path(i))]
    if absent:
      raise FileNotFoundError(f"{len(absent)} of the {len(self.image_ids)} images of {ann_file} "
                              f"are not in {images_dir}, e.g. {absent[:3]}.")
    self.description = f"coco:{ann_file}:{images_dir}"

  def _path(self, image_id: int) -> str:
    return os.path.join(self.images_dir, self.coco.imgs[image_id]["file_name"])

  def __len__(self) -> int:
    return len(self.image_ids)

  def image(self, i: int) -> np.ndarray:
    with Image.open(self._path(self.image_ids[i])) as im:
      return np.asarray(im.convert("RGB"))

  def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
    image_id = self.image_ids[i]
    image = self.image(i)
    h, w = image.shape[:2]
    info = self.coco.imgs[image_id]
    if (info.get("height", h), info.get("width", w)) != (h, w):
      raise ValueError(f"Image {image_id} ({self._path(image_id)}) is {w}x{h}, but the "
                       f"annotations say {info['width']}x{info['height']}.")
    masks, boxes = [], []
    for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False)):
      m = self.coco.annToMask(ann).astype(bool)
      if m.any():
        masks.append(m)
        x, y, bw, bh = ann["bbox"]
        boxes.append(np.clip([x, y, x + bw, y + bh], 0, [w, h, w, h]))
    return _item(image, masks, boxes, _pick(len(masks), self.max_masks, self.seed, i))


def _need_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist.")


def open_dataset(spec: str, max_masks: Optional[int] = None, seed: int = 0):
  """The dataset that `spec` names (see the module's docstring); clear errors for bad specs."""
  kind, _, rest = spec.partition(":")
  if kind == "coco":
    parts = rest.split(":")
    if len(parts) != 2 or not all(parts):
      raise ValueError(f"{spec!r}: a COCO dataset is coco:ANN.json:IMAGES_DIR.")
    return CocoDataset(parts[0], parts[1], max_masks, seed)
  if kind == "tfds":
    # The split may hold a colon in its slice: train[:1000].
    match = re.fullmatch(r"([^:]+):([^:\[]+(?:\[[^\]]*\])?)(?::(.+))?", rest)
    if not match:
      raise ValueError(f"{spec!r}: a TFDS dataset is tfds:NAME:SPLIT or tfds:NAME:SPLIT:DATA_DIR.")
    records, _ = data_lib.tfds_records(*match.groups())
    return Sa1bRecords(records, spec, max_masks, seed)
  directory = rest if kind == "sa1b" else spec
  if not os.path.exists(directory):
    raise FileNotFoundError(f"{spec!r} does not exist; {SPEC_HELP}.")
  if not os.path.isdir(directory):
    raise ValueError(f"{spec!r} is a file, not a dataset; {SPEC_HELP}.")
  return Sa1bRecords(FolderRecords(directory), directory, max_masks, seed)


def check_not_empty(dataset, indices: Sequence[int]) -> None:
  """Refuses a dataset without any image (its masks are counted as they are read)."""
  if not len(indices):
    raise ValueError(f"{dataset.description} has no images to evaluate.")
