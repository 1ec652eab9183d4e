"""Pretrained weights -> a params file that a config names (`config.model.init_from`).

  python -m rml_jax.convert --arch=resnet101 --src=resnet101-63fe2227.pth --out=r101.npz
  python -m rml_jax.convert --arch=vit --src=ViT-B_16.npz --out=vit_b16.npz
  python -m rml_jax.convert --arch=vit --src=vit_base_patch16_224.safetensors --out=vit_b16.npz
  python -m rml_jax.convert --arch=dinov2 --src=dinov2_vitb14_pretrain.pth --out=dinov2_b14.npz

Sources: torchvision-format ResNet state dicts, timm-format ViT state dicts and the published
DINOv2 checkpoints (with or without registers) (`.pth` through torch when it is installed,
`.safetensors` or `.npz` without it), and ViT checkpoints in the `.npz` layout of the original
ViT / AugReg releases. The output is an `.npz` of flat keys `params/<module path>` and
`batch_stats/<module path>` in this project's layout (ResNet under `backbone`, ViT and DINOv2
under `encoder`); heads and decoders are never converted, so they stay freshly initialised.
Every source key that is not used is listed.
"""

from __future__ import annotations

import os
import re

import numpy as np

from rml_jax import weights
from rml_jax.errors import UserError, fail
from rml_jax.weights import Tree, flatten, load, save, unflatten

# ---------------------------------------------------------------------------------------------
# Reading source checkpoints.
# ---------------------------------------------------------------------------------------------


def load_source(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file -> {key: float32 array}. .pth needs torch; .safetensors / .npz do not."""
  if not os.path.exists(path):
    raise UserError(f"--src: {path} does not exist")
  if path.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError:
      raise UserError(f"--src: {path} is a torch file and torch is not installed; convert it "
                      "to .safetensors or .npz, or `pip install torch`") from None
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError)
      raise UserError(f"--src: {path} is not readable as a torch checkpoint "
                      f"({weights.first_sentence(e)}); expected a state dict saved with "
                      "torch.save") from None
    if isinstance(state, dict):
      state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
      raise UserError(f"--src: {path} holds a {type(state).__name__} that is not a flat dict "
                      "of tensors; expected a state dict saved with torch.save")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors raises SafetensorError, OSError
      raise UserError(f"--src: {path} is not readable as safetensors "
                      f"({weights.first_sentence(e)}); expected a .safetensors checkpoint"
                      ) from None
  if path.endswith(".npz"):
    return weights.read_npz(path, "--src", "an .npz checkpoint of arrays")
  raise UserError(f"--src: {path}: expected a .pth, .safetensors or .npz file")


# ---------------------------------------------------------------------------------------------
# ResNet (torchvision layout).
# ---------------------------------------------------------------------------------------------

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def resnet_from_torch(state: dict[str, np.ndarray]) -> tuple[Tree, list[str]]:
  """torchvision ResNet state dict -> ({'params': {'backbone': ...}, 'batch_stats': ...}, unused).

  conv weights [O, I, kh, kw] -> [kh, kw, I, O] (1x1 convs -> Dense kernels [I, O]); BN
  weight/bias -> scale/bias, running stats -> batch_stats; fc and num_batches_tracked unused.
  """
  flat: dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    match = re.fullmatch(r"(?:(layer\d+)\.(\d+)\.)?(.+)\.(\w+)", key)
    if match is None or key.startswith("fc.") or key.endswith("num_batches_tracked"):
      unused.append(key)
      continue
    layer, block, module, field = match.groups()
    prefix = f"backbone/{layer}_{block}/" if layer else "backbone/"
    module = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(module,
                                                                                    module)
    if module.startswith("conv") or module == "downsample_conv":
      if field != "weight":
        unused.append(key)
        continue
      if value.shape[2:] == (1, 1) and layer:  # 1x1 conv as Dense
        flat[f"params/{prefix}{module}/kernel_dense/kernel"] = value[:, :, 0, 0].T
      else:
        flat[f"params/{prefix}{module}/kernel"] = value.transpose(2, 3, 1, 0)
    elif module.startswith("bn") or module == "downsample_bn":
      if field not in _BN:
        unused.append(key)
        continue
      collection, name = _BN[field]
      flat[f"{collection}/{prefix}{module}/{name}"] = value
    else:
      unused.append(key)
  return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()}), unused


# ---------------------------------------------------------------------------------------------
# ViT (timm layout, and the original ViT / AugReg .npz layout).
# ---------------------------------------------------------------------------------------------


def encoder_from_torch(state: dict[str, np.ndarray]) -> tuple[Tree, list[str]]:
  """A ViT state dict with timm's / DINOv2's key names -> ({'params': {'encoder': ...}}, unused).

  cls_token, pos_embed, register_tokens, patch_embed.proj.*, norm.*, and per block
  blocks.{i}.{norm1,attn.qkv,attn.proj,mlp.fc1,mlp.fc2}.{weight,bias} and {ls1,ls2}.gamma (also
  the chunked form blocks.{chunk}.{i}.*). Linear weights [out, in] -> kernels [in, out], the
  patch convolution [D, 3, p, p] -> [p, p, 3, D]. Anything else is returned as unused.
  """
  flat: dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    if key in ("cls_token", "pos_embed", "register_tokens"):
      flat[f"encoder/{key}"] = value
    elif key == "patch_embed.proj.weight":
      flat["encoder/patch_embed/kernel"] = value.transpose(2, 3, 1, 0)
    elif key == "patch_embed.proj.bias":
      flat["encoder/patch_embed/bias"] = value
    elif key in ("norm.weight", "norm.bias"):
      flat[f"encoder/norm/{'scale' if key.endswith('weight') else 'bias'}"] = value
    elif match := re.fullmatch(r"blocks\.(?:\d+\.)?(\d+)\.(ls1|ls2)\.gamma", key):
      index, module = match.groups()
      flat[f"encoder/blocks_{index}/{module}/gamma"] = value
    elif match := re.fullmatch(r"blocks\.(?:\d+\.)?(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|"
                               r"mlp\.fc1|mlp\.fc2)\.(weight|bias)", key):
      index, module, field = match.groups()
      path = f"encoder/blocks_{index}/{module.replace('.', '/')}"
      if module.startswith("norm"):
        flat[f"{path}/{'scale' if field == 'weight' else 'bias'}"] = value
      else:
        flat[f"{path}/{'kernel' if field == 'weight' else 'bias'}"] = (
            value.T if field == "weight" else value)
    else:
      unused.append(key)
  return {"params": unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})}, unused


def vit_from_timm(state: dict[str, np.ndarray]) -> tuple[Tree, list[str]]:
  """timm VisionTransformer state dict -> ({'params': {'encoder': ...}}, unused keys)."""
  return encoder_from_torch(state)


def vit_from_original_npz(state: dict[str, np.ndarray]) -> tuple[Tree, list[str]]:
  """Original ViT / AugReg .npz (Transformer/encoderblock_i/...) -> timm keys -> our layout."""
  timm: dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    if key == "cls":
      timm["cls_token"] = value
    elif key == "Transformer/posembed_input/pos_embedding":
      timm["pos_embed"] = value
    elif key == "embedding/kernel":
      timm["patch_embed.proj.weight"] = value.transpose(3, 2, 0, 1)
    elif key == "embedding/bias":
      timm["patch_embed.proj.bias"] = value
    elif key.startswith("Transformer/encoder_norm/"):
      timm[f"norm.{'weight' if key.endswith('scale') else 'bias'}"] = value
    elif match := re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", key):
      index, rest = match.groups()
      prefix = f"blocks.{index}."
      if rest.startswith("LayerNorm_0/") or rest.startswith("LayerNorm_2/"):
        norm = "norm1" if rest.startswith("LayerNorm_0") else "norm2"
        timm[prefix + f"{norm}.{'weight' if rest.endswith('scale') else 'bias'}"] = value
      elif rest.startswith("MlpBlock_3/Dense_"):
        fc = "fc1" if "Dense_0" in rest else "fc2"
        timm[prefix + f"mlp.{fc}.{'weight' if rest.endswith('kernel') else 'bias'}"] = (
            value.T if rest.endswith("kernel") else value)
      elif rest.startswith("MultiHeadDotProductAttention_1/"):
        continue  # gathered below: q, k, v are fused into one qkv projection
      else:
        unused.append(key)
    else:
      unused.append(key)
  blocks = sorted({int(m.group(1)) for k in state
                   if (m := re.match(r"Transformer/encoderblock_(\d+)/MultiHead", k))})
  for index in blocks:
    base = f"Transformer/encoderblock_{index}/MultiHeadDotProductAttention_1/"
    # query/key/value kernels [D, heads, head_dim]; out kernel [heads, head_dim, D].
    kernels = [state[f"{base}{n}/kernel"].reshape(state[f"{base}{n}/kernel"].shape[0], -1)
               for n in ("query", "key", "value")]
    biases = [state[f"{base}{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
    timm[f"blocks.{index}.attn.qkv.weight"] = np.concatenate(kernels, axis=1).T
    timm[f"blocks.{index}.attn.qkv.bias"] = np.concatenate(biases)
    out = state[f"{base}out/kernel"]
    timm[f"blocks.{index}.attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
    timm[f"blocks.{index}.attn.proj.bias"] = state[f"{base}out/bias"]
  tree, more_unused = vit_from_timm(timm)
  return tree, unused + more_unused


# ---------------------------------------------------------------------------------------------
# DINOv2 (the published facebookresearch/dinov2 checkpoints).
# ---------------------------------------------------------------------------------------------

# (hidden size, depth) -> (published name, published parameter count in millions).
DINOV2_PUBLISHED = {(384, 12): ("ViT-S/14", 21), (768, 12): ("ViT-B/14", 86),
                    (1024, 24): ("ViT-L/14", 300), (1536, 40): ("ViT-g/14", 1100)}


def dinov2_from_torch(state: dict[str, np.ndarray]) -> tuple[Tree, list[str]]:
  """A published DINOv2 state dict -> ({'params': {'encoder': ...}}, unused keys).

  The published keys are timm's plus register_tokens and LayerScale's ls1 / ls2.gamma
  (`encoder_from_torch`); mask_token (masked-image pretraining only) and ViT-g's SwiGLU MLPs
  (mlp.w12, mlp.w3) come back unused.
  """
  return encoder_from_torch(state)


def dinov2_description(variables: Tree) -> str:
  """'ViT-B/14, 4 registers (published: 86M parameters; models: dpt_dinov2_vitb14_reg4)' for a
  converted DINOv2 encoder, from its shapes."""
  encoder = variables["params"]["encoder"]
  width = encoder["cls_token"].shape[-1]
  depth = sum(1 for name in encoder if name.startswith("blocks_"))
  registers = encoder["register_tokens"].shape[1] if "register_tokens" in encoder else 0
  name, published = DINOV2_PUBLISHED.get((width, depth), (f"width {width}, depth {depth}", None))
  model = (f"dpt_dinov2_{name.lower().replace('-', '').replace('/', '')}"
           if published and width != 1536 else None)  # no ViT-g model (SwiGLU MLPs)
  parts = [name + (f", {registers} registers" if registers else "")]
  if published:
    parts.append(f"published: {published}M parameters")
  if model:
    parts.append(f"model: {model}{'_reg4' if registers == 4 else ''}")
  return f"{parts[0]} ({'; '.join(parts[1:])})" if len(parts) > 1 else parts[0]


ARCHS = ("resnet50", "resnet101", "vit", "dinov2")


def convert(arch: str, src: str, out: str) -> list[str]:
  """Converts `src` into `out`; returns the unused source keys."""
  state = load_source(src)
  if arch.startswith("resnet"):
    variables, unused = resnet_from_torch(state)
  elif arch == "vit":
    is_original = any(k.startswith("Transformer/") for k in state)
    variables, unused = (vit_from_original_npz if is_original else vit_from_timm)(state)
  elif arch == "dinov2":
    variables, unused = dinov2_from_torch(state)
    encoder = variables["params"].get("encoder", {})
    patch = encoder.get("patch_embed", {}).get("kernel")
    if encoder and ("cls_token" not in encoder or patch is None or patch.shape[0] != 14
                    or "ls1" not in encoder.get("blocks_0", {})):
      raise UserError(f"--src: {src} is not a DINOv2 checkpoint (expected cls_token, a 14 x 14 "
                      "patch_embed.proj and LayerScale blocks.0.ls1.gamma; first keys: "
                      f"{sorted(state)[:3]}); a timm ViT converts with --arch=vit")
  else:
    raise UserError(f"--arch: expected one of {sorted(ARCHS)}, got {arch!r}")
  if not flatten(variables):
    raise UserError(f"--src: {src} has no {arch} parameters (first keys: "
                    f"{sorted(state)[:3]})")
  save(out, variables)
  return unused


def main(argv: list[str] | None = None) -> None:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
  parser.add_argument("--src", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    unused = convert(args.arch, args.src, args.out)
  except UserError as e:
    fail(str(e))
  variables = load(args.out)
  count = sum(v.size for v in flatten(variables.get("params", {})).values())
  print(f"Wrote {args.out}: {count:,} parameters ({count / 1e6:.1f}M).")
  if args.arch == "dinov2":
    print(f"DINOv2 {dinov2_description(variables)}.")
  if unused:
    print(f"Unused source keys ({len(unused)}): {', '.join(unused)}")


if __name__ == "__main__":
  main()
