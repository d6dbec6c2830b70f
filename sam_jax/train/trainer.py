"""The training loop: init or resume, the jitted sharded step, logging, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job, in named steps:
`open_data`, `restore_or_init_state`, `evaluate_before_training`, the
`train_loop`, then `evaluate_and_export`. Resume order (as in big_vision): the
workdir's latest checkpoint, else `config.model_init` (a sam_jax checkpoint
directory, e.g. a converted release), else from scratch.
"""

import functools
import json
import logging
import os
import re
import threading
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils

from sam_jax.build import build_sam, image_size_hw
from sam_jax.checkpoint import abstract_params, init_params, load_config, load_sam, save_sam
from sam_jax.train import data as data_lib
from sam_jax.train import demo_data, embedding_cache, eval_data, flops, optim, preemption, recipe
from sam_jax.train import sharding as shard_lib

State = Dict[str, Any]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf, or diverged; the run stops, keeping the last good checkpoint."""


class CheckpointSaveError(RuntimeError):
  """A training checkpoint could not be written; the run stops at the first failed save."""


class DataError(ValueError):
  """The training data is too corrupt to train on (see WORKDIR/skipped_examples.json)."""


def resolve_model_config(config) -> ml_collections.ConfigDict:
  """The model's config: `config.model`, or a checkpoint's with `config.model` overrides."""
  if config.get("model_init"):
    mcfg = load_config(config.model_init)
    overrides = config.get("model_overrides", ml_collections.ConfigDict())
    mcfg.update(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
    return mcfg
  return config.model


def initial_params(config, model) -> Any:
  if config.get("model_init"):
    _, params = load_sam(config.model_init, image_size=resolve_model_config(config).image_size)
    return params
  return rescale_init(init_params(model, jax.random.key(config.seed)),
                      config.get("init_scale") or ())


def rescale_init(params, rules) -> Any:
  """Fresh parameters with those whose path (`a/b/kernel`) matches a rule's regex scaled.

  `rules`: (regex, factor) pairs, the first match wins (config.init_scale). Only
  a run from scratch uses them: a checkpoint's parameters are never changed.
  """
  rules = [(re.compile(r), float(f)) for r, f in rules]
  used = set()

  def scale(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    for i, (r, f) in enumerate(rules):
      if r.fullmatch(name):
        used.add(i)
        return x * f
    return x

  params = jax.tree_util.tree_map_with_path(scale, params)
  unused = [rules[i][0].pattern for i in range(len(rules)) if i not in used]
  if unused:
    raise ValueError(f"config.init_scale: {unused} match no parameter path; paths look like "
                     "'mask_decoder/output_hypernetworks_mlps_0/layers_2/kernel'.")
  return params


class Trainer:
  """Holds the model, optimizer, mesh, shardings and the jitted step."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mcfg = resolve_model_config(config)
    self.model = build_sam(self.mcfg)
    self.mesh = mesh if mesh is not None else shard_lib.make_mesh(config.mesh_shape)
    self.abstract_params = abstract_params(self.model)
    self.tx, self.schedule = optim.make_optimizer(
        config.optim, self.abstract_params, self.mcfg.image_encoder.depth, config.freeze)
    self.rules = shard_lib.rules_from_config(config)
    self.param_shardings = shard_lib.param_shardings(self.abstract_params, self.mesh, self.rules)
    abstract = jax.eval_shape(self._state_from_params, self.abstract_params)
    self.state_shardings = dict(
        params=self.param_shardings,
        opt_state=shard_lib.state_shardings(abstract["opt_state"], self.param_shardings,
                                            self.mesh),
        step=shard_lib.NamedSharding(self.mesh, shard_lib.P()),
        rng=shard_lib.NamedSharding(self.mesh, shard_lib.P()))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, self.state_shardings)
    self._step_fns = {}  # by the batch's keys: images, or cached embeddings

  def abstract_batch(self, global_batch: int) -> Dict[str, jax.ShapeDtypeStruct]:
    """The ShapeDtypeStructs of a global training batch as `data.train_batches` yields it
    (after `_step_inputs`): with the image embeddings in place of the images where the
    config caches them."""
    h, w = image_size_hw(self.mcfg.image_size)
    mh, mw = recipe.target_size(self.model, self.config)
    m = self.config.data.max_masks
    images = jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32)
    embeddings = bool(self.config.get("cache_embeddings", False))
    if embeddings:
      model = self.model
      images = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.embed_images),
                              self.abstract_state["params"], images)
    return {"embeddings" if embeddings else "images": images,
            "masks": jax.ShapeDtypeStruct((global_batch, m, mh, mw), jnp.uint8),
            "valid": jax.ShapeDtypeStruct((global_batch, m), jnp.bool_)}

  def _state_from_params(self, params) -> State:
    return dict(params=params, opt_state=self.tx.init(params),
                step=jnp.zeros((), jnp.int32),
                rng=jax.random.key_data(jax.random.key(self.config.seed)))

  def init_state(self, params) -> State:
    """The step-0 state, sharded, from host or device parameters."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      params = jax.device_put(params, self.param_shardings)
      return jax.jit(self._state_from_params, out_shardings=self.state_shardings)(params)

  def loss_and_grads(self, params, batch, key):
    fn = functools.partial(recipe.simulate, model=self.model, config=self.config, train=True)
    # FSDP: the model computes with gathered weights (see sharding.gather_fsdp).
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: fn(shard_lib.gather_fsdp(p, self.mesh, self.rules), batch=batch, key=key),
        has_aux=True)(params)
    return loss, metrics, grads

  def _train_step(self, state: State, batch) -> tuple:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    _, metrics, grads = self.loss_and_grads(state["params"], batch, key)
    with jax.named_scope("optimizer"):
      updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                     param_norm=optax.global_norm(params), lr=self.schedule(state["step"]))
    new = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
    return new, metrics

  def _jitted_step(self, batch):
    keys = tuple(sorted(batch))
    if keys not in self._step_fns:
      batch_sh = {k: shard_lib.batch_sharding(self.mesh, len(v.shape)) for k, v in batch.items()}
      replicated = shard_lib.NamedSharding(self.mesh, shard_lib.P())
      self._step_fns[keys] = jax.jit(self._train_step,
                                     in_shardings=(self.state_shardings, batch_sh),
                                     out_shardings=(self.state_shardings, replicated),
                                     donate_argnums=(0,))
    return self._step_fns[keys]

  def train_step(self, state: State, batch) -> tuple:
    """One optimizer step; `state` is donated. Jitted with explicit shardings."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_step(batch)(state, shard_lib.put_batch(batch, self.mesh))

  def compile_step(self, batch) -> jax.stages.Compiled:
    """`train_step` compiled ahead of time for a global batch of these shapes.

    `batch` may hold `jax.ShapeDtypeStruct`s: nothing is allocated, so
    `.memory_analysis()` of the result tells whether a batch size would fit
    before trying it. Shapes already stepped on come from the same cache.
    """
    # With the shardings that `train_step`'s arrays carry: the two then share
    # one compilation (without, each would compile the same program again).
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=shard_lib.batch_sharding(self.mesh, len(v.shape)))
             for k, v in batch.items()}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_step(batch).lower(self.abstract_state, batch).compile()


class _CheckpointManager(ocp.CheckpointManager):
  """The trainer asks JAX's preemption sync point itself, at the same calls in every
  process; Orbax's own asks (from its finalize thread, with older steps) could set the
  sync point to a step that has passed, and the run would never stop for it."""

  def reached_preemption(self, step: int) -> bool:
    return False


def _check_writable(directory: str) -> None:
  """Fails before the first step, naming the folder and the cause, if checkpoints cannot be written."""
  probe = os.path.join(directory, f".sam_jax-write-probe-{jax.process_index()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("probe")
    os.remove(probe)
  except OSError as e:
    raise CheckpointSaveError(f"Cannot write checkpoints to {directory}: "
                              f"{e.strerror or e}. Make it writable or choose another "
                              "workdir.") from e


def checkpoint_manager(workdir: str, config, check_writable: bool = False) -> ocp.CheckpointManager:
  if check_writable:
    _check_writable(os.path.join(os.path.abspath(workdir), "checkpoints"))
  pp = ocp.checkpoint_managers.preservation_policy
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every,
      preservation_policy=pp.LatestN(config.keep_checkpoints),
      enable_async_checkpointing=True)
  return _CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                            options=options)


def save_checkpoint(mgr, step: int, state: State, meta: dict) -> None:
  """Starts the (asynchronous) save of `step`; a failure of this or the previous save raises."""
  try:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)), force=True)
  except Exception as e:  # noqa: BLE001 - Orbax raises any type; the run must stop now
    raise CheckpointSaveError(f"Saving the checkpoint of step {step} to {mgr.directory} "
                              f"failed: {type(e).__name__}: {e}") from e


def check_saves(mgr) -> None:
  """Raises CheckpointSaveError as soon as a finished asynchronous save has failed."""
  try:
    mgr.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise CheckpointSaveError(f"Saving a checkpoint to {mgr.directory} failed: "
                              f"{type(e).__name__}: {e}") from e


def restore_checkpoint(mgr, trainer: Trainer, step: int):
  """State restored straight onto this run's mesh (which may differ from the saver's)."""
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(trainer.abstract_state), meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def _to_host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)).tolist(), tree)


def _gathered(params):
  """The full parameters on every process (host copies when they span several processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(params, tiled=True)  # a collective: all call it
  return params


def _prepare_data(config, workdir: str):
  """The train/eval folders; the demo's generated dataset is written first if asked.

  Process 0 writes it (into a workdir that every process shares); the others
  wait for it to be complete.
  """
  dcfg = config.data
  train_dir, eval_dir = dcfg.train_dir, dcfg.get("eval_dir")
  if dcfg.get("generate"):
    g = dcfg.generate
    root = os.path.join(workdir, "data")
    train_dir, eval_dir = os.path.join(root, "train"), os.path.join(root, "eval")
    if jax.process_index() == 0:
      print(f"Writing the demo dataset: {g.num_train} + {g.num_eval} generated images of "
            f"{g.size} px (train + held-out) in SA-1B's layout under {root}", flush=True)
      demo_data.write_dataset(train_dir, g.num_train, g.size, g.max_shapes, seed=g.seed)
      demo_data.write_dataset(eval_dir, g.num_eval, g.size, g.max_shapes, seed=g.seed + 1,
                              prefix="sa_eval_")
    shard_lib.sync_processes("sam_jax demo data written")
  return train_dir, eval_dir


def run_eval(model, params, dataset, eval_config):
  """`config.eval`'s protocol (sam_jax.train.evaluate) on the first `num_images` held-out images."""
  from sam_jax.train import evaluate  # scipy only when evaluating
  indices = range(min(eval_config.num_images or len(dataset), len(dataset)))
  return evaluate.evaluate_model(model, params, dataset, evaluate.training_protocol(eval_config),
                                 indices, pictures=4)


def train_and_evaluate(config, workdir: str, stop_at: Optional[int] = None,
                       restart_data_order: bool = False) -> Dict[str, Any]:
  """Trains per `config`, evaluates, exports; returns a summary dict.

  `stop_at` ends the run early at that step (after checkpointing it), as a
  preemption would; calling again resumes from the workdir. A SIGTERM saves the
  step in progress and raises `preemption.Preempted` (exit status 75).
  `restart_data_order` lets a resumed run change the global batch size, reading
  the data from its start again (else refused: the data position would be wrong).
  """
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config)
  if config.get("cache_embeddings"):
    embedding_cache.check_config(config, trainer.mcfg)  # before any work: refuses freeze='full'
  train_src, eval_examples = open_data(config, workdir, trainer)
  mgr = checkpoint_manager(workdir, config, check_writable=True)
  summary = _read_summary(workdir)
  state, start, data_step, resumed = restore_or_init_state(config, trainer, mgr,
                                                           restart_data_order)
  step_flops = None
  if not resumed and eval_examples is not None and config.eval.get("before_training", True):
    # The step compiles on a second thread meanwhile: XLA compiles on one core.
    compiling = _Background(trainer.compile_step, trainer.abstract_batch(config.batch_size))
    summary["untrained"] = evaluate_before_training(trainer, state, eval_examples, config,
                                                    workdir)
    step_flops = count_step_flops(trainer)  # while the compile may still run
    compiling.result()  # its errors are the run's; the first step finds it compiled
  with preemption.Notice() as notice:  # from here to the last step, a SIGTERM saves the run
    if config.get("cache_embeddings"):
      train_src = with_embedding_cache(config, trainer, state, train_src, workdir, notice)
    total = stop_at if stop_at is not None else config.total_steps
    state, step, losses, preempted = train_loop(config, trainer, state, train_src, mgr, workdir,
                                                start, data_step, total, notice, step_flops)
  summary["losses"] = {**summary.get("losses", {}), **{str(k): v for k, v in losses.items()}}
  if step >= config.total_steps and not preempted:
    summary.update(evaluate_and_export(config, trainer, state, eval_examples, workdir,
                                       summary.get("untrained", {})))
  _write_summary(workdir, summary)
  if preempted:  # the checkpoint is written: train_loop waited for it
    err = preemption.Preempted(f"the checkpoint of step {step}")
    print(err, flush=True)
    raise err
  summary["state"] = state
  return summary


class _Background:
  """A call on a daemon thread. Unlike a ThreadPoolExecutor's worker, which the
  interpreter joins at exit, it does not hold up a run stopped meanwhile (Ctrl-C
  during the untrained evaluation) for the rest of a compile that can take minutes."""

  def __init__(self, fn, *args):
    self._value, self._error = None, None
    self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True,
                                    name=f"background {getattr(fn, '__name__', fn)}")
    self._thread.start()

  def _run(self, fn, *args):
    try:
      self._value = fn(*args)
    except BaseException as e:  # noqa: BLE001 - re-raised by result(), in the caller's thread
      self._error = e

  def result(self):
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._value


def open_data(config, workdir: str, trainer: Trainer):
  """The training examples, and the held-out examples to evaluate on (None without)."""
  mcfg = trainer.mcfg
  image_hw = image_size_hw(mcfg.image_size)
  target = recipe.target_size(trainer.model, config)
  train_dir, eval_dir = _prepare_data(config, workdir)
  train_src = data_lib.open_examples(config.data, "train", train_dir, workdir, image_hw, target,
                                     config.data.max_masks, mcfg.pixel_mean)
  if not config.eval.num_images:
    return train_src, None
  eval_src = data_lib.open_examples(config.data, "eval", eval_dir, workdir, image_hw, image_hw,
                                    config.eval.max_masks, mcfg.pixel_mean)
  if eval_src is None:
    return train_src, None
  return train_src, eval_data.Sa1bRecords(eval_src.records, eval_src.description,
                                          config.eval.max_masks)


def _summary_path(workdir: str) -> str:
  return os.path.join(workdir, "summary.json")


def _read_summary(workdir: str) -> Dict[str, Any]:
  """The summary a previous (interrupted) run of this workdir wrote, else empty."""
  if not os.path.exists(_summary_path(workdir)):
    return {}
  with open(_summary_path(workdir)) as f:
    return json.load(f)


def _write_summary(workdir: str, summary: Dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(_summary_path(workdir), "w") as f:
      json.dump({k: v for k, v in summary.items() if v is not None}, f, indent=2)


def restore_or_init_state(config, trainer: Trainer, mgr, restart_data_order: bool = False):
  """(state, step, data position, resumed): the workdir's latest readable checkpoint, else step 0.

  An unreadable checkpoint (a crash mid-write, a damaged disk) is reported and
  the one before it is used; when none can be read, the run stops. The
  checkpoint may come from another number of processes or mesh; its data
  position holds for the same global batch size only (see `_data_position`).
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  failures = []
  for start in steps:
    try:
      state, meta = restore_checkpoint(mgr, trainer, start)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
      failures.append(f"step {start}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
      print(f"The checkpoint of step {start} in {mgr.directory} is unreadable "
            f"({failures[-1]}); trying the one before it.", flush=True)
      _set_aside(mgr, start)
      continue
    data_step = _data_position(meta, start, config, mgr, restart_data_order)
    logging.info("Resumed from step %d (data position %d)", start, data_step)
    print(f"Resuming from the checkpoint of step {start} (data position {data_step}), "
          f"{_topology_report(meta, trainer)}" +
          (f"; the later {len(failures)} could not be read." if failures else "."), flush=True)
    return state, start, data_step, True
  if failures:
    raise CheckpointSaveError(
        f"None of the checkpoints in {mgr.directory} can be read:\n  " + "\n  ".join(failures) +
        "\nMove the folder away to start from scratch.")
  return trainer.init_state(initial_params(config, trainer.model)), 0, 0, False


def _data_position(meta: Dict[str, Any], start: int, config, mgr,
                   restart_data_order: bool) -> int:
  """The checkpoint's data position; another global batch size is refused unless
  `restart_data_order` (the data is then read from its start)."""
  saved_batch = meta.get("global_batch", config.batch_size)
  if saved_batch == config.batch_size:
    return meta["data_step"]
  if not restart_data_order:
    raise ValueError(
        f"The checkpoint of step {start} in {mgr.directory} was trained with a global batch "
        f"of {saved_batch}, this config has {config.batch_size}: its data position "
        f"({meta['data_step']} batches) would mean other examples now. Keep config.batch_size="
        f"{saved_batch}, or pass restart_data_order=True (train.py --restart_data_order) "
        "to read the data from its start again.")
  print(f"The global batch changed from {saved_batch} to {config.batch_size}: "
        "restarting the data order.", flush=True)
  return 0


def _topology(trainer: Trainer) -> Dict[str, Any]:
  """Who writes a checkpoint: recorded in its meta, reported when it is restored."""
  return dict(process_count=jax.process_count(), local_device_count=jax.local_device_count(),
              mesh=dict(trainer.mesh.shape))


def _topology_report(meta: Dict[str, Any], trainer: Trainer) -> str:
  def words(t):
    return (f"{t['process_count']} process(es) x {t['local_device_count']} devices, "
            f"mesh {t['mesh']}")
  here = words(_topology(trainer))
  return f"saved by {words(meta)}; restored onto {here}" if "mesh" in meta else f"onto {here}"


def _set_aside(mgr, step: int) -> None:
  """Renames an unreadable checkpoint (kept for inspection) so that its step can be saved again."""
  if jax.process_index() == 0:
    path = os.path.join(str(mgr.directory), str(step))
    if os.path.isdir(path):
      os.rename(path, f"{path}.unreadable-{int(time.time())}")
  shard_lib.sync_processes(f"sam_jax set aside checkpoint {step}")
  mgr.reload()


def evaluate_before_training(trainer: Trainer, state: State, eval_examples, config,
                             workdir: str) -> Dict[str, Any]:
  """The untrained model's prompt mIoUs (its 1-point masks kept for the final picture)."""
  # The state's parameters, placed as after training: the evaluation compiles once.
  res = run_eval(trainer.model, _gathered(state["params"]), eval_examples, config.eval)
  if jax.process_index() == 0 and "pictures" in res:
    np.save(os.path.join(workdir, "untrained_masks_1point.npy"), res["pictures"]["pred"])
  print(f"Before training: 1-point mIoU {res['miou_1point_default']:.3f}, "
        f"box mIoU {res['miou_box']:.3f}", flush=True)
  return {k: v for k, v in res.items() if k != "pictures"}


def with_embedding_cache(config, trainer: Trainer, state: State, train_src, workdir: str,
                         notice: Optional[preemption.Notice] = None):
  """The training examples with their image embeddings (cached, built on first use)."""
  cache = embedding_cache.open_or_build(
      config.get("embedding_cache_dir") or os.path.join(workdir, "embeddings"), train_src,
      trainer.model, state["params"], trainer.mcfg, trainer.mesh, config.batch_size, config.seed,
      notice)
  return embedding_cache.CachedSource(train_src, cache)  # batches carry `embeddings`


def train_loop(config, trainer: Trainer, state: State, train_src, mgr, workdir: str,
               start: int, data_step: int, total: int,
               notice: Optional[preemption.Notice] = None,
               step_flops: Optional[float] = None):
  """Steps `start + 1 .. total`, logging and checkpointing on the way.

  `step_flops`: the model FLOPs of a step, if counted already (`count_step_flops`).

  Returns the last state, the last step, the host losses by step, and whether
  `notice` stopped the run early (that step's checkpoint then written).
  """
  health = DataHealth(train_src, config.data, workdir)
  batches = data_lib.train_batches(train_src, config.batch_size, config.seed, data_step,
                                   jax.process_index(), jax.process_count())
  log = MetricsLog(workdir, config)
  log.drop_after(start)  # rows a previous run logged past its last checkpoint
  # One program, not an op-by-op compile for each leaf's shape.
  limits = _Divergence(config.get("diverge_factor", 100.0),
                       float(jax.device_get(jax.jit(optax.global_norm)(state["params"]))))
  pending, t0, images_seen = [], time.time(), 0
  losses = {}
  step, preempted = start, False
  peak = flops.peak_flops(jax.devices()[0].device_kind, trainer.mcfg.dtype,
                          config.get("peak_flops"))
  if step_flops is None:
    step_flops = count_step_flops(trainer)
  _print_step_flops(step_flops, trainer, peak)
  bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  log.bar = bar
  try:
    for step in range(start + 1, total + 1):
      batch = next(batches)
      health.update(batch, step)
      inputs = _step_inputs(batch)
      state, metrics = trainer.train_step(state, inputs)
      pending.append((step, metrics))
      images_seen += config.batch_size
      bar.update(1)
      check_saves(mgr)
      preempted = notice is not None and notice.reached()  # the same step in every process
      should_save = step % config.checkpoint_every == 0 or step == total or preempted
      if step % config.log_every == 0 or should_save:
        host = _check_finite(pending, mgr, limits)
        pending = []
        for s, m in host:
          losses[s] = m["loss"]
        dt = time.time() - t0
        log.write(dict(step=step, **host[-1][1], images_per_s=images_seen / max(dt, 1e-9),
                       skipped_examples=health.num_skipped,
                       bad_annotations=len(train_src.bad_annotations),
                       **flops.utilization(step_flops * images_seen / config.batch_size, dt,
                                           peak, jax.device_count())))
        t0, images_seen = time.time(), 0
        health.write()
      if should_save:
        save_checkpoint(mgr, step, state, dict(step=step, data_step=data_step + step - start,
                                               global_batch=config.batch_size,
                                               **_topology(trainer)))
      if preempted:
        break
  except BaseException:
    try:  # the run is already failing: report its error, not a second one from Orbax
      mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      logging.error("A checkpoint save failed while the run stopped: %s", e)
    raise
  else:
    try:
      mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"Saving the last checkpoint to {mgr.directory} failed: "
                                f"{type(e).__name__}: {e}") from e
  finally:
    bar.close()
    batches.close()  # stops the prefetching thread
    log.close()
    health.write()
  return state, step, losses, preempted


class DataHealth:
  """What the run consumed: distinct corrupt examples and steps without any valid mask.

  Counted from the batches the steps use (not those read ahead), each corrupt
  example once. Stops the run with DataError when more than
  `config.data.max_empty_batches` steps had no valid mask, or when corrupt
  examples (with those left out at preparation) pass
  `config.data.max_skipped_fraction` of those seen. Lists them in
  WORKDIR/skipped_examples.json (one file per process when several).
  """

  def __init__(self, source, dcfg, workdir: str):
    self.source = source
    self.seen = np.zeros(len(source), bool)
    self.corrupt = np.zeros(len(source), bool)
    self.empty_steps, self.num_skipped = 0, len(source.skipped_at_prepare)
    self.max_empty = dcfg.get("max_empty_batches", 10)
    self.max_fraction = dcfg.get("max_skipped_fraction", 0.1)
    name = ("skipped_examples.json" if jax.process_count() == 1
            else f"skipped_examples.{jax.process_index()}.json")
    self.path = os.path.join(workdir, name)
    prepared = len(source.skipped_at_prepare)
    if prepared and prepared / (prepared + len(source)) > self.max_fraction:
      self.write()
      raise DataError(
          f"{prepared} of the {prepared + len(source)} examples of {source.description} were "
          f"left out as corrupt when it was prepared, more than config.data."
          f"max_skipped_fraction={self.max_fraction}; see {self.path}.")

  def update(self, batch, step: int) -> None:
    if "index" in batch:  # batches built by data.load_batch say which examples they hold
      index = np.asarray(batch["index"])
      self.seen[index] = True
      self.corrupt[index[np.asarray(batch["corrupt"], bool)]] = True
    counts = np.array([np.asarray(batch["valid"]).sum(), self.seen.sum(), self.corrupt.sum()],
                      np.int64)
    if jax.process_count() > 1:  # every process decides on the same global numbers
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(0)
    valid, seen, corrupt = (int(c) for c in counts)
    prepared = len(self.source.skipped_at_prepare)
    self.num_skipped = corrupt + prepared
    if valid == 0:
      self.empty_steps += 1
      if self.empty_steps > self.max_empty:
        self.write()
        raise DataError(
            f"The batch of step {step} has no valid mask: {self.empty_steps} steps so far "
            f"without one, more than config.data.max_empty_batches={self.max_empty}. "
            f"{corrupt} corrupt examples and {len(self.source.bad_annotations)} invalid "
            f"annotations so far; see {self.path}.")
    if seen >= min(len(self.source), 100) and \
        (corrupt + prepared) / (seen + prepared) > self.max_fraction:
      self.write()
      raise DataError(
          f"{corrupt + prepared} of the {seen + prepared} examples seen by step {step} are "
          f"corrupt, more than config.data.max_skipped_fraction={self.max_fraction}; "
          f"see {self.path}.")

  def write(self) -> None:
    src = self.source
    if not (src.skipped_at_prepare or self.corrupt.any() or src.bad_annotations):
      return
    listing = dict(
        at_preparation=src.skipped_at_prepare,
        at_read={str(i): src.skipped_at_read.get(int(i), "") for i in np.flatnonzero(self.corrupt)},
        bad_annotations={f"{i}/{j}": r for (i, j), r in sorted(src.bad_annotations.items())})
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(listing, f, indent=1)
    os.replace(tmp, self.path)


def _step_inputs(batch) -> Dict[str, Any]:
  """The step's inputs: the images, or their cached embeddings, with the masks."""
  inputs = dict(masks=batch["masks"], valid=batch["valid"])
  if "embeddings" in batch:
    inputs["embeddings"] = batch["embeddings"]
  else:
    inputs["images"] = batch["image"]
  return inputs


class MetricsLog:
  """One record per log step: WORKDIR/metrics.jsonl, TensorBoard if asked, and a printed line."""

  def __init__(self, workdir: str, config):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = config.total_steps
    self.writer = None
    self.bar = None  # the loop's progress bar: shows the latest loss, prints the line above it
    if config.get("tensorboard") and jax.process_index() == 0:
      from sam_jax.train import tensorboard  # noqa: PLC0415 - tensorboardX only when asked
      self.writer = tensorboard.Writer(os.path.join(workdir, "tensorboard"))

  def drop_after(self, step: int) -> None:
    """Drops rows past `step`: a resumed run logs those steps again."""
    if jax.process_index() != 0 or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(keep)
      os.replace(self.path + ".tmp", self.path)

  def write(self, record: Dict[str, Any]) -> None:
    if jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if self.writer is not None:
      self.writer.write(record["step"], record)
    line = (f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
            f"iou(first/last round) {record['iou_per_round'][0]:.3f}/"
            f"{record['iou_per_round'][-1]:.3f} lr {record['lr']:.2e} "
            f"{record['images_per_s']:.1f} img/s")
    if self.bar is None or self.bar.disable:
      print(line, flush=True)
      return
    self.bar.set_postfix_str(f"loss {record['loss']:.4f}, {record['images_per_s']:.1f} img/s",
                             refresh=False)
    self.bar.write(line)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def evaluate_and_export(config, trainer: Trainer, state: State, eval_examples, workdir: str,
                        untrained: Dict[str, Any]) -> Dict[str, Any]:
  """After the last step: the trained model's mIoUs and picture, and the export.

  Returns the summary entries (`trained`, `export`) it produced.
  """
  out = {}
  params = _gathered(state["params"])
  if eval_examples is not None:
    res = run_eval(trainer.model, params, eval_examples, config.eval)
    out["trained"] = {k: v for k, v in res.items() if k != "pictures"}
    print(results_table(untrained, out["trained"], config.eval.num_clicks), flush=True)
    if jax.process_index() == 0 and "pictures" in res:
      _write_picture(workdir, res["pictures"])
  if config.get("export") and jax.process_index() == 0:
    export_dir = os.path.join(workdir, "export")
    save_sam(export_dir, trainer.mcfg, jax.device_get(params), overwrite=True)
    out["export"] = export_dir
    print(f"Exported the trained parameters to {export_dir} (load with sam_jax.checkpoint.load_sam).")
  return out


def results_table(untrained: Dict[str, Any], trained: Dict[str, Any], num_points: int) -> str:
  """The held-out mIoUs before and after training, one prompt per row."""
  rows = [("1 point", lambda r: r["miou_1point_default"]), ("1 box", lambda r: r["miou_box"])]
  if num_points > 1:
    rows.append((f"1 point + {num_points - 1} clicks",
                 lambda r: r["miou_points"][str(num_points)]))

  def cell(res, get):
    try:
      return f"{get(res):.3f}"
    except KeyError:  # e.g. a resumed run that did not evaluate the untrained model
      return "-"

  width = max(len(name) for name, _ in rows) + 2
  lines = [f"Held-out mIoU ({trained['num_masks']} masks):",
           f"  {'prompt':<{width}}{'untrained':>10}{'trained':>10}"]
  lines += [f"  {name:<{width}}{cell(untrained, get):>10}{cell(trained, get):>10}"
            for name, get in rows]
  return "\n".join(lines)


def count_step_flops(trainer: Trainer) -> float:
  """Model FLOPs of one step on the global batch (see `flops`); 0 if they cannot be counted."""
  try:
    return flops.train_step_flops(trainer.mcfg, trainer.config, trainer.abstract_params,
                                  trainer.abstract_batch(trainer.config.batch_size))
  except Exception as e:  # noqa: BLE001 - a metric must never stop the run
    logging.warning("Could not count the model FLOPs of a step (no MFU): %s", e)
    return 0.0


def _print_step_flops(count: float, trainer: Trainer, peak) -> None:
  if not count or jax.process_index() != 0:
    return
  kind = jax.devices()[0].device_kind
  print(f"Model FLOPs per step: {count / 1e12:.4g} TFLOP; " + (
      f"peak {peak / 1e12:g} TFLOP/s per device ({kind}, {trainer.mcfg.dtype})" if peak else
      f"no peak FLOP/s known for {kind!r} in {trainer.mcfg.dtype}, so no MFU "
      "(set config.peak_flops)"), flush=True)


class _Divergence:
  """What counts as exploding: a parameter norm or a loss `factor` times its usual size."""

  def __init__(self, factor: float, start_norm: float):
    self.factor, self.start_norm, self.losses = factor, start_norm, []

  def problem(self, s: int, m) -> Optional[str]:
    if m["param_norm"] > self.factor * self.start_norm:
      return (f"The param_norm grew to {m['param_norm']:.3g} at step {s}, over {self.factor:g} "
              f"times its {self.start_norm:.3g} at the start of this run")
    if len(self.losses) >= 3 and m["loss"] > self.factor * float(np.median(self.losses)):
      return (f"The loss jumped to {m['loss']:.3g} at step {s}, over {self.factor:g} times its "
              f"median {float(np.median(self.losses)):.3g} so far")
    self.losses.append(m["loss"])
    return None


def _check_finite(pending, mgr, limits: Optional[_Divergence] = None):
  """Host copies of pending metrics; stops the run at the first non-finite or exploding step.

  Runs before each save, so a checkpoint is only written for a step whose
  loss and parameters are finite and not exploding: the last checkpoint is good.
  """
  host = [(s, _to_host(m)) for s, m in pending]
  for s, m in host:
    # A finite loss with non-finite new parameters would poison the next save too.
    bad = [k for k in ("loss", "param_norm") if not np.isfinite(m[k])]
    why = (f"The {' and '.join(bad)} became {m[bad[0]]} at step {s}" if bad else
           limits.problem(s, m) if limits is not None else None)
    if why:
      mgr.wait_until_finished()
      last = mgr.latest_step()
      raise NonFiniteLossError(
          f"{why}; stopping, nothing saved from this step on. The last good checkpoint is "
          f"step {last}" +
          (" (none was saved): rerun to start again." if last is None else
           ". Lower the learning rate or inspect the data, then rerun to resume from it."))
  return host


def _write_picture(workdir, pictures):
  from sam_jax.train import evaluate
  valid = pictures["valid"]
  points = np.zeros(valid.shape + (2,), np.float32)
  for i, j in zip(*np.nonzero(valid)):
    points[i, j] = evaluate.interior_point(pictures["gt"][i, j])
  cols, titles = [pictures["gt"]], ["ground truth"]
  untrained = os.path.join(workdir, "untrained_masks_1point.npy")
  if os.path.exists(untrained) and np.load(untrained).shape == pictures["pred"].shape:
    cols.append(np.load(untrained))
    titles.append("untrained, 1 point")
  cols.append(pictures["pred"])
  titles.append("trained, 1 point")
  path = os.path.join(workdir, "predictions.png")
  evaluate.render(path, pictures["images"], cols, titles, points, valid)
  print(f"Wrote {path}: ground truth and 1-point masks of the held-out images", flush=True)


def evaluate_only(config, workdir: str, checkpoint: Optional[str] = None) -> Dict[str, Any]:
  """The evaluation mode: prompt mIoUs of a sam_jax checkpoint on the held-out split.

  The checkpoint is `checkpoint`, else WORKDIR/export, else `config.model_init`.
  Prints and returns 1-point, 1-box and k-click mIoU; writes WORKDIR/eval.json.
  """
  ckpt = checkpoint or (os.path.join(workdir, "export")
                        if os.path.isdir(os.path.join(workdir, "export")) else config.model_init)
  if not ckpt:
    raise ValueError(f"Nothing to evaluate: no {workdir}/export and no config.model_init.")
  model, params = load_sam(ckpt)
  _, eval_dir = _prepare_data(config, workdir)
  size = image_size_hw(load_config(ckpt).image_size)
  src = data_lib.open_examples(config.data, "eval", eval_dir, workdir, size, size,
                               config.eval.max_masks, load_config(ckpt).pixel_mean)
  if src is None:
    raise ValueError("Set config.data.eval_dir (a folder in SA-1B's layout), or tfds_name and "
                     "eval_split, to evaluate on.")
  dataset = eval_data.Sa1bRecords(src.records, src.description, config.eval.max_masks)
  # Every process evaluates its share of the images; all get the gathered result.
  res = run_eval(model, params, dataset, config.eval)
  res = {k: v for k, v in res.items() if k != "pictures"}
  points = ", ".join(f"{k}: {v:.3f}" for k, v in res["miou_points"].items())
  if jax.process_index() == 0:
    print(f"{ckpt} on {res['num_masks']} masks of {src.description}: 1-point mIoU "
          f"{res['miou_1point_default']:.3f} (oracle {res['miou_1point_oracle']:.3f}), box mIoU "
          f"{res['miou_box']:.3f}, after k points {points}", flush=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(dict(checkpoint=ckpt, **res), f, indent=2)
  return res
