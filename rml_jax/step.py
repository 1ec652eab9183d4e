"""train_step / eval_step / predict_step: pure functions of (state, batch), jitted once each.

One train step (DESIGN.md): both mean teachers label the weak unlabeled view -> thresholded
pseudo labels -> CutMix on the strong view (labels and masks mixed with the same box) -> each
student on concat(labeled, strong) -> SGD updates and EMA teachers, all in one jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rml_jax import augment, losses, sharding, soft_labels
from rml_jax import evaluate as evaluate_lib
from rml_jax import metrics as metrics_lib
from rml_jax import prototypes as prototypes_lib
from rml_jax.errors import UserError
from rml_jax.state import Learner, RMLState

MODES = ("supervised", "mean_teacher", "direct", "iml", "rml")  # the paper's ablation ladder


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
  cutmix_prob: float
  cutmix_area: tuple[float, float]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  prototype_momentum: float = 0.9999
  prototype_temperature: float = 1.0
  rectify_start_step: int = 0
  stage_steps: int = 0  # steps per stage (schedules restart each stage); 0 = a single stage
  stored_labels: bool = False  # a later stage: p^0 is the previous stage's stored soft label
  soft_label_top_k: int = 3
  ignore_index: int = 255
  # Inference (eval, predict, stored soft labels): "whole" image or "sliding" windows of
  # eval_window with a stride of eval_stride * window, optionally averaged with the h-flip.
  eval_protocol: str = "whole"
  eval_window: tuple[int, int] = (0, 0)
  eval_stride: float = 2 / 3
  eval_flip: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "StepConfig":
    rml = config.rml
    if rml.mode not in MODES:
      raise UserError(f"config.rml.mode: expected one of {MODES}, got {rml.mode!r}")
    if rml.bn_stats not in ("joint", "labeled"):
      raise UserError("config.rml.bn_stats: expected 'joint' or 'labeled', got "
                      f"{rml.bn_stats!r}")
    if not 0.0 <= rml.get("prototype_momentum", 0.9999) < 1.0:
      raise UserError("config.rml.prototype_momentum: expected a value in [0, 1), got "
                      f"{rml.prototype_momentum!r}")
    if rml.stages < 1 or (rml.stages > 1 and rml.mode == "supervised"):
      raise UserError(f"config.rml.stages: expected 1, or more with a semi-supervised mode, got "
                      f"{rml.stages!r} with mode {rml.mode!r}")
    if rml.get("stage_restart", "init") not in ("init", "continue"):
      raise UserError("config.rml.stage_restart: expected 'init' or 'continue', got "
                      f"{rml.stage_restart!r}")
    if rml.get("prototype_temperature", 1.0) <= 0:
      raise UserError("config.rml.prototype_temperature: expected a positive value, got "
                      f"{rml.prototype_temperature!r}")
    evaluation = config.get("eval") or ml_collections.ConfigDict()
    protocol = evaluation.get("protocol", "whole")
    if protocol not in ("whole", "sliding"):
      raise UserError(f"config.eval.protocol: expected 'whole' or 'sliding', got {protocol!r}")
    window = tuple(evaluation.get("window", None) or config.data.crop_size)
    stride = evaluation.get("stride", 2 / 3)
    if not 0 < stride <= 1:
      raise UserError(f"config.eval.stride: expected a fraction of the window in (0, 1], got "
                      f"{stride!r}")
    return cls(mode=rml.mode, num_classes=num_classes, threshold=rml.threshold,
               unsup_weight=rml.unsup_weight,
               unsup_rampup_steps=rml.unsup_rampup_steps, ema_decay=rml.ema_decay,
               bn_stats=rml.bn_stats,
               cutmix_prob=config.augment.cutmix_prob,
               cutmix_area=tuple(config.augment.cutmix_area),
               mean=tuple(config.data.mean), std=tuple(config.data.std),
               prototype_momentum=rml.get("prototype_momentum", 0.9999),
               prototype_temperature=rml.get("prototype_temperature", 1.0),
               rectify_start_step=rml.get("rectify_start_step", 0),
               stage_steps=config.total_steps if rml.stages > 1 else 0,
               soft_label_top_k=rml.get("soft_label_top_k", 3),
               eval_protocol=protocol, eval_window=window, eval_stride=float(stride),
               eval_flip=bool(evaluation.get("flip", False)))


def normalize(images: jax.Array, cfg: StepConfig) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32, scaled to [0, 1] then standardised by the config's mean/std."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(cfg.mean)) / jnp.asarray(cfg.std)


def teacher_outputs(model, learner: Learner, images: jax.Array) -> dict[str, jax.Array]:
  """Mean teacher in eval mode: {'logits' [N, H, W, K], 'features' [N, h, w, C]}, no gradient."""
  variables = {"params": learner.ema_params, "batch_stats": learner.ema_batch_stats}
  return jax.lax.stop_gradient(model.apply(variables, images, train=False))


def student_outputs(model, learner: Learner, images: jax.Array) -> dict[str, jax.Array]:
  """The current student in eval mode (eq. 3's peer prediction), no gradient."""
  variables = {"params": learner.params, "batch_stats": learner.batch_stats}
  return jax.lax.stop_gradient(model.apply(variables, images, train=False))


def pseudo_labels(logits: jax.Array, threshold: float) -> tuple[jax.Array, ...]:
  """Eqs. 2/4: (probs [N,H,W,K], hard labels [N,H,W] int32, confidence mask [N,H,W] bool)."""
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, jnp.argmax(probs, -1).astype(jnp.int32), jnp.max(probs, -1) >= threshold


def self_rectify(learner: Learner, probs: jax.Array, features: jax.Array, in_image: jax.Array,
                 step: jax.Array, cfg: StepConfig
                 ) -> tuple[Learner, jax.Array, jax.Array, jax.Array]:
  """Section 4.2 for one teacher: prototype update (eq. 11), class confidence (eq. 9), eq. 6.

  Args:
    learner: holds the teacher's prototypes [K, C] and prototypes_seen [K].
    probs: [N, H, W, K] the teacher's soft labels p^0; features: [N, h, w, C] its features.
    in_image: [N, H, W] bool, False on crop padding (left out of the prototype means).
    step: scalar int; rectification is applied from cfg.rectify_start_step on, once every class
      has a prototype (before that the labels are p^0's argmax).
  Returns:
    (learner with new prototypes, labels [N, H, W] int32, label confidence [N, H, W] float32,
     applied: scalar bool).
  """
  _, height, width, _ = probs.shape
  _, h, w, _ = features.shape
  # Teacher argmax at the feature resolution (probabilities area-averaged down, as ProDA does).
  small_probs = prototypes_lib.resize_to(probs, h, w)
  small_in_image = prototypes_lib.resize_to(in_image[..., None].astype(jnp.float32), h, w)
  small_labels = jnp.where(small_in_image[..., 0] > 0.5, jnp.argmax(small_probs, -1), -1)
  prototypes, seen = prototypes_lib.update_prototypes_with_init(
      learner.prototypes, learner.prototypes_seen, features, small_labels,
      cfg.prototype_momentum)
  confidence = prototypes_lib.class_confidence(features, prototypes, cfg.prototype_temperature)
  confidence = prototypes_lib.resize_to(confidence, height, width)  # K channels only
  rectified, rectified_confidence = prototypes_lib.rectify(probs, confidence)
  applied = jnp.all(seen) & (step >= cfg.rectify_start_step)
  labels = jnp.where(applied, rectified, jnp.argmax(probs, -1).astype(jnp.int32))
  label_confidence = jnp.where(applied, rectified_confidence, jnp.max(probs, -1))
  return learner.replace(prototypes=prototypes, prototypes_seen=seen), labels, \
      label_confidence, applied


def unsup_weight_at(step: jax.Array, weight: float, rampup_steps: int) -> jax.Array:
  """Sigmoid-shaped ramp-up of the unsupervised weight: weight * exp(-5 (1 - t / T)^2), t < T."""
  if rampup_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  progress = jnp.clip(step.astype(jnp.float32) / rampup_steps, 0.0, 1.0)
  return weight * jnp.exp(-5.0 * (1.0 - progress) ** 2)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """Mean-teacher EMA decay with warm-up: min(decay, (t + 1) / (t + 10))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (step + 1.0) / (step + 10.0))


def _update_learner(learner: Learner, model, tx, inputs: jax.Array, rng: jax.Array,
                    loss_fn, decay: jax.Array) -> tuple[Learner, dict[str, jax.Array]]:
  """One student update (grad, optimizer) and its teacher's EMA (eq. 4's mean teacher).

  A non-finite loss or gradient leaves the learner unchanged (metric `skipped` = 1): one bad
  batch cannot poison the weights or the teacher.
  """

  def objective(params):
    variables = {"params": params, "batch_stats": learner.batch_stats}
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
    loss, aux = loss_fn(logits)
    return loss, (mutated["batch_stats"], aux)

  (loss, (batch_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(learner.params)
  grad_norm = optax.global_norm(grads)
  # Decided before the update, so the select below fuses into the update's own pass over the
  # state (checking the new parameters too cost a second pass: about 10% of a R101 CPU step).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, learner.opt_state, learner.params)
  params = optax.apply_updates(learner.params, updates)
  ema = lambda teacher, student: decay * teacher + (1.0 - decay) * student  # noqa: E731
  new_learner = learner.replace(
      params=params, batch_stats=batch_stats, opt_state=opt_state,
      ema_params=jax.tree.map(ema, learner.ema_params, params),
      ema_batch_stats=jax.tree.map(ema, learner.ema_batch_stats, batch_stats))
  # Divergence guard: keep the old learner (prototypes included) when this update is not finite.
  new_learner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_learner, learner)
  return new_learner, dict(aux, loss=loss, grad_norm=grad_norm,
                           skipped=1.0 - finite.astype(jnp.float32))


def _pseudo_label_metrics(name: str, labels: jax.Array, valid: jax.Array, gt: jax.Array,
                          in_image: jax.Array) -> dict[str, jax.Array]:
  """Sums for pseudo-label accuracy (all in-image pixels and confident ones) and the ratio."""
  out = {}
  out[f"pl_correct_{name}"], out[f"pl_counted_{name}"] = metrics_lib.pseudo_label_accuracy(
      labels, gt, in_image)
  out[f"plc_correct_{name}"], out[f"plc_counted_{name}"] = metrics_lib.pseudo_label_accuracy(
      labels, gt, valid)
  out[f"confident_ratio_{name}"] = jnp.sum(valid) / jnp.maximum(jnp.sum(in_image), 1)
  return out


def train_step(state: RMLState, batch: dict[str, Any], *, cfg: StepConfig
               ) -> tuple[RMLState, dict[str, jax.Array]]:
  """One step of the configured rung of the ladder on a global batch (see input_pipeline for
  its layout). Returns the new state and a dict of float32 scalar metrics.

  Teachers of student a / b per mode: supervised: none; mean_teacher: its own mean teacher only;
  direct: the other student's current prediction (eq. 3); iml: both mean teachers (eqs. 4-5);
  rml: both mean teachers, labels self-rectified with each teacher's prototypes (eq. 6).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  cutmix_rng, rng_a, rng_b = jax.random.split(rng, 3)
  # Step within the current stage: ramp-ups and warm-ups restart with every stage.
  local_step = state.step % cfg.stage_steps if cfg.stage_steps else state.step
  labeled_images = normalize(batch["labeled"]["image"], cfg)
  labels = batch["labeled"]["label"]
  num_labeled = labeled_images.shape[0]
  learner_a, learner_b = state.learner_a, state.learner_b
  metrics: dict[str, jax.Array] = {}

  if cfg.mode == "supervised":
    inputs = labeled_images
    targets_a = targets_b = None
  else:
    unlabeled = batch["unlabeled"]
    weak = normalize(unlabeled["weak"], cfg)
    strong = normalize(unlabeled["strong"], cfg)
    in_image = unlabeled["valid"]
    gt = unlabeled["label"]
    source = student_outputs if cfg.mode == "direct" else teacher_outputs
    out_a = source(state.model_a, learner_a, weak)
    out_b = source(state.model_b, learner_b, weak)
    probs_a, labels_a, valid_a = pseudo_labels(out_a["logits"], cfg.threshold)
    probs_b, labels_b, valid_b = pseudo_labels(out_b["logits"], cfg.threshold)
    metrics["teacher_tv"] = metrics_lib.total_variation(probs_a, probs_b)  # coupling (Fig. 2)
    metrics["teacher_disagreement"] = jnp.sum(
        (labels_a != labels_b) & in_image) / jnp.maximum(jnp.sum(in_image), 1)
    if cfg.stored_labels:  # p^0 = the previous stage's teachers' soft labels, stored offline
      k = cfg.soft_label_top_k
      probs_a = soft_labels.decode(unlabeled["soft_classes"][..., :k],
                                   unlabeled["soft_probs"][..., :k], cfg.num_classes)
      probs_b = soft_labels.decode(unlabeled["soft_classes"][..., k:],
                                   unlabeled["soft_probs"][..., k:], cfg.num_classes)
      labels_a, labels_b = (jnp.argmax(p, -1).astype(jnp.int32) for p in (probs_a, probs_b))
      valid_a, valid_b = (jnp.max(p, -1) >= cfg.threshold for p in (probs_a, probs_b))
    if cfg.mode == "rml":
      metrics.update(_pseudo_label_metrics("raw_a", labels_a, valid_a & in_image, gt, in_image))
      metrics.update(_pseudo_label_metrics("raw_b", labels_b, valid_b & in_image, gt, in_image))
      learner_a, labels_a, confidence_a, applied = self_rectify(
          learner_a, probs_a, out_a["features"], in_image, local_step, cfg)
      learner_b, labels_b, confidence_b, _ = self_rectify(
          learner_b, probs_b, out_b["features"], in_image, local_step, cfg)
      valid_a, valid_b = confidence_a >= cfg.threshold, confidence_b >= cfg.threshold
      metrics["rectified"] = applied.astype(jnp.float32)
    valid_a, valid_b = valid_a & in_image, valid_b & in_image
    metrics.update(_pseudo_label_metrics("a", labels_a, valid_a, gt, in_image))
    metrics.update(_pseudo_label_metrics("b", labels_b, valid_b, gt, in_image))
    # CutMix on device: one box per sample, applied to image, labels and masks alike.
    n, h, w = labels_a.shape
    box = augment.cutmix_box_masks(cutmix_rng, n, h, w, cfg.cutmix_prob, cfg.cutmix_area)
    strong, labels_a, valid_a, labels_b, valid_b = augment.cutmix(
        box, strong, labels_a, valid_a, labels_b, valid_b)
    inputs = ((labeled_images, strong) if cfg.bn_stats == "labeled"
              else jnp.concatenate([labeled_images, strong], axis=0))
    # Both terms of a student's loss share one weight, so every rung has the same total weight.
    own_a, own_b = (labels_a, valid_a), (labels_b, valid_b)
    if cfg.mode == "mean_teacher":  # two independent mean teachers, no exchange
      targets_a, targets_b = own_a + own_a, own_b + own_b
    elif cfg.mode == "direct":  # eq. 3: each student taught by the other student
      targets_a, targets_b = own_b + own_b, own_a + own_a
    else:  # iml / rml, eq. 5: each student taught by both teachers
      targets_a = targets_b = (labels_a, valid_a, labels_b, valid_b)

  unsup_weight = unsup_weight_at(local_step, cfg.unsup_weight, cfg.unsup_rampup_steps)

  def make_loss_fn(targets):
    def loss_fn(logits: jax.Array):
      sup = losses.cross_entropy(logits[:num_labeled], labels, cfg.ignore_index)  # eq. 1
      if targets is None:
        return sup, {"sup_loss": sup}
      t_labels_a, t_valid_a, t_labels_b, t_valid_b = targets
      unsup = losses.student_mutual_loss(  # eq. 5, one student's two terms
          logits[num_labeled:], t_labels_a, t_labels_b, t_valid_a, t_valid_b)
      return sup + unsup_weight * unsup, {"sup_loss": sup, "unsup_loss": unsup}
    return loss_fn

  decay = ema_decay_at(local_step, cfg.ema_decay)
  learner_a, metrics_a = _update_learner(learner_a, state.model_a, state.tx, inputs, rng_a,
                                         make_loss_fn(targets_a), decay)
  learner_b, metrics_b = _update_learner(learner_b, state.model_b, state.tx, inputs, rng_b,
                                         make_loss_fn(targets_b), decay)
  metrics.update({f"{k}_a": v for k, v in metrics_a.items()})
  metrics.update({f"{k}_b": v for k, v in metrics_b.items()})
  new_state = state.replace(step=state.step + 1, learner_a=learner_a, learner_b=learner_b)
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


MODEL_NAMES = ("teacher_a", "teacher_b", "student_a", "student_b")


def predict_step(state: RMLState, images: jax.Array, *, cfg: StepConfig) -> dict[str, jax.Array]:
  """uint8 [N, H, W, 3] -> {model name: softmax probs [N, H, W, K] float32} for all four.

  With cfg.eval_protocol 'sliding' the probabilities are averaged over overlapping windows;
  cfg.eval_flip adds the horizontally flipped view.
  """
  whole = functools.partial(_whole_image_probs, state, cfg=cfg)
  if cfg.eval_protocol == "sliding":
    return evaluate_lib.sliding_window_probs(whole, images, cfg.eval_window, cfg.eval_stride,
                                             cfg.eval_flip)
  return evaluate_lib.with_flip(whole, images) if cfg.eval_flip else whole(images)


def _whole_image_probs(state: RMLState, images: jax.Array, *, cfg: StepConfig
                       ) -> dict[str, jax.Array]:
  """The four models on whole images: uint8 [N, H, W, 3] -> {name: probs [N, H, W, K]}."""
  x = normalize(images, cfg)
  out = {}
  for name, model, learner in (("a", state.model_a, state.learner_a),
                               ("b", state.model_b, state.learner_b)):
    out[f"teacher_{name}"] = jax.nn.softmax(teacher_outputs(model, learner, x)["logits"], -1)
    student = model.apply({"params": learner.params, "batch_stats": learner.batch_stats}, x,
                          train=False)
    out[f"student_{name}"] = jax.nn.softmax(student["logits"], -1)
  return out


def eval_step(state: RMLState, batch: dict[str, jax.Array], *, cfg: StepConfig
              ) -> dict[str, metrics_lib.ConfusionMatrix]:
  """{model name: ConfusionMatrix [K, K]} of the four models on one eval batch."""
  probs = predict_step(state, batch["image"], cfg=cfg)
  return {name: metrics_lib.ConfusionMatrix(metrics_lib.confusion_matrix(
      batch["label"], jnp.argmax(p, -1), cfg.num_classes, cfg.ignore_index))
      for name, p in probs.items()}


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
