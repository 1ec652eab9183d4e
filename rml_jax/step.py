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
from rml_jax import class_balance as balance_lib
from rml_jax import metrics as metrics_lib
from rml_jax import prototypes as prototypes_lib
from rml_jax import state as state_lib
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
  """The static settings of a step (hashable: part of the jit cache key).

  rml, augment: config.rml and config.augment as they are (frozen); mean, std: the input
  standardisation; stage_steps: state.stage_length, the steps of each stage (the step count
  wraps at it only when there are several stages); stored_labels: a later stage, whose p^0 is
  the previous stage's stored soft label; evaluation: the protocol of eval, predict and stored
  soft labels.
  """

  num_classes: int
  rml: ml_collections.FrozenConfigDict
  augment: ml_collections.FrozenConfigDict
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  stage_steps: int
  stored_labels: bool
  evaluation: inference.Protocol
  # With mesh.fsdp > 1 the state keeps the weights split over "fsdp"; a forward pass gathers
  # them to this (replicated) sharding at use (gathered). None: the weights are not split.
  weights_sharding: jax.sharding.NamedSharding | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "StepConfig":
    """The step's settings from a config that schema.validate accepted."""
    evaluation = config.eval
    return cls(num_classes=num_classes, rml=ml_collections.FrozenConfigDict(config.rml),
               augment=ml_collections.FrozenConfigDict(config.augment),
               mean=tuple(config.data.mean), std=tuple(config.data.std),
               stage_steps=state_lib.stage_length(config),
               stored_labels=False,
               evaluation=inference.Protocol(
                   name=evaluation.protocol,
                   window=tuple(evaluation.window or config.data.crop_size),
                   stride=float(evaluation.stride), flip=bool(evaluation.flip)))

  @property
  def mode(self) -> "Mode":
    return MODES[self.rml.mode]

  def unsup_weight_at(self, local_step: jax.Array) -> jax.Array:
    """The unsupervised weight at a step of the stage, ramps included (unsup_weight_at)."""
    rml = self.rml
    return unsup_weight_at(local_step, rml.unsup_weight, rml.unsup_rampup_steps,
                           round(rml.unsup_rampdown * self.stage_steps), self.stage_steps)

  @property
  def per_student_views(self) -> bool:
    """Each student its own strong view and CutMix box (else one shared)."""
    return self.augment.strong_views == "per_student"


@struct.dataclass
class Candidates:
  """One source's hard pseudo labels before any threshold: labels [N, H, W] int32, their
  confidence [N, H, W] float32 and the distribution [N, H, W, K] float32 both are read from
  (p^0, or eq. 6's omega * p^0 renormalised after rectification)."""

  labels: jax.Array
  confidence: jax.Array
  distribution: jax.Array


@struct.dataclass
class PseudoLabels:
  """One source's pseudo labels: labels [N, H, W] int32, valid [N, H, W] bool (confident and
  inside the image: the pixels that enter eq. 2); with rml.soft_targets also the distribution
  [N, H, W, K] float32 that eq. 2 then takes as its target (None: the hard labels)."""

  labels: jax.Array
  valid: jax.Array
  distribution: jax.Array | None = None


Metrics = dict[str, jax.Array]

# ---------------------------------------------------------------------------------------------
# The paper's equations, one function each.
# ---------------------------------------------------------------------------------------------


def pseudo_labels(logits: jax.Array, threshold: float) -> tuple[jax.Array, PseudoLabels]:
  """Eqs. 2 / 4: logits [N, H, W, K] -> (probs [N, H, W, K], labels = argmax with
  valid = max prob >= threshold)."""
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, PseudoLabels(jnp.argmax(probs, -1).astype(jnp.int32),
                             jnp.max(probs, -1) >= threshold)


def candidates_of(probs: jax.Array) -> Candidates:
  """Soft labels p^0 [N, H, W, K] -> their argmax and its probability (eq. 2 before tau)."""
  return Candidates(jnp.argmax(probs, -1).astype(jnp.int32), jnp.max(probs, -1), probs)


def label_interior(labels: jax.Array, radius: int) -> jax.Array:
  """labels [N, H, W] int -> [N, H, W] bool: True where every pixel within `radius` (a square
  window, clipped at the border) holds the same label, i.e. away from a class boundary of the
  label map (outside the paper: rml.boundary_ignore)."""
  if radius <= 0:
    return jnp.ones(labels.shape, bool)
  window = (1, 2 * radius + 1, 2 * radius + 1)
  low = jax.lax.reduce_window(labels, jnp.iinfo(labels.dtype).max, jax.lax.min, window,
                              (1, 1, 1), "SAME")
  high = jax.lax.reduce_window(labels, jnp.iinfo(labels.dtype).min, jax.lax.max, window,
                               (1, 1, 1), "SAME")
  return low == high


def ema_update(teacher: Any, student: Any, decay: jax.Array) -> Any:
  """Eq. 4's mean teacher: theta' <- decay * theta' + (1 - decay) * theta, leaf by leaf."""
  return jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, teacher, student)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """Mean-teacher EMA decay with warm-up: min(decay, (t + 1) / (t + 10))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (step + 1.0) / (step + 10.0))


def unsup_weight_at(step: jax.Array, weight: float, rampup_steps: int,
                    rampdown_steps: int = 0, stage_steps: int = 0) -> jax.Array:
  """The unsupervised weight at a step of the stage (a scalar).

  Ramp-up (Laine and Aila 2017, as mean teacher): weight * exp(-5 (1 - t / U)^2) for t < U =
  rampup_steps. Ramp-down over the stage's last D = rampdown_steps of S = stage_steps: times
  exp(-12.5 p^2) with p = (t - (S - D)) / D, the Gaussian ramp-down shape of the same paper, so
  that the low-learning-rate tail fits the labeled images alone (outside the paper: fidelity C.8).
  """
  step = step.astype(jnp.float32)
  value = jnp.asarray(weight, jnp.float32)
  if rampup_steps > 0:
    progress = jnp.clip(step / rampup_steps, 0.0, 1.0)
    value = value * jnp.exp(-5.0 * (1.0 - progress) ** 2)
  if rampdown_steps > 0:
    progress = jnp.clip((step - (stage_steps - rampdown_steps)) / rampdown_steps, 0.0, 1.0)
    value = value * jnp.exp(-12.5 * progress ** 2)
  return value


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
  """Eq. 11 for one teacher from step rml.rectify_start_step on (the train loop computes the
  exact eq. 10 prototypes at that step; before it the prototypes are not used).

  features: [N, h, w, C] the teacher's features; labels: [N, h, w] int32 its argmax
  (teacher_assignment; -1 = none). A class without a prototype yet starts at its batch mean.
  """
  seen = learner.prototypes_seen
  moved = prototypes_lib.update_prototypes(learner.prototypes, features, labels,
                                           cfg.rml.prototype_momentum, seen=seen)
  moved_seen = seen | prototypes_lib.classes_present(labels, cfg.num_classes)
  started = step >= cfg.rml.rectify_start_step
  return learner.replace(prototypes=jnp.where(started, moved, learner.prototypes),
                         prototypes_seen=jnp.where(started, moved_seen, seen))


def self_rectify(learner: Learner, probs: jax.Array, features: jax.Array, in_image: jax.Array,
                 step: jax.Array, cfg: StepConfig) -> tuple[Candidates, Metrics]:
  """Section 4.2 for one teacher: class confidence (eq. 9) and the rectified labels (eq. 6).

  Args:
    learner: holds the teacher's prototypes [K, C] and prototypes_seen [K].
    probs: [N, H, W, K] the soft labels p^0; features: [N, h, w, C] the teacher's features;
    in_image: [N, H, W] bool (the pixels the metrics average over).
    step: scalar int; rectification is applied from rml.rectify_start_step on, with the classes
      that have a prototype: eq. 9's softmax runs over those, and a pixel whose p^0 label has
      no prototype yet keeps p^0's label and confidence.
  Returns:
    (the rectified candidates, {'rectified_classes': classes rectified with (0 before the
     start), 'omega_entropy': eq. 9's mean entropy in nats over in-image pixels}).
  """
  _, height, width, _ = probs.shape
  seen = learner.prototypes_seen
  applied = (step >= cfg.rml.rectify_start_step) & jnp.any(seen)
  # With no class seen yet, any mask keeps the softmax finite; `applied` discards it.
  omega = prototypes_lib.class_confidence(features, learner.prototypes,
                                          cfg.rml.prototype_temperature,
                                          seen=jnp.where(applied, seen, True))
  omega = prototypes_lib.resize_to(omega, height, width)  # K channels only
  rectified, rectified_confidence = prototypes_lib.rectify(probs, omega)
  raw = candidates_of(probs)
  use = applied & seen[raw.labels]
  distribution = (raw.distribution if not cfg.rml.soft_targets else jnp.where(
      use[..., None], prototypes_lib.rectified_distribution(probs, omega), raw.distribution))
  candidates = Candidates(jnp.where(use, rectified, raw.labels),
                          jnp.where(use, rectified_confidence, raw.confidence), distribution)
  metrics = {"rectified_classes": jnp.where(applied, jnp.sum(seen), 0),
             "omega_entropy": jnp.where(applied, prototypes_lib.omega_entropy(omega, in_image),
                                        0.0)}
  return candidates, metrics


# ---------------------------------------------------------------------------------------------
# The unlabeled branch: sources -> p^0 -> rectification -> class balance -> CutMix per student.
# ---------------------------------------------------------------------------------------------


def _pseudo_label_metrics(name: str, pseudo: PseudoLabels, gt: jax.Array, in_image: jax.Array,
                          num_classes: int) -> Metrics:
  """Sums for pseudo-label accuracy (all in-image pixels and confident ones), the confident
  ratio, and per-class sums `plk_<sum>_<name>` [K] (metrics.pseudo_label_class_counts)."""
  out = {f"plk_{k}_{name}": v for k, v in metrics_lib.pseudo_label_class_counts(
      pseudo.labels, pseudo.valid, gt, in_image, num_classes).items()}
  out[f"pl_correct_{name}"], out[f"pl_counted_{name}"] = metrics_lib.pseudo_label_accuracy(
      pseudo.labels, gt, in_image)
  out[f"plc_correct_{name}"], out[f"plc_counted_{name}"] = metrics_lib.pseudo_label_accuracy(
      pseudo.labels, gt, pseudo.valid)
  out[f"confident_ratio_{name}"] = _share(pseudo.valid, in_image)
  return out


def _share(mask: jax.Array, in_image: jax.Array) -> jax.Array:
  """The share of in-image pixels [N, H, W] bool where mask [N, H, W] bool holds."""
  return jnp.sum(mask & in_image) / jnp.maximum(jnp.sum(in_image), 1)


def gathered(weights: Any, cfg: StepConfig) -> Any:
  """A model's variables as a forward pass uses them: whole on every chip.

  With mesh.fsdp > 1 the state holds each big leaf split over "fsdp" (sharding.state_shardings).
  Left to itself, XLA's sharding propagation carries that split from a kernel into the
  activations it multiplies, and then regathers activations, all-reduces whole gradients and
  recomputes work on every chip; gathering the weights at their use (FSDP, ZeRO-3's all-gather)
  keeps the activations split by images only, and the gradients flowing back are summed over
  every chip and split as the leaves are. Without fsdp: `weights` unchanged.
  """
  if cfg.weights_sharding is None:
    return weights
  return jax.lax.with_sharding_constraint(weights, cfg.weights_sharding)


def with_gathered_weights(state: RMLState, cfg: StepConfig) -> RMLState:
  """The state with the four models' variables gathered (`gathered`), for the programs that
  only run forward passes (eval, predict, eq. 10's prototype pass)."""
  if cfg.weights_sharding is None:
    return state
  return state.replace(**{name: learner.replace(
      params=gathered(learner.params, cfg), batch_stats=gathered(learner.batch_stats, cfg),
      ema_params=gathered(learner.ema_params, cfg),
      ema_batch_stats=gathered(learner.ema_batch_stats, cfg))
      for name, learner in (("learner_a", state.learner_a), ("learner_b", state.learner_b))})


def source_outputs(state: RMLState, weak: jax.Array, mode: Mode, cfg: StepConfig
                   ) -> tuple[dict, dict]:
  """The mode's two pseudo-label sources in eval mode on normalised images [N, H, W, 3]:
  ({'logits', 'features'} of learner a's, of learner b's)."""
  pick = (lambda learner: learner.teacher) if mode.source == "teacher" else (
      lambda learner: learner.student)
  return (inference.apply_eval(state.model_a, gathered(pick(state.learner_a), cfg), weak),
          inference.apply_eval(state.model_b, gathered(pick(state.learner_b), cfg), weak))


def _split_batch(output: dict[str, jax.Array], first: int) -> tuple[dict, dict]:
  """A source's outputs on concat(labeled, unlabeled) -> (labeled part, unlabeled part)."""
  return ({k: v[:first] for k, v in output.items()}, {k: v[first:] for k, v in output.items()})


def coupling_metrics(probs_a: jax.Array, probs_b: jax.Array, in_image: jax.Array) -> Metrics:
  """The two sources' coupling (the paper's Figure 2) on probs [N, H, W, K]: total variation
  and the share of in-image pixels whose argmax differs."""
  disagree = jnp.argmax(probs_a, -1) != jnp.argmax(probs_b, -1)
  return {"teacher_tv": metrics_lib.total_variation(probs_a, probs_b),
          "teacher_disagreement": _share(disagree, in_image)}


def initial_soft_labels(source_probs: tuple[jax.Array, jax.Array], unlabeled: dict[str, jax.Array],
                        cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
  """p^0 of both sources [N, H, W, K]: the sources' softmax, or in a later stage the previous
  stage's teachers' soft labels stored offline (unlabeled['soft_classes'|'soft_probs'])."""
  if not cfg.stored_labels:
    return source_probs
  k = cfg.rml.soft_label_top_k
  return tuple(soft_labels.decode(unlabeled["soft_classes"][..., part],
                                  unlabeled["soft_probs"][..., part], cfg.num_classes)
               for part in (slice(None, k), slice(k, None)))


def distribution_alignment(learners: tuple[Learner, Learner], soft: tuple[jax.Array, jax.Array],
                           in_image: jax.Array, labeled_labels: jax.Array | None,
                           cfg: StepConfig) -> tuple[tuple[Learner, Learner],
                                                     tuple[jax.Array, jax.Array], Metrics]:
  """With rml.distribution_alignment (class_balance.py): each source's running class shares of
  the labeled pixels (labeled_labels [Nl, H, W], IGNORE_LABEL where void or padding; None: kept)
  and of its p^0 on the in-image pixels take this batch, and p^0 [N, H, W, K] becomes the
  aligned distribution. Returns (learners, p^0 per source, metrics `predicted_share_min_X`:
  the smallest running predicted share over the labeled one, how far the rarest class lags)."""
  if not cfg.rml.distribution_alignment:
    return learners, soft, {}
  momentum = cfg.rml.class_balance_momentum
  updated, aligned, metrics = [], [], {}
  for name, learner, probs in zip(("a", "b"), learners, soft):
    label_shares = learner.label_distribution
    if labeled_labels is not None:
      known = labeled_labels != IGNORE_LABEL
      label_shares = balance_lib.running_mean(
          label_shares, balance_lib.class_shares(labeled_labels, known, cfg.num_classes),
          momentum, jnp.any(known))
    predicted = balance_lib.running_mean(
        learner.prediction_distribution, balance_lib.mean_prediction(probs, in_image), momentum,
        jnp.any(in_image))
    aligned.append(balance_lib.align_distribution(probs, label_shares, predicted))
    updated.append(learner.replace(label_distribution=label_shares,
                                   prediction_distribution=predicted))
    metrics[f"predicted_share_min_{name}"] = jnp.min(predicted / jnp.maximum(label_shares, 1e-6))
  return tuple(updated), tuple(aligned), metrics


def rectification(learners: tuple[Learner, Learner], soft: tuple[jax.Array, jax.Array],
                  outputs: tuple[dict, dict], labeled_outputs: tuple[dict, dict] | None,
                  labeled_known: jax.Array | None, in_image: jax.Array, step: jax.Array,
                  cfg: StepConfig) -> tuple[tuple[Learner, Learner], tuple[Candidates, ...],
                                            Metrics]:
  """Section 4.2 for both sources: eq. 11 moves each teacher's prototypes with its features on
  the unlabeled (and, with labeled_outputs, the labeled) images, each assigned to the current
  teacher's argmax (eq. 10's rule); then eqs. 9 and 6 rectify p^0.

  soft: p^0 per source [N, H, W, K]; outputs / labeled_outputs: the teachers' {'logits',
  'features'} on the unlabeled / labeled images; labeled_known: [Nl, H, W] bool, the labeled
  pixels that are neither crop padding nor void. Returns (learners with moved prototypes,
  rectified candidates per source, metrics `rectified_classes_X`, `omega_entropy_X`).
  """
  updated, candidates, metrics = [], [], {}
  for i, (name, learner) in enumerate(zip(("a", "b"), learners)):
    features = outputs[i]["features"]
    _, h, w, _ = features.shape
    teacher_probs = jax.nn.softmax(outputs[i]["logits"], axis=-1)
    labels = teacher_assignment(teacher_probs, in_image, h, w)  # eq. 10: the current teacher
    all_features = features
    if labeled_outputs is not None:
      labeled_probs = jax.nn.softmax(labeled_outputs[i]["logits"], axis=-1)
      all_features = jnp.concatenate([labeled_outputs[i]["features"], features])
      labels = jnp.concatenate([teacher_assignment(labeled_probs, labeled_known, h, w), labels])
    learner = online_prototypes(learner, all_features, labels, step, cfg)
    rectified, rectify_metrics = self_rectify(learner, soft[i], features, in_image, step, cfg)
    metrics.update({f"{k}_{name}": v for k, v in rectify_metrics.items()})
    updated.append(learner)
    candidates.append(rectified)
  return tuple(updated), tuple(candidates), metrics


def class_balance(learners: tuple[Learner, Learner], candidates: tuple[Candidates, ...],
                  in_image: jax.Array, cfg: StepConfig
                  ) -> tuple[tuple[Learner, Learner], tuple[PseudoLabels, ...], Metrics]:
  """Each source's per-class thresholds (class_balance.py) and the pseudo labels that pass
  them: every source's running confidence histogram takes this batch's in-image candidates,
  then rml.class_balance turns it into thresholds [K] (all tau for 'none', which leaves the
  histograms as they are), and a pixel is valid where it is in the image, its confidence
  reaches its label's threshold and, with rml.boundary_ignore = r > 0, no pixel within r of it
  has another label.

  Returns (learners with updated histograms, PseudoLabels per source, metrics
  `class_threshold_X` [K]).
  """
  rml = cfg.rml
  updated, pseudo, metrics = [], [], {}
  for name, learner, candidate in zip(("a", "b"), learners, candidates):
    histogram = learner.confidence_histogram  # 'none' neither reads nor updates it
    if rml.class_balance != "none":
      batch = balance_lib.confidence_histogram(candidate.labels, candidate.confidence, in_image,
                                               cfg.num_classes, rml.class_balance_bins)
      histogram = balance_lib.running_mean(histogram, batch, rml.class_balance_momentum)
    thresholds = balance_lib.class_thresholds(rml.class_balance, histogram, rml.threshold,
                                              rml.class_balance_portion, rml.class_balance_floor)
    valid = (in_image & (candidate.confidence >= thresholds[candidate.labels])
             & label_interior(candidate.labels, rml.boundary_ignore))
    updated.append(learner.replace(confidence_histogram=histogram))
    pseudo.append(PseudoLabels(candidate.labels, valid,
                               candidate.distribution if rml.soft_targets else None))
    metrics[f"class_threshold_{name}"] = thresholds
  return tuple(updated), tuple(pseudo), metrics


def cutmix_per_student(strong: jax.Array, pseudo: tuple[PseudoLabels, ...], rng: jax.Array,
                       cfg: StepConfig) -> tuple[tuple[jax.Array, ...],
                                                 tuple[tuple[PseudoLabels, ...], ...]]:
  """CutMix on device, one box per sample: a student's strong view and the labels and masks it
  learns from are mixed with the same box; with per-student views each student has its own.

  strong: [N, V, H, W, 3] normalised strong views (V = 2 per student, or 1 shared); pseudo: the
  two sources' labels. Returns (per student its mixed view [N, H, W, 3], per student the mixed
  PseudoLabels of its mode.routes).
  """
  n, h, w = pseudo[0].labels.shape
  leaves, treedef = jax.tree.flatten(pseudo)  # labels, valid (and distribution) per source
  mixed_views = []
  for view in range(strong.shape[1]):
    view_rng = jax.random.fold_in(rng, view) if cfg.per_student_views else rng
    box = augment.cutmix_box_masks(view_rng, n, h, w, cfg.augment.cutmix_prob,
                                   tuple(cfg.augment.cutmix_area))
    image, *mixed_leaves = augment.cutmix(box, strong[:, view], *leaves)
    mixed_views.append((image, jax.tree.unflatten(treedef, mixed_leaves)))
  views, targets = [], []
  for student, route in enumerate(cfg.mode.routes):
    image, mixed = mixed_views[student if cfg.per_student_views else 0]
    views.append(image)
    targets.append(tuple(mixed[source] for source in route))
  return tuple(views), tuple(targets)


def unlabeled_targets(state: RMLState, unlabeled: dict[str, jax.Array], rng: jax.Array,
                      step: jax.Array, cfg: StepConfig, labeled_weak: jax.Array | None = None,
                      labeled_labels: jax.Array | None = None
                      ) -> tuple[tuple[Learner, Learner], tuple[jax.Array, ...],
                                 tuple[tuple[PseudoLabels, ...], ...], Metrics]:
  """The unlabeled branch of a step: sources -> p^0 (-> distribution alignment) ->
  rectification (rml) -> class balance -> CutMix per student.

  unlabeled: {'weak' [N, H, W, 3] uint8, 'strong' [N, V, H, W, 3] uint8, 'valid' [N, H, W]
  bool, 'label' [N, H, W] int32 (hidden truth, for metrics only)} (+ stored soft labels).
  labeled_weak: the normalised labeled images [Nl, H, W, 3]; with rml.prototypes_from_labeled
  their teacher features join the prototype update (eq. 10 runs over D_l and D_u) where
  labeled_labels [Nl, H, W] int32 is not IGNORE_LABEL (crop padding, void; default: every
  pixel counts), which also give distribution alignment the labeled class shares.
  Returns ((learner a, learner b) with updated prototypes and histograms, per student its
  mixed normalised strong view, per student the mixed PseudoLabels of its mode.routes, the
  branch's metrics).
  """
  mode = cfg.mode
  weak = inference.normalize(unlabeled["weak"], cfg.mean, cfg.std)
  strong = inference.normalize(unlabeled["strong"], cfg.mean, cfg.std)
  in_image, gt = unlabeled["valid"], unlabeled["label"]
  with_labeled = mode.rectify and cfg.rml.prototypes_from_labeled and labeled_weak is not None
  outputs = source_outputs(state, jnp.concatenate([labeled_weak, weak]) if with_labeled
                           else weak, mode, cfg)
  labeled_outputs = None
  labeled_known = None
  if with_labeled:
    labeled_outputs, outputs = zip(*(_split_batch(o, labeled_weak.shape[0]) for o in outputs))
    labeled_known = (jnp.ones(labeled_weak.shape[:3], bool) if labeled_labels is None
                     else labeled_labels != IGNORE_LABEL)
  source_probs = tuple(jax.nn.softmax(o["logits"], axis=-1) for o in outputs)
  metrics = coupling_metrics(*source_probs, in_image)
  soft = initial_soft_labels(source_probs, unlabeled, cfg)
  learners, soft, align_metrics = distribution_alignment(
      (state.learner_a, state.learner_b), soft, in_image, labeled_labels, cfg)
  metrics.update(align_metrics)
  candidates = tuple(candidates_of(p) for p in soft)
  if mode.rectify:
    for name, c in zip(("raw_a", "raw_b"), candidates):
      metrics.update(_pseudo_label_metrics(name, PseudoLabels(
          c.labels, in_image & (c.confidence >= cfg.rml.threshold)), gt, in_image,
          cfg.num_classes))
    learners, candidates, rectify_metrics = rectification(
        learners, soft, outputs, labeled_outputs, labeled_known, in_image, step, cfg)
    metrics.update(rectify_metrics)
    for name, c in zip(("a", "b"), candidates):  # the single tau after eq. 6, before balancing
      metrics[f"confident_ratio_rectified_{name}"] = _share(c.confidence >= cfg.rml.threshold,
                                                            in_image)
  learners, pseudo, balance_metrics = class_balance(learners, candidates, in_image, cfg)
  metrics.update(balance_metrics)
  for name, p in zip(("a", "b"), pseudo):
    metrics.update(_pseudo_label_metrics(name, p, gt, in_image, cfg.num_classes))
  views, targets = cutmix_per_student(strong, pseudo, rng, cfg)
  return learners, views, targets, metrics


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
    unlabeled = logits[num_labeled:]
    unsup = sum(_pseudo_label_term(unlabeled, target) for target in targets)  # eq. 5
    return sup + unsup_weight * unsup, {"sup_loss": sup, "unsup_loss": unsup}

  return loss_fn


def _pseudo_label_term(logits: jax.Array, target: PseudoLabels) -> jax.Array:
  """Eq. 2 for one source: hard labels, or with rml.soft_targets its distribution."""
  if target.distribution is None:
    return losses.pseudo_label_loss(logits, target.labels, target.valid)
  return losses.soft_pseudo_label_loss(logits, target.distribution, target.valid)


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
                      loss_fn: LossFn, cfg: StepConfig
                      ) -> tuple[jax.Array, Any, dict[str, jax.Array], Any]:
  """(loss, new batch_stats, loss metrics, gradients with respect to learner.params, split as
  the params are)."""

  def objective(params):
    logits, batch_stats = student_logits(model, gathered(params, cfg),
                                         gathered(learner.batch_stats, cfg), inputs, rng)
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
  rng = jax.random.fold_in(state.rng, state.step)
  cutmix_rng, rng_a, rng_b = jax.random.split(rng, 3)
  # Step within the current stage: ramp-ups and warm-ups restart with every stage.
  local_step = state.step % cfg.stage_steps if cfg.rml.stages > 1 else state.step
  labeled_images = inference.normalize(batch["labeled"]["image"], cfg.mean, cfg.std)
  labels = batch["labeled"]["label"]
  learners = (state.learner_a, state.learner_b)
  metrics: Metrics = {}
  targets: tuple[tuple[PseudoLabels, ...], ...] = ((), ())
  inputs = (labeled_images, labeled_images)
  if cfg.mode.unlabeled:
    # Labeled pixels with a label: crop padding (and void) stay out of the prototypes and the
    # labeled class shares.
    learners, views, targets, metrics = unlabeled_targets(
        state, batch["unlabeled"], cutmix_rng, local_step, cfg, labeled_images, labels)
    inputs = tuple((labeled_images, view) if cfg.rml.bn_stats == "labeled"
                   else jnp.concatenate([labeled_images, view], axis=0) for view in views)
  unsup_weight = cfg.unsup_weight_at(local_step)
  decay = ema_decay_at(local_step, cfg.rml.ema_decay)
  updated = []
  for name, learner, previous, model, key, student_inputs, target in zip(
      ("a", "b"), learners, (state.learner_a, state.learner_b), (state.model_a, state.model_b),
      (rng_a, rng_b), inputs, targets):
    loss, batch_stats, aux, grads = student_gradients(
        learner, model, student_inputs, key, student_loss_fn(labels, target, unsup_weight),
        cfg)
    learner, update_metrics = apply_update(learner, state.tx, loss, batch_stats, grads, decay,
                                           previous)
    metrics.update({f"{k}_{name}": v for k, v in {**aux, **update_metrics}.items()})
    updated.append(learner)
  new_state = state.replace(step=state.step + 1, learner_a=updated[0], learner_b=updated[1])
  # Scalars, and [K] per-class vectors (keys plk_* and class_threshold_*).
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def predict_step(state: RMLState, images: jax.Array, *, cfg: StepConfig) -> dict[str, jax.Array]:
  """uint8 [N, H, W, 3] -> {model name: softmax probs [N, H, W, K] float32} for all four, under
  the config's eval protocol (whole image or sliding windows, optional flip)."""
  return inference.probabilities(with_gathered_weights(state, cfg), images, cfg.mean, cfg.std,
                                 cfg.evaluation)


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
    outputs = inference.apply_eval(model, gathered(learner.teacher, cfg), images)
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
