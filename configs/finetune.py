"""Fine-tuning a converted SAM checkpoint on a folder in SA-1B's layout.

  python convert_weights.py --checkpoint sam_vit_b_01ec64.pth --output /ckpt/sam_vit_b
  python train.py --config configs/finetune.py:/ckpt/sam_vit_b --workdir /tmp/ft \\
      --config.data.train_dir=/data/mine/train --config.data.eval_dir=/data/mine/val

`arg` is the sam_jax checkpoint directory. `--config.freeze` picks what does not
train: `frozen_image_encoder` (default, the common recipe: prompt encoder +
decoder), `decoder_only`, `full`, or a regex over parameter paths such as
'image_encoder/blocks_[0-9]/.*' (docs/ablations.md). Frozen parameters get no
backward pass; with the whole encoder frozen, `--config.cache_embeddings=True`
runs it only once per image, before training.
"""

import ml_collections

from configs import common
from sam_jax.train import optim


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict()  # unused: the model comes from the checkpoint
  c.model_init = arg
  # Fields replaced in the checkpoint's model config (not the parameters).
  c.model_overrides = dict(dtype="float32")
  c.freeze = "frozen_image_encoder"
  c.data = dict(train_dir="", eval_dir="", generate=None, max_masks=16, max_mask_fraction=0.9)
  # Corrupt data stops the run (docs/reliability.md): steps without any valid mask,
  # and the share of corrupt examples among those seen.
  c.data.max_empty_batches = 10
  c.data.max_skipped_fraction = 0.1
  c.diverge_factor = 100.0  # a parameter norm or loss this many times its usual stops the run
  c.batch_size = 4
  c.total_steps = 2000
  c.log_every = 20
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.export = True
  c.mesh_shape = (-1, 1, 1)
  common.paper_prompts_and_loss(c)
  c.optim = dict(lr=1e-5, warmup_steps=100, decay_steps=(1500,), decay_factor=0.1,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, layer_decay=0.8, grad_clip=0.0,
                 lr_mults=(), wd_mults=optim.DEFAULT_WD_MULTS, muon_lr=0.0,
                 muon_params=optim.DEFAULT_MUON_PARAMS, muon_convs=False)
  c.remat_rounds = False
  c.unroll_rounds = False
  c.eval = dict(num_images=50, max_masks=16, num_clicks=5, before_training=True)
  common.outputs_off(c)
  return c
