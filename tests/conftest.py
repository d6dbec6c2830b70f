"""Shared fixtures and tiny models; the parity maxima measured by the run are printed at the end."""

import collections
import fcntl
import functools
import os
import socket
import subprocess
import sys
import time
from typing import Optional

# The test extra installs libtpu (for the TPU compile tests, which need no TPU): without
# this, every JAX start on a machine without TPUs tries and logs a TPU client error.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

PARITY = collections.defaultdict(float)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def memory_lock(request):
  """Tests marked `memory_heavy` (a full-size model) hold a lock that only they take, so
  that under xdist no two of them run together; any other test may run beside one
  (the memory measured: docs/testing.md)."""
  if request.node.get_closest_marker("memory_heavy") is None:
    yield
    return
  with open(os.path.join(ROOT, ".pytest_memory.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      _release_memory()
      yield
    finally:
      _release_memory()
      fcntl.flock(f, fcntl.LOCK_UN)


def _release_memory() -> None:
  """Hands this worker's freed memory back to the system: compiled programs of earlier
  tests, and the heap glibc keeps after large frees (a full-size model is GBs)."""
  import ctypes  # noqa: PLC0415
  import gc  # noqa: PLC0415
  gc.collect()
  jax.clear_caches()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


CACHE_SETTINGS = dict(jax_persistent_cache_min_compile_time_secs=1.0,
                      jax_persistent_cache_min_entry_size_bytes=-1,
                      jax_compilation_cache_max_size=8 * 2**30)  # a size: locked writes


@pytest.fixture(autouse=True, scope="session")
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for every process of the session, the xdist workers and
  the subprocesses that tests start (through the environment): the training tests
  build new jitted steps for the same programs, in many tests, and compile each once."""
  inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR")  # a subprocess of this session
  if inherited:
    path = inherited
  else:
    base = tmp_path_factory.getbasetemp()
    path = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache")
  settings = dict(CACHE_SETTINGS, jax_compilation_cache_dir=path)
  old = {k: getattr(jax.config, k) for k in settings}
  with pytest.MonkeyPatch.context() as env:
    for k, v in settings.items():
      jax.config.update(k, v)
      env.setenv(k.upper(), str(v))
    yield
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules that compare runs, not speeds: without XLA's optimisations the
  tiny test model's training step compiles sooner."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


# --- tiny models, shared -----------------------------------------------------


def tiny_train_config():
  """The training tests' config: a model of a few thousand parameters on 64-pixel
  images, 4 steps of batch 4 on 12 generated images; no evaluation."""
  from configs import demo  # noqa: PLC0415 - configs/ is found from the repository root
  c = demo.get_config("quick")
  m = c.model
  m.image_size = 64
  m.prompt_embed_dim = 32
  m.image_encoder.update(dict(patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=2,
                              global_attn_indexes=(1,)))
  m.mask_decoder.update(dict(iou_head_hidden_dim=32, transformer_mlp_dim=64,
                             transformer_num_heads=2))
  c.data.generate.update(dict(num_train=12, num_eval=4, size=64, max_shapes=4))
  c.data.max_masks = 2
  c.batch_size = 4
  c.prompts.num_rounds = 3
  c.prompts.num_no_point_rounds = 1
  c.eval.num_images = 0
  c.total_steps, c.log_every, c.checkpoint_every = 4, 1, 2
  c.optim.warmup_steps = 1
  c.export = False
  return c


def one_block_train_config():
  """`tiny_train_config` with one windowed encoder block, one decoder layer and one
  prompt round: the multi-device tests compile it fast."""
  c = tiny_train_config()
  c.model.image_encoder.update(dict(depth=1, global_attn_indexes=()))
  c.model.mask_decoder.transformer_depth = 1
  c.prompts.num_rounds = 1
  return c


def fake_batch(config, batch_size):
  """A deterministic batch: random images, rectangle masks on the low-res grid."""
  s = config.model.image_size
  low = 4 * s // config.model.image_encoder.patch_size
  n = config.data.max_masks
  rng = np.random.default_rng(0)
  masks = np.zeros((batch_size, n, low, low), np.uint8)
  for i in range(batch_size):
    for j in range(n):
      y, x = rng.integers(0, low // 2, 2)
      masks[i, j, y:y + low // 3, x:x + low // 4] = 1
  return dict(images=rng.uniform(0, 255, (batch_size, s, s, 3)).astype(np.float32),
              masks=masks, valid=np.ones((batch_size, n), bool))


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
  """`tests.reference.tiny_reference_sam` and its conversion, for the session:
  (reference, checkpoint directory, model, params)."""
  from tests.reference import save_and_convert, tiny_reference_sam  # noqa: PLC0415 - torch
  ref = tiny_reference_sam()
  _, directory, model, params = save_and_convert(ref, tmp_path_factory.mktemp("tiny_sam"))
  return ref, directory, model, params


@pytest.fixture(scope="module")
def small_conversion(tmp_path_factory):
  """A small randomised reference SAM (2 blocks of width 64, 128 px) saved as a .pth
  and converted: (reference, .pth path, checkpoint directory, model, params)."""
  from tests.reference import reference_sam, save_and_convert  # noqa: PLC0415 - torch
  ref = reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                      image_size=128, seed=3)
  return (ref, *save_and_convert(ref, tmp_path_factory.mktemp("convert")))


# --- tests on several CPU devices ---------------------------------------------

DEVICES_ENV = "SAM_JAX_TEST_CPU_DEVICES"
# For tests that compile a whole train step in their own process: XLA:CPU's backend
# optimisations off (LLVM's, the fusion emitters'), much faster compiles.
# Sharding is decided before them, in the SPMD partitioner.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")


def with_cpu_devices(count: int, xla_flags: str = ""):
  """Runs the decorated test in a fresh pytest process with `count` CPU devices.

  XLA fixes the device count when its backend starts, and the suite's own
  process keeps one device (the training configs' meshes take every device),
  so the test reruns itself by node id; there, it runs in place.
  """
  def decorate(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
      if os.environ.get(DEVICES_ENV) == str(count):
        assert jax.device_count() == count, jax.devices()
        return test(*args, **kwargs)
      # The running test's own node id, parameters included ("path::name[params] (call)").
      node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **{DEVICES_ENV: str(count)},
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={count} {xla_flags}")
      out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist",
                            "-p", "no:cacheprovider", node], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
      assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    return run
  return decorate


# --- random models and jobs of several processes ----------------------------------


def random_params(abstract, seed: int = 0):
  """Parameters drawn without an init compile: unit-scale activations through every
  kernel, LayerNorm scales near 1, biases and tables (rel_pos included) non-zero."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    z = rng.standard_normal(x.shape).astype(np.float32)
    if path[-1].key == "kernel":
      return z / np.sqrt(np.prod(x.shape[:-1]))
    return 1 + 0.1 * z if path[-1].key == "scale" else 0.1 * z
  return jax.tree_util.tree_map_with_path(draw, abstract)


def write_random_checkpoint(directory: str, mcfg, seed: int = 0) -> str:
  """A sam_jax checkpoint of `random_params` for the model config `mcfg`."""
  from sam_jax.build import build_sam  # noqa: PLC0415
  from sam_jax.checkpoint import abstract_params, save_sam  # noqa: PLC0415
  save_sam(directory, mcfg, random_params(abstract_params(build_sam(mcfg)), seed))
  return directory


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int, xla_flags: str = FAST_COMPILE_FLAGS, **extra) -> dict:
  """A subprocess's environment: this checkout first, `devices` CPU devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}")


class Processes:
  """Commands started together (the processes of one job), each logging to a file:
  a full pipe would stall a process."""

  def __init__(self, log_dir, commands: dict, env: dict, envs: Optional[dict] = None):
    """`commands`: {name: argv}; `env`, or `envs`[name] where given: the environment."""
    self.logs, self.procs = {}, {}
    for name, argv in commands.items():
      self.logs[name] = os.path.join(str(log_dir), f"{name}.log")
      with open(self.logs[name], "w") as log:
        self.procs[name] = subprocess.Popen(
            argv, cwd=ROOT, env=(envs or {}).get(name, env), stdout=log,
            stderr=subprocess.STDOUT)

  def log(self, name) -> str:
    with open(self.logs[name]) as f:
      return f.read()

  def tails(self, size: int = 4000) -> str:
    return "\n".join(f"--- {name}:\n{self.log(name)[-size:]}" for name in self.procs)

  def wait(self, timeout: float = 300, stop_at_failure: bool = True) -> dict:
    """Exit statuses once all have ended; at `timeout`, or once one has failed (its
    peers would wait on it), the rest are killed."""
    deadline = time.time() + timeout
    try:
      while time.time() < deadline and any(p.poll() is None for p in self.procs.values()):
        if stop_at_failure and any(p.poll() for p in self.procs.values()):
          break
        time.sleep(0.1)
    finally:
      for p in self.procs.values():
        if p.poll() is None:
          p.kill()
    return {name: p.wait() for name, p in self.procs.items()}

  def succeed(self, timeout: float = 300) -> None:
    codes = self.wait(timeout)
    assert set(codes.values()) == {0}, f"exit statuses {codes}\n{self.tails()}"


def record(name: str, value: float) -> float:
  """Keeps the largest value seen for `name` (printed in the terminal summary)."""
  PARITY[name] = max(PARITY[name], float(value))
  return float(value)


def assert_close_rel(actual, expected, rel: float, name: str) -> None:
  """max|a - e| / max|e| <= rel: relative to the tensor's scale, not per element."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  if actual.size == 0:
    return
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert record(name, err) <= rel, f"{name}: relative error {err:.3g} > {rel}"


def assert_close_abs(actual, expected, atol: float, name: str) -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = np.abs(actual - expected).max()
  assert record(name, err) <= atol, f"{name}: absolute error {err:.3g} > {atol}"


def assert_masks_agree(actual, expected, fraction: float, name: str) -> None:
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  disagree = float(np.mean(actual != expected))
  record(name, disagree)
  assert disagree <= 1 - fraction, f"{name}: {disagree:.3%} of mask pixels differ"


def pytest_terminal_summary(terminalreporter):
  if PARITY:
    terminalreporter.section("parity with the reference: largest errors measured")
    for name in sorted(PARITY):
      terminalreporter.write_line(f"{name:55s} {PARITY[name]:.3g}")


def pytest_sessionfinish(session):
  """Under pytest-xdist, hands this worker's maxima to the controller."""
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["parity"] = dict(PARITY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  for name, value in getattr(node, "workeroutput", {}).get("parity", {}).items():
    record(name, value)
