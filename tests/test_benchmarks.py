"""The benchmark harness runs and writes well-formed results (timings unchecked).

One quick run: a 2-block model at 256 x 256, every benchmark, few repeats.
"""

import json
import math
import os
import re
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import run
from tests.conftest import ROOT

# Timings are recorded, never checked: compiled without XLA's optimisations.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "quick.json"
  scratch = tmp_path_factory.mktemp("scratch")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tempfile, "tempdir", str(scratch))
    # A photo size other than the astronaut's own 512 x 512: the resize too.
    assert run.main(["--quick", "--photos", "240x320,512x512", "--out", str(out)]) == 0
  # The engine benchmark's photos and outputs are removed with their folder.
  assert not [p for p in os.listdir(scratch) if p.startswith("engine_bench_")]
  with open(out) as f:
    return json.load(f)


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_environment_is_recorded(report):
  env = report["environment"]
  for key in ("date_utc", "cpu", "cpu_count", "jax_backend", "versions", "loadavg", "command"):
    assert key in env, key
  assert env["versions"]["jax"] and env["versions"]["torch"]
  assert "--quick" in env["command"]
  assert report["anchors"]["image encoder TFLOP per 1024x1024 image"]["vit_h"] == 5.96


@pytest.mark.slow
def test_every_benchmark_has_well_formed_rows(report):
  rows = report["results"]
  assert {r["bench"] for r in rows} == set(run.BENCHMARKS)
  assert not [r for r in rows if "error" in r]
  for row in rows:
    if row["bench"] == "train":  # no reference trainer to compare with
      continue
    assert _positive(row["speedup"]), row
    for side in ("sam_jax", "reference"):
      s = row[side]
      assert s["times_s"] and all(_positive(t) for t in s["times_s"]), (row["bench"], side)
      assert _positive(s["median_s"]) and _positive(s["rate"]) and _positive(s["first_call_s"])
      assert len(s["loadavg_before"]) == 3 and len(s["loadavg_after"]) == 3
    assert math.isclose(row["speedup"], row["reference"]["median_s"] / row["sam_jax"]["median_s"])


@pytest.mark.slow
def test_encoder_rows(report):
  (row,) = [r for r in report["results"] if r["bench"] == "encoder"]
  assert row["attention"] == "global xla, windows xla"
  assert _positive(row["sam_jax"]["compile_s"])
  assert row["sam_jax"]["peak_rss_growth_mb"] >= 0


@pytest.mark.slow
def test_amg_rows_count_masks(report):
  (amg,) = [r for r in report["results"] if r["bench"] == "amg"]
  assert amg["points_per_side"] == 4
  assert amg["sam_jax"]["masks"] >= 0 and amg["reference"]["masks"] >= 0


@pytest.mark.slow
def test_attention_rows(report):
  rows = [r for r in report["results"] if r["bench"] == "attention"]
  assert {(r["block"], r["mode"]) for r in rows} == {
      (b, m) for b in ("global", "window") for m in ("forward", "forward+backward")}
  for row in rows:
    if row["mode"] == "forward":
      assert row["max_abs_diff_vs_xla"] == 0.0 and row["max_abs_output"] > 0


@pytest.mark.slow
def test_train_row(report):
  (row,) = [r for r in report["results"] if r["bench"] == "train"]
  j = row["sam_jax"]
  assert len(j["times_s"]) == 2 and all(_positive(t) for t in j["times_s"])
  assert _positive(j["rate"]) and math.isfinite(j["loss"])
  assert _positive(row["model_tflop_per_step"]) and _positive(row["model_tflop_per_s"])
  assert row["mfu"] is None  # no known peak for a CPU: not guessed
  # XLA's account of the step: at least the parameters and Adam's two moments.
  assert row["compiled_memory_gb"] * 2**30 > 3 * 4 * row["model_parameters"]
  assert "batch_search" not in row  # only with --train-batch-max


def test_batch_search_rows_and_the_timed_steps_at_the_largest(monkeypatch):
  """The GPU search (benchmarks.run) is compile_report's: one row per batch compiled,
  seeded with --train-batch, at most --train-batch-max; then two timed steps at the largest."""
  compiled, stepped = [], []
  monkeypatch.setattr(run, "_step_memory_gb",
                      lambda trainer, batch, b: compiled.append(b) or 1.0 + 0.5 * b)

  class Trainer:
    model = types.SimpleNamespace(image_size=(16, 16))

    def train_step(self, state, big):
      stepped.append(big["images"].shape[0])
      return state, dict(loss=jnp.float32(0.5))

  batch = dict(masks=np.zeros((2, 4, 8, 8), bool))
  args = types.SimpleNamespace(memory_limit_gb=6.0, train_batch=2, train_batch_max=64,
                               train_masks=4)
  out = run._largest_batch(Trainer(), None, batch, args, 2.0)
  assert out["largest_batch_per_device"] == 10  # 1 + 0.5 b <= 6
  # The --train-batch row's memory is the caller's (compiled for the timed row): not again.
  assert 2 not in compiled and len(compiled) == len(set(compiled))
  assert [r["batch_per_device"] for r in out["batch_search"]] == sorted({2, *compiled})
  assert all(r["fits"] == (r["compiled_memory_gb"] <= 6.0) for r in out["batch_search"])
  assert stepped == [10 * jax.device_count()] * 2
  args.train_batch_max = 4
  assert run._largest_batch(Trainer(), None, batch, args, 2.0)["largest_batch_per_device"] == 4
  args.memory_limit_gb = 1.0
  out = run._largest_batch(Trainer(), None, batch, args, 2.0)
  assert out["largest_batch_per_device"] is None and "largest_batch_step" not in out


@pytest.mark.slow
def test_photo_rows_are_at_the_size_asked_for(report):
  for bench in ("predict", "amg"):
    (row,) = [r for r in report["results"] if r["bench"] == bench]  # --quick: the first size
    assert row["image_hw"] == [240, 320], bench


def test_photos_are_sizes(capsys):
  assert run.parse_args(["--photos", "480x640,1500x2250"]).photos == [(480, 640), (1500, 2250)]
  with pytest.raises(SystemExit):
    run.parse_args(["--photos", "512"])
  assert "HxW" in capsys.readouterr().err


def test_batch_search_needs_a_memory_limit_on_a_cpu(capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--only", "train", "--train-batch-max", "8"])
  assert "--memory-limit-gb" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_every_row(report, tmp_path, capsys):
  from benchmarks import report as report_lib
  path = tmp_path / "quick.json"
  path.write_text(json.dumps(report))
  assert report_lib.main([str(path)]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
  header_rows = 2  # the comparison table's and the training table's
  assert len(rows) == len(report["results"]) + header_rows, out


def test_gpu_script_steps_parse():
  """Every command of benchmarks/gpu.sh takes its arguments: the GPU is lent
  for minutes, too few to lose a step to a renamed flag."""
  import importlib
  import shlex
  with open(os.path.join(os.path.dirname(run.__file__), "gpu.sh")) as f:
    script = f.read().replace("\\\n", " ")
  names = []
  for line in script.splitlines():
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before a command
      words.pop(0)
    if any("$" in w for w in words):  # the helpers' own bodies
      continue
    if words[:1] == ["step"]:
      args = ["--keep-going", "--precision", "tf32", "--out", "x.json", *words[3:]]
      if "--train-batch-max" in args:  # a CPU reports no memory limit; a GPU does
        args += ["--memory-limit-gb", "80"]
      run.parse_args(args)
    elif words[:1] == ["limited"] and words[3:5] == ["python3", "-m"]:
      importlib.import_module(words[5]).parse_args(words[6:])
    else:
      continue
    names.append(words[1])
  assert len(names) == len(set(names)) >= 10, names


@pytest.mark.slow
def test_profile_predict_reports_every_part(capsys):
  from benchmarks import profile_predict
  assert profile_predict.main(["--variant", "tiny", "--image-size", "256", "--calls", "1",
                               "--top", "3"]) == 0
  out = capsys.readouterr().out
  assert "predict " in out and "decode " in out and "upscale " in out
  assert "jit_decode: span" in out and "jit_upscale: span" in out
  assert out.count("\n  ") == 3  # the three largest operations
  assert "GFLOP/s" in out


@pytest.mark.slow
def test_profile_encoder_splits_the_time_by_model_part(capsys):
  from benchmarks import profile_encoder
  assert profile_encoder.main(["--variant", "tiny", "--image-size", "256", "--calls", "1",
                               "--top", "3"]) == 0
  out = capsys.readouterr().out
  parts = {line.rsplit(None, 2)[0].strip(): float(line.split()[-1].rstrip("%"))
           for line in out.splitlines() if re.match(r"  [a-z]", line)}
  # The tiny encoder: block 0 windowed, block 1 global.
  assert {"window attention", "window mlp", "global attention", "global qkv", "patch_embed",
          "neck"} <= set(parts), out
  assert sum(parts.values()) == pytest.approx(100, abs=0.5)
  largest = [line for line in out.splitlines() if re.match(r" +[0-9.]+  ", line)]
  assert len(largest) == 3, out


@pytest.mark.slow
def test_profile_train_step_splits_the_time_by_part_and_pass(capsys):
  from benchmarks import profile_train_step
  tiny = ["--config.model.image_size=64", "--config.model.prompt_embed_dim=32",
          "--config.model.image_encoder.embed_dim=32", "--config.model.image_encoder.depth=1",
          "--config.model.image_encoder.global_attn_indexes=()",
          "--config.model.image_encoder.window_size=2",
          "--config.model.mask_decoder.transformer_depth=1", "--config.prompts.num_rounds=2",
          "--config.batch_size=2", "--config.data.max_masks=2"]
  assert profile_train_step.main([f"--config={ROOT}/configs/demo.py:quick", *tiny,
                                  "--steps", "1", "--calls", "1", "--top", "3"]) == 0
  out = capsys.readouterr().out
  tables = re.split(r"\n(?=\S)", out.split("\nby part and pass", 1)[1])
  rows = [line for line in tables[0].splitlines()[1:] if line.startswith("  ")]
  parts = {line.split("ops  ", 1)[1]: float(line.split()[2].rstrip("%")) for line in rows}
  for part in ("image encoder, forward", "image encoder, backward",
               "decoder: two-way transformer, forward", "decoder: two-way transformer, backward",
               "losses, forward", "optimizer update, other"):
    assert part in parts, out
  assert sum(parts.values()) == pytest.approx(100, abs=0.5)
  assert "images/s" in out and len(tables[2].splitlines()) == 1 + 3, out  # the three largest


def test_profile_train_step_help_and_a_bad_flag_exit_with_a_message(capsys):
  from benchmarks import profile_train_step
  with pytest.raises(SystemExit) as e:
    profile_train_step.parse_flags(["--help"])
  assert e.value.code == 0 and "--steps" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="Unknown command line flag 'stepz'.*--help"):
    profile_train_step.parse_flags(["--stepz", "3"])


def test_model_part_reads_the_module_path():
  from benchmarks.profile_encoder import model_part
  path = "jit(f)/Sam.embed_images/image_encoder/blocks_{}/{}/dot_general"
  assert model_part(path.format(7, "attn/qkv"), {7}) == "global qkv"
  assert model_part(path.format(6, "attn/proj"), {7}) == "window proj"
  assert model_part(path.format(6, "attn"), {7}) == "window attention"
  assert model_part(path.format(17, "mlp/lin1"), {7}) == "window mlp"
  assert model_part("jit(f)/Sam.embed_images/image_encoder/neck_0/conv", {7}) == "neck"
  assert model_part("", {7}) == "other"


def test_product_names_see_inside_fusions():
  from benchmarks.trace import product_names
  hlo = "\n".join([
      '%fused_computation.3 (p0: f32[4,8], p1: f32[8,8]) -> f32[4,8] {',
      '  %dot.1 = f32[4,8]{1,0} dot(%p0, %p1), metadata={op_name="f/blocks_0/mlp/lin2/dot"}',
      '  %dot.2 = f32[4,8]{1,0} dot(%dot.1, %p1), metadata={op_name="f/blocks_1/attn/qkv/dot"}',
      '  ROOT %add.1 = f32[4,8]{1,0} add(%dot.2, %dot.2), metadata={op_name="f/blocks_1/add"}',
      '}',
      'ENTRY %main (a: f32[4,8], b: f32[8,8]) -> f32[4,8] {',
      '  ROOT %ynn_fusion.3 = f32[4,8]{1,0} fusion(%a, %b), kind=kCustom, '
      'calls=%fused_computation.3, metadata={op_name="f/blocks_1/add"}',
      '}'])
  assert product_names(hlo) == {"ynn_fusion.3": ["f/blocks_0/mlp/lin2/dot",
                                                 "f/blocks_1/attn/qkv/dot"]}


def test_operations_are_the_accelerators_where_there_is_one(tmp_path):
  import gzip

  from benchmarks.trace import operations
  meta = [dict(ph="M", name="process_name", pid=pid, args=dict(name=name))
          for pid, name in ((1, "/host:CPU"), (2, "/device:GPU:0"))]
  op = lambda pid, ts: dict(ph="X", pid=pid, ts=ts, dur=1.0, name="f",  # noqa: E731
                            args=dict(hlo_op="fusion.1", hlo_module="jit_f"))
  (tmp_path / "run").mkdir()
  with gzip.open(tmp_path / "run" / "host.trace.json.gz", "wt") as f:
    json.dump(dict(traceEvents=meta + [op(1, 5.0), op(2, 7.0), op(2, 3.0)]), f)
  assert [(e["pid"], e["ts"]) for e in operations(str(tmp_path))] == [(2, 3.0), (2, 7.0)]
  with gzip.open(tmp_path / "run" / "host.trace.json.gz", "wt") as f:  # CPU only: the host's
    json.dump(dict(traceEvents=meta[:1] + [op(1, 5.0)]), f)
  assert [e["pid"] for e in operations(str(tmp_path))] == [1]


@pytest.mark.slow
def test_convert_benchmark_times_each_side_and_cleans_up(tmp_path, monkeypatch):
  from benchmarks import convert
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  out = tmp_path / "convert.json"
  assert convert.main(["--variant", "tiny", "--image-size", "256", "--repeats", "2",
                       "--out", str(out)]) == 0
  with open(out) as f:
    result = json.load(f)
  assert set(result["rows"]) == {"reference", "convert", "load"}
  for name, row in result["rows"].items():
    assert len(row["times_s"]) == len(row["peak_rss_gb_each"]) == 2, name
    assert all(_positive(x) for x in row["times_s"] + row["peak_rss_gb_each"]), name
    assert row["seconds"] == pytest.approx(sum(row["times_s"]) / 2), name  # the median of two
  assert result["rows"]["reference"]["vs_reference"] == 1.0
  assert _positive(result["checkpoint_gb"])
  assert not os.listdir(scratch)  # the checkpoint and its conversion are removed
