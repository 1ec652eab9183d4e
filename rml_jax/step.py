"""train_step / eval_step / predict_step: pure functions of (state, batch), jitted once each.

One train step (docs/design.md): the pseudo-label sources of the mode label the weak unlabeled
view -> thresholded (optionally self-rectified) pseudo labels -> CutMix on each student's strong
view (its own box; the labels and masks it learns from mixed with the same box) -> each student
on the labeled images and its strong view -> optimizer updates and EMA teachers, all in one
jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from rml_jax import augment, inference, losses, sharding, soft_labels
from rml_jax import metrics as metrics_lib
from rml_jax import prototypes as prototypes_lib
from rml_jax.constants import IGNORE_LABEL
from rml_jax.state import Learner, RMLState


@dataclasses.dataclass(frozen=True)
class Mode:
  """One rung of the paper's ladder, as data.

  source: whose predictions on the weak view become pseudo labels: each learner's mean
    "teacher" (eq. 4) or its current "student" (eq. 3).
  rectify: the pseudo labels are self-rectified with the teachers' prototypes (eq. 6).
  routes: per student (a, b), the two pseudo-label sets its unlabeled loss sums (0 = those of
    learner a's source, 1 = learner b's); () when the unlabeled images are not used.
  """

  source: str
  rectify: bool
  routes: tuple[tuple[int, int], ...]

  @property
  def unlabeled(self) -> bool:
    return bool(self.routes)


MODES: dict[str, Mode] = {
    "supervised": Mode("teacher", False, ()),
    "mean_teacher": Mode("teacher", False, ((0, 0), (1, 1))),  # each its own teacher
    "direct": Mode("student", False, ((1, 1), (0, 0))),  # eq. 3: the other student
    "iml": Mode("teacher", False, ((0, 1), (0, 1))),  # eqs. 4-5: both mean teachers
    "rml": Mode("teacher", True, ((0, 1), (0, 1))),  # eq. 6: iml with rectified labels
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyperparameters of a step (hashable: part of the jit cache key)."""

  mode: str
  num_classes: int
  threshold: float
  unsup_weight: float
  unsup_rampup_steps: int
  ema_decay: float
  bn_stats: str
  per_student_views: bool  # each student its own strong view and CutMix box (else shared)
  cutmix_prob: float
  cutmix_area: tuple[float, float]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  prototype_momentum: float
  prototype_temperature: float
  rectify_start_step: int
  prototypes_from_labeled: bool  # eq. 11 also averages the labeled images' teacher features
  stage_steps: int  # steps per stage (schedules restart each stage); 0 = a single stage
  stored_labels: bool  # a later stage: p^0 is the previous stage's stored soft label
  soft_label_top_k: int
  evaluation: inference.Protocol  # eval, predict and stored soft labels

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "StepConfig":
    """The step's settings from a config that schema.validate accepted."""
    rml, evaluation = config.rml, config.eval
    return cls(mode=rml.mode, num_classes=num_classes, threshold=rml.threshold,
               unsup_weight=rml.unsup_weight,
               unsup_rampup_steps=rml.unsup_rampup_steps, ema_decay=rml.ema_decay,
               bn_stats=rml.bn_stats,
               per_student_views=config.augment.strong_views == "per_student",
               cutmix_prob=config.augment.cutmix_prob,
               cutmix_area=tuple(config.augment.cutmix_area),
               mean=tuple(config.data.mean), std=tuple(config.data.std),
               prototype_momentum=rml.prototype_momentum,
               prototype_temperature=rml.prototype_temperature,
               rectify_start_step=rml.rectify_start_step,
               prototypes_from_labeled=rml.prototypes_from_labeled,
               stage_steps=config.total_steps if rml.stages > 1 else 0,
               stored_labels=False,
               soft_label_top_k=rml.soft_label_top_k,
               evaluation=inference.Protocol(
                   name=evaluation.protocol,
                   window=tuple(evaluation.window or config.data.crop_size),
                   stride=float(evaluation.stride), flip=bool(evaluation.flip)))


@struct.dataclass
class PseudoLabels:
  """One source's hard pseudo labels: labels [N, H, W] int32, valid [N, H, W] bool (confident
  and inside the image: the pixels that enter eq. 2)."""

  labels: jax.Array
  valid: jax.Array


# ---------------------------------------------------------------------------------------------
# The paper's equations, one function each.
# ---------------------------------------------------------------------------------------------


def pseudo_labels(logits: jax.Array, threshold: float) -> tuple[jax.Array, PseudoLabels]:
  """Eqs. 2 / 4: logits [N, H, W, K] -> (probs [N, H, W, K], labels = argmax with
  valid = max prob >= threshold)."""
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, PseudoLabels(jnp.argmax(probs, -1).astype(jnp.int32),
                             jnp.max(probs, -1) >= threshold)


def ema_update(teacher: Any, student: Any, decay: jax.Array) -> Any:
  """Eq. 4's mean teacher: theta' <- decay * theta' + (1 - decay) * theta, leaf by leaf."""
  return jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, teacher, student)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """Mean-teacher EMA decay with warm-up: min(decay, (t + 1) / (t + 10))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (step + 1.0) / (step + 10.0))


def unsup_weight_at(step: jax.Array, weight: float, rampup_steps: int) -> jax.Array:
  """Sigmoid-shaped ramp-up of the unsupervised weight: weight * exp(-5 (1 - t / T)^2), t < T."""
  if rampup_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  progress = jnp.clip(step.astype(jnp.float32) / rampup_steps, 0.0, 1.0)
  return weight * jnp.exp(-5.0 * (1.0 - progress) ** 2)


def teacher_assignment(probs: jax.Array, in_image: jax.Array, height: int, width: int
                       ) -> jax.Array:
  """Eq. 10's class assignment at the feature resolution: probs [N, H, W, K] of the current
  teacher, in_image [N, H, W] bool -> labels [N, height, width] int32, the argmax of the
  area-averaged probabilities (as ProDA), -1 where a cell is mostly outside the image."""
  small_probs = prototypes_lib.resize_to(probs, height, width)
  small_in_image = prototypes_lib.resize_to(in_image[..., None].astype(jnp.float32), height,
                                            width)
  return jnp.where(small_in_image[..., 0] > 0.5, jnp.argmax(small_probs, -1), -1
                   ).astype(jnp.int32)


def online_prototypes(learner: Learner, features: jax.Array, labels: jax.Array,
                      step: jax.Array, cfg: StepConfig) -> Learner:
  """Eq. 11 for one teacher from step cfg.rectify_start_step on (the train loop computes the
  exact eq. 10 prototypes at that step; before it the prototypes are not used).

  features: [N, h, w, C] the teacher's features; labels: [N, h, w] int32 its argmax
  (teacher_assignment; -1 = none). A class without a prototype yet starts at its batch mean.
  """
  seen = learner.prototypes_seen
  moved = prototypes_lib.update_prototypes(learner.prototypes, features, labels,
                                           cfg.prototype_momentum, seen=seen)
  moved_seen = seen | prototypes_lib.classes_present(labels, cfg.num_classes)
  started = step >= cfg.rectify_start_step
  return learner.replace(prototypes=jnp.where(started, moved, learner.prototypes),
                         prototypes_seen=jnp.where(started, moved_seen, seen))


def self_rectify(learner: Learner, probs: jax.Array, features: jax.Array, step: jax.Array,
                 cfg: StepConfig) -> tuple[PseudoLabels, jax.Array]:
  """Section 4.2 for one teacher: class confidence (eq. 9) and the rectified labels (eq. 6).

  Args:
    learner: holds the teacher's prototypes [K, C] and prototypes_seen [K].
    probs: [N, H, W, K] the soft labels p^0; features: [N, h, w, C] the teacher's features.
    step: scalar int; rectification is applied from cfg.rectify_start_step on, once every class
      has a prototype (before that the labels are p^0's argmax).
  Returns:
    (pseudo labels whose `valid` thresholds the rectified confidence (not yet masked to the
     image), applied: scalar bool).
  """
  _, height, width, _ = probs.shape
  confidence = prototypes_lib.class_confidence(features, learner.prototypes,
                                               cfg.prototype_temperature)
  confidence = prototypes_lib.resize_to(confidence, height, width)  # K channels only
  rectified, rectified_confidence = prototypes_lib.rectify(probs, confidence)
  applied = jnp.all(learner.prototypes_seen) & (step >= cfg.rectify_start_step)
  labels = jnp.where(applied, rectified, jnp.argmax(probs, -1).astype(jnp.int32))
  label_confidence = jnp.where(applied, rectified_confidence, jnp.max(probs, -1))
  return PseudoLabels(labels, label_confidence >= cfg.threshold), applied


# ---------------------------------------------------------------------------------------------
# The unlabeled branch: pseudo labels for both students.
# ---------------------------------------------------------------------------------------------


def _pseudo_label_metrics(name: str, pseudo: PseudoLabels, gt: jax.Array, in_image: jax.Array,
                          num_classes: int) -> dict[str, jax.Array]:
  """Sums for pseudo-label accuracy (all in-image pixels and confident ones), the confident
  ratio, and per-class sums `plk_<sum>_<name>` [K] (metrics.pseudo_label_class_counts)."""
  out = {f"plk_{k}_{name}": v for k, v in metrics_lib.pseudo_label_class_counts(
      pseudo.labels, pseudo.valid, gt, in_image, num_classes).items()}
  out[f"pl_correct_{name}"], out[f"pl_counted_{name}"] = metrics_lib.pseudo_label_accuracy(
      pseudo.labels, gt, in_image)
  out[f"plc_correct_{name}"], out[f"plc_counted_{name}"] = metrics_lib.pseudo_label_accuracy(
      pseudo.labels, gt, pseudo.valid)
  out[f"confident_ratio_{name}"] = jnp.sum(pseudo.valid) / jnp.maximum(jnp.sum(in_image), 1)
  return out


def source_outputs(state: RMLState, weak: jax.Array, mode: Mode) -> tuple[dict, dict]:
  """The mode's two pseudo-label sources in eval mode on normalised images [N, H, W, 3]:
  ({'logits', 'features'} of learner a's, of learner b's)."""
  pick = (lambda learner: learner.teacher) if mode.source == "teacher" else (
      lambda learner: learner.student)
  return (inference.apply_eval(state.model_a, pick(state.learner_a), weak),
          inference.apply_eval(state.model_b, pick(state.learner_b), weak))


def _split_batch(output: dict[str, jax.Array], first: int) -> tuple[dict, dict]:
  """A source's outputs on concat(labeled, unlabeled) -> (labeled part, unlabeled part)."""
  return ({k: v[:first] for k, v in output.items()}, {k: v[first:] for k, v in output.items()})


def unlabeled_targets(state: RMLState, unlabeled: dict[str, jax.Array], rng: jax.Array,
                      step: jax.Array, cfg: StepConfig, metrics: dict[str, jax.Array],
                      labeled_weak: jax.Array | None = None,
                      labeled_known: jax.Array | None = None
                      ) -> tuple[tuple[Learner, Learner], tuple[jax.Array, jax.Array],
                                 tuple[tuple[PseudoLabels, ...], ...]]:
  """Both sources' pseudo labels on the unlabeled batch, and CutMix applied to each student's
  strong view and to the labels it learns from. Adds the pseudo-label metrics to `metrics`.

  labeled_weak: the normalised labeled images [Nl, H, W, 3]; with cfg.prototypes_from_labeled
  their teacher features join the prototype update (eq. 10 runs over D_l and D_u), where
  labeled_known [Nl, H, W] bool (default everywhere) marks pixels that are not crop padding.
  Returns ((learner a, learner b) with updated prototypes, per student its mixed normalised
  strong view [N, H, W, 3], per student the mixed PseudoLabels of its mode.routes).
  """
  mode = MODES[cfg.mode]
  learners = (state.learner_a, state.learner_b)
  weak = inference.normalize(unlabeled["weak"], cfg.mean, cfg.std)
  strong = inference.normalize(unlabeled["strong"], cfg.mean, cfg.std)  # [N, V, H, W, 3]
  in_image, gt = unlabeled["valid"], unlabeled["label"]
  with_labeled = mode.rectify and cfg.prototypes_from_labeled and labeled_weak is not None
  num_labeled = labeled_weak.shape[0] if with_labeled else 0
  outputs = source_outputs(state, jnp.concatenate([labeled_weak, weak]) if with_labeled
                           else weak, mode)
  if with_labeled:
    labeled_outputs, outputs = zip(*(_split_batch(o, num_labeled) for o in outputs))
  (probs_a, pseudo_a), (probs_b, pseudo_b) = (pseudo_labels(o["logits"], cfg.threshold)
                                              for o in outputs)
  metrics["teacher_tv"] = metrics_lib.total_variation(probs_a, probs_b)  # coupling (Fig. 2)
  metrics["teacher_disagreement"] = jnp.sum(
      (pseudo_a.labels != pseudo_b.labels) & in_image) / jnp.maximum(jnp.sum(in_image), 1)
  teacher_probs = (probs_a, probs_b)
  probs = [probs_a, probs_b]
  pseudo = [pseudo_a, pseudo_b]
  if cfg.stored_labels:  # p^0 = the previous stage's teachers' soft labels, stored offline
    k = cfg.soft_label_top_k
    for i, part in enumerate((slice(None, k), slice(k, None))):
      probs[i] = soft_labels.decode(unlabeled["soft_classes"][..., part],
                                    unlabeled["soft_probs"][..., part], cfg.num_classes)
      pseudo[i] = PseudoLabels(jnp.argmax(probs[i], -1).astype(jnp.int32),
                               jnp.max(probs[i], -1) >= cfg.threshold)
  if mode.rectify:
    for name, p in zip(("raw_a", "raw_b"), pseudo):
      metrics.update(_pseudo_label_metrics(name, p.replace(valid=p.valid & in_image), gt,
                                           in_image, cfg.num_classes))
    updated = []
    for i, learner in enumerate(learners):
      features = outputs[i]["features"]
      _, h, w, _ = features.shape
      labels = teacher_assignment(teacher_probs[i], in_image, h, w)  # eq. 10: current teacher
      if with_labeled:
        labeled_probs = jax.nn.softmax(labeled_outputs[i]["logits"], axis=-1)
        known = (jnp.ones(labeled_probs.shape[:3], bool) if labeled_known is None
                 else labeled_known)
        features = jnp.concatenate([labeled_outputs[i]["features"], features])
        labels = jnp.concatenate([teacher_assignment(labeled_probs, known, h, w), labels])
      updated.append(online_prototypes(learner, features, labels, step, cfg))
    learners = tuple(updated)
    rectified = [self_rectify(learner, probs[i], outputs[i]["features"], step, cfg)
                 for i, learner in enumerate(learners)]
    pseudo = [r[0] for r in rectified]
    metrics["rectified"] = rectified[0][1].astype(jnp.float32)
  pseudo = [p.replace(valid=p.valid & in_image) for p in pseudo]
  for name, p in zip(("a", "b"), pseudo):
    metrics.update(_pseudo_label_metrics(name, p, gt, in_image, cfg.num_classes))
  # CutMix on device, one box per sample: a student's strong view and the labels and masks it
  # learns from are mixed with the same box; with per-student views each student has its own.
  n, h, w = pseudo[0].labels.shape
  arrays = [a for p in pseudo for a in (p.labels, p.valid)]
  mixed_views = []
  for view in range(strong.shape[1]):
    view_rng = jax.random.fold_in(rng, view) if cfg.per_student_views else rng
    box = augment.cutmix_box_masks(view_rng, n, h, w, cfg.cutmix_prob, cfg.cutmix_area)
    image, labels_a, valid_a, labels_b, valid_b = augment.cutmix(box, strong[:, view], *arrays)
    mixed_views.append((image, (PseudoLabels(labels_a, valid_a), PseudoLabels(labels_b, valid_b))))
  views, targets = [], []
  for student, route in enumerate(mode.routes):
    image, mixed = mixed_views[student if cfg.per_student_views else 0]
    views.append(image)
    targets.append(tuple(mixed[source] for source in route))
  return learners, tuple(views), tuple(targets)


# ---------------------------------------------------------------------------------------------
# One student's update.
# ---------------------------------------------------------------------------------------------

LossFn = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def student_loss_fn(labels: jax.Array, targets: tuple[PseudoLabels, ...],
                    unsup_weight: jax.Array) -> LossFn:
  """The loss of one student given its logits [Nl + Nu, H, W, K] (labeled first):
  eq. 1 on the labeled images plus unsup_weight times its two eq. 2 terms of eq. 5 (none when
  `targets` is empty). labels: [Nl, H, W] int32. Returns (loss, {'sup_loss', 'unsup_loss'})."""
  num_labeled = labels.shape[0]

  def loss_fn(logits: jax.Array):
    sup = losses.cross_entropy(logits[:num_labeled], labels, IGNORE_LABEL)  # eq. 1
    if not targets:
      return sup, {"sup_loss": sup}
    first, second = targets  # eq. 5: both terms share one weight on every rung
    unlabeled = logits[num_labeled:]
    unsup = (losses.pseudo_label_loss(unlabeled, first.labels, first.valid)
             + losses.pseudo_label_loss(unlabeled, second.labels, second.valid))
    return sup + unsup_weight * unsup, {"sup_loss": sup, "unsup_loss": unsup}

  return loss_fn


def student_logits(model: nn.Module, params: Any, batch_stats: Any,
                   inputs: jax.Array | tuple[jax.Array, jax.Array], rng: jax.Array
                   ) -> tuple[jax.Array, Any]:
  """The student in train mode (dropout, stochastic depth, batch statistics).

  inputs: one array [N, H, W, 3], or (labeled, strong) for two passes whose running BN
  statistics come from the labeled pass alone. Returns (logits [N, H, W, K] with the labeled
  images first, new batch_stats).
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if isinstance(inputs, tuple):
    # Separate passes: running BN statistics come from the labeled (weak) pass alone, so
    # teachers and eval normalise with statistics of clean images, not of strong views.
    outputs, mutated = model.apply(variables, inputs[0], train=True, rngs={"dropout": rng},
                                   mutable=["batch_stats"])
    unlabeled_outputs, _ = model.apply(variables, inputs[1], train=True,
                                       rngs={"dropout": jax.random.fold_in(rng, 1)},
                                       mutable=["batch_stats"])
    logits = jnp.concatenate([outputs["logits"], unlabeled_outputs["logits"]], axis=0)
  else:
    outputs, mutated = model.apply(variables, inputs, train=True, rngs={"dropout": rng},
                                   mutable=["batch_stats"])
    logits = outputs["logits"]
  return logits, mutated["batch_stats"]


def student_gradients(learner: Learner, model: nn.Module, inputs, rng: jax.Array,
                      loss_fn: LossFn) -> tuple[jax.Array, Any, dict[str, jax.Array], Any]:
  """(loss, new batch_stats, loss metrics, gradients with respect to learner.params)."""

  def objective(params):
    logits, batch_stats = student_logits(model, params, learner.batch_stats, inputs, rng)
    loss, aux = loss_fn(logits)
    return loss, (batch_stats, aux)

  (loss, (batch_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(learner.params)
  return loss, batch_stats, aux, grads


def apply_update(learner: Learner, tx: optax.GradientTransformation, loss: jax.Array,
                 batch_stats: Any, grads: Any, decay: jax.Array, previous: Learner | None = None
                 ) -> tuple[Learner, dict[str, jax.Array]]:
  """The optimizer step and the teacher's EMA (eq. 4) from one student's gradients.

  A non-finite loss or gradient norm returns `previous` (the learner as the step found it,
  before this step's prototype update; default `learner`) and metric `skipped` = 1: one bad
  batch cannot poison the weights, the teacher or the prototypes.
  """
  grad_norm = optax.global_norm(grads)
  # Decided before the update, so the select below fuses into the update's own pass over the
  # state instead of costing a second one.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, learner.opt_state, learner.params)
  params = optax.apply_updates(learner.params, updates)
  new_learner = learner.replace(
      params=params, batch_stats=batch_stats, opt_state=opt_state,
      ema_params=ema_update(learner.ema_params, params, decay),
      ema_batch_stats=ema_update(learner.ema_batch_stats, batch_stats, decay))
  # Divergence guard: keep the old learner (prototypes included) when this update is not finite.
  previous = learner if previous is None else previous
  new_learner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_learner, previous)
  return new_learner, {"loss": loss, "grad_norm": grad_norm,
                       "skipped": 1.0 - finite.astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------------------------


def train_step(state: RMLState, batch: dict[str, Any], *, cfg: StepConfig
               ) -> tuple[RMLState, dict[str, jax.Array]]:
  """One step of the configured rung of the ladder (MODES) on a global batch (see
  input_pipeline for its layout). Returns the new state and a dict of float32 scalar metrics."""
  mode = MODES[cfg.mode]
  rng = jax.random.fold_in(state.rng, state.step)
  cutmix_rng, rng_a, rng_b = jax.random.split(rng, 3)
  # Step within the current stage: ramp-ups and warm-ups restart with every stage.
  local_step = state.step % cfg.stage_steps if cfg.stage_steps else state.step
  labeled_images = inference.normalize(batch["labeled"]["image"], cfg.mean, cfg.std)
  labels = batch["labeled"]["label"]
  learners = (state.learner_a, state.learner_b)
  metrics: dict[str, jax.Array] = {}
  targets: tuple[tuple[PseudoLabels, ...], ...] = ((), ())
  inputs = (labeled_images, labeled_images)
  if mode.unlabeled:
    # Labeled pixels with a label: crop padding (and void) stay out of the prototypes.
    learners, views, targets = unlabeled_targets(state, batch["unlabeled"], cutmix_rng,
                                                 local_step, cfg, metrics, labeled_images,
                                                 labels != IGNORE_LABEL)
    inputs = tuple((labeled_images, view) if cfg.bn_stats == "labeled"
                   else jnp.concatenate([labeled_images, view], axis=0) for view in views)
  unsup_weight = unsup_weight_at(local_step, cfg.unsup_weight, cfg.unsup_rampup_steps)
  decay = ema_decay_at(local_step, cfg.ema_decay)
  updated = []
  for name, learner, previous, model, key, student_inputs, target in zip(
      ("a", "b"), learners, (state.learner_a, state.learner_b), (state.model_a, state.model_b),
      (rng_a, rng_b), inputs, targets):
    loss, batch_stats, aux, grads = student_gradients(
        learner, model, student_inputs, key, student_loss_fn(labels, target, unsup_weight))
    learner, update_metrics = apply_update(learner, state.tx, loss, batch_stats, grads, decay,
                                           previous)
    metrics.update({f"{k}_{name}": v for k, v in {**aux, **update_metrics}.items()})
    updated.append(learner)
  new_state = state.replace(step=state.step + 1, learner_a=updated[0], learner_b=updated[1])
  # Scalars, and [K] per-class sums (keys plk_*).
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def predict_step(state: RMLState, images: jax.Array, *, cfg: StepConfig) -> dict[str, jax.Array]:
  """uint8 [N, H, W, 3] -> {model name: softmax probs [N, H, W, K] float32} for all four, under
  the config's eval protocol (whole image or sliding windows, optional flip)."""
  return inference.probabilities(state, images, cfg.mean, cfg.std, cfg.evaluation)


def eval_step(state: RMLState, batch: dict[str, jax.Array], *, cfg: StepConfig
              ) -> dict[str, metrics_lib.ConfusionMatrix]:
  """{model name: ConfusionMatrix [K, K]} of the four models on one eval batch."""
  probs = predict_step(state, batch["image"], cfg=cfg)
  return {name: metrics_lib.ConfusionMatrix(metrics_lib.confusion_matrix(
      batch["label"], jnp.argmax(p, -1), cfg.num_classes, IGNORE_LABEL))
      for name, p in probs.items()}


def prototype_sums_step(state: RMLState, batch: dict[str, jax.Array], *, cfg: StepConfig
                        ) -> tuple[jax.Array, jax.Array]:
  """Eq. 10's sums on one batch of train images, for both mean teachers.

  batch: {'image' [N, H, W, 3] uint8, 'valid' [N, H, W] bool (False on padding)}. Each teacher
  assigns its features to its own argmax (teacher_assignment). Returns (sums [2, K, C] float32,
  counts [2, K] float32); add them over the dataset, then prototypes.exact_prototypes.
  """
  images = inference.normalize(batch["image"], cfg.mean, cfg.std)
  sums, counts = [], []
  for model, learner in ((state.model_a, state.learner_a), (state.model_b, state.learner_b)):
    outputs = inference.apply_eval(model, learner.teacher, images)
    _, h, w, _ = outputs["features"].shape
    labels = teacher_assignment(jax.nn.softmax(outputs["logits"], axis=-1), batch["valid"], h, w)
    s, c = prototypes_lib.class_sums(outputs["features"], labels, cfg.num_classes)
    sums.append(s)
    counts.append(c)
  return jnp.stack(sums), jnp.stack(counts)


def with_exact_prototypes(state: RMLState, sums: jax.Array, counts: jax.Array) -> RMLState:
  """The state with both teachers' prototypes set by eq. 10 from dataset-wide sums
  ([2, K, C], [2, K]: prototype_sums_step added over the train images)."""
  learners = []
  for i, learner in enumerate((state.learner_a, state.learner_b)):
    prototypes, seen = prototypes_lib.exact_prototypes(sums[i], counts[i])
    learners.append(learner.replace(prototypes=prototypes, prototypes_seen=seen))
  return state.replace(learner_a=learners[0], learner_b=learners[1])


def jit_steps(cfg: StepConfig, state_shardings, mesh):
  """The three steps jitted once with explicit shardings; the train state is donated."""
  data = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  train = jax.jit(functools.partial(train_step, cfg=cfg), in_shardings=(state_shardings, data),
                  out_shardings=(state_shardings, repl), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, cfg=cfg), in_shardings=(state_shardings, data),
                     out_shardings=repl)
  predict = jax.jit(functools.partial(predict_step, cfg=cfg),
                    in_shardings=(state_shardings, data), out_shardings=data)
  return train, evaluate, predict
