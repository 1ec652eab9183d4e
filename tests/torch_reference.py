"""Plain-torch reference models with torchvision's / timm's module names and state-dict keys,
for the weight-import parity tests (torchvision itself is not importable beside the CPU torch
build used here)."""

import torch
from torch import nn


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes, width, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision.models.ResNet's layout (conv1, bn1, layer1..4, fc). Dilated stages use their
  dilation in every block and stride 1, as DeepLabv2 does."""

  def __init__(self, layers, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), width=64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_planes = width
    for stage, blocks in enumerate(layers):
      planes = width * 2**stage
      modules = []
      for b in range(blocks):
        stride = strides[stage] if b == 0 else 1
        downsample = None
        if b == 0 and (stride != 1 or in_planes != planes * 4):
          downsample = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * 4))
        modules.append(Bottleneck(in_planes, planes, stride, dilations[stage], downsample))
        in_planes = planes * 4
      setattr(self, f"layer{stage + 1}", nn.Sequential(*modules))
    self.fc = nn.Linear(in_planes, 1000)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> None:
  """Non-trivial running statistics and affine parameters, so BN import is really checked."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
      m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
      m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return self.proj(out)


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, dim * 4)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  """timm.models.VisionTransformer's names; forward returns the token grid without cls."""

  def __init__(self, image_size=(32, 48), patch=8, dim=48, depth=2, heads=4):
    super().__init__()
    self.grid = (image_size[0] // patch, image_size[1] // patch)
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim) * 0.02)
    self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, 1000)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    x = self.norm(self.blocks(x))
    return x[:, 1:].reshape(x.shape[0], *self.grid, -1)


class DinoLayerScale(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.rand(dim) + 0.5)


class DinoBlock(nn.Module):
  """The published DINOv2 block's names: norm1, attn.qkv, attn.proj, ls1, norm2, mlp, ls2."""

  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.ls1 = DinoLayerScale(dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, dim * 4)
    self.ls2 = DinoLayerScale(dim)

  def forward(self, x):
    x = x + self.ls1.gamma * self.attn(self.norm1(x))
    return x + self.ls2.gamma * self.mlp(self.norm2(x))


class DinoVisionTransformer(nn.Module):
  """The published DINOv2 ViT's state-dict keys (cls_token, pos_embed for a 37 x 37 grid,
  mask_token, register_tokens, patch_embed.proj, blocks.i, norm) and its token order and
  position-embedding resampling: F.interpolate bicubic with scale factor (grid + 0.1) / 37
  without registers, with the output size and antialiasing with them. `forward` returns the
  final-normed patch tokens [N, h, w, D] after each block in `out_blocks`."""

  def __init__(self, dim=384, depth=12, heads=6, registers=0, patch=14, pos_grid=37):
    super().__init__()
    self.patch, self.registers, self.pos_grid = patch, registers, pos_grid
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + pos_grid**2, dim) * 0.02)
    self.mask_token = nn.Parameter(torch.zeros(1, dim))
    if registers:
      self.register_tokens = nn.Parameter(torch.randn(1, registers, dim) * 0.02)
    self.patch_embed = PatchEmbed(patch, dim)
    self.blocks = nn.ModuleList([DinoBlock(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def position_embedding(self, h, w):
    if (h, w) == (self.pos_grid, self.pos_grid):
      return self.pos_embed
    m, dim = self.pos_grid, self.pos_embed.shape[-1]
    grid = self.pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if self.registers:  # the _reg checkpoints: output size, antialiased
      grid = nn.functional.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:
      grid = nn.functional.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m),
                                       mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([self.pos_embed[:, :1], grid], dim=1)

  def forward(self, x, out_blocks):
    n, _, height, width = x.shape
    h, w = height // self.patch, width // self.patch
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1) + self.position_embedding(h, w)
    if self.registers:
      x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], 1)
    outputs = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if i in out_blocks:
        outputs.append(self.norm(x)[:, 1 + self.registers:].reshape(n, h, w, -1))
    return outputs
