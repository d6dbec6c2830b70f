"""TensorBoard event files of the training metrics, without TensorFlow.

`config.tensorboard = True` writes every metrics.jsonl record to
WORKDIR/tensorboard as scalars (tags `train/<name>`, the per-round IoU as
`train/iou_round_<k>`), through tensorboardX's event writer. Process 0 only.
View with `tensorboard --logdir WORKDIR/tensorboard` (the viewer is a separate
install: `pip install tensorboard`).
"""

import glob
import math
import numbers
import os
import struct
from typing import Dict, Iterator, List, Tuple

SKIP = ("step",)


def scalars(record: Dict) -> Iterator[Tuple[str, float]]:
  """(tag, value) of each finite number in a metrics record; lists become one tag per entry."""
  for key, value in record.items():
    if key in SKIP or value is None:
      continue
    if isinstance(value, (list, tuple)):
      name = "iou_round" if key == "iou_per_round" else key
      for i, v in enumerate(value):
        if isinstance(v, numbers.Real) and math.isfinite(v):
          yield f"train/{name}_{i}", float(v)
    elif isinstance(value, numbers.Real) and math.isfinite(value):
      yield f"train/{key}", float(value)


class Writer:
  """Appends metrics records to an event file in `logdir`."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - only when asked for
    os.makedirs(logdir, exist_ok=True)
    self._writer = SummaryWriter(logdir)

  def write(self, step: int, record: Dict) -> None:
    for tag, value in scalars(record):
      self._writer.add_scalar(tag, value, step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every event file in `logdir`, in write order."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415
  out: Dict[str, List[Tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      while True:  # TFRecord: length (u64), its crc (u32), data, its crc (u32)
        header = f.read(12)
        if len(header) < 12:
          break
        (length,) = struct.unpack("<Q", header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        for v in event.summary.value:
          if v.HasField("simple_value"):
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out
