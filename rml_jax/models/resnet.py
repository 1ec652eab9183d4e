"""ResNet backbones (bottleneck blocks) with torchvision's module names, dilation and model noise.

Module names follow torchvision (`conv1`, `bn1`, `layer3_1.conv2`, `layer1_0.downsample_conv`), so
a torchvision state dict maps onto the params one to one. 1x1 convolutions are written as a Dense
over the channel axis (a [1, 1, Cin, Cout] kernel is a [Cin, Cout] matrix): on XLA:CPU the weight
gradient of a 1x1 convolution is much slower than the same matmul (docs/performance.md).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# config.model.activation: the nonlinearity of the CNN blocks and the decoders.
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu}


def accumulates_in_float32(dtype: jnp.dtype) -> bool:
  """Whether a reduced-precision matmul should ask for a float32 result explicitly.

  On the CPU a bfloat16 x bfloat16 -> bfloat16 dot takes a slow path (slower than float32),
  while -> float32 runs on the bfloat16 matrix units where the CPU has them (docs/performance.md).
  GPUs and TPUs accumulate in float32 anyway.
  """
  return dtype != jnp.float32 and jax.default_backend() == "cpu"


class Conv1x1(nn.Module):
  """A strided 1x1 convolution as slice + Dense. [N, H, W, Cin] -> [N, H/s, W/s, features].

  In bfloat16 on the CPU the products are summed in float32 and the result rounded once to
  bfloat16 (the same parameters; see `accumulates_in_float32`).
  """

  features: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.stride > 1:
      x = x[:, :: self.stride, :: self.stride, :]
    dot_general = jax.lax.dot_general
    if accumulates_in_float32(self.dtype):
      dot_general = functools.partial(dot_general, preferred_element_type=jnp.float32)
    y = nn.Dense(self.features, use_bias=False, dtype=self.dtype, dot_general=dot_general,
                 name="kernel_dense")(x)
    return y.astype(self.dtype)


class Conv3x3(nn.Module):
  """A 3x3 convolution (stride, dilation d, padding d) that skips the taps it can never use.

  [N, H, W, Cin] -> [N, H', W', features], the same function and parameters as nn.Conv (kernel
  [3, 3, Cin, features], optional bias [features]). With d >= H (or W) the off-centre rows (or
  columns) of the kernel only ever read zero padding: the convolution keeps the kernel rows and
  columns that reach the image. Exact on every backend; it matters on XLA:CPU, whose dilated
  convolutions slow down as the dilation grows (DeepLabv2's ASPP: rates 6-24 on small maps).
  """

  features: int
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
    d = self.dilation
    # A dimension no bigger than d: only the centre tap meets the image, without padding.
    rows, pad_h = (slice(0, 3), d) if d < x.shape[1] else (slice(1, 2), 0)
    cols, pad_w = (slice(0, 3), d) if d < x.shape[2] else (slice(1, 2), 0)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel[rows, cols].astype(self.dtype), (self.stride, self.stride),
        ((pad_h, pad_h), (pad_w, pad_w)), rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
      y = y + bias.astype(self.dtype).reshape((1, 1, 1, self.features))
    return y


SURVIVAL_SCHEDULES = ("uniform", "linear")  # config.model.survival_schedule


def survival_probs(num_blocks: int, survival_prob: float, schedule: str) -> list[float]:
  """Per-block survival probabilities of stochastic depth, first block first.

  uniform: survival_prob for every block; linear: Huang et al.'s rule, 1 - (l / L) *
  (1 - survival_prob) for block l = 1..L, so the last block survives with survival_prob.
  """
  if schedule == "uniform":
    return [survival_prob] * num_blocks
  return [1.0 - (i + 1) / num_blocks * (1.0 - survival_prob) for i in range(num_blocks)]


def drop_path(x: jax.Array, survival_prob: float, deterministic: bool, rng: jax.Array | None):
  """Stochastic depth: zeroes a residual branch per sample with prob 1 - survival_prob.

  x: [N, ...]. Kept branches are scaled by 1 / survival_prob so the expectation is unchanged.
  """
  if deterministic or survival_prob >= 1.0:
    return x
  keep = jax.random.bernoulli(rng, survival_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / survival_prob, 0.0).astype(x.dtype)


def batch_norm(name: str, train: bool, frozen: bool, dtype: jnp.dtype) -> nn.BatchNorm:
  """torchvision's BatchNorm2d defaults (momentum 0.1 = flax 0.9, eps 1e-5); frozen = eval."""
  return nn.BatchNorm(use_running_average=not train or frozen, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (stride on the 3x3 conv). [N, H, W, Cin] -> [N, H/s, W/s, 4 * width]."""

  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  survival_prob: float = 1.0
  frozen_bn: bool = False
  dtype: jnp.dtype = jnp.float32
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: batch_norm(name, train, self.frozen_bn, self.dtype)  # noqa: E731
    act = ACTIVATIONS[self.activation]
    out = act(norm("bn1")(Conv1x1(self.width, dtype=self.dtype, name="conv1")(x)))
    out = Conv3x3(self.width, self.stride, self.dilation, dtype=self.dtype, name="conv2")(out)
    out = act(norm("bn2")(out))
    out = norm("bn3")(Conv1x1(self.width * 4, dtype=self.dtype, name="conv3")(out))
    deterministic = not train or self.survival_prob >= 1.0
    rng = None if deterministic else self.make_rng("dropout")
    out = drop_path(out, self.survival_prob, deterministic, rng)
    if self.downsample:
      x = norm("downsample_bn")(
          Conv1x1(self.width * 4, self.stride, dtype=self.dtype, name="downsample_conv")(x))
    return act(out + x)


class ResNet(nn.Module):
  """Bottleneck ResNet trunk (no pooling, no fc). [N, H, W, 3] -> [N, H/os, W/os, 32 * base_width].

  stage_sizes: blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
  strides / dilations: per stage; DeepLabv2 uses strides (1, 2, 1, 1), dilations (1, 1, 2, 4)
  for output stride 8.
  """

  stage_sizes: Sequence[int]
  base_width: int = 64
  strides: Sequence[int] = (1, 2, 2, 2)
  dilations: Sequence[int] = (1, 1, 1, 1)
  stem_pool: bool = True
  survival_prob: float = 1.0
  frozen_bn: bool = False
  dtype: jnp.dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass
  activation: str = "relu"
  survival_schedule: str = "uniform"  # survival_probs: uniform | linear over the blocks

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    x = nn.Conv(self.base_width, (7, 7), strides=2, padding=3, use_bias=False, dtype=self.dtype,
                name="conv1")(x)
    x = ACTIVATIONS[self.activation](batch_norm("bn1", train, self.frozen_bn, self.dtype)(x))
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_features = self.base_width
    survival = iter(survival_probs(sum(self.stage_sizes), self.survival_prob,
                                   self.survival_schedule))
    for stage, num_blocks in enumerate(self.stage_sizes):
      width = self.base_width * 2**stage
      for block in range(num_blocks):
        stride = self.strides[stage] if block == 0 else 1
        x = block_cls(
            width=width, stride=stride, dilation=self.dilations[stage],
            downsample=block == 0 and (stride != 1 or in_features != width * 4),
            survival_prob=next(survival), frozen_bn=self.frozen_bn, dtype=self.dtype,
            activation=self.activation, name=f"layer{stage + 1}_{block}")(x, train)
        in_features = width * 4
    return x
