"""Timing helpers: interleaved repeats, peak memory, and a record of the machine."""

import contextlib
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

import jax


def block(x):
  """Waits for JAX results and for torch's CUDA stream (a no-op on CPU)."""
  x = jax.block_until_ready(x)
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_initialized():
    torch.cuda.synchronize()
  return x


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
  """The largest resident-set growth over the start, sampled every `every` s."""

  def __init__(self, every: float = 0.002):
    self.every, self.peak, self._stop = every, 0, threading.Event()

  def __enter__(self):
    self.start = _rss_bytes()
    self.peak = self.start
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.every)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())

  @property
  def growth_mb(self) -> float:
    return (self.peak - self.start) / 2**20


def interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                memory: bool = False) -> Dict[str, Dict[str, Any]]:
  """Runs each fn `warmup` times, then A, B, A, B... `repeats` rounds.

  Alternating spreads the load of other jobs on a shared machine over both
  sides alike. Returns per fn: the first call's seconds (compilation for JAX
  unless compiled beforehand, lazy initialisation for torch), every timed
  repeat, the median, the load average around the repeats and, with
  `memory`, the peak RSS growth during the first warm-up call (untimed
  otherwise: the sampler costs a little time).
  """
  out = {name: {"first_call_s": None, "times_s": []} for name in fns}
  for name, fn in fns.items():
    for i in range(warmup):
      rss = PeakRss() if memory and i == 0 else contextlib.nullcontext()
      t = time.perf_counter()
      with rss:
        block(fn())
      if i == 0:
        out[name]["first_call_s"] = time.perf_counter() - t
        if memory:
          out[name]["peak_rss_growth_mb"] = round(rss.growth_mb, 1)
  load_before = os.getloadavg()
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      block(fn())
      out[name]["times_s"].append(time.perf_counter() - t)
  load_after = os.getloadavg()
  for name, fn in fns.items():
    r = out[name]
    r["median_s"] = statistics.median(r["times_s"])
    r["min_s"] = min(r["times_s"])
    r["loadavg_before"], r["loadavg_after"] = list(load_before), list(load_after)
  return out


def timed(fn: Callable[[], Any]) -> float:
  t = time.perf_counter()
  block(fn())
  return time.perf_counter() - t


def _version(dist: str) -> Optional[str]:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def torch_device() -> str:
  """The reference runs where JAX does: on the GPU when JAX's backend is one."""
  import torch
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def environment() -> Dict[str, Any]:
  import torch
  devices = jax.devices()
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in devices],
      "jax_device_kind": devices[0].device_kind,
      "torch_threads": torch.get_num_threads(),
      "torch_device": torch_device(),
      "torch_device_name": (torch.cuda.get_device_name() if torch_device() == "cuda"
                            else cpu_model()),
      "versions": {d: _version(d) for d in (
          "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "nvidia-cudnn-cu13",
          "nvidia-cudnn-cu12", "flax", "torch", "segment-anything", "numpy")
          if _version(d)},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "loadavg": list(os.getloadavg()),
  }
