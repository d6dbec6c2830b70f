"""Reading XLA's profiler traces: operation events, busy time, and what model
part each operation comes from."""

import glob
import gzip
import json
import re
from typing import Dict, List

from sam_jax.train import hlo_costs


def operations(trace_dir: str) -> List[dict]:
  """The profiler's HLO operation events, in time order: the accelerator's
  where there is one (its host also logs the launches), else the CPU's."""
  (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and e["args"]["name"].startswith("/device:")}
  if any(e["pid"] in devices for e in ops):
    ops = [e for e in ops if e["pid"] in devices]
  return sorted(ops, key=lambda e: e["ts"])


def busy_ms(ops) -> float:
  """The union of the operations' intervals: a gap between them is dispatch or idle time."""
  intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in ops)
  total, (start, end) = 0.0, intervals[0]
  for a, b in intervals[1:]:
    if a > end:
      total, start, end = total + end - start, a, b
    else:
      end = max(end, b)
  return (total + end - start) / 1e3


def op_names(hlo_text: str) -> Dict[str, str]:
  """HLO instruction name -> its `op_name` metadata (the jitted function's and
  Flax modules' path, e.g. .../image_encoder/blocks_7/attn/qkv/dot_general)."""
  return {m.group(1): m.group(2) for m in re.finditer(
      r"^\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", hlo_text, re.M)}


def control_flow(hlo_text: str) -> set:
  """Names of the while, conditional and call instructions: their events span
  their bodies' operations, which have events of their own."""
  return {m.group(1) for m in re.finditer(
      r"^\s*(?:ROOT )?%(\S+) = .*? (?:while|conditional|call)\(", hlo_text, re.M)}


def product_names(hlo_text: str) -> Dict[str, List[str]]:
  """Fusion instruction name -> the `op_name`s of the products (dots and
  convolutions) inside it. XLA's CPU fusions can hold several model parts
  (a block's MLP with the next block's norm and qkv); these say which."""
  comps, _ = hlo_costs.computations(hlo_text)
  products = {}
  for name, lines in comps.items():
    products[name] = [m.group(1) for line in lines
                      if re.search(r" (?:dot|convolution)\(", line)
                      and (m := re.search(r'op_name="([^"]+)"', line))]
  out = {}
  for lines in comps.values():
    for line in lines:
      called = re.search(r"calls=%([\w.-]+)", line)
      parsed = called and hlo_costs.instruction(line)
      if parsed:
        out[parsed[0]] = products.get(called.group(1), [])
  return out