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
