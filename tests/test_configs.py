"""Every shipped config loads with each of its presets, names real models and existing splits;
the DeepLabv2 + SETR pair (Table 5), ViT position embeddings at other input sizes, remat."""

from __future__ import annotations

import os

import pytest

from configs import city, city_dinov2, city_setr, digits, folder, voc, voc_dinov2
from rml_jax import models, schema, state, step
from rml_jax.datasets import splits

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
