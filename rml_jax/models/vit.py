"""ViT encoder (ViT-B/16, ViT-L/16 and small CPU variants) with timm's module names.

Names follow timm (`patch_embed`, `cls_token`, `pos_embed`, `blocks_3.attn.qkv`, `blocks_3.mlp.fc1`,
`norm`), so a timm state dict maps onto the params one to one (rml_jax/convert.py). The position
embedding is a parameter at this model's token grid; pretrained embeddings made for another grid
are interpolated when imported.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rml_jax.models.resnet import drop_path, survival_probs


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection. [N, T, D] -> [N, T, D]."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(x)
    q, k, v = (qkv.reshape(n, t, 3, self.num_heads, head_dim)[:, :, i] for i in range(3))
    # softmax(q k^T / sqrt(head_dim)) v per head.
    out = jax.nn.dot_product_attention(q, k, v)  # [N, T, heads, head_dim]
    return nn.Dense(d, dtype=self.dtype, name="proj")(out.reshape(n, t, d))


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), approximate=False)
    return nn.Dense(d, dtype=self.dtype, name="fc2")(x)


class LayerScale(nn.Module):
  """x * gamma, gamma [D] (DINOv2's `ls1` / `ls2`)."""

  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block; stochastic depth on both residual branches; with
  layer_scale, each branch is scaled by a learned per-channel gamma first (DINOv2)."""

  num_heads: int
  mlp_ratio: float = 4.0
  survival_prob: float = 1.0
  dtype: jnp.dtype = jnp.float32
  layer_scale: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    deterministic = not train or self.survival_prob >= 1.0
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)  # noqa: E731
    scale = lambda name, y: LayerScale(name=name)(y) if self.layer_scale else y  # noqa: E731
    branch = scale("ls1", Attention(self.num_heads, self.dtype, name="attn")(norm("norm1")(x)))
    rng = None if deterministic else self.make_rng("dropout")
    x = x + drop_path(branch, self.survival_prob, deterministic, rng)
    branch = scale("ls2", Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype,
                              name="mlp")(norm("norm2")(x)))
    rng = None if deterministic else self.make_rng("dropout")
    return x + drop_path(branch, self.survival_prob, deterministic, rng)


def resample_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], new_grid: tuple[int, int]
                       ) -> jax.Array:
  """[1, 1 + gh * gw, D] -> [1, 1 + nh * nw, D]: the class token's entry kept, the grid's
  entries resized bilinearly."""
  cls, tokens = pos_embed[:, :1], pos_embed[:, 1:]
  d = pos_embed.shape[-1]
  tokens = jax.image.resize(tokens.reshape(1, *grid, d), (1, *new_grid, d), "bilinear")
  return jnp.concatenate([cls, tokens.reshape(1, new_grid[0] * new_grid[1], d)], axis=1)


class VisionTransformer(nn.Module):
  """[N, H, W, 3] -> token grid [N, H / patch, W / patch, D] (the class token is dropped)."""

  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  survival_prob: float = 1.0
  dtype: jnp.dtype = jnp.float32
  pos_grid: tuple[int, int] | None = None  # the token grid of the crop (None: the input's)
  remat: bool = False  # recompute each block's activations in the backward pass
  survival_schedule: str = "uniform"  # resnet.survival_probs: uniform | linear over the blocks

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                name="patch_embed")(images)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
    grid = tuple(self.pos_grid) if self.pos_grid else (h, w)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + grid[0] * grid[1], d))
    if (h, w) != grid:  # another input size than the crop (whole-image eval): resample
      pos = resample_pos_embed(pos, grid, (h, w))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1) + pos
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    survival = survival_probs(self.depth, self.survival_prob, self.survival_schedule)
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, survival[i], self.dtype,
                    name=f"blocks_{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return x[:, 1:].reshape(n, h, w, d)
