"""SAM pretraining on SA-1B with the paper's hyperparameters (appendix A).

  python train.py --config configs/pretrain.py:vit_h --workdir gs://.../sam_vit_h \\
      --config.data.train_dir=/data/sa1b   # extracted SA-1B tars: sa_*.jpg + sa_*.json

`arg` picks the encoder: vit_b, vit_l or vit_h (default). Values as reported
in the SAM paper, appendix A ("Training algorithm"): AdamW (0.9, 0.999), wd
0.1, linear warmup of 250 iterations then step decay by 10x; ViT-H: lr 8e-4,
batch 256, 90k iterations with decays at 60k and 86,666, drop path 0.4,
layer decay 0.8; ViT-B/L: lr 8e-4/4e-4, batch 128, 180k iterations with
decays at 120k and 160k, drop path 0.6/0.4, layer decay 0.6/0.8. Up to 64
masks per image, 11 prompt rounds (1 initial, 8 clicks, 2 without a click).
The paper starts the encoder from an MAE-pretrained ViT: point
`model_init` at such a checkpoint directory to do the same.
"""

import ml_collections

from sam_jax.build import model_config

# variant: (lr, batch, total steps, decay steps, drop path, layer decay)
RECIPES = {
    "vit_b": (8e-4, 128, 180_000, (120_000, 160_000), 0.6, 0.6),
    "vit_l": (4e-4, 128, 180_000, (120_000, 160_000), 0.4, 0.8),
    "vit_h": (8e-4, 256, 90_000, (60_000, 86_666), 0.4, 0.8),
}


def get_config(arg=None):
  variant = arg or "vit_h"
  lr, batch, steps, decays, drop_path, layer_decay = RECIPES[variant]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config(variant)
  c.model.dtype = "bfloat16"  # compute; parameters and optimizer state stay float32
  c.model.image_encoder.drop_path_rate = drop_path
  c.model.image_encoder.remat = True  # recompute each encoder block in the backward pass
  c.model_init = None
  c.freeze = "full"
  c.data = dict(train_dir="", eval_dir="", generate=None, max_masks=64, max_mask_fraction=0.9)
  c.batch_size = batch
  c.total_steps = steps
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.export = True
  c.mesh_shape = (-1, 1, 1)  # e.g. (-1, 8, 1) for FSDP over 8 chips per replica
  c.prompts = dict(num_rounds=11, num_no_point_rounds=2, box_prob=0.5,
                   box_noise_frac=0.1, box_noise_max_px=20.0)
  c.loss = dict(focal_weight=20.0, dice_weight=1.0, iou_weight=1.0,
                focal_alpha=0.25, focal_gamma=2.0)
  c.optim = dict(lr=lr, warmup_steps=250, decay_steps=decays, decay_factor=0.1,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, layer_decay=layer_decay,
                 grad_clip=0.0)
  c.remat_rounds = True  # 11 decoder rounds x 64 masks: keep only each round's inputs
  c.unroll_rounds = False
  c.eval = dict(num_images=0, max_masks=64, num_clicks=5, before_training=False)
  return c
