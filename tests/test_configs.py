"""Configs build models whose parameters are exactly the reference's tensors."""

import subprocess
import sys

import jax
import pytest
import torch
from segment_anything import sam_model_registry

from configs import sam as sam_config
from sam_jax import build_sam, load_sam
from sam_jax.checkpoint import abstract_params
from sam_jax.convert import torch_key

TORCH_LAYOUT = {2: (1, 0), 4: (3, 2, 0, 1)}


def _state_dict_shapes(params):
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    shape = tuple(leaf.shape)
    if names[-1] == "kernel":
      shape = tuple(shape[i] for i in TORCH_LAYOUT[len(shape)])
    shapes[torch_key(names)] = shape
  return shapes


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_variant_matches_reference_state_dict(variant):
  with torch.device("meta"):
    ref = sam_model_registry[variant]()
  expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  got = _state_dict_shapes(abstract_params(build_sam(sam_config.get_config(variant))))
  assert got == expected


def test_overrides_change_the_architecture():
  config = sam_config.get_config("vit_b")
  config.image_size = (512, 768)
  config.image_encoder.depth = 3
  config.image_encoder.global_attn_indexes = (2,)
  config.mask_decoder.transformer_depth = 1
  params = abstract_params(build_sam(config))
  enc = params["image_encoder"]
  assert enc["pos_embed"].shape == (1, 32, 48, 768)
  assert sorted(k for k in enc if k.startswith("blocks_")) == ["blocks_0", "blocks_1", "blocks_2"]
  assert enc["blocks_2"]["attn"]["rel_pos_h"].shape == (63, 64)
  assert enc["blocks_2"]["attn"]["rel_pos_w"].shape == (95, 64)
  assert enc["blocks_0"]["attn"]["rel_pos_h"].shape == (27, 64)
  assert "layers_1" not in params["mask_decoder"]["transformer"]


def test_bad_configs_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown SAM variant 'vit_x'"):
    sam_config.get_config("vit_x")
  config = sam_config.get_config("vit_b")
  config.image_size = 1000
  with pytest.raises(ValueError, match="multiple of patch_size 16"):
    build_sam(config)
  from configs import demo
  with pytest.raises(ValueError, match="'quick', 'long' or nothing, not 'lng'"):
    demo.get_config("lng")
  long, short = demo.get_config("long"), demo.get_config()
  assert long.total_steps == 2 * short.total_steps
  assert long.data.generate.num_train == short.data.generate.num_train > 400
  assert demo.get_config("quick").data.generate.num_train == 400
  assert long.optim.decay_steps[0] / long.total_steps == short.optim.decay_steps[0] / short.total_steps


@pytest.mark.slow
def test_new_checkpoint_cli(tmp_path):
  out = tmp_path / "random"
  subprocess.run(
      [sys.executable, "-m", "sam_jax.new_checkpoint", "--config", "configs/sam.py:vit_b",
       "--config.image_size=128", "--config.image_encoder.depth=2",
       "--config.image_encoder.global_attn_indexes=(1,)", "--output", str(out)],
      check=True, capture_output=True)
  model, params = load_sam(str(out))
  assert model.image_size == (128, 128) and model.image_encoder.depth == 2


@pytest.mark.parametrize("name,arg", [("demo", None), ("demo", "quick"), ("demo", "long"),
                                      ("finetune", "/ckpt"),
                                      ("pretrain", "vit_b")])
def test_training_configs_name_valid_parameter_groups_and_loss_terms(name, arg):
  """Their freeze patterns, lr/wd multipliers and loss terms resolve on the model's
  parameters (the finetune config's model comes from its checkpoint: ViT-B here)."""
  import importlib
  from sam_jax.train import losses, optim
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  losses.check_config(config.loss, config.loss_params)
  mcfg = config.model if "image_encoder" in config.model else sam_config.get_config("vit_b")
  params = abstract_params(build_sam(mcfg))
  optim.make_optimizer(config.optim, params, mcfg.image_encoder.depth, config.freeze)
