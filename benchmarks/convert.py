"""Checkpoint conversion and loading, against the reference's own loader, each in a fresh process.

  python -m benchmarks.convert                          # vit_h at 1024: a 2.5 GB checkpoint
  python -m benchmarks.convert --variant vit_b --image-size 256 --repeats 1

A randomised reference checkpoint (`.pth`) is written once. Then, each in its
own process as a user runs them (imports included), repeated alternately:
- `reference`: `segment_anything.sam_model_registry[variant](checkpoint=PTH)`,
  the reference's way to load the weights (the model built, then the state dict
  loaded into it);
- `convert`: `python -m sam_jax.convert_weights --checkpoint PTH --output DIR`;
- `load`: `sam_jax.checkpoint.load_sam(DIR)` with the checksums verified.
Each row has the median wall seconds, the largest resident memory of its
processes, and the ratio to `reference`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAKE = """
import sys, torch
from benchmarks.models import reference_model
torch.save(reference_model(sys.argv[1], int(sys.argv[2])).state_dict(), sys.argv[3])
"""
# The registry builds 1024-pixel models; at another size the model is built as the checkpoint's.
REFERENCE = """
import sys, torch
from benchmarks.models import reference_model
variant, size, pth = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if size == 1024:
  from segment_anything import sam_model_registry
  sam_model_registry[variant](checkpoint=pth)
else:
  reference_model(variant, size).load_state_dict(torch.load(pth))
"""
LOAD = """
import sys, jax
from sam_jax.checkpoint import load_sam
jax.block_until_ready(load_sam(sys.argv[1])[1])
"""


def timed(args, log: str) -> tuple:
  """(wall seconds, peak RSS in GB) of one child process; its failure stops the benchmark."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  start = time.perf_counter()
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    _, status, rusage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for the rusage
  if proc.returncode != 0:
    with open(log) as f:
      sys.stderr.write(f.read()[-4000:])
    raise SystemExit(f"benchmarks.convert: {' '.join(args[:2])} failed")
  return wall, rusage.ru_maxrss / 2**20  # KB on Linux


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="vit_h", choices=["tiny", "vit_b", "vit_l", "vit_h"],
                 help="tiny: a 2-block model, a smoke run of the harness")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", help="a JSON file for the results")
  a = p.parse_args(argv)
  work = tempfile.mkdtemp(prefix="sam_jax_convert_bench_")
  try:
    pth, out = os.path.join(work, "sam.pth"), os.path.join(work, "sam")
    subprocess.run([sys.executable, "-c", MAKE, a.variant, str(a.image_size), pth], cwd=ROOT,
                   check=True)
    runs = {"reference": [], "convert": [], "load": []}
    for _ in range(a.repeats):
      shutil.rmtree(out, ignore_errors=True)
      for name, args in (("reference", ["-c", REFERENCE, a.variant, str(a.image_size), pth]),
                         ("convert", ["-m", "sam_jax.convert_weights", "--checkpoint", pth,
                                      "--output", out]),
                         ("load", ["-c", LOAD, out])):
        runs[name].append(timed(args, os.path.join(work, "stderr.txt")))
    rows = {name: dict(seconds=statistics.median(w for w, _ in rs),
                       peak_rss_gb=max(r for _, r in rs),
                       times_s=[w for w, _ in rs], peak_rss_gb_each=[r for _, r in rs])
            for name, rs in runs.items()}
    base = rows["reference"]["seconds"]
    result = dict(variant=a.variant, image_size=a.image_size, repeats=a.repeats,
                  checkpoint_gb=os.path.getsize(pth) / 2**30, load_average=os.getloadavg(),
                  rows={k: dict(v, vs_reference=v["seconds"] / base) for k, v in rows.items()})
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(f"{a.variant} at {a.image_size}: a {result['checkpoint_gb']:.2f} GB checkpoint, "
        f"median of {a.repeats}, each in a fresh process")
  for name, r in result["rows"].items():
    print(f"  {name:10s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_gb']:5.2f} GB  "
          f"{r['vs_reference']:.2f}x the reference's load")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
