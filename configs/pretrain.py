"""SAM pretraining on SA-1B with the paper's hyperparameters (appendix A).

  python train.py --config configs/pretrain.py:vit_h --workdir gs://.../sam_vit_h \\
      --config.data.tfds_data_dir=gs://.../tensorflow_datasets

SA-1B is read through TFDS's `segment_anything` builder, prepared once in the
array_record format (see docs/training.md). To read a folder in SA-1B's layout
instead (e.g. a few extracted SA-1B tars; one process copies it into TFDS
first, which suits fine-tuning sizes rather than all 11M images), pass
`--config.data.tfds_name=` and `--config.data.train_dir=/data/sa1b`. `arg`
picks the encoder: vit_b, vit_l or vit_h (default).

From Kirillov et al., "Segment Anything" (arXiv:2304.02643), appendix A,
"Training algorithm": "AdamW (beta1 = 0.9, beta2 = 0.999) and a linear
learning rate warmup for 250 iterations and a step-wise learning rate decay
schedule. The initial learning rate (lr), after warmup, is 8e-4. We train for
90k iterations (~2 SA-1B epochs) and decrease the lr by a factor of 10 at 60k
iterations and again at 86666 iterations. The batch size is 256 images. [...]
weight decay (wd) 0.1 [...] drop path (dp) with a rate of 0.4. [...] layer-wise
learning rate decay (ld) of 0.8. No data augmentation [...] up to 64 randomly
sampled masks per GPU [...] discard any that cover more than 90% of the
image"; "To train ViT-B and ViT-L, we use 180k iterations with batch size 128
distributed across 128 GPUs. We set lr = 8e-4/4e-4, ld = 0.6/0.8, wd = 0.1,
and dp = 0.6/0.4 for ViT-B/L". Both recipes put one image on each GPU, so
64 masks per GPU is 64 per image here. The prompts: 11 iterations, "one
sampled initial input prompt, 8 iteratively sampled points, and two
iterations where no new external information is supplied"; box noise of
std 10% of the side, at most 20 pixels; focal:dice 20:1, IoU MSE x 1.0.

Our choices where the paper is silent: the ViT-B/L decay steps. We put them
at the same fractions of training as ViT-H's (60k/90k = 2/3 and
86,666/90k = 26/27), i.e. 120k and 173,333 of 180k. Also Adam's eps (1e-8,
PyTorch's default), no gradient clipping, and the focal loss's alpha 0.25,
gamma 2. The paper starts the encoder from an MAE-pretrained ViT: point
`model_init` at such a checkpoint directory to do the same.
"""

import ml_collections

from configs import common
from sam_jax.build import model_config
from sam_jax.train import optim

# variant: (lr, batch, total steps, decay steps, drop path, layer decay)
RECIPES = {
    "vit_b": (8e-4, 128, 180_000, (120_000, 173_333), 0.6, 0.6),  # decay steps: ours
    "vit_l": (4e-4, 128, 180_000, (120_000, 173_333), 0.4, 0.8),
    "vit_h": (8e-4, 256, 90_000, (60_000, 86_666), 0.4, 0.8),
}


def get_config(arg=None):
  variant = arg or "vit_h"
  lr, batch, steps, decays, drop_path, layer_decay = RECIPES[variant]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config(variant)
  c.model.dtype = "bfloat16"  # compute; parameters and optimizer state stay float32
  # The decoder's 64 masks x 11 rounds per image are most of a step's memory traffic.
  c.model.mask_decoder.dtype = "bfloat16"
  c.model.image_encoder.drop_path_rate = drop_path
  c.model.image_encoder.remat = True  # recompute each encoder block in the backward pass
  c.model_init = None
  c.freeze = "full"
  c.data = dict(tfds_name="segment_anything", tfds_data_dir="", train_split="train",
                eval_split="", train_dir="", eval_dir="", generate=None,
                max_masks=64, max_mask_fraction=0.9)
  # Corrupt data stops the run (docs/reliability.md): steps without any valid mask,
  # and the share of corrupt examples among those seen.
  c.data.max_empty_batches = 10
  c.data.max_skipped_fraction = 0.1
  c.diverge_factor = 100.0  # a parameter norm or loss this many times its usual stops the run
  c.batch_size = batch
  c.total_steps = steps
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.export = True
  c.mesh_shape = (-1, 1, 1)  # e.g. (-1, 8, 1) for FSDP over 8 chips per replica
  common.paper_prompts_and_loss(c)
  c.optim = dict(lr=lr, warmup_steps=250, decay_steps=decays, decay_factor=0.1,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, layer_decay=layer_decay,
                 grad_clip=0.0, lr_mults=(), wd_mults=optim.DEFAULT_WD_MULTS, muon_lr=0.0,
                 muon_params=optim.DEFAULT_MUON_PARAMS, muon_convs=False)
  c.remat_rounds = True  # 11 decoder rounds x 64 masks: keep only each round's inputs
  c.unroll_rounds = False
  c.eval = dict(num_images=0, max_masks=64, num_clicks=5, before_training=False)
  common.outputs_off(c)
  return c
