"""Markdown tables from the JSON that `benchmarks.run --out` writes.

  python -m benchmarks.report benchmarks/results/cpu_vit_b.json
"""

import json
import sys
from typing import Any, Dict, List


def _ms(s: float) -> str:
  return f"{s * 1e3:,.1f}"


def _what(row: Dict[str, Any]) -> str:
  if row["bench"] == "encoder":
    what = (f"{row['image_size'][0]}x{row['image_size'][1]}, batch {row['batch']}, "
            f"{row.get('dtype', 'float32')}")
    return what + (", seed attention" if "seed" in row.get("attention", "") else "")
  if row["bench"] == "attention":
    return (f"{row['block']} block, {row['mode']}, {row['implementation']}, batch "
            f"{row['batch']}, {row['dtype']}")
  if row["bench"] == "decoder":
    return f"{row['prompts']} prompt(s), 1 point each"
  if row["bench"] == "predict":
    return f"1 point on {row['image_hw'][0]}x{row['image_hw'][1]}"
  if row["bench"] == "engine":
    return (f"annotate {row['images']} photos, {row['points_per_side']}^2 points, "
            f"{row['crop_n_layers']} crop layers; masks/s {row['sam_jax']['masks_per_s']:.1f} "
            f"vs {row['reference']['masks_per_s']:.1f}")
  return (f"{row['points_per_side']}^2 points, batch {row['points_per_batch']}, "
          f"{row['image_hw'][0]}x{row['image_hw'][1]}")


def table(rows: List[Dict[str, Any]]) -> str:
  lines = ["| benchmark | variant | setting | sam_jax median (ms) | reference median (ms) "
           "| sam_jax rate | reference rate | speedup | sam_jax compile (s) | repeats | load avg (1 min) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['bench']} | {r['variant']} | FAILED: {r['error'][:200]} |" + " |" * 8)
      continue
    if r["bench"] == "train":
      continue  # no reference: see train_table
    j, ref = r["sam_jax"], r["reference"]
    compile_s = f"{j['compile_s']:.1f}" if "compile_s" in j else f"{j['first_call_s']:.1f} (first call)"
    lines.append(
        f"| {r['bench']} | {r['variant']} | {_what(r)} | {_ms(j['median_s'])} | {_ms(ref['median_s'])} "
        f"| {j['rate']:.3g} {r['metric']} | {ref['rate']:.3g} {r['metric']} | {r['speedup']:.2f}x "
        f"| {compile_s} | {len(j['times_s'])} | {j['loadavg_before'][0]:.1f} to {j['loadavg_after'][0]:.1f} |")
  return "\n".join(lines)


def train_table(rows: List[Dict[str, Any]]) -> str:
  rows = [r for r in rows if r["bench"] == "train" and "error" not in r]
  if not rows:
    return ""
  lines = ["| variant | dtype | batch per device | masks per image | step (ms) | images/s "
           "| model TFLOP per step | model TFLOP/s | MFU | peak memory (GB) | XLA's memory (GB) "
           "| largest batch per device that fits | first step (s) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
  for r in rows:
    j = r["sam_jax"]
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    largest = "not searched"
    if "batch_search" in r:
      tried = ", ".join(f"{t['batch_per_device']}: {t['compiled_memory_gb']:.3g}"
                        for t in r["batch_search"])
      largest = f"{r['largest_batch_per_device']} in {r['memory_limit_gb']} GB ({tried} GB)"
    lines.append(
        f"| {r['variant']} | {r['dtype']} | {r['batch_per_device']} | {r['masks_per_image']} "
        f"| {_ms(j['median_s'])} | {j['rate']:.3g} | {r['model_tflop_per_step']:.3g} "
        f"| {r['model_tflop_per_s']:.3g} | {mfu} | {r['device_peak_memory_gb']} "
        f"| {r.get('compiled_memory_gb', 'n/a')} | {largest} | {j['first_call_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  for path in (argv if argv is not None else sys.argv[1:]):
    with open(path) as f:
      report = json.load(f)
    env = report["environment"]
    flags = f"XLA_FLAGS='{env['xla_flags']}' " if env.get("xla_flags") else ""
    device = env.get("jax_device_kind", env["jax_backend"])
    print(f"{path}: {env['cpu']} x{env['cpu_count']}, {env['date_utc']}, "
          f"jax {env['versions']['jax']} ({device}), torch {env['versions']['torch']} "
          f"({env.get('torch_device', 'cpu')}, {env['torch_threads']} threads)\n"
          f"`{flags}{env['command']}`\n")
    print(table(report["results"]))
    train = train_table(report["results"])
    if train:
      print("\n" + train)
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
