"""A TFDS builder for a local folder in SA-1B's layout (`NAME.jpg` + `NAME.json`).

It writes the folder as a TFDS dataset with exactly the features of the TFDS
catalog's `segment_anything` (SA-1B), in the `array_record` format, so one's
own data and SA-1B go through the same random-access reader
(`sam_jax.train.data`). Neither writing nor reading needs TensorFlow.

  builder = prepare_folder("/data/mine/train", data_dir="/tmp/tfds")
  source = builder.as_data_source("train")   # len(source), source[i]

Each folder is its own builder config, named after the folder and a
fingerprint of its files (names, sizes, modification times): a changed folder
is prepared again, an unchanged one is reused. Examples keep the folder's
sorted file order (shuffling is left to the training pipeline). The image
bytes are stored as they are; masks may be COCO RLE (compressed or not) or
COCO polygons, and are stored as compressed RLE. Missing `area` and `bbox`
are computed from the mask; a missing `crop_box` is the whole image; missing
`point_coords`, `predicted_iou` and `stability_score` (which training does not
use) are NaN. An example whose JSON cannot be parsed, whose image cannot be
identified, whose masks do not match the image's size, or whose files are
links to outside the folder is left out, logged, and named in the dataset's metadata (`skipped`), so it is counted and a long
preparation never stops on one bad file.
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from typing import Dict, Iterator, List, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils
from tensorflow_datasets.datasets.segment_anything import (
    segment_anything_dataset_builder as sa_tfds)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_examples(directory: str) -> List[Tuple[str, str]]:
  """Sorted (name, image file) pairs of the images that have a `NAME.json` beside them."""
  files = set(os.listdir(directory))
  pairs = []
  for f in sorted(files):
    stem, ext = os.path.splitext(f)
    if ext.lower() in IMAGE_EXTENSIONS and stem + ".json" in files:
      pairs.append((stem, f))
  if not pairs:
    raise FileNotFoundError(f"No NAME.jpg + NAME.json pairs (SA-1B layout) in {directory}.")
  return pairs


def fingerprint(directory: str) -> str:
  """A short hash of the folder's path and of its examples' names, sizes and times."""
  h = hashlib.sha256(os.path.abspath(directory).encode())
  for name, image in list_examples(directory):
    for f in (image, name + ".json"):
      st = os.stat(os.path.join(directory, f))
      h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
  return h.hexdigest()[:12]


def config_name(directory: str) -> str:
  base = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(os.path.abspath(directory)))[:40]
  return f"{base}_{fingerprint(directory)}"


def _box(xywh, h: int, w: int) -> np.ndarray:
  """COCO (x, y, w, h) pixels -> TFDS's normalised (ymin, xmin, ymax, xmax), clipped to [0, 1]."""
  box = sa_tfds._normalize_bbox(list(xywh), h, w)  # pylint: disable=protected-access
  return np.clip(box, 0.0, 1.0).astype(np.float32)


def _compressed_rle(seg, h: int, w: int) -> dict:
  if isinstance(seg, list):  # COCO polygons
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  elif isinstance(seg.get("counts"), list):  # uncompressed RLE
    rle = mask_utils.frPyObjects(seg, *seg["size"])
  else:
    rle = dict(size=seg["size"], counts=seg["counts"])
  counts = rle["counts"]
  return dict(size=[int(s) for s in rle["size"]],
              counts=counts.decode("ascii") if isinstance(counts, bytes) else counts)


def folder_example(directory: str, name: str, image_file: str, index: int) -> Dict:
  """One example in `segment_anything`'s features; raises on a corrupt file."""
  root = os.path.realpath(directory)
  for f in (name + ".json", image_file):
    target = os.path.realpath(os.path.join(directory, f))
    if os.path.commonpath([root, target]) != root:
      raise ValueError(f"{f} is a link to {target}, outside the folder; copy the file in "
                       "instead (links are followed only within the folder)")
  with open(os.path.join(directory, name + ".json")) as f:
    record = json.load(f)
  content = epath.Path(directory, image_file).read_bytes()
  with Image.open(io.BytesIO(content)) as im:  # reads the header only
    w, h = im.size
  info = record.get("image") or {}
  nan = float("nan")
  annotations = []
  for i, a in enumerate(record["annotations"]):
    rle = _compressed_rle(a["segmentation"], h, w)
    if tuple(rle["size"]) != (h, w):
      raise ValueError(f"mask {i} is {tuple(rle['size'])} on an image of {(h, w)}")
    area = a.get("area")
    bbox = a.get("bbox")
    annotations.append(dict(
        area=int(mask_utils.area(rle) if area is None else area),
        bbox=_box(mask_utils.toBbox(rle) if bbox is None else bbox, h, w),
        crop_box=_box(a.get("crop_box") or (0, 0, w, h), h, w),
        id=int(a.get("id", i)),
        point_coords=np.asarray(a.get("point_coords") or [[nan, nan]], np.float64).reshape(1, 2),
        predicted_iou=float(a.get("predicted_iou", nan)),
        stability_score=float(a.get("stability_score", nan)),
        segmentation=dict(counts=rle["counts"], size=np.asarray(rle["size"], np.uint64))))
  image = dict(content=content, file_name=info.get("file_name", image_file), height=h, width=w,
               image_id=int(info.get("image_id", index)))
  return dict(image=image, annotations=annotations)


class Sa1bFolder(sa_tfds.Builder, skip_registration=True):
  """`segment_anything`'s features, read from the folder given as `manual_dir`.

  Not registered by name: build it with `prepare_folder`, which picks the
  config for the folder.
  """

  name = "sa1b_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "SA-1B-layout folders, skipping corrupt examples."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "`manual_dir` is the folder of NAME.jpg + NAME.json files."

  # TFDS 4.9's own lookup of this file needs the `importlib_resources` backport
  # for a builder outside its package; the answers are plain.
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    features = sa_tfds.Builder._info(self).features  # pylint: disable=protected-access
    info = self.dataset_info_from_configs(
        description=("A local folder in SA-1B's layout: "
                     f"{getattr(self.builder_config, 'description', '')}"),
        features=features, disable_shuffling=True,
        metadata=tfds.core.MetadataDict(skipped={}))
    # A local folder has nothing on TFDS's bucket, and TFDS's lookup of a folder not
    # yet prepared leaves an empty temporary directory behind each time.
    info.initialize_from_bucket = lambda: None
    return info

  # TFDS prints "Downloading and preparing dataset ..." for every build; a local
  # folder downloads nothing, so its messages go to the log instead.
  def _log_download_bytes(self) -> None:
    logging.info("Preparing %s as a TFDS dataset under %s",
                 getattr(self.builder_config, "description", self.name), self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Prepared %s", self.data_dir)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, directory: str):  # pylint: disable=arguments-renamed
    skipped = {}
    for index, (name, image_file) in enumerate(list_examples(directory)):
      try:
        example = folder_example(directory, name, image_file, index)
      except Exception as e:  # noqa: BLE001 - one bad file must never end a preparation
        skipped[name] = f"{type(e).__name__}: {e}"
        logging.warning("Leaving out corrupt example %s of %s: %s", name, directory, e)
        continue
      yield name, example
    self.info.metadata["skipped"] = skipped


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """TFDS's warnings and progress bars off, for the project's own folders.

  A folder's builder config is ours ("Using custom data configuration") and
  new ("Variant folder ... has no dataset_info.json"): nothing to warn about.
  Our own messages (a corrupt example left out) use the standard logger and stay.
  """
  absl_logger = logging.getLogger("absl")  # TFDS logs through absl
  level = absl_logger.level
  bar = tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access
  absl_logger.setLevel(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    absl_logger.setLevel(level)
    tfds.display_progress_bar(bar)


def prepare_folder(directory: str, data_dir: str) -> Sa1bFolder:
  """The folder's TFDS builder under `data_dir`, prepared (array_record) if it was not yet."""
  config = tfds.core.BuilderConfig(name=config_name(directory),
                                   description=os.path.abspath(directory))
  with quiet_tfds():
    builder = Sa1bFolder(data_dir=data_dir, config=config, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=directory))
  return builder


def skipped(builder) -> Dict[str, str]:
  """{name: reason} of the examples left out when the folder was prepared."""
  metadata = builder.info.metadata
  return dict(metadata.get("skipped", {})) if metadata is not None else {}
