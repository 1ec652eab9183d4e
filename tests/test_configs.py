"""Every shipped config loads with each of its presets, names real models and existing splits;
the Cityscapes DeepLabv2 + SETR pair (Table 5) trains end to end on a Cityscapes replica."""

from __future__ import annotations

import json
import os

import pytest

from configs import city, city_setr, digits, folder, voc
from rml_jax import models, state, step, train
from rml_jax.datasets import splits

CASES = ([(digits, a) for a in ("", "tiny")] + [(city, a) for a in city.SPLITS + ("full", "cpu")]
         + [(city_setr, a) for a in ("", "1_30", "cpu")] + [(voc, a) for a in voc.SPLITS + ("cpu",)]
         + [(folder, "isbi,data.root=/data/isbi")])


@pytest.mark.parametrize("module, arg", CASES)
def test_config_loads_with_known_models_and_splits(module, arg):
  config = module.get_config(arg)
  assert config.model.name in models.MODELS
  assert not config.model_b.name or config.model_b.name in models.MODELS
  step.StepConfig.from_config(config, num_classes=3)
  if config.data.get("split"):
    folder_path = splits.split_folder(config.data, config.data.split)
    assert os.path.isfile(os.path.join(folder_path, "labeled.txt"))


def test_city_setr_pairs_deeplabv2_with_setr_without_noise():
  config = city_setr.get_config()
  model_a, model_b = state.build_models(config, 19)
  assert type(model_a).__name__ == "DeepLabV2" and type(model_b).__name__ == "SETR"
  assert config.rml.mode == "iml" and config.data.split == "1_8"
  assert (config.model.dropout_rate, config.model.survival_prob) == (0.0, 1.0)
  assert city_setr.get_config("1_30,seed=3").data.split == "1_30"


@pytest.mark.slow
def test_city_setr_trains_on_a_cityscapes_replica(tmp_path):
  from tests.test_datasets import _cityscapes_zips

  _cityscapes_zips(str(tmp_path / "zips"))
  config = city_setr.get_config("cpu")
  config.data.update(dict(manual_dir=str(tmp_path / "zips"), data_dir=str(tmp_path / "tfds"),
                          split="", labeled_fraction=0.5))
  results = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert set(results) == set(step.MODEL_NAMES)
  stored = json.load(open(tmp_path / "work" / "eval" / "step_4.json"))["results"]
  assert len(stored["teacher_b"]["iou"]) == 19 and stored["teacher_b"]["iou"]["car"] is not None


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


@pytest.mark.parametrize("name", ["deeplabv2_tiny", "setr_naive_tiny"])
def test_remat_gives_the_same_outputs_and_gradients(name):
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  def build(remat):
    return models.build_model(ml_collections.ConfigDict(dict(name=name, remat=remat,
                                                              survival_prob=0.8)), 4)

  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = build(False).init(jax.random.key(0), images)
  rngs = {"dropout": jax.random.key(2)}

  def loss(params, model):
    out, _ = model.apply({**variables, "params": params}, images, train=True, rngs=rngs,
                         mutable=["batch_stats"])
    return jnp.mean(out["logits"] ** 2)

  plain = jax.value_and_grad(loss)(variables["params"], build(False))
  remat = jax.value_and_grad(loss)(variables["params"], build(True))
  np.testing.assert_allclose(plain[0], remat[0], rtol=1e-5)
  # Equal up to float32 reassociation, measured against the gradients' overall scale.
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(plain[1]))
  for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
    assert np.max(np.abs(a - b)) <= 1e-4 * scale
