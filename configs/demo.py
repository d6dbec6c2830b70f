"""The demo: a tiny SAM learns to segment generated shapes on CPU in minutes.

  python train.py --config configs/demo.py --workdir /tmp/sam_demo

It writes a generated dataset in SA-1B's layout under WORKDIR/data, prints the
held-out 1-point mIoU of the untrained model, trains, prints the trained mIoU
beside it and writes WORKDIR/predictions.png. `--config configs/demo.py:quick`
is the shortened run that the test uses; `configs/demo.py:long` the long one, twice
the steps (docs/demo.md has what each prints).
"""

import ml_collections

from configs import common
from sam_jax.build import model_config
from sam_jax.train import optim


def tiny_model(image_size: int = 128) -> ml_collections.ConfigDict:
  """A SAM a few hundred times smaller than ViT-B: 2 blocks of width 64, an 8x8 token grid.

  The decoder's cost grows with the token grid (its masks are 4x the grid), so
  the demo keeps 16-pixel patches, as the real model, on 128-pixel images.
  """
  m = model_config("vit_b")
  m.variant = "demo"
  m.image_size = image_size
  m.prompt_embed_dim = 64
  m.image_encoder.update(dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, window_size=4,
                              global_attn_indexes=(1,), drop_path_rate=0.0))
  m.mask_decoder.update(dict(iou_head_hidden_dim=64, transformer_mlp_dim=256,
                             transformer_num_heads=4))
  return m


def get_config(arg=None):
  """`arg` 'quick': the test's shortened run (400 steps, 3 prompt rounds in place of 11,
  400 generated images in place of 3600, no export). 'long': twice the steps (1800).

  A step's time grows with its rounds; the test (tests/test_train_demo.py) asks
  only that the model learns, which 3 rounds show. The 3600 images: on 400, seen
  18 times each in 900 steps, the held-out mIoUs grow less (docs/demo.md).
  """
  if arg not in (None, "", "quick", "long"):
    raise ValueError(f"configs/demo.py takes 'quick', 'long' or nothing, not {arg!r}.")
  quick, long = arg == "quick", arg == "long"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = tiny_model(128)
  # The encoder runs once per image, the decoder once per round and mask (11 x 32 per
  # step, most of a step's cost): 4 blocks of width 128 are cheap beside it (docs/demo.md).
  c.model.image_encoder.update(dict(embed_dim=128, depth=4, num_heads=4,
                                    global_attn_indexes=(1, 3)))
  # One two-way block (SAM's has two): a third less work per decode, so more steps
  # in the same minutes, which buys more than the second block (docs/demo.md).
  c.model.mask_decoder.transformer_depth = 1
  c.model_init = None  # a sam_jax checkpoint directory to fine-tune from
  # What does not train: a preset (full, frozen_image_encoder, decoder_only), or
  # regexes over parameter paths such as 'prompt_encoder/.*' (train/param_groups.py).
  c.freeze = "full"
  # From scratch only: (regex over parameter paths, factor) scaling the fresh init.
  # The prompt encoder's random Fourier frequencies at half SAM's scale: on the 8x8
  # grid SAM's leave a cell's encoding unlike its neighbours' (docs/demo.md).
  c.init_scale = (("prompt_encoder/pe_layer/positional_encoding_gaussian_matrix", 0.5),)

  c.data = dict(
      train_dir="", eval_dir="",
      generate=dict(num_train=400 if quick else 3600, num_eval=24, size=128, max_shapes=5,
                    seed=0),
      max_masks=4, max_mask_fraction=0.9)
  # Corrupt data stops the run (docs/reliability.md): steps without any valid mask,
  # and the share of corrupt examples among those seen.
  c.data.max_empty_batches = 10
  c.data.max_skipped_fraction = 0.1
  c.diverge_factor = 100.0  # a parameter norm or loss this many times its usual stops the run
  c.batch_size = 8
  c.total_steps = 400 if quick else 900
  c.log_every = 50
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  c.export = not quick
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices

  common.paper_prompts_and_loss(c, box_noise_max_px=20.0 * 128 / 1024)  # scaled to 128 px
  if quick:
    c.prompts.update(dict(num_rounds=3, num_no_point_rounds=1))
  # b2 0.95: Adam's second moment forgets the first steps' large gradients sooner.
  # Muon for the dense and convolution kernels learns more per step than AdamW (docs/demo.md).
  c.optim = dict(lr=2e-3, warmup_steps=20, schedule="step", decay_steps=(750,),
                 decay_factor=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                 layer_decay=1.0, grad_clip=1.0, lr_mults=(), wd_mults=optim.DEFAULT_WD_MULTS,
                 muon_lr=0.01, muon_params=optim.DEFAULT_MUON_PARAMS, muon_convs=True)
  if long:  # the same schedule stretched twice
    c.update(dict(total_steps=1800, log_every=100, checkpoint_every=600))
    c.optim.decay_steps = (1500,)
  c.remat_rounds = False
  c.eval = dict(num_images=24, max_masks=8, num_clicks=5, before_training=True)
  common.outputs_off(c)
  return c
