"""The frozen-encoder embedding cache, TensorBoard events and MFU fields, on one tiny run."""

import json
import os

import jax
import numpy as np
import pytest

from sam_jax.train import demo_data, embedding_cache, tensorboard, trainer
from tests.conftest import tiny_train_config


pytestmark = pytest.mark.usefixtures("fast_compiles")


def small_config(tmp_path):
  """Frozen encoder, one decoder layer, two prompt rounds, 8 shared examples: two compiles."""
  c = tiny_train_config()
  c.freeze = "frozen_image_encoder"
  c.model.mask_decoder.transformer_depth = 1
  c.prompts.num_rounds, c.prompts.num_no_point_rounds = 2, 1
  c.total_steps, c.log_every, c.checkpoint_every = 3, 1, 2
  data = str(tmp_path / "data")
  if not os.path.isdir(data):
    demo_data.write_dataset(data, 8, 64, 3, seed=0)
  c.data.generate = None
  c.data.train_dir = data
  c.data.tfds_data_dir = str(tmp_path / "tfds")  # prepared once for every run
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cached_embeddings_reproduce_the_frozen_encoder_run(tmp_path, capsys):
  config = small_config(tmp_path)
  config.tensorboard = True
  plain = trainer.train_and_evaluate(config, str(tmp_path / "plain"))

  config.tensorboard = False
  config.cache_embeddings = True
  cut = str(tmp_path / "cached")
  trainer.train_and_evaluate(config, cut, stop_at=2)
  assert "Computing the image embeddings of 8 examples" in capsys.readouterr().out
  resumed = trainer.train_and_evaluate(config, cut)  # resumes, and reuses the cache
  assert "Using the cached image embeddings" in capsys.readouterr().out
  assert sorted(resumed["losses"]) == sorted(plain["losses"]) == ["1", "2", "3"]
  # Bit-identical on this CPU with XLA's optimisations on or off; a fused encoder may
  # round differently elsewhere.
  for step, loss in plain["losses"].items():
    np.testing.assert_allclose(resumed["losses"][step], loss, rtol=1e-6, err_msg=step)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(plain["state"]["params"]),
               jax.device_get(resumed["state"]["params"]))

  # MFU fields: FLOPs counted; no peak is known for a CPU, so no MFU (null, not a guess).
  rows = _rows(tmp_path / "plain")
  assert all(r["mfu"] is None and r["model_tflops_per_s"] > 0 for r in rows)
  # TensorBoard: every scalar of metrics.jsonl, read back from the event file.
  events = tensorboard.read_scalars(str(tmp_path / "plain" / "tensorboard"))
  for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("focal", "train/focal"),
                   ("grad_norm", "train/grad_norm"), ("images_per_s", "train/images_per_s"),
                   ("model_tflops_per_s", "train/model_tflops_per_s")):
    assert [s for s, _ in events[tag]] == [1, 2, 3], tag
    np.testing.assert_allclose([v for _, v in events[tag]], [r[key] for r in rows], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in events["train/iou_round_1"]],
                             [r["iou_per_round"][1] for r in rows], rtol=1e-6)
  assert "train/mfu" not in events

  # Another encoder (a changed parameter) makes the cache stale: recomputed, not used.
  cache_dir = os.path.join(cut, "embeddings")
  old = embedding_cache.EmbeddingCache(cache_dir, json.load(open(f"{cache_dir}/meta.json")))[5]
  t = trainer.Trainer(config)
  params = jax.device_get(resumed["state"]["params"])
  params["image_encoder"]["neck_3"]["bias"] = params["image_encoder"]["neck_3"]["bias"] + 1.0
  src = trainer.data_lib.open_examples(config.data, "train", config.data.train_dir, cut,
                                       64, 16, 2, t.mcfg.pixel_mean)
  cache = embedding_cache.open_or_build(cache_dir, src, t.model, params, t.mcfg, t.mesh, 4)
  assert "stale" in capsys.readouterr().out
  np.testing.assert_allclose(cache[5], old + 1.0, rtol=1e-5, atol=1e-5)


def test_rows_of_every_process_part_and_bfloat16(tmp_path):
  """Index i of a cache written by 2 processes in global batches of 4, stored as bits."""
  meta = dict(num_examples=10, global_batch=4, process_count=2, shape=[1], dtype="bfloat16")
  for p in range(2):  # part p: rows 2p, 2p + 1 of each batch of examples 0-3, 4-7, 8-11
    rows = np.array([4 * k + 2 * p + r for k in range(3) for r in range(2)], jax.numpy.bfloat16)
    np.save(tmp_path / f"part-{p:05d}-of-00002.npy", rows[:, None].view(np.uint16))
  cache = embedding_cache.EmbeddingCache(str(tmp_path), meta)
  assert [float(cache[i][0]) for i in range(10)] == list(range(10))
  assert cache[3].dtype == jax.numpy.bfloat16
  with pytest.raises(IndexError):
    cache[10]  # noqa: B018


def test_the_cache_refuses_a_training_encoder(tmp_path):
  config = small_config(tmp_path)
  config.freeze, config.cache_embeddings = "full", True
  with pytest.raises(ValueError, match="needs a frozen image encoder"):
    trainer.train_and_evaluate(config, str(tmp_path / "full"))
  assert not os.path.exists(tmp_path / "full" / "embeddings")


def test_what_is_frozen_decides_whether_embeddings_can_be_cached():
  config = tiny_train_config()
  config.cache_embeddings = True
  for freeze in ("frozen_image_encoder", "decoder_only", "image_encoder/.*"):
    config.freeze = freeze
    embedding_cache.check_config(config, config.model)  # the whole encoder is frozen
  for freeze in ("full", "image_encoder/blocks_0/.*", "prompt_encoder/.*"):
    config.freeze = freeze
    with pytest.raises(ValueError, match="needs a frozen image encoder"):
      embedding_cache.check_config(config, config.model)
