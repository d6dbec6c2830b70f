"""Fields that every training config sets alike (not a config: no get_config)."""


def paper_prompts_and_loss(c, box_noise_max_px: float = 20.0) -> None:
  """The SAM paper's prompt simulation and loss (appendix A) as `c.prompts`, `c.loss`.

  11 rounds: the first prompt (a point or a box, equal odds; box corners jittered
  by 10% of the side, at most `box_noise_max_px`), 8 clicks and 2 rounds without
  one; focal and dice 20:1 plus the IoU head's MSE.

  `c.loss` weights the terms of `sam_jax.train.losses` by name (weight 0: logged,
  not trained on); `c.loss_params` holds a term's keyword arguments.
  """
  c.prompts = dict(num_rounds=11, num_no_point_rounds=2, box_prob=0.5,
                   box_noise_frac=0.1, box_noise_max_px=box_noise_max_px)
  c.loss = dict(focal=20.0, dice=1.0, iou_mse=1.0)
  c.loss_params = dict(focal=dict(alpha=0.25, gamma=2.0))
  # Masks are scored on the decoder's low-res grid times this (4: the input resolution).
  c.loss_upsample = 1


def outputs_off(c) -> None:
  """The optional outputs and the embedding cache, off; enable per run with --config.*."""
  c.tensorboard = False  # also write the metrics as TensorBoard events (WORKDIR/tensorboard)
  c.peak_flops = 0.0  # one device's peak FLOP/s for the MFU; 0: flops.PEAK_FLOPS's entry
  # Frozen encoder only: compute the image embeddings once, under embedding_cache_dir
  # (default WORKDIR/embeddings), and train the prompt encoder + decoder on them.
  c.cache_embeddings = False
  c.embedding_cache_dir = ""
