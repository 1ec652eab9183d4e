"""DPT decoder on a DINOv2 encoder: the segmenter of UniMatch V2 and Depth Anything.

Four encoder blocks' token grids [N, h, w, D] (h = H / 14) are projected (1x1) and reassembled
to four scales (4x and 2x transposed convolutions, identity, a stride-2 3x3 convolution),
brought to one width by 3x3 convolutions, fused top-down by residual fusion blocks (each
upsamples 2x), and a 3x3 convolution + ReLU gives the features that the 1x1 classifier and the
prototypes read, at 8x the token grid. Logits are resized bilinearly to the input. The decoder
is always freshly initialised, so its resizing uses jax.image.resize (half-pixel centres) where
the reference code uses align_corners=True (docs/fidelity.md).

Inputs whose sides are not multiples of 14 (whole-image evaluation) are zero-padded at the
bottom and right to the next multiple; logits and features are cropped back to the input.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rml_jax.models.dinov2 import DinoV2


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, height, width, c), "bilinear")


class ResidualConvUnit(nn.Module):
  """x + conv3x3(relu(conv3x3(relu(x)))), biases on, no batch norm. [N, h, w, F] -> same."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    out = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name="conv1")(nn.relu(x))
    out = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name="conv2")(nn.relu(out))
    return x + out


class FusionBlock(nn.Module):
  """(coarser path [N, h, w, F], skip [N, h, w, F] or None) -> [N, size or 2h x 2w, F]."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None,
               size: tuple[int, int] | None = None) -> jax.Array:
    if skip is not None:
      x = x + ResidualConvUnit(self.dtype, name="res_conv_unit1")(skip)
    x = ResidualConvUnit(self.dtype, name="res_conv_unit2")(x)
    size = size or (2 * x.shape[1], 2 * x.shape[2])
    x = _resize(x, *size)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="out_conv")(x)


class DPTHead(nn.Module):
  """Four token grids [N, h, w, D] -> features [N, 8h, 8w, features]."""

  features: int = 128
  out_channels: Sequence[int] = (96, 192, 384, 768)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, grids: Sequence[jax.Array]) -> jax.Array:
    conv = lambda f, k, s, name, bias=True: nn.Conv(  # noqa: E731
        f, (k, k), strides=s, padding=k // 2, use_bias=bias, dtype=self.dtype, name=name)
    layers = []
    for i, (grid, width) in enumerate(zip(grids, self.out_channels)):
      x = nn.Dense(width, dtype=self.dtype, name=f"project{i}")(grid)
      if i == 0:
        x = nn.ConvTranspose(width, (4, 4), strides=(4, 4), padding="VALID", dtype=self.dtype,
                             name=f"resize{i}")(x)
      elif i == 1:
        x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                             name=f"resize{i}")(x)
      elif i == 3:
        x = conv(width, 3, 2, f"resize{i}")(x)
      layers.append(conv(self.features, 3, 1, f"layer{i + 1}_rn", bias=False)(x))
    path = FusionBlock(self.dtype, name="refinenet4")(layers[3], size=layers[2].shape[1:3])
    path = FusionBlock(self.dtype, name="refinenet3")(path, layers[2], size=layers[1].shape[1:3])
    path = FusionBlock(self.dtype, name="refinenet2")(path, layers[1], size=layers[0].shape[1:3])
    path = FusionBlock(self.dtype, name="refinenet1")(path, layers[0])
    return nn.relu(conv(self.features, 3, 1, "output_conv1")(path))


class DPTDinoV2(nn.Module):
  """DINOv2 encoder + DPT decoder. [N, H, W, 3] -> {'logits': [N, H, W, K] float32,
  'features': [N, ~8H/14, ~8W/14, features]}, like every student."""

  num_classes: int
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  out_blocks: Sequence[int] = (2, 5, 8, 11)
  num_registers: int = 0
  features: int = 128
  out_channels: Sequence[int] = (96, 192, 384, 768)
  patch_size: int = 14
  pos_grid: int = 37
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  dropout_rate: float = 0.0
  survival_prob: float = 1.0
  survival_schedule: str = "linear"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    n, height, width, _ = images.shape
    p = self.patch_size
    padded_h, padded_w = -(-height // p) * p, -(-width // p) * p
    if (padded_h, padded_w) != (height, width):
      images = jnp.pad(images, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))
    grids = DinoV2(self.hidden_size, self.depth, self.num_heads, tuple(self.out_blocks),
                   self.num_registers, p, self.pos_grid, self.interpolate_offset,
                   self.interpolate_antialias, survival_prob=self.survival_prob,
                   survival_schedule=self.survival_schedule, dtype=self.dtype,
                   remat=self.remat, name="encoder")(images, train)
    features = DPTHead(self.features, tuple(self.out_channels), self.dtype,
                       name="decoder")(grids)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    logits = _resize(logits.astype(jnp.float32), padded_h, padded_w)[:, :height, :width]
    fh, fw = features.shape[1:3]
    features = features[:, :-(-height * fh // padded_h), :-(-width * fw // padded_w)]
    return {"logits": logits, "features": features}
