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
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sam_jax.build import build_sam, image_size_hw
from sam_jax.checkpoint import abstract_params, init_params, load_config, load_sam, save_sam
from sam_jax.train import data as data_lib
from sam_jax.train import demo_data, embedding_cache, flops, optim, recipe
from sam_jax.train import sharding as shard_lib

State = Dict[str, Any]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops, keeping the last good checkpoint."""


def model_config(config) -> ml_collections.ConfigDict:
  """The model's config: `config.model`, or a checkpoint's with `config.model` overrides."""
  if config.get("model_init"):
    mcfg = load_config(config.model_init)
    overrides = config.get("model_overrides", ml_collections.ConfigDict())
    mcfg.update(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
    return mcfg
  return config.model


def initial_params(config, model) -> Any:
  if config.get("model_init"):
    _, params = load_sam(config.model_init, image_size=model_config(config).image_size)
    return params
  return init_params(model, jax.random.key(config.seed))


class Trainer:
  """Holds the model, optimizer, mesh, shardings and the jitted step."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mcfg = model_config(config)
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
    self._step_fn = None

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
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), lr=self.schedule(state["step"]))
    new = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
    return new, metrics

  def _jitted_step(self, batch):
    if self._step_fn is None:
      batch_sh = {k: shard_lib.batch_sharding(self.mesh, len(v.shape)) for k, v in batch.items()}
      replicated = shard_lib.NamedSharding(self.mesh, shard_lib.P())
      self._step_fn = jax.jit(self._train_step,
                              in_shardings=(self.state_shardings, batch_sh),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=(0,))
    return self._step_fn

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


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  pp = ocp.checkpoint_managers.preservation_policy
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every,
      preservation_policy=pp.LatestN(config.keep_checkpoints),
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save_checkpoint(mgr, step: int, state: State, meta: dict) -> None:
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         meta=ocp.args.JsonSave(meta)), force=True)


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
      demo_data.write_dataset(train_dir, g.num_train, g.size, g.max_shapes, seed=g.seed)
      demo_data.write_dataset(eval_dir, g.num_eval, g.size, g.max_shapes, seed=g.seed + 1,
                              prefix="sa_eval_")
    shard_lib.sync_processes("sam_jax demo data written")
  return train_dir, eval_dir


def run_eval(trainer: Trainer, params, examples, num_clicks: int):
  from sam_jax.train import evaluate  # scipy only when evaluating
  return evaluate.evaluate(trainer.model, params, examples, num_clicks)


def train_and_evaluate(config, workdir: str, stop_at: Optional[int] = None) -> Dict[str, Any]:
  """Trains per `config`, evaluates, exports; returns a summary dict.

  `stop_at` ends the run early at that step (after checkpointing it), as a
  preemption would; calling again resumes from the workdir.
  """
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config)
  if config.get("cache_embeddings"):
    embedding_cache.check_config(config, trainer.mcfg)  # before any work: refuses freeze='full'
  train_src, eval_examples = open_data(config, workdir, trainer)
  mgr = checkpoint_manager(workdir, config)
  summary = _read_summary(workdir)
  state, start, data_step, resumed = restore_or_init_state(config, trainer, mgr)
  if not resumed and eval_examples is not None and config.eval.get("before_training", True):
    summary["untrained"] = evaluate_before_training(trainer, state, eval_examples, config, workdir)
  if config.get("cache_embeddings"):
    train_src = with_embedding_cache(config, trainer, state, train_src, workdir)
  total = stop_at if stop_at is not None else config.total_steps
  state, step, losses = train_loop(config, trainer, state, train_src, mgr, workdir, start,
                                   data_step, total)
  summary["losses"] = {**summary.get("losses", {}), **{str(k): v for k, v in losses.items()}}
  if step >= config.total_steps:
    summary.update(evaluate_and_export(config, trainer, state, eval_examples, workdir,
                                       summary.get("untrained", {})))
  _write_summary(workdir, summary)
  summary["state"] = state
  return summary


def open_data(config, workdir: str, trainer: Trainer):
  """The training examples, and the held-out examples to evaluate on (None without)."""
  mcfg = trainer.mcfg
  image_hw = image_size_hw(mcfg)
  low_res = recipe.low_res_size(trainer.model)
  train_dir, eval_dir = _prepare_data(config, workdir)
  train_src = data_lib.open_examples(config.data, "train", train_dir, workdir, image_hw, low_res,
                                     config.data.max_masks, mcfg.pixel_mean)
  if not config.eval.num_images:
    return train_src, None
  eval_src = data_lib.open_examples(config.data, "eval", eval_dir, workdir, image_hw, image_hw,
                                    config.eval.max_masks, mcfg.pixel_mean)
  if eval_src is None:
    return train_src, None
  ex = data_lib.eval_examples(eval_src, config.eval.num_images)
  return train_src, dict(images=ex["image"], masks=ex["masks"], valid=ex["valid"])


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


def restore_or_init_state(config, trainer: Trainer, mgr):
  """(state, step, data position, resumed): the workdir's latest checkpoint, else step 0."""
  start = mgr.latest_step()
  if start is not None:
    state, meta = restore_checkpoint(mgr, trainer, start)
    logging.info("Resumed from step %d (data position %d)", start, meta["data_step"])
    print(f"Resuming from the checkpoint of step {start}.", flush=True)
    return state, start, meta["data_step"], True
  return trainer.init_state(initial_params(config, trainer.model)), 0, 0, False


def evaluate_before_training(trainer: Trainer, state: State, eval_examples, config,
                             workdir: str) -> Dict[str, Any]:
  """The untrained model's prompt mIoUs (its 1-point masks kept for the final picture)."""
  # The state's parameters, placed as after training: the evaluation compiles once.
  res = run_eval(trainer, _gathered(state["params"]), eval_examples, config.eval.num_clicks)
  if jax.process_index() == 0:
    np.save(os.path.join(workdir, "untrained_masks_1point.npy"), res["masks_1point"])
  print(f"Before training: 1-point mIoU {res['miou_1point']:.3f}, "
        f"box mIoU {res['miou_box']:.3f}", flush=True)
  return {k: v for k, v in res.items() if k != "masks_1point"}


def with_embedding_cache(config, trainer: Trainer, state: State, train_src, workdir: str):
  """The training examples with their image embeddings (cached, built on first use)."""
  cache = embedding_cache.open_or_build(
      config.get("embedding_cache_dir") or os.path.join(workdir, "embeddings"), train_src,
      trainer.model, state["params"], trainer.mcfg, trainer.mesh, config.batch_size, config.seed)
  return embedding_cache.CachedSource(train_src, cache)  # batches carry `embeddings`


def train_loop(config, trainer: Trainer, state: State, train_src, mgr, workdir: str,
               start: int, data_step: int, total: int):
  """Steps `start + 1 .. total`, logging and checkpointing on the way.

  Returns the last state, the last step and the host losses by step.
  """
  batches = data_lib.train_batches(train_src, config.batch_size, config.seed, data_step,
                                   jax.process_index(), jax.process_count())
  log = MetricsLog(workdir, config)
  pending, t0, images_seen = [], time.time(), 0
  losses = {}
  step = start
  peak = flops.peak_flops(jax.devices()[0].device_kind, trainer.mcfg.dtype,
                          config.get("peak_flops"))
  step_flops = None
  try:
    for step in range(start + 1, total + 1):
      inputs = _step_inputs(next(batches))
      if step_flops is None:
        step_flops = _count_step_flops(trainer, inputs, peak)
      state, metrics = trainer.train_step(state, inputs)
      pending.append((step, metrics))
      images_seen += config.batch_size
      should_save = step % config.checkpoint_every == 0 or step == total
      if step % config.log_every == 0 or should_save:
        host = _check_finite(pending, mgr)
        pending = []
        for s, m in host:
          losses[s] = m["loss"]
        dt = time.time() - t0
        log.write(dict(step=step, **host[-1][1], images_per_s=images_seen / max(dt, 1e-9),
                       skipped_examples=train_src.num_skipped,
                       **flops.utilization(step_flops * images_seen / config.batch_size, dt,
                                           peak, jax.device_count())))
        t0, images_seen = time.time(), 0
      if should_save:
        save_checkpoint(mgr, step, state, dict(step=step, data_step=step))
  finally:
    batches.close()  # stops the prefetching thread
    mgr.wait_until_finished()
    log.close()
  return state, step, losses


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
    if config.get("tensorboard") and jax.process_index() == 0:
      from sam_jax.train import tensorboard  # noqa: PLC0415 - tensorboardX only when asked
      self.writer = tensorboard.Writer(os.path.join(workdir, "tensorboard"))

  def write(self, record: Dict[str, Any]) -> None:
    if jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if self.writer is not None:
      self.writer.write(record["step"], record)
    print(f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
          f"iou(first/last round) {record['iou_per_round'][0]:.3f}/"
          f"{record['iou_per_round'][-1]:.3f} lr {record['lr']:.2e} "
          f"{record['images_per_s']:.1f} img/s", flush=True)

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
    res = run_eval(trainer, params, eval_examples, config.eval.num_clicks)
    out["trained"] = {k: v for k, v in res.items() if k != "masks_1point"}
    if jax.process_index() == 0:
      _write_picture(workdir, eval_examples, res["masks_1point"])
    u = untrained
    print(f"1-point mIoU: untrained {u.get('miou_1point', float('nan')):.3f} -> trained "
          f"{res['miou_1point']:.3f}; box: {u.get('miou_box', float('nan')):.3f} -> "
          f"{res['miou_box']:.3f}; after {config.eval.num_clicks} clicks: "
          f"{res['miou_clicks'][-1]:.3f} ({res['num_masks']} held-out masks)", flush=True)
  if config.get("export") and jax.process_index() == 0:
    export_dir = os.path.join(workdir, "export")
    save_sam(export_dir, trainer.mcfg, jax.device_get(params), overwrite=True)
    out["export"] = export_dir
    print(f"Exported the trained parameters to {export_dir} (load with sam_jax.checkpoint.load_sam).")
  return out


def _count_step_flops(trainer: Trainer, inputs, peak) -> float:
  """Model FLOPs of one step on the global batch (see `flops`); 0 if they cannot be counted."""
  n = jax.process_count()
  global_batch = {k: jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), v.dtype)
                  for k, v in inputs.items()}
  try:
    count = flops.train_step_flops(trainer.mcfg, trainer.config, trainer.abstract_params,
                                   global_batch)
  except Exception as e:  # noqa: BLE001 - a metric must never stop the run
    logging.warning("Could not count the model FLOPs of a step (no MFU): %s", e)
    return 0.0
  kind = jax.devices()[0].device_kind
  print(f"Model FLOPs per step: {count / 1e12:.4g} TFLOP; " + (
      f"peak {peak / 1e12:g} TFLOP/s per device ({kind}, {trainer.mcfg.dtype})" if peak else
      f"no peak FLOP/s known for {kind!r} in {trainer.mcfg.dtype}, so no MFU "
      "(set config.peak_flops)"), flush=True)
  return count


def _check_finite(pending, mgr):
  """Host copies of pending metrics; stops the run at the first non-finite loss."""
  host = [(s, _to_host(m)) for s, m in pending]
  for s, m in host:
    # A finite loss with non-finite new parameters would poison the next save too.
    bad = [k for k in ("loss", "param_norm") if not np.isfinite(m[k])]
    if bad:
      mgr.wait_until_finished()
      last = mgr.latest_step()
      raise NonFiniteLossError(
          f"The {' and '.join(bad)} became {m[bad[0]]} at step {s}; stopping, nothing saved "
          f"from this step on. The last good checkpoint is "
          f"step {last}" + (" (none was saved)." if last is None else
                            ". Lower the learning rate or inspect the data, then rerun to resume."))
  return host


def _write_picture(workdir, examples, masks):
  from sam_jax.train import evaluate
  points = np.zeros(examples["valid"].shape + (2,), np.float32)
  for i, j in zip(*np.nonzero(examples["valid"])):
    points[i, j] = evaluate.interior_point(examples["masks"][i, j].astype(bool))
  cols, titles = [examples["masks"].astype(bool)], ["ground truth"]
  untrained = os.path.join(workdir, "untrained_masks_1point.npy")
  if os.path.exists(untrained):
    cols.append(np.load(untrained))
    titles.append("untrained, 1 point")
  cols.append(masks)
  titles.append("trained, 1 point")
  path = os.path.join(workdir, "predictions.png")
  evaluate.render(path, examples["images"], cols, titles, points, examples["valid"])
  print(f"Wrote {path}", flush=True)


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
  size = image_size_hw(load_config(ckpt))
  src = data_lib.open_examples(config.data, "eval", eval_dir, workdir, size, size,
                               config.eval.max_masks, load_config(ckpt).pixel_mean)
  if src is None:
    raise ValueError("Set config.data.eval_dir (a folder in SA-1B's layout), or tfds_name and "
                     "eval_split, to evaluate on.")
  ex = data_lib.eval_examples(src, config.eval.num_images or len(src))
  from sam_jax.train import evaluate
  res = evaluate.evaluate(model, params, dict(images=ex["image"], masks=ex["masks"],
                                              valid=ex["valid"]), config.eval.num_clicks)
  res = {k: v for k, v in res.items() if k != "masks_1point"}
  clicks = ", ".join(f"{k + 1}: {v:.3f}" for k, v in enumerate(res["miou_clicks"]))
  print(f"{ckpt} on {res['num_masks']} masks of {src.description}: 1-point mIoU "
        f"{res['miou_1point']:.3f}, box mIoU {res['miou_box']:.3f}, after k clicks {clicks}",
        flush=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(dict(checkpoint=ckpt, **res), f, indent=2)
  return res
