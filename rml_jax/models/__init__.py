"""Model registry: a config names a model, `build_model` returns the Flax module."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rml_jax.errors import UserError
from rml_jax.models.deeplabv2 import DeepLabV2
from rml_jax.models.dpt import DPTDinoV2
from rml_jax.models.resnet import ACTIVATIONS as ACTIVATIONS  # config.model.activation
from rml_jax.models.resnet import SURVIVAL_SCHEDULES as SURVIVAL_SCHEDULES
from rml_jax.models.setr import SETR

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype

# Each entry: architecture hyperparameters; config.model fields (noise, dtype, ...) are added.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv2_resnet101": functools.partial(DeepLabV2, stage_sizes=(3, 4, 23, 3)),
    "deeplabv2_resnet50": functools.partial(DeepLabV2, stage_sizes=(3, 4, 6, 3)),
    # CPU-sized DeepLabv2 shape for the embedded digits: one block per stage, width 8, output
    # stride 8 (layer4 dilated), ASPP rates scaled to an 8x8 feature map.
    "deeplabv2_tiny": functools.partial(
        DeepLabV2, stage_sizes=(1, 1, 1, 1), base_width=8, strides=(1, 2, 2, 1),
        dilations=(1, 1, 1, 2), stem_pool=False, aspp_rates=(1, 2, 3, 4)),
    # SETR (Table 5's transformer student): ViT-B/16 or ViT-L/16 encoder.
    "setr_naive_vit_b16": functools.partial(SETR, decoder="naive"),
    "setr_pup_vit_b16": functools.partial(SETR, decoder="pup"),
    "setr_naive_vit_l16": functools.partial(SETR, decoder="naive", hidden_size=1024, depth=24,
                                            num_heads=16),
    "setr_pup_vit_l16": functools.partial(SETR, decoder="pup", hidden_size=1024, depth=24,
                                          num_heads=16),
    # CPU-sized SETR for the embedded digits: patch 8, width 96, 4 blocks.
    "setr_naive_tiny": functools.partial(SETR, decoder="naive", patch_size=8, hidden_size=96,
                                         depth=4, num_heads=4, decoder_width=64),
}

# DINOv2 encoders with a DPT decoder: encoder sizes as published (ViT-S/B/L, patch 14, 37 x 37
# position grid), the blocks the decoder reads and its widths as UniMatch V2's model_configs;
# `_reg4`: the checkpoints with 4 register tokens (published with the output-size, antialiased
# position-embedding resampling).
DINOV2_SIZES = {
    "vits14": dict(hidden_size=384, depth=12, num_heads=6, out_blocks=(2, 5, 8, 11),
                   features=64, out_channels=(48, 96, 192, 384)),
    "vitb14": dict(hidden_size=768, depth=12, num_heads=12, out_blocks=(2, 5, 8, 11),
                   features=128, out_channels=(96, 192, 384, 768)),
    "vitl14": dict(hidden_size=1024, depth=24, num_heads=16, out_blocks=(4, 11, 17, 23),
                   features=256, out_channels=(256, 512, 1024, 1024)),
}
for _size, _arch in DINOV2_SIZES.items():
  MODELS[f"dpt_dinov2_{_size}"] = functools.partial(DPTDinoV2, **_arch)
  MODELS[f"dpt_dinov2_{_size}_reg4"] = functools.partial(
      DPTDinoV2, num_registers=4, interpolate_offset=0.0, interpolate_antialias=True, **_arch)
# CPU-sized DINOv2 + DPT for tests and the embedded demos: width 48, 4 blocks, 4 x 4 grid.
MODELS["dpt_dinov2_tiny"] = functools.partial(
    DPTDinoV2, hidden_size=48, depth=4, num_heads=3, out_blocks=(0, 1, 2, 3), pos_grid=4,
    features=16, out_channels=(8, 16, 32, 48))



def input_multiple(name: str) -> int:
  """What training crops and sliding windows of model `name` must be multiples of: the patch
  size for DINOv2 encoders (other inputs are zero-padded to it), 1 for the others."""
  factory = MODELS[name]
  if factory.func is DPTDinoV2:
    return factory.keywords.get("patch_size", DPTDinoV2.patch_size)
  return 1


_MODEL_FIELDS = ("dropout_rate", "survival_prob", "survival_schedule", "frozen_bn", "remat",
                 "activation")


def build_model(model_config: ml_collections.ConfigDict, num_classes: int,
                dtype: str = "float32", image_size: tuple[int, int] | None = None) -> nn.Module:
  """Builds the module that `model_config.name` names, with the config's noise settings.

  image_size: the training crop, for models whose parameters depend on it (ViT position
  embeddings, resampled at other input sizes).
  """
  if model_config.name not in MODELS:
    raise UserError(f"config.model.name: unknown model {model_config.name!r}; "
                    f"expected one of {sorted(MODELS)}")
  fields = MODELS[model_config.name].func.__dataclass_fields__
  # Each model takes the config fields it has (SETR has no frozen_bn: its decoder is new).
  kwargs = {k: model_config[k] for k in _MODEL_FIELDS if k in model_config and k in fields}
  if image_size and "image_size" in fields:
    kwargs["image_size"] = tuple(image_size)
  return MODELS[model_config.name](num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)
