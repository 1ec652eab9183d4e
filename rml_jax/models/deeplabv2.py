"""DeepLabv2: a dilated ResNet trunk and an ASPP head of summed dilated 3x3 convolutions."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rml_jax.models.resnet import Conv3x3, ResNet


class ASPPSum(nn.Module):
  """DeepLabv2 classifier: sum over rates of 3x3 convs with dilation r. [N,h,w,C] -> [N,h,w,K]."""

  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    logits = 0.0
    for i, rate in enumerate(self.rates):
      logits = logits + Conv3x3(
          self.num_classes, dilation=rate, use_bias=True,
          kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name=f"branch{i}")(features)
    return logits


class DeepLabV2(nn.Module):
  """Returns {'logits': [N, H, W, K] float32 at input size, 'features': [N, h, w, C]}.

  `features` are the input of the classifier head (what prototypes are computed on).
  Dropout (model noise, paper: 0.5) acts on the features before the head in train mode.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  base_width: int = 64
  strides: Sequence[int] = (1, 2, 1, 1)
  dilations: Sequence[int] = (1, 1, 2, 4)
  stem_pool: bool = True
  aspp_rates: Sequence[int] = (6, 12, 18, 24)
  dropout_rate: float = 0.0
  survival_prob: float = 1.0
  frozen_bn: bool = False
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  activation: str = "relu"
  survival_schedule: str = "uniform"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    features = ResNet(
        stage_sizes=self.stage_sizes, base_width=self.base_width, strides=self.strides,
        dilations=self.dilations, stem_pool=self.stem_pool, survival_prob=self.survival_prob,
        frozen_bn=self.frozen_bn, dtype=self.dtype, remat=self.remat,
        activation=self.activation, survival_schedule=self.survival_schedule,
        name="backbone")(images, train)
    head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = ASPPSum(self.num_classes, self.aspp_rates, self.dtype, name="head")(head_input)
    n, h, w, _ = images.shape
    logits = jax.image.resize(logits.astype(jnp.float32), (n, h, w, self.num_classes), "bilinear")
    return {"logits": logits, "features": features}
