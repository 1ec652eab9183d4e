"""The ablation ladder: who teaches whom in each mode, self-rectification in the step, and the
divergence guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rml_jax import inference, sharding, train
from rml_jax.errors import UserError
from rml_jax.program import Program
from tests.conftest import tiny_config


def _batch(seed: int = 0, size: int = 64) -> dict:
  """Two labeled and two unlabeled images; one strong view per student (digits default)."""
  rng = np.random.default_rng(seed)
  return {"labeled": {"image": rng.integers(0, 255, (2, size, size, 3), dtype=np.uint8),
                      "label": rng.integers(0, 11, (2, size, size)).astype(np.int32)},
          "unlabeled": {"weak": rng.integers(0, 255, (2, size, size, 3), dtype=np.uint8),
                        "strong": rng.integers(0, 255, (2, 2, size, size, 3), dtype=np.uint8),
                        "valid": np.ones((2, size, size), bool),
                        "label": rng.integers(0, 11, (2, size, size)).astype(np.int32)}}


def _program(data_dir, mode: str, extra: str = ""):
  # threshold 0: every pseudo label counts, so any change of a teacher changes the loss; rml
  # moves its prototypes from the first step.
  config = tiny_config(data_dir, f"mode={mode},rml.threshold=0.0,optimizer.warmup_steps=0,"
                       "rml.rectify_start_step=0" + extra)
  return Program.create(config)


def _state_with(program, swap: str | None):
  """A fresh state from key 0; `swap` names a part of learner b taken from a key-1 state."""
  base = program.fresh_state(jax.random.key(0))
  if swap is None:
    return base
  other = program.fresh_state(jax.random.key(1))
  if swap == "all":
    return base.replace(learner_b=other.learner_b)
  return base.replace(learner_b=base.learner_b.replace(**{swap: getattr(other.learner_b, swap)}))


def _student_a_after_step(program, swap):
  new_state, _ = program.train_fn(_state_with(program, swap),
                                  sharding.to_global(_batch(), program.mesh))
  return jax.device_get(new_state.learner_a.params)


def _same(x, y) -> bool:
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


@pytest.mark.parametrize("mode,depends_on,ignores", [
    ("mean_teacher", [], ["all"]),  # taught by its own teacher only
    ("direct", ["params"], ["ema_params"]),  # eq. 3: the other *student* teaches
    ("iml", ["ema_params"], ["params"]),  # eqs. 4-5: the other *mean teacher* teaches
])
def test_who_teaches_student_a(data_dir, tmp_path, mode, depends_on, ignores):
  program = _program(data_dir, mode)
  reference = _student_a_after_step(program, None)
  for part in depends_on:
    assert not _same(reference, _student_a_after_step(program, part)), f"{mode}: {part} ignored"
  for part in ignores:
    assert _same(reference, _student_a_after_step(program, part)), f"{mode}: {part} used"


@pytest.mark.parametrize("from_labeled", [True, False])
def test_rml_step_initialises_prototypes_from_teacher_class_means(data_dir, from_labeled):
  """Without exact prototypes yet, the first online update (eq. 11) starts each class at the
  mean teacher feature of the pixels its argmax assigns (eq. 10 on the batch): over the
  labeled and the weak unlabeled images, or the unlabeled ones alone."""
  program = _program(data_dir, "rml", f",rml.prototypes_from_labeled={from_labeled}")
  initial = jax.device_get(_state_with(program, None))
  new_state, metrics = program.train_fn(_state_with(program, None),
                                        sharding.to_global(_batch(), program.mesh))
  new_state = jax.device_get(new_state)
  cfg = program.step_config
  images = [_batch()["unlabeled"]["weak"]]
  if from_labeled:
    images.insert(0, _batch()["labeled"]["image"])
  weak = inference.normalize(jnp.asarray(np.concatenate(images)), cfg.mean, cfg.std)
  for name, model in (("learner_a", program.abstract_state.model_a),
                      ("learner_b", program.abstract_state.model_b)):
    out = jax.device_get(inference.apply_eval(model, getattr(initial, name).teacher, weak))
    features = np.asarray(out["features"], np.float64)  # [N, h, w, C]
    n, h, w, c = features.shape
    probs = np.asarray(jax.nn.softmax(out["logits"], -1), np.float64)  # [N, H, W, K]
    factor = probs.shape[1] // h
    # Reference: average each factor x factor block of probabilities, argmax, class means.
    small = probs.reshape(n, h, factor, w, factor, -1).mean(axis=(2, 4)).argmax(-1)
    learner = getattr(new_state, name)
    present = np.unique(small)
    np.testing.assert_array_equal(np.flatnonzero(learner.prototypes_seen), present)
    for k in present:
      np.testing.assert_allclose(learner.prototypes[k], features[small == k].mean(0),
                                 rtol=1e-4, atol=1e-5)
    absent = np.setdiff1d(np.arange(program.num_classes), present)
    np.testing.assert_array_equal(learner.prototypes[absent], 0.0)
  # Rectification takes part with the classes that have a prototype; raw and final accuracy
  # both logged.
  assert float(metrics["rectified_classes_a"]) == np.sum(new_state.learner_a.prototypes_seen)
  for key in ("pl_counted_raw_a", "pl_counted_a", "confident_ratio_a", "omega_entropy_a",
              "confident_ratio_rectified_a"):
    assert np.isfinite(float(metrics[key]))


@pytest.mark.parametrize("mode", ["iml", "rml"])
def test_non_finite_update_is_skipped_and_counted(data_dir, mode):
  """The whole learner stays bitwise as it was, in rml its prototypes too (they are updated
  from the finite teacher before the student's update is found non-finite)."""
  program = _program(data_dir, mode)
  poisoned = _state_with(program, None)
  leaves, treedef = jax.tree.flatten(poisoned.learner_a.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
  poisoned = poisoned.replace(learner_a=poisoned.learner_a.replace(
      params=jax.tree.unflatten(treedef, leaves)))
  before = jax.device_get(poisoned.learner_a)
  new_state, metrics = program.train_fn(poisoned, sharding.to_global(_batch(), program.mesh))
  assert float(metrics["skipped_a"]) == 1.0
  after = jax.device_get(new_state.learner_a)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)  # NaN compares equal to NaN here
  assert int(new_state.step) == 1


def test_training_that_keeps_diverging_stops_with_one_clear_error(data_dir, tmp_path):
  config = tiny_config(data_dir, "optimizer.learning_rate=1e30,max_skipped_steps=2")
  # Step 1 is finite (huge weights); from step 2 every forward pass overflows and is skipped.
  with pytest.raises(UserError, match=r"training diverged: \d+ steps in a row .*\(up to step 4\)"
                     r".*checkpoint \(step 2\) is kept"):
    train.train_and_evaluate(config, str(tmp_path / "diverge"))
  assert (tmp_path / "diverge" / "checkpoints" / "2").is_dir()


def test_heterogeneous_pair_deeplab_and_setr_trains(data_dir, tmp_path):
  config = tiny_config(data_dir, "mode=iml,model_b.name=setr_naive_tiny,"
                       "optimizer.warmup_steps=0")
  program = Program.create(config)
  assert type(program.abstract_state.model_b).__name__ == "SETR"
  assert "encoder" in program.abstract_state.learner_b.params  # a ViT, not a ResNet
  initial = jax.device_get(program.initial_state())
  new_state, metrics = program.train_fn(program.initial_state(),
                                        sharding.to_global(_batch(), program.mesh))
  assert np.isfinite(float(metrics["loss_b"])) and float(metrics["skipped_b"]) == 0.0
  after = jax.device_get(new_state.learner_b.params)
  assert not _same(after["encoder"], initial.learner_b.params["encoder"])
  # SETR's features are the decoder's input of its classifier: prototypes have that width.
  assert new_state.learner_b.prototypes.shape == (program.num_classes, 64)


def test_bfloat16_compute_keeps_float32_weights_and_tracks_float32(data_dir, tmp_path):
  results = {}
  for dtype in ("float32", "bfloat16"):
    program = _program(data_dir, "iml", f",dtype={dtype}")
    new_state, metrics = program.train_fn(_state_with(program, None),
                                          sharding.to_global(_batch(), program.mesh))
    leaves = jax.tree.leaves(jax.device_get(new_state.learner_a.params))
    assert all(leaf.dtype == np.float32 for leaf in leaves)  # float32 params and updates
    results[dtype] = float(metrics["sup_loss_a"])
  # Same initial weights, so the first loss differs only by bfloat16 rounding.
  assert results["bfloat16"] == pytest.approx(results["float32"], rel=2e-2)
  assert results["bfloat16"] != results["float32"]  # the compute really ran in bfloat16


def test_city_setr_pair_trains_the_setr_decoder_statistics_and_keeps_the_resnets_frozen():
  """configs/city_setr.py freezes the pretrained ResNet's batch-norm statistics
  (model.frozen_bn); the SETR decoder's batch norm is freshly initialised and must train."""
  from configs import city_setr

  program = Program.create(city_setr.get_config("cpu"))  # tiny DeepLabv2 + tiny SETR
  assert type(program.abstract_state.model_b).__name__ == "SETR"
  rng = np.random.default_rng(0)
  h, w = program.config.data.crop_size
  image = lambda: rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8)  # noqa: E731
  batch = {"labeled": {"image": image(), "label": rng.integers(0, 19, (2, h, w)).astype(np.int32)},
           "unlabeled": {"weak": image(), "strong": np.stack([image(), image()], 1),
                         "valid": np.ones((2, h, w), bool),
                         "label": np.full((2, h, w), 255, np.int32)}}
  before = jax.device_get(program.fresh_state(jax.random.key(0)))
  after, _ = program.train_fn(program.fresh_state(jax.random.key(0)),
                              sharding.to_global(batch, program.mesh))
  after = jax.device_get(after)
  for old, new in zip(jax.tree.leaves(before.learner_a.batch_stats),
                      jax.tree.leaves(after.learner_a.batch_stats)):
    np.testing.assert_array_equal(old, new)  # the frozen ResNet
  setr_old = before.learner_b.batch_stats["decode_bn"]
  setr_new = after.learner_b.batch_stats["decode_bn"]
  assert not np.allclose(setr_old["mean"], setr_new["mean"])
  assert not np.allclose(setr_old["var"], setr_new["var"])
