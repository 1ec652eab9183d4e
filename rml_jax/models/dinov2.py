"""DINOv2 ViT encoders (ViT-S/14, B/14, L/14, with or without 4 register tokens).

Module and parameter names follow the published checkpoints (`patch_embed`, `cls_token`,
`pos_embed`, `register_tokens`, `blocks_3.attn.qkv`, `blocks_3.ls1.gamma`, `blocks_3.mlp.fc1`,
`norm`), so rml_jax/convert.py maps a state dict onto the params one to one. As in the published
model, the position embedding stays a parameter at its pretraining grid (37 x 37 for a 518
crop) and is resampled bicubically to each input's token grid in the forward pass, with the
published model's details (`interpolate_pos_embed`): torch's bicubic kernels, half-pixel
centres, and per checkpoint family the published settings (without registers: scale factor
(grid + 0.1) / 37, no antialiasing; with registers: the output size, antialiased). Register
tokens carry no position embedding.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rml_jax.models.resnet import survival_probs
from rml_jax.models.vit import Block

# torch's cubic convolution coefficients: plain bicubic, and the antialiased (PIL) kernel.
BICUBIC_A = -0.75
ANTIALIAS_A = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """The cubic convolution kernel at distances x (any sign)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int, offset: float = 0.0,
                    antialias: bool = False) -> np.ndarray:
  """The [out_size, in_size] matrix of torch's bicubic F.interpolate along one axis
  (align_corners=False), as the published model calls it: with offset > 0 torch gets the scale
  factor (out_size + offset) / in_size, else the output size.

  Plain: output i reads input position (i + 0.5) * r - 0.5 (r = 1 / scale) with 4 taps of the
  a = -0.75 kernel, indices clamped to the edges. Antialiased: the a = -0.5 kernel stretched by
  r when downsampling (r > 1), taps inside the input only, weights normalised to sum 1.
  """
  ratio = in_size / (out_size + offset) if offset else in_size / out_size
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if not antialias:
    source = (rows + 0.5) * ratio - 0.5
    first = np.floor(source)
    for tap in range(-1, 3):
      index = np.clip(first + tap, 0, in_size - 1).astype(np.int64)
      np.add.at(matrix, (rows, index), _cubic(source - (first + tap), BICUBIC_A))
    return matrix.astype(np.float32)
  support = 2.0 * max(ratio, 1.0)
  stretch = 1.0 / max(ratio, 1.0)
  for i in rows:
    center = ratio * (i + 0.5)
    low = max(int(center - support + 0.5), 0)
    high = min(int(center + support + 0.5), in_size)
    taps = np.arange(low, high)
    weights = _cubic((taps - center + 0.5) * stretch, ANTIALIAS_A)
    matrix[i, low:high] = weights / weights.sum()
  return matrix.astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], offset: float = 0.1,
                          antialias: bool = False) -> jax.Array:
  """The published model's resampling. [1, 1 + M * M, D] -> [1, 1 + gh * gw, D].

  Unchanged when the grid is the stored M x M one; otherwise the class token's entry is kept and
  the M x M grid resampled bicubically to gh x gw (`resample_matrix` per axis, in float32).
  The published checkpoints without registers use offset 0.1 and no antialiasing, those with
  registers offset 0 and antialiasing.
  """
  num_patches = pos_embed.shape[1] - 1
  side = int(round(num_patches**0.5))
  if side * side != num_patches:
    raise ValueError(f"pos_embed: {num_patches} grid entries are not a square grid")
  if tuple(grid) == (side, side):
    return pos_embed
  rows = resample_matrix(side, grid[0], offset, antialias)
  cols = resample_matrix(side, grid[1], offset, antialias)
  tokens = pos_embed[0, 1:].astype(jnp.float32).reshape(side, side, -1)
  resized = jnp.einsum("ha,abd,wb->hwd", rows, tokens, cols, precision="highest")
  resized = resized.reshape(1, grid[0] * grid[1], -1).astype(pos_embed.dtype)
  return jnp.concatenate([pos_embed[:, :1], resized], axis=1)


class DinoV2(nn.Module):
  """[N, H, W, 3] (H, W multiples of patch_size) -> the token grids [N, H/14, W/14, D] after
  the blocks named in `out_blocks`, each through the final LayerNorm (the published
  `get_intermediate_layers(..., norm=True)`); class and register tokens dropped."""

  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  out_blocks: Sequence[int] = (2, 5, 8, 11)
  num_registers: int = 0
  patch_size: int = 14
  pos_grid: int = 37  # side of the stored position-embedding grid (518 / 14)
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  mlp_ratio: float = 4.0
  survival_prob: float = 1.0
  survival_schedule: str = "linear"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> list[jax.Array]:
    p, d = self.patch_size, self.hidden_size
    n, height, width, _ = images.shape
    if height % p or width % p:
      raise ValueError(f"DinoV2: input {height}x{width} is not a multiple of patch {p}")
    x = nn.Conv(d, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                name="patch_embed")(images)
    grid = (height // p, width // p)
    x = x.reshape(n, grid[0] * grid[1], d)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + self.pos_grid**2, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1)
    x = x + interpolate_pos_embed(pos, grid, self.interpolate_offset,
                                  self.interpolate_antialias).astype(x.dtype)
    if self.num_registers:
      registers = self.param("register_tokens", nn.initializers.normal(1e-6),
                             (1, self.num_registers, d))
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(registers, (n, self.num_registers, d))
                           .astype(x.dtype), x[:, 1:]], axis=1)
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    survival = survival_probs(self.depth, self.survival_prob, self.survival_schedule)
    final_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
    outputs = []
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, survival[i], self.dtype, layer_scale=True,
                    name=f"blocks_{i}")(x, train)
      if i in self.out_blocks:
        patches = final_norm(x)[:, 1 + self.num_registers:]
        outputs.append(patches.reshape(n, *grid, d))
    return outputs
