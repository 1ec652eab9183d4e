"""The train step's pieces against direct references: pseudo labels, EMA teachers, ramp-up."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rml_jax import augment, inference, prototypes, sharding, state, step
from rml_jax.program import Program
from tests.conftest import tiny_config


def test_pseudo_labels_threshold_the_teacher_confidence():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)) * 3, jnp.float32)
  probs, pseudo = step.pseudo_labels(logits, 0.8)
  expected_probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, expected_probs, rtol=1e-5)
  np.testing.assert_array_equal(pseudo.labels, expected_probs.argmax(-1))
  np.testing.assert_array_equal(pseudo.valid, expected_probs.max(-1) >= 0.8)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_label_interior_keeps_pixels_whose_window_holds_one_label(radius):
  rng = np.random.default_rng(radius)
  labels = rng.integers(0, 3, (2, 9, 11)).astype(np.int32)
  labels[0, :, :5] = 1  # a wide region: its inside survives any radius here
  got = np.asarray(step.label_interior(jnp.asarray(labels), radius))
  expected = np.zeros(labels.shape, bool)
  for n, i, j in np.ndindex(labels.shape):
    window = labels[n, max(i - radius, 0):i + radius + 1, max(j - radius, 0):j + radius + 1]
    expected[n, i, j] = (window == labels[n, i, j]).all()
  np.testing.assert_array_equal(got, expected)
  assert got[0, 4, 1] and (radius == 0 or not got.all())


def test_unsup_weight_ramp_and_ema_decay_warmup():
  steps = jnp.asarray([0, 50, 100, 200])
  np.testing.assert_allclose(step.unsup_weight_at(steps, 0.5, 100),
                             0.5 * np.exp(-5 * (1 - np.clip([0, 0.5, 1, 2], 0, 1)) ** 2),
                             rtol=1e-6)
  np.testing.assert_allclose(step.unsup_weight_at(steps, 0.5, 0), 0.5)
  # Ramp-down over the last 40 of 200 steps: exp(-12.5 p^2), p from 0 at step 160 to 1 at 200.
  late = jnp.asarray([0, 159, 160, 180, 199, 200])
  progress = np.clip((np.asarray([0, 159, 160, 180, 199, 200]) - 160) / 40, 0, 1)
  np.testing.assert_allclose(step.unsup_weight_at(late, 0.5, 0, 40, 200),
                             0.5 * np.exp(-12.5 * progress ** 2), rtol=1e-6)
  np.testing.assert_allclose(step.unsup_weight_at(late, 0.5, 100, 40, 200),
                             0.5 * np.exp(-5 * (1 - np.clip(np.asarray(late) / 100, 0, 1)) ** 2)
                             * np.exp(-12.5 * progress ** 2), rtol=1e-6)
  np.testing.assert_allclose(step.ema_decay_at(steps, 0.99),
                             np.minimum(0.99, (np.asarray([0, 50, 100, 200]) + 1) / (
                                 np.asarray([0, 50, 100, 200]) + 10)), rtol=1e-6)


def test_unsup_rampdown_is_a_fraction_of_each_stage():
  config = tiny_config("unused")
  config.total_steps, config.rml.stages, config.rml.unsup_rampdown = 100, 2, 0.25
  config.rml.unsup_rampup_steps = 0
  cfg = step.StepConfig.from_config(config, num_classes=11)
  weights = np.asarray(cfg.unsup_weight_at(jnp.asarray([0, 75, 90, 100])))
  expected = config.rml.unsup_weight * np.exp(-12.5 * np.asarray([0, 0, 0.6, 1.0]) ** 2)
  np.testing.assert_allclose(weights, expected, rtol=1e-6)


def _train_batch(size: int, views: int) -> dict:
  """2 labeled and 2 unlabeled random size x size images (`views` strong views each)."""
  rng = np.random.default_rng(0)
  return {"labeled": {"image": rng.integers(0, 255, (2, size, size, 3), dtype=np.uint8),
                      "label": rng.integers(0, 11, (2, size, size)).astype(np.int32)},
          "unlabeled": {"weak": rng.integers(0, 255, (2, size, size, 3), dtype=np.uint8),
                        "strong": rng.integers(0, 255, (2, views, size, size, 3),
                                               dtype=np.uint8),
                        "valid": np.ones((2, size, size), bool),
                        "label": np.full((2, size, size), 255, np.int32)}}


@pytest.mark.parametrize("bn_stats", ["joint", "labeled"])
def test_one_step_updates_students_and_moves_teachers_by_ema(data_dir, tmp_path, bn_stats):
  config = tiny_config(data_dir, f"rml.bn_stats={bn_stats},optimizer.warmup_steps=0")
  program = Program.create(config)
  # Two identical initial states: one is donated to the step, the other kept as the reference
  # (on CPU a donated buffer may be shared with host views of it).
  initial = program.fresh_state(jax.random.key(0))
  placed = program.fresh_state(jax.random.key(0))
  batch = _train_batch(64, views=2)  # digits: one strong view per student
  updated, metrics = program.train_fn(placed, sharding.to_global(batch, program.mesh))
  updated = jax.device_get(updated)
  assert int(updated.step) == 1
  decay = min(config.rml.ema_decay, 1 / 10)  # warm-up value at step 0
  for name in ("learner_a", "learner_b"):
    before, after = jax.device_get(getattr(initial, name)), getattr(updated, name)
    for teacher, old_teacher, student in zip(jax.tree.leaves(after.ema_params),
                                             jax.tree.leaves(before.ema_params),
                                             jax.tree.leaves(after.params)):
      np.testing.assert_allclose(teacher, decay * old_teacher + (1 - decay) * student,
                                 rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before.params),
                                                         jax.tree.leaves(after.params)))
  # Running BN statistics: with bn_stats='labeled' they are exactly those of a train-mode pass
  # over the labeled images alone; with 'joint' the strong views change them.
  before = jax.device_get(initial.learner_a)
  _, labeled_only = program.abstract_state.model_a.apply(
      {"params": before.params, "batch_stats": before.batch_stats},
      inference.normalize(jnp.asarray(batch["labeled"]["image"]), program.step_config.mean,
                          program.step_config.std), train=True,
      mutable=["batch_stats"])
  same = all(np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(
      jax.tree.leaves(labeled_only["batch_stats"]), jax.tree.leaves(updated.learner_a.batch_stats)))
  assert same == (bn_stats == "labeled")
  for key in ("loss_a", "loss_b", "sup_loss_a", "unsup_loss_a", "teacher_tv"):
    assert np.isfinite(float(metrics[key]))


@pytest.mark.parametrize("model_b", ["", "setr_naive_tiny", "dpt_dinov2_tiny"])
def test_initial_students_are_each_models_own_init(model_b):
  """Same-architecture students are initialised in one vmapped call: each must still equal its
  model's own init from its own key (and the two differ); a heterogeneous pair takes the plain
  path. Teachers start equal to their students."""
  config = tiny_config("/unused", f"model_b.name={model_b}" if model_b else "")
  init_fn = state.make_init_fn(config, 10)
  initial = jax.jit(init_fn)(jax.random.key(3))
  rng_a, rng_b, _ = jax.random.split(jax.random.key(3), 3)
  image = jnp.zeros((1, *config.data.crop_size, 3), jnp.float32)
  for learner, model, rng in ((initial.learner_a, initial.model_a, rng_a),
                              (initial.learner_b, initial.model_b, rng_b)):
    # jitted like the state's init (eager op-by-op evaluation rounds differently by an ulp)
    expected = jax.jit(lambda r, m=model: m.init({"params": r}, image, train=False))(rng)
    jax.tree.map(np.testing.assert_array_equal, learner.params, expected["params"])
    jax.tree.map(np.testing.assert_array_equal, learner.ema_params, expected["params"])
    jax.tree.map(np.testing.assert_array_equal, learner.batch_stats,
                 expected.get("batch_stats", {}))
  if not model_b:
    kernels = [(a, b) for a, b in zip(jax.tree.leaves(initial.learner_a.params),
                                      jax.tree.leaves(initial.learner_b.params)) if a.ndim == 4]
    assert kernels and all(not np.array_equal(a, b) for a, b in kernels)


def test_a_dinov2_student_beside_a_deeplabv2_one_learns_in_one_step(data_dir):
  """The DINOv2 + DPT student and a DeepLabv2 one (56 x 56 crops, multiples of 14): one RML step
  moves both students, each teacher by EMA, and the DINOv2 teacher's prototypes live in its own
  16-wide feature space."""
  config = tiny_config(data_dir, "model.name=dpt_dinov2_tiny,model_b.name=deeplabv2_tiny,"
                       "mode=rml,rml.rectify_start_step=0,optimizer.warmup_steps=0,"
                       "model.survival_prob=0.8,model.dropout_rate=0.5")
  config.data.crop_size = (56, 56)
  program = Program.create(config)
  initial = jax.device_get(program.fresh_state(jax.random.key(0)))
  placed = program.fresh_state(jax.random.key(0))
  batch = _train_batch(56, views=2)
  updated, metrics = program.train_fn(placed, sharding.to_global(batch, program.mesh))
  updated = jax.device_get(updated)
  decay = min(config.rml.ema_decay, 1 / 10)
  for name in ("learner_a", "learner_b"):
    before, after = getattr(initial, name), getattr(updated, name)
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before.params),
                                                       jax.tree.leaves(after.params))]
    assert sum(moved) > len(moved) // 2, name
    for teacher, old, student in zip(jax.tree.leaves(after.ema_params),
                                     jax.tree.leaves(before.ema_params),
                                     jax.tree.leaves(after.params)):
      np.testing.assert_allclose(teacher, decay * old + (1 - decay) * student, rtol=1e-5,
                                 atol=1e-6)
  assert "encoder" in updated.learner_a.params and "backbone" in updated.learner_b.params
  assert updated.learner_a.prototypes.shape == (11, 16)  # the DPT features' width
  for key in ("loss_a", "loss_b", "unsup_loss_a", "teacher_tv"):
    assert np.isfinite(float(metrics[key])), key


def _unlabeled_batch(views: int) -> dict:
  rng = np.random.default_rng(5)
  return {"weak": rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
          "strong": rng.integers(0, 255, (2, views, 64, 64, 3), dtype=np.uint8),
          "valid": np.ones((2, 64, 64), bool),
          "label": np.full((2, 64, 64), 255, np.int32)}


@pytest.mark.parametrize("views, soft", [("per_student", False), ("shared", False),
                                         ("per_student", True)])
def test_each_student_learns_from_its_own_strong_view_and_cutmix_box(data_dir, views, soft):
  """Per student: its view, and the labels and masks of both teachers it learns from (with
  rml.soft_targets their distributions too), are mixed with its own box (numpy mixing as the
  reference); shared: one view and box for both."""
  config = tiny_config(data_dir, f"mode=iml,augment.strong_views={views},"
                       f"augment.cutmix_prob=1.0,rml.threshold=0.5,rml.soft_targets={soft}")
  program = Program.create(config)
  cfg = program.step_config
  train_state = program.fresh_state(jax.random.key(0))
  unlabeled = _unlabeled_batch(2 if views == "per_student" else 1)
  rng = jax.random.key(9)
  _, mixed_views, targets, _ = step.unlabeled_targets(
      train_state, jax.tree.map(jnp.asarray, unlabeled), rng, jnp.asarray(0), cfg)
  weak = inference.normalize(jnp.asarray(unlabeled["weak"]), cfg.mean, cfg.std)
  sources = [step.pseudo_labels(o["logits"], cfg.rml.threshold)
             for o in step.source_outputs(train_state, weak, step.MODES["iml"], cfg)]
  strong = np.asarray(inference.normalize(jnp.asarray(unlabeled["strong"]), cfg.mean, cfg.std))

  def mixed(box, array):
    box = box.reshape(box.shape + (1,) * (array.ndim - 3))
    return np.where(box, np.roll(array, -1, axis=0), array)

  boxes = []
  for student in range(2):
    view = student if views == "per_student" else 0
    box = np.asarray(augment.cutmix_box_masks(
        jax.random.fold_in(rng, view) if views == "per_student" else rng, 2, 64, 64, 1.0,
        cfg.augment.cutmix_area))
    boxes.append(box)
    np.testing.assert_allclose(mixed_views[student], mixed(box, strong[:, view]), rtol=1e-6)
    for (probs, source), target in zip(sources, targets[student]):  # iml: both teach each
      np.testing.assert_array_equal(target.labels, mixed(box, np.asarray(source.labels)))
      np.testing.assert_array_equal(target.valid, mixed(box, np.asarray(source.valid)))
      if soft:
        np.testing.assert_allclose(target.distribution, mixed(box, np.asarray(probs)),
                                   rtol=1e-6)
      else:
        assert target.distribution is None
  if views == "per_student":
    assert not np.array_equal(boxes[0], boxes[1])
    assert not np.allclose(mixed_views[0], mixed_views[1])
  else:
    np.testing.assert_array_equal(mixed_views[0], mixed_views[1])


def test_stage_two_assigns_prototype_classes_by_the_current_teacher(data_dir):
  """Eq. 10 in a later stage: the stored p^0 decides the pseudo labels, but each prototype
  update assigns pixels by the current mean teacher's argmax, not by p^0's."""
  config = tiny_config(data_dir, "mode=rml,rml.stages=2,rml.rectify_start_step=0,"
                       "rml.prototypes_from_labeled=False,rml.prototype_momentum=0.5")
  program = Program.create(config)
  cfg = dataclasses.replace(program.step_config, stored_labels=True)
  train_state = program.fresh_state(jax.random.key(0))
  unlabeled = _unlabeled_batch(2)
  k = cfg.rml.soft_label_top_k
  # p^0: class 7 everywhere with probability 1 for both teachers (the rest of the top k: 0).
  stored_classes = np.zeros((2, 64, 64, 2 * k), np.uint8)
  stored_classes[..., 0] = stored_classes[..., k] = 7
  stored_probs = np.zeros((2, 64, 64, 2 * k), np.uint8)
  stored_probs[..., 0] = stored_probs[..., k] = 255
  unlabeled.update(soft_classes=stored_classes, soft_probs=stored_probs)
  batch = jax.tree.map(jnp.asarray, unlabeled)
  learners, _, _, _ = step.unlabeled_targets(train_state, batch, jax.random.key(9),
                                             jnp.asarray(0), cfg)
  weak = inference.normalize(batch["weak"], cfg.mean, cfg.std)
  outputs = step.source_outputs(train_state, weak, step.MODES["rml"], cfg)
  for learner, before, output in zip(learners, (train_state.learner_a, train_state.learner_b),
                                     outputs):
    features = output["features"]
    _, h, w, _ = features.shape
    probs = jax.nn.softmax(output["logits"], axis=-1)
    by_teacher = step.teacher_assignment(probs, batch["valid"], h, w)
    assert not np.all(np.asarray(by_teacher) == 7)  # the teacher does not say 7 everywhere
    expected = prototypes.update_prototypes(before.prototypes, features, by_teacher,
                                            cfg.rml.prototype_momentum, seen=before.prototypes_seen)
    by_stored = jnp.full_like(by_teacher, 7)
    wrong = prototypes.update_prototypes(before.prototypes, features, by_stored,
                                         cfg.rml.prototype_momentum, seen=before.prototypes_seen)
    np.testing.assert_allclose(learner.prototypes, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(learner.prototypes, wrong, rtol=1e-5, atol=1e-6)


def test_rectification_leaves_a_class_without_prototype_at_its_p0_label(data_dir):
  """Eqs. 9 and 6 with one class unseen: the softmax runs over the seen classes (numpy
  reference), a pixel whose p^0 label is the unseen class keeps p^0's label and confidence,
  and the rectified-class count says how many classes took part."""
  config = tiny_config(data_dir, "mode=rml,rml.rectify_start_step=0")
  program = Program.create(config)
  cfg = program.step_config
  train_state = program.fresh_state(jax.random.key(0))
  rng = np.random.default_rng(3)
  k, channels = train_state.learner_a.prototypes.shape
  unseen = 2
  seen = np.ones(k, bool)
  seen[unseen] = False
  learner = train_state.learner_a.replace(
      prototypes=jnp.asarray(rng.normal(size=(k, channels)), jnp.float32),
      prototypes_seen=jnp.asarray(seen))
  logits = rng.normal(size=(1, 8, 8, k))
  logits[0, :3, :, unseen] += 6.0  # the first rows' p^0 label is the unseen class
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
  features = rng.normal(size=(1, 8, 8, channels)).astype(np.float32)
  candidates, metrics = step.self_rectify(learner, jnp.asarray(probs), jnp.asarray(features),
                                          jnp.ones((1, 8, 8), bool), jnp.asarray(0), cfg)
  labels, confidence = np.asarray(candidates.labels), np.asarray(candidates.confidence)
  protos = np.asarray(learner.prototypes)
  for idx in np.ndindex(1, 8, 8):
    p = probs[idx]
    if p.argmax() == unseen:
      assert labels[idx] == unseen and confidence[idx] == pytest.approx(p.max())
      continue
    distance = np.linalg.norm(features[idx] - protos, axis=-1)
    omega = np.where(seen, np.exp(-(distance - distance[seen].min())), 0.0)
    omega /= omega.sum()
    weighted = omega * p
    assert labels[idx] == weighted.argmax() and labels[idx] != unseen
    assert confidence[idx] == pytest.approx(weighted.max() / weighted.sum(), rel=1e-4)
  assert (labels[0, :3] == unseen).all()
  assert float(metrics["rectified_classes"]) == k - 1
  soft_rml = ml_collections.ConfigDict(cfg.rml)
  soft_rml.soft_targets = True
  soft_cfg = dataclasses.replace(cfg, rml=ml_collections.FrozenConfigDict(soft_rml))
  soft, _ = step.self_rectify(learner, jnp.asarray(probs), jnp.asarray(features),
                              jnp.ones((1, 8, 8), bool), jnp.asarray(0), soft_cfg)
  distribution = np.asarray(soft.distribution)
  np.testing.assert_array_equal(distribution.argmax(-1), labels)  # the labels' distribution
  np.testing.assert_allclose(distribution.max(-1), confidence, rtol=1e-5)
  np.testing.assert_allclose(distribution[0, :3], probs[0, :3], rtol=1e-6)  # unseen: p^0
  assert float(metrics["omega_entropy"]) > 0
