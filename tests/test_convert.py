"""Weight import: torchvision-layout ResNets and timm / original-layout ViTs give the same
features in Flax as in torch; mismatching checkpoints stop with one clear line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rml_jax import convert, weights
from rml_jax.errors import UserError
from rml_jax.models.resnet import ResNet
from rml_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
from tests import torch_reference  # noqa: E402  (needs torch)

DEEPLAB = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
PLAIN = dict(strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1))


def _relative_error(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layers,name", [((3, 4, 6, 3), "resnet50"),
                                         ((3, 4, 23, 3), "resnet101")])
@pytest.mark.parametrize("geometry", ["plain", "dilated"])
def test_resnet_import_matches_torch(layers, name, geometry):
  shape = DEEPLAB if geometry == "dilated" else PLAIN
  torch.manual_seed(0)
  reference = torch_reference.ResNet(layers, **shape).eval()
  torch_reference.randomize_batch_norm(reference)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)

  variables, unused = convert.resnet_from_torch(_state_dict(reference))
  assert sorted(unused) == sorted(["fc.weight", "fc.bias"] + [
      k for k in reference.state_dict() if k.endswith("num_batches_tracked")])
  model = ResNet(stage_sizes=layers, **shape)
  init = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  merged, kept = weights.merge_pretrained(
      {"params": {"backbone": init["params"]}, "batch_stats": {"backbone": init["batch_stats"]}},
      variables, name)
  assert kept == []  # every backbone tensor came from the checkpoint
  got = model.apply({"params": merged["params"]["backbone"],
                     "batch_stats": merged["batch_stats"]["backbone"]}, images, train=False)
  assert got.shape == want.shape
  error = _relative_error(np.asarray(got), want)
  assert error < 1e-4, error
  count = sum(v.size for v in jax.tree.leaves(init["params"]))
  published = {"resnet50": 23.5e6, "resnet101": 42.5e6}[name]  # torchvision, without fc
  print(f"{name} backbone: {count / 1e6:.2f}M parameters (published about "
        f"{published / 1e6:.1f}M)")
  assert abs(count - published) / published < 0.01


def _vit_pair():
  torch.manual_seed(1)
  reference = torch_reference.VisionTransformer(image_size=(32, 48), patch=8, dim=48, depth=2,
                                                heads=4).eval()
  model = VisionTransformer(patch_size=8, hidden_size=48, depth=2, num_heads=4)
  return reference, model


def test_vit_import_from_timm_layout_matches_torch():
  reference, model = _vit_pair()
  images = np.random.default_rng(1).normal(size=(2, 32, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  variables, unused = convert.vit_from_timm(_state_dict(reference))
  assert sorted(unused) == ["head.bias", "head.weight"]
  init = model.init(jax.random.key(0), jnp.zeros((1, 32, 48, 3)), train=False)
  merged, kept = weights.merge_pretrained({"params": {"encoder": init["params"]}}, variables,
                                          "vit")
  assert kept == []
  got = np.asarray(model.apply({"params": merged["params"]["encoder"]}, images, train=False))
  assert got.shape == want.shape == (2, 4, 6, 48)
  assert _relative_error(got, want) < 1e-4


def _to_original_layout(state, heads):
  """timm keys -> the original ViT .npz layout (written independently of convert.py)."""
  out = {"cls": state["cls_token"], "Transformer/posembed_input/pos_embedding": state["pos_embed"],
         "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": state["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": state["norm.weight"],
         "Transformer/encoder_norm/bias": state["norm.bias"]}
  blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
  for i in blocks:
    b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = (state[b + "norm1.weight"],
                                                                 state[b + "norm1.bias"])
    out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = (state[b + "norm2.weight"],
                                                                 state[b + "norm2.bias"])
    for j, fc in enumerate(("fc1", "fc2")):
      out[p + f"MlpBlock_3/Dense_{j}/kernel"] = state[b + f"mlp.{fc}.weight"].T
      out[p + f"MlpBlock_3/Dense_{j}/bias"] = state[b + f"mlp.{fc}.bias"]
    qkv_w, qkv_b = state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]
    d = qkv_w.shape[1]
    for j, n in enumerate(("query", "key", "value")):
      attn = p + f"MultiHeadDotProductAttention_1/{n}/"
      out[attn + "kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
      out[attn + "bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, d // heads)
    attn = p + "MultiHeadDotProductAttention_1/out/"
    out[attn + "kernel"] = state[b + "attn.proj.weight"].T.reshape(heads, d // heads, d)
    out[attn + "bias"] = state[b + "attn.proj.bias"]
  return out


def test_original_vit_npz_layout_converts_like_timm(tmp_path):
  reference, _ = _vit_pair()
  state = _state_dict(reference)
  path = str(tmp_path / "original.npz")
  np.savez(path, **_to_original_layout(state, heads=4))
  unused = convert.convert("vit", path, str(tmp_path / "converted.npz"))
  assert unused == []
  from_original = weights.flatten(weights.load(str(tmp_path / "converted.npz")))
  from_timm = weights.flatten(convert.vit_from_timm(state)[0])
  assert sorted(from_original) == sorted(from_timm)
  for key in from_timm:
    np.testing.assert_allclose(from_original[key], from_timm[key], rtol=1e-6, atol=1e-7)


def test_position_embedding_is_resampled_to_the_crop_grid():
  reference, _ = _vit_pair()  # trained at a 4 x 6 grid
  state = _state_dict(reference)
  square = np.concatenate([state["pos_embed"][:, :1],
                           np.random.default_rng(2).normal(size=(1, 16, 48))], 1)
  state["pos_embed"] = square.astype(np.float32)  # a 4 x 4 pretraining grid
  model = VisionTransformer(patch_size=8, hidden_size=48, depth=2, num_heads=4)
  init = model.init(jax.random.key(0), jnp.zeros((1, 32, 64, 3)), train=False)  # 4 x 8 grid
  merged, _ = weights.merge_pretrained({"params": {"encoder": init["params"]}},
                                       convert.vit_from_timm(state)[0], "vit", (4, 8))
  pos = merged["params"]["encoder"]["pos_embed"]
  assert pos.shape == (1, 33, 48)
  grid = torch.from_numpy(square[:, 1:].reshape(1, 4, 4, 48)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(4, 8), mode="bilinear",
                                         align_corners=False)
  np.testing.assert_allclose(pos[0, 1:], want.permute(0, 2, 3, 1).reshape(32, 48).numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pos[0, 0], square[0, 0])


def test_a_checkpoint_that_does_not_fit_names_the_parameter(tmp_path):
  torch.manual_seed(0)
  variables, _ = convert.resnet_from_torch(_state_dict(torch_reference.ResNet((3, 4, 6, 3))))
  model = ResNet(stage_sizes=(3, 4, 6, 3), base_width=32)  # half width: every conv differs
  init = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  target = {"params": {"backbone": init["params"]},
            "batch_stats": {"backbone": init["batch_stats"]}}
  with pytest.raises(UserError, match=r"r50.npz: parameter .* has shape \(.*\) but the model "
                                      r"expects \(.*\)"):
    weights.merge_pretrained(target, variables, "r50.npz")
  deeper, _ = convert.resnet_from_torch(_state_dict(torch_reference.ResNet((3, 4, 23, 3))))
  shallow = ResNet(stage_sizes=(3, 4, 6, 3))
  init = shallow.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  with pytest.raises(UserError, match="layer3_6.* does not exist in this model"):
    weights.merge_pretrained({"params": {"backbone": init["params"]},
                              "batch_stats": {"backbone": init["batch_stats"]}}, deeper, "r101")


def test_convert_cli_writes_a_file_and_reports_unused_keys(tmp_path, capsys):
  from safetensors.numpy import save_file

  reference, _ = _vit_pair()
  src = str(tmp_path / "vit.safetensors")
  save_file(_state_dict(reference), src)
  convert.main(["--arch=vit", f"--src={src}", f"--out={tmp_path / 'vit.npz'}"])
  out = capsys.readouterr().out
  assert "Unused source keys (2): head.bias, head.weight" in out  # listed, never dropped
  assert (tmp_path / "vit.npz").exists()
  with pytest.raises(SystemExit):
    convert.main(["--arch=vit", f"--src={tmp_path / 'missing.pth'}", "--out=x.npz"])
  assert "does not exist" in capsys.readouterr().err


def test_init_from_loads_both_students_and_teachers(data_dir, tmp_path):
  from rml_jax.program import Program
  from tests.conftest import tiny_config

  torch.manual_seed(3)
  reference = torch_reference.ResNet((1, 1, 1, 1), strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2),
                                     width=8)  # deeplabv2_tiny's trunk
  torch_reference.randomize_batch_norm(reference)
  path = str(tmp_path / "tiny.npz")
  weights.save(path, convert.resnet_from_torch(_state_dict(reference))[0])
  program = Program.create(tiny_config(data_dir, f"model.init_from={path}"))
  loaded = jax.device_get(program.initial_state())
  scratch = Program.create(tiny_config(data_dir))
  fresh = jax.device_get(scratch.initial_state())
  want = weights.flatten(weights.load(path))
  for learner, fresh_learner in ((loaded.learner_a, fresh.learner_a),
                                 (loaded.learner_b, fresh.learner_b)):
    for collection, student, teacher in (("params", learner.params, learner.ema_params),
                                         ("batch_stats", learner.batch_stats,
                                          learner.ema_batch_stats)):
      got_student = weights.flatten({collection: student})
      got_teacher = weights.flatten({collection: teacher})
      for key, value in want.items():
        if key.startswith(collection):
          np.testing.assert_array_equal(got_student[key], value)
          np.testing.assert_array_equal(got_teacher[key], value)
    # The head is not in the file: it keeps its seeded initialisation.
    np.testing.assert_array_equal(learner.params["head"]["branch0"]["kernel"],
                                  fresh_learner.params["head"]["branch0"]["kernel"])


@pytest.mark.parametrize("name,published", [("setr_naive_vit_b16", 86e6),
                                            ("setr_pup_vit_l16", 304e6)])
def test_vit_encoder_sizes_match_the_published_ones(name, published):
  import ml_collections

  from rml_jax import models

  model = models.build_model(ml_collections.ConfigDict(dict(name=name)), 19)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 224, 224, 3)))
  encoder = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"]["encoder"]))
  print(f"{name} encoder: {encoder / 1e6:.1f}M parameters (published about "
        f"{published / 1e6:.0f}M)")
  assert abs(encoder - published) / published < 0.01


def _dinov2_reference(registers: int, seed: int = 4, dim: int = 384, depth: int = 12,
                      heads: int = 6):
  torch.manual_seed(seed)
  return torch_reference.DinoVisionTransformer(dim=dim, depth=depth, heads=heads,
                                               registers=registers).eval()


@pytest.mark.parametrize("name,registers", [("dpt_dinov2_vits14", 0),
                                            ("dpt_dinov2_vits14_reg4", 4)])
@pytest.mark.parametrize("grid", [(18, 36), (40, 44)])
def test_dinov2_import_matches_torch_at_a_resampled_grid(name, registers, grid):
  """Published-layout keys converted and loaded into the registry's DINOv2 + DPT model: the
  encoder's final and intermediate features (captured inside the full model) within 1e-4 of
  the torch reference, at a grid that downsamples the stored 37 x 37 position grid (ViT-S/14 at
  252 x 504) and one that upsamples it (a 4-block width-48 ViT at 560 x 616)."""
  from rml_jax import models

  if grid == (18, 36):
    reference, model = _dinov2_reference(registers), models.MODELS[name](num_classes=19)
    blocks, dim = (2, 5, 8, 11), 384
  else:
    reference = _dinov2_reference(registers, dim=48, depth=4, heads=3)
    blocks, dim = (0, 1, 2, 3), 48
    model = models.MODELS[name](num_classes=19).clone(hidden_size=48, depth=4, num_heads=3,
                                                      out_blocks=blocks)
  size = (14 * grid[0], 14 * grid[1])
  images = np.random.default_rng(2).normal(size=(2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    want = [t.numpy() for t in reference(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                         blocks)]
  variables, unused = convert.dinov2_from_torch(_state_dict(reference))
  assert unused == ["mask_token"]
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))
  merged, kept = weights.merge_pretrained(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init), variables, name)
  assert kept and all(not k.startswith("params/encoder") for k in kept)  # the decoder only
  _, captured = model.apply(merged, images, capture_intermediates=lambda m, _: m.name == "encoder",
                            mutable=["intermediates"])
  got = captured["intermediates"]["encoder"]["__call__"][0]
  assert len(got) == len(want)
  for block, g, w in zip(blocks, got, want):
    assert g.shape == w.shape == (2, *grid, dim), block
    assert _relative_error(np.asarray(g), w) < 1e-4, (block, _relative_error(np.asarray(g), w))


def test_a_dinov2_checkpoint_without_registers_does_not_fill_a_reg4_model():
  """Loading must not leave part of a pretrained encoder at its random init (registers)."""
  from rml_jax import models

  variables, _ = convert.dinov2_from_torch(_state_dict(
      _dinov2_reference(0, dim=48, depth=4, heads=3)))
  model = models.MODELS["dpt_dinov2_vits14_reg4"](num_classes=3).clone(
      hidden_size=48, depth=4, num_heads=3, out_blocks=(0, 1, 2, 3))
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3))))
  with pytest.raises(UserError, match=r"parameter params/encoder/register_tokens \(1, 4, 48\) "
                                      r"of this model's encoder is not in the file"):
    weights.merge_pretrained(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init),
                             variables, "dinov2_s14.npz")


# Encoder / decoder sizes: DINOv2's README (21M, 86M, 300M, rounded) and UniMatch V2's training
# logs (encoder 22.1M and 86.6M, DPT decoder 2.7M and 10.9M for S and B). The logged decoders
# count one residual unit that the reference builds but never calls (refinenet4's first:
# the coarsest fusion block has no skip input); this model does not create it.
@pytest.mark.parametrize("name,published,logged_encoder,logged_decoder", [
    ("dpt_dinov2_vits14", 21e6, 22.1e6, 2.7e6), ("dpt_dinov2_vitb14", 86e6, 86.6e6, 10.9e6),
    ("dpt_dinov2_vitl14", 300e6, None, None), ("dpt_dinov2_vitb14_reg4", 86e6, 86.6e6, 10.9e6)])
def test_dinov2_sizes_match_the_published_ones(name, published, logged_encoder, logged_decoder):
  from rml_jax import models

  model = models.MODELS[name](num_classes=21)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 56, 56, 3)))
  count = lambda tree: sum(np.prod(s.shape) for s in jax.tree.leaves(tree))  # noqa: E731
  encoder = count(shapes["params"]["encoder"])
  decoder = count(shapes["params"]) - encoder
  print(f"{name}: encoder {encoder / 1e6:.2f}M (published {published / 1e6:.0f}M), "
        f"decoder + classifier {decoder / 1e6:.2f}M")
  assert abs(encoder - published) / published < 0.06
  if logged_encoder:
    assert round(encoder / 1e5) == round(logged_encoder / 1e5)
    unused_unit = 2 * (9 * model.features**2 + model.features)  # two 3x3 convs with bias
    assert round((decoder + unused_unit) / 1e5) == round(logged_decoder / 1e5)


def test_a_dinov2_checkpoint_of_another_size_names_the_parameter(tmp_path, capsys):
  """ViT-S weights converted through the CLI from a .pth, loaded into the ViT-B model: one line
  naming the first mismatching parameter and both shapes."""
  from rml_jax import models

  reference = _dinov2_reference(registers=0)
  src = str(tmp_path / "dinov2_vits14_pretrain.pth")
  torch.save(reference.state_dict(), src)
  out = str(tmp_path / "dinov2_s14.npz")
  convert.main(["--arch=dinov2", f"--src={src}", f"--out={out}"])
  printed = capsys.readouterr().out
  assert "ViT-S/14 (published: 21M parameters; model: dpt_dinov2_vits14)" in printed
  assert "Unused source keys (1): mask_token" in printed
  model = models.MODELS["dpt_dinov2_vitb14"](num_classes=19)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 56, 56, 3))))
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  with pytest.raises(UserError, match=r"^dinov2_s14.npz: parameter params/encoder/\S+ has shape "
                                      r"\(.*384.*\) but the model expects \(.*768.*\)$"):
    weights.merge_pretrained(target, weights.load(out), "dinov2_s14.npz")
  with pytest.raises(SystemExit):  # a ResNet checkpoint is not a DINOv2 one
    torch.save(torch_reference.ResNet((1, 1, 1, 1)).state_dict(), str(tmp_path / "r.pth"))
    convert.main(["--arch=dinov2", f"--src={tmp_path / 'r.pth'}", f"--out={out}"])
  assert "has no dinov2 parameters" in capsys.readouterr().err
  timm_vit, _ = _vit_pair()  # a timm ViT (patch 8, no LayerScale) is refused too
  torch.save(timm_vit.state_dict(), str(tmp_path / "vit.pth"))
  with pytest.raises(SystemExit):
    convert.main(["--arch=dinov2", f"--src={tmp_path / 'vit.pth'}", f"--out={out}"])
  assert "is not a DINOv2 checkpoint" in capsys.readouterr().err
