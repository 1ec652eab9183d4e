"""The optimizer against the update rule written out: SGD with L2 decay on kernels only, and a
frozen backbone batch norm whose scales and biases do not move."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import city, city_setr, digits
from rml_jax import models, state


def _params(config, name=None):
  model_config = config.model.copy_and_resolve_references()
  if name:
    model_config.name = name
  model = models.build_model(model_config, 19)
  return model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]


def _paths(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sgd_decays_kernels_only():
  # SGD, lr 1e-4, decay 5e-4, one rate for every parameter.
  config = city.get_config("cpu,model.frozen_bn=False,optimizer.lr_multipliers=()")
  params = _params(config)
  tx = state.make_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr, decay = config.optimizer.learning_rate, config.optimizer.weight_decay
  kinds = set()
  values = _paths(params)
  for path, update in _paths(updates).items():
    value = values[path]
    if path.endswith("['kernel']"):  # first momentum step: -lr * (grad + decay * w)
      np.testing.assert_allclose(update, -lr * decay * value, rtol=1e-5, atol=1e-12)
      kinds.add("kernel")
    else:  # biases and batch-norm scales: no decay
      np.testing.assert_array_equal(update, 0.0)
      kinds.add(path.rsplit("[", 1)[-1])
  assert kinds >= {"kernel", "'bias']", "'scale']"}


def test_the_demo_decays_every_parameter_as_it_was_measured():
  config = digits.get_config("optimizer.warmup_steps=0")  # AdamW, every leaf decayed
  params = _params(config)
  tx = state.make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  scale = _paths(updates)["['backbone']['bn1']['scale']"]
  assert np.all(scale != 0.0)  # ones: AdamW's decoupled decay reaches them


@pytest.mark.parametrize("train_affine", [False, True])
def test_frozen_batch_norm_keeps_the_backbone_scales_and_biases(train_affine):
  config = city.get_config(f"cpu,model.train_bn_affine={train_affine}")  # frozen_bn=True
  params = _params(config)
  tx = state.make_optimizer(config)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {p: bool(np.any(u != 0)) for p, u in _paths(updates).items()}
  backbone_bn = [p for p in moved if p.startswith("['backbone']") and "bn" in p]
  assert backbone_bn and all(moved[p] == train_affine for p in backbone_bn)
  assert all(moved[p] for p in moved if p not in backbone_bn)  # kernels, the head


def test_setr_decoder_batch_norm_is_never_frozen():
  config = city.get_config("cpu")  # frozen_bn=True
  params = _params(config, "setr_naive_tiny")
  labels = {jax.tree_util.keystr(p): label for p, label in
            jax.tree_util.tree_flatten_with_path(state.frozen_bn_labels(params))[0]}
  assert set(labels.values()) == {"train"}
  assert any("decode_bn" in p for p in labels)


def test_parameter_groups_scale_the_adamw_step_per_pattern():
  """AdamW's first step written out, -lr_group * (g / (|g| + eps) + wd * w), with the decoder
  and classifier at 40x the encoder's rate (UniMatch V2's groups), all leaves decayed."""
  config = digits.get_config("model.name=dpt_dinov2_tiny,optimizer.warmup_steps=0,"
                             "optimizer.weight_decay=0.01")
  config.optimizer.lr_multipliers = (("^(decoder|classifier)/", 40.0),)
  lr, wd = config.optimizer.learning_rate, config.optimizer.weight_decay
  model = models.build_model(config.model, 3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 56, 56, 3)))["params"]
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  tx = state.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  values, gradients = _paths(params), _paths(grads)
  groups = set()
  for path, update in _paths(updates).items():
    multiplier = 1.0 if path.startswith("['encoder']") else 40.0
    groups.add(multiplier)
    g, w = gradients[path], values[path]
    want = -lr * multiplier * (g / (np.abs(g) + 1e-8) + wd * w)
    np.testing.assert_allclose(update, want, rtol=2e-4, atol=1e-9, err_msg=path)
  assert groups == {1.0, 40.0}
  assert state.lr_multiplier_of("decoder/refinenet1/out_conv/kernel",
                                config.optimizer.lr_multipliers) == 40.0
  assert state.lr_multiplier_of("encoder/blocks_0/attn/qkv/kernel",
                                config.optimizer.lr_multipliers) == 1.0


def test_groups_keep_the_optimizer_state_of_a_config_without_them():
  """No multipliers: the state is optax's plain one (or {'train', 'frozen'} with frozen batch
  norm), so checkpoints written before groups existed restore."""
  import optax

  config = city.get_config("cpu,optimizer.lr_multipliers=()")  # frozen_bn=True
  params = _params(config)
  opt_state = state.make_optimizer(config).init(params)
  assert set(opt_state.inner_states) == {"train", "frozen"}
  sgd = optax.chain(optax.add_decayed_weights(5e-4, mask=state.decays),
                    optax.sgd(state.learning_rate_schedule(config), momentum=0.9))
  before_groups = optax.multi_transform({"train": sgd, "frozen": optax.set_to_zero()},
                                        state.frozen_bn_labels).init(params)
  assert jax.tree.structure(opt_state) == jax.tree.structure(before_groups)
  plain = digits.get_config()
  assert not hasattr(state.make_optimizer(plain).init(_params(plain)), "inner_states")


def test_paper_configs_train_the_new_layers_at_ten_times_the_rate():
  """DeepLabv2's fine-tuning protocol: the randomly initialised ASPP head (and SETR's decoder)
  at 10x, every backbone or encoder parameter at the base rate."""
  for config in (city.get_config("cpu"), city_setr.get_config("cpu")):
    multipliers = config.optimizer.lr_multipliers
    for name in (config.model.name, config.model_b.name or config.model.name):
      for path, _ in _paths(_params(config, name)).items():
        text = "/".join(part.strip("[']") for part in path.split("]") if part)
        expected = 10.0 if text.startswith(("head/", "decode_", "classifier/")) else 1.0
        assert state.lr_multiplier_of(text, multipliers) == expected, (name, text)


@pytest.mark.parametrize("scaling, expected", [
    ("none", 1e-4), ("linear", 1e-4 * 16 / 4), ("sqrt", 1e-4 * 2.0)])
def test_lr_scaling_against_the_reference_batch(scaling, expected):
  """city.py's SGD (lr 1e-4 for the paper's batch 4) at 16 + 16 images: linear 4e-4, sqrt
  2e-4; the first SGD step moves a bias (no decay) by lr times its gradient."""
  config = city.get_config(f"cpu,model.frozen_bn=False,optimizer.lr_multipliers=(),"
                           f"labeled_batch_size=16,unlabeled_batch_size=16,"
                           f"optimizer.lr_scaling={scaling}")
  assert config.optimizer.reference_batch_size == 4
  assert state.scaled_learning_rate(config) == pytest.approx(expected, rel=1e-12)
  assert float(state.learning_rate_schedule(config)(0)) == pytest.approx(expected, rel=1e-6)
  params = {"bias": jnp.zeros((3,))}
  tx = state.make_optimizer(config)
  updates, _ = tx.update({"bias": jnp.ones((3,))}, tx.init(params), params)
  np.testing.assert_allclose(updates["bias"], -expected, rtol=1e-6)
