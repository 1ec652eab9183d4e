"""Every shipped config passes its own check with each of its presets (and the folder presets
train a step), names real models and existing splits; the DeepLabv2 + SETR pair (Table 5), ViT
position embeddings at other input sizes, remat."""

from __future__ import annotations

import importlib
import inspect
import os

import numpy as np
import pytest

from configs import city, city_dinov2, city_setr, digits, folder, voc, voc_dinov2
from rml_jax import models, schema, state, step
from rml_jax.datasets import splits
from rml_jax.errors import UserError
from tests.test_datasets import _png

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
SHIPPED = sorted(name[:-3] for name in os.listdir(CONFIGS_DIR)
                 if name.endswith(".py") and name != "__init__.py")
SMOKE_PRESETS = ("tiny", "cpu")  # presets meant to follow another: they shrink any run

CASES = ([(digits, a) for a in ("", "tiny")] + [(city, a) for a in city.SPLITS + ("full", "cpu")]
         + [(city_setr, a) for a in ("", "1_30", "cpu")] + [(voc, a) for a in voc.SPLITS + ("cpu",)]
         + [(folder, "isbi,data.root=/data/isbi")]
         + [(city_dinov2, a) for a in (*city_dinov2.SPLITS, "deeplab", "iml,small", "large",
                                       "cpu", "cpu,deeplab")]
         + [(voc_dinov2, a) for a in (*voc_dinov2.SPLITS, "deeplab", "cpu")])


@pytest.mark.parametrize("module, arg", CASES)
def test_config_loads_with_known_models_and_splits(module, arg):
  config = module.get_config(arg)
  assert config.model.name in models.MODELS
  assert not config.model_b.name or config.model_b.name in models.MODELS
  schema.validate(config)
  step.StepConfig.from_config(config, num_classes=3)
  if config.data.split:
    folder_path = splits.split_folder(config.data, config.data.split)
    assert os.path.isfile(os.path.join(folder_path, "labeled.txt"))


def preset_args(presets: dict) -> list[str]:
  """The arg strings a user is meant to write: no preset, each preset alone and followed by
  each smoke preset, and each of those with mode=rml (the paper's method)."""
  smoke = [name for name in SMOKE_PRESETS if name in presets]
  args = [""] + [name for name in presets]
  args += [f"{name},{s}" for name in presets for s in smoke if s != name]
  return args + [f"{arg},mode=rml".lstrip(",") for arg in args]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_its_own_check_with_every_preset(name):
  """schema.validate on every arg string of preset_args: a shipped preset never fails its own
  check (configs/folder.py:tiny once did, over num_image_summaries)."""
  module = importlib.import_module(f"configs.{name}")
  if "arg" not in inspect.signature(module.get_config).parameters:
    schema.validate(module.get_config())
    return
  assert hasattr(module, "presets"), f"configs/{name}.py: expected presets() listing its presets"
  failures = {}
  for arg in preset_args(module.presets()):
    try:
      schema.validate(module.get_config(arg))
    except UserError as e:
      failures[arg] = str(e)
  assert not failures, failures


def test_preset_args_cover_every_preset_with_the_smoke_presets():
  args = preset_args(folder.presets())
  assert {"tiny", "isbi", "stanford", "isbi,tiny", "stanford,tiny", "stanford,tiny,mode=rml",
          "mode=rml"} <= set(args)
  assert "tiny,tiny" not in args


def _write_folder(root: str, preset: str) -> None:
  """A few 24x32 images and labels in the layout of a folder.py preset ('' = the default
  images/, labels/, unlabeled/)."""
  rng = np.random.default_rng(0)
  image_dir, label_dir, unlabeled_dir = {
      "isbi": ("train/image", "train/label", "unlabeled"),
      "stanford": ("images", "labels", "")}.get(preset, ("images", "labels", "unlabeled"))
  values = np.array([0, 1, 2, 7, 15] if preset == "stanford" else [0, 255], np.uint8)
  stems = [f"img{i}" for i in range(8)]
  for stem in stems:
    _png(os.path.join(root, image_dir, f"{stem}.png"),
         rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    _png(os.path.join(root, label_dir, f"{stem}.png"), rng.choice(values, (24, 32)))
  if unlabeled_dir:
    for i in range(2):
      _png(os.path.join(root, unlabeled_dir, f"u{i}.png"),
           rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
  if preset == "stanford":
    os.makedirs(os.path.join(root, "splits"))
    for name, listed in (("train", stems[:6]), ("val", stems[6:])):
      with open(os.path.join(root, "splits", f"{name}.txt"), "w") as f:
        f.write("".join(f"{stem}\n" for stem in listed))


@pytest.mark.parametrize("arg", [
    "tiny,data.val_holdout=2",
    pytest.param("isbi,tiny", marks=pytest.mark.slow),
    pytest.param("stanford,tiny", marks=pytest.mark.slow),
    # no unlabeled image: supervised trains (its summaries without unlabeled ones); iml stops
    pytest.param("tiny,data.val_holdout=2,data.unlabeled_dir=,mode=supervised",
                 marks=pytest.mark.slow)])
def test_folder_presets_train_and_evaluate_a_step(arg, tmp_path):
  """Each folder preset with `tiny` (eval batches of 2, fewer than num_image_summaries) trains
  one step on a folder of its layout, evaluates and writes its image summaries."""
  from rml_jax import train

  preset = arg.split(",")[0]
  root = str(tmp_path / "folder")
  _write_folder(root, "" if preset == "tiny" else preset)
  config = folder.get_config(f"{arg},steps=1,eval_every=1,log_every=1,checkpoint_every=1,"
                             f"data.root={root},data.data_dir={tmp_path / 'tfds'}")
  assert config.eval_batch_size < config.num_image_summaries
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert set(results) == {"teacher_a", "teacher_b", "student_a", "student_b"}
  assert os.path.isfile(tmp_path / "run" / "eval" / "step_1.json")


def test_dinov2_configs_follow_unimatch_v2():
  """Splits, schedule (epochs over the unlabeled images), crops, groups and the pairs."""
  config = city_dinov2.get_config()
  assert (config.model.name, config.model_b.name, config.rml.mode) == (
      "dpt_dinov2_vitb14", "", "rml")
  assert config.data.crop_size == (798, 798) and config.eval.protocol == "sliding"
  assert config.total_steps == 180 * ((2975 - 372) // 8) == 58_500
  labeled = splits.read_ids(os.path.join(splits.split_folder(config.data, "1_16"),
                                         "labeled.txt"))
  assert len(labeled) == 186
  assert city_dinov2.get_config("1_2").total_steps == 180 * (1487 // 8)
  model_a, model_b = state.build_models(city_dinov2.get_config("deeplab"), 19)
  assert (type(model_a).__name__, type(model_b).__name__) == ("DPTDinoV2", "DeepLabV2")
  multipliers = config.optimizer.lr_multipliers
  assert state.lr_multiplier_of("decoder/layer1_rn/kernel", multipliers) == 40.0
  assert state.lr_multiplier_of("head/branch0/kernel", multipliers) == 40.0  # DeepLabv2's ASPP
  assert state.lr_multiplier_of("encoder/blocks_0/ls1/gamma", multipliers) == 1.0
  assert state.lr_multiplier_of("backbone/layer1_0/conv1/kernel", multipliers) == 1.0
  voc_config = voc_dinov2.get_config("92")
  assert voc_config.data.split == "1_16" and voc_config.data.crop_size == (518, 518)
  assert voc_config.total_steps == 60 * ((10582 - 92) // 16)
  assert len(splits.read_ids(os.path.join(splits.split_folder(voc_config.data, "1_1"),
                                          "labeled.txt"))) == 1464
  assert all(side % 14 == 0 for side in voc_config.eval.pad_to)


def test_city_setr_pairs_deeplabv2_with_setr_without_noise():
  config = city_setr.get_config()
  model_a, model_b = state.build_models(config, 19)
  assert type(model_a).__name__ == "DeepLabV2" and type(model_b).__name__ == "SETR"
  assert config.rml.mode == "iml" and config.data.split == "1_8"
  assert (config.model.dropout_rate, config.model.survival_prob) == (0.0, 1.0)
  assert city_setr.get_config("1_30,seed=3").data.split == "1_30"


def test_vit_position_embeddings_follow_the_input_size():
  """A SETR built for 32x64 crops runs on 64x128 images with resampled position embeddings,
  which equal the stored ones when resampled to the same grid."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from rml_jax.models import vit

  model = models.build_model(ml_collections.ConfigDict(dict(name="setr_naive_tiny")), 5,
                             image_size=(32, 64))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 64, 3)))
  assert variables["params"]["encoder"]["pos_embed"].shape == (1, 1 + 4 * 8, 96)
  logits = model.apply(variables, jnp.zeros((2, 64, 128, 3)))["logits"]
  assert logits.shape == (2, 64, 128, 5)
  pos = variables["params"]["encoder"]["pos_embed"]
  np.testing.assert_allclose(vit.resample_pos_embed(pos, (4, 8), (4, 8)), pos, atol=1e-6)


@pytest.mark.parametrize("block", ["bottleneck", "vit_block"])
def test_remat_blocks_give_the_same_outputs_and_gradients(block):
  """config.model.remat wraps these blocks in nn.remat: same values, same gradients, and the
  same stochastic-depth draws."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from rml_jax.models import resnet, vit

  if block == "bottleneck":
    cls, kwargs, shape = resnet.Bottleneck, dict(width=4, downsample=True, survival_prob=0.5), \
        (2, 8, 8, 8)
  else:
    cls, kwargs, shape = vit.Block, dict(num_heads=2, survival_prob=0.5), (2, 5, 8)
  x = jax.random.uniform(jax.random.key(1), shape)
  plain, remat = cls(**kwargs), nn.remat(cls, static_argnums=(2,))(**kwargs)
  variables = plain.init({"params": jax.random.key(0), "dropout": jax.random.key(3)}, x, True)

  def loss(params, module):
    out = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(2)})[0]
    return jnp.sum(out ** 2)

  value, grads = jax.value_and_grad(loss)(variables["params"], plain)
  value_remat, grads_remat = jax.value_and_grad(loss)(variables["params"], remat)
  np.testing.assert_allclose(value_remat, value, rtol=1e-5)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-5 * scale


def test_remat_config_reaches_the_blocks():
  """With config.model.remat the traced forward pass holds rematerialised (remat) calls."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  x = jnp.zeros((1, 16, 16, 3))
  for name in ("deeplabv2_tiny", "setr_naive_tiny"):
    traced = {}
    for remat in (False, True):
      model = models.build_model(ml_collections.ConfigDict(dict(name=name, remat=remat)), 4)
      variables = jax.eval_shape(model.init, jax.random.key(0), x)
      traced[remat] = str(jax.make_jaxpr(lambda v, m=model: m.apply(
          v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}))(
              variables))
    assert "remat" in traced[True] and "remat" not in traced[False], name


@pytest.mark.parametrize("module", [city, voc])
def test_paper_configs_carry_the_settings_the_paper_states(module):
  """Section 5.2 and eq. 5 (docs/fidelity.md lists the settings the paper leaves open)."""
  config = module.get_config()
  assert config.model.name == "deeplabv2_resnet101"
  assert (config.model.dropout_rate, config.model.survival_prob) == (0.5, 0.8)
  assert (config.optimizer.name, config.optimizer.learning_rate) == ("sgd", 1e-4)
  assert config.rml.prototype_momentum == 0.9999 and config.rml.stages == 2
  assert config.rml.unsup_weight == 1.0  # eq. 5: the four terms with unit weights
  assert config.rml.mode == "rml"
  assert config.augment.strong_views == "per_student"  # section 4.1: input noise per learner
  assert config.rml.prototypes_from_labeled  # eq. 10 averages over D_l and D_u
  # Prototypes start after 10% of each stage (the paper is silent; docs/fidelity.md).
  assert config.rml.rectify_start_step == config.total_steps // 10
  if module is city:
    assert config.data.resize == (512, 1024) and config.data.crop_size == (256, 512)
    assert (config.labeled_batch_size, config.total_steps) == (4, 90_000)
  else:
    assert config.data.scale_range == (0.5, 1.5) and config.data.crop_size == (321, 321)
    assert (config.labeled_batch_size, config.total_steps) == (10, 60_000)
