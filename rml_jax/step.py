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

from rml_jax import augment, losses, sharding
from rml_jax import metrics as metrics_lib
from rml_jax.errors import UserError
from rml_jax.state import Learner, RMLState

MODES = ("supervised", "iml")  # later rungs of the ablation ladder plug in here


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
  ignore_index: int = 255

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "StepConfig":
    if config.rml.mode not in MODES:
      raise UserError(f"config.rml.mode: expected one of {MODES}, got {config.rml.mode!r}")
    if config.rml.bn_stats not in ("joint", "labeled"):
      raise UserError("config.rml.bn_stats: expected 'joint' or 'labeled', got "
                      f"{config.rml.bn_stats!r}")
    return cls(mode=config.rml.mode, num_classes=num_classes, threshold=config.rml.threshold,
               unsup_weight=config.rml.unsup_weight,
               unsup_rampup_steps=config.rml.unsup_rampup_steps, ema_decay=config.rml.ema_decay,
               bn_stats=config.rml.bn_stats,
               cutmix_prob=config.augment.cutmix_prob,
               cutmix_area=tuple(config.augment.cutmix_area),
               mean=tuple(config.data.mean), std=tuple(config.data.std))


def normalize(images: jax.Array, cfg: StepConfig) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32, scaled to [0, 1] then standardised by the config's mean/std."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(cfg.mean)) / jnp.asarray(cfg.std)


def teacher_outputs(model, learner: Learner, images: jax.Array) -> dict[str, jax.Array]:
  """Mean teacher in eval mode: {'logits' [N, H, W, K], 'features' [N, h, w, C]}, no gradient."""
  variables = {"params": learner.ema_params, "batch_stats": learner.ema_batch_stats}
  return jax.lax.stop_gradient(model.apply(variables, images, train=False))


def pseudo_labels(logits: jax.Array, threshold: float) -> tuple[jax.Array, ...]:
  """Eqs. 2/4: (probs [N,H,W,K], hard labels [N,H,W] int32, confidence mask [N,H,W] bool)."""
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, jnp.argmax(probs, -1).astype(jnp.int32), jnp.max(probs, -1) >= threshold


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
  """One student update (grad, optimizer) and its teacher's EMA (eq. 4's mean teacher)."""

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
  updates, opt_state = tx.update(grads, learner.opt_state, learner.params)
  params = optax.apply_updates(learner.params, updates)
  ema = lambda teacher, student: decay * teacher + (1.0 - decay) * student  # noqa: E731
  new_learner = learner.replace(
      params=params, batch_stats=batch_stats, opt_state=opt_state,
      ema_params=jax.tree.map(ema, learner.ema_params, params),
      ema_batch_stats=jax.tree.map(ema, learner.ema_batch_stats, batch_stats))
  return new_learner, dict(aux, loss=loss, grad_norm=optax.global_norm(grads))


def train_step(state: RMLState, batch: dict[str, Any], *, cfg: StepConfig
               ) -> tuple[RMLState, dict[str, jax.Array]]:
  """One RML step on a global batch (see input_pipeline for its layout). Returns the new state
  and a dict of float32 scalar metrics."""
  rng = jax.random.fold_in(state.rng, state.step)
  cutmix_rng, rng_a, rng_b = jax.random.split(rng, 3)
  labeled_images = normalize(batch["labeled"]["image"], cfg)
  labels = batch["labeled"]["label"]
  num_labeled = labeled_images.shape[0]
  metrics: dict[str, jax.Array] = {}

  if cfg.mode == "supervised":
    inputs = labeled_images
    unsup_targets = None
  else:
    unlabeled = batch["unlabeled"]
    weak = normalize(unlabeled["weak"], cfg)
    strong = normalize(unlabeled["strong"], cfg)
    probs_a, labels_a, valid_a = pseudo_labels(
        teacher_outputs(state.model_a, state.learner_a, weak)["logits"], cfg.threshold)
    probs_b, labels_b, valid_b = pseudo_labels(
        teacher_outputs(state.model_b, state.learner_b, weak)["logits"], cfg.threshold)
    in_image = unlabeled["valid"]
    valid_a, valid_b = valid_a & in_image, valid_b & in_image
    gt = unlabeled["label"]
    for name, teacher_labels, valid in (("a", labels_a, valid_a), ("b", labels_b, valid_b)):
      correct, counted = metrics_lib.pseudo_label_accuracy(teacher_labels, gt, in_image)
      metrics[f"pl_correct_{name}"], metrics[f"pl_counted_{name}"] = correct, counted
      correct, counted = metrics_lib.pseudo_label_accuracy(teacher_labels, gt, valid)
      metrics[f"plc_correct_{name}"], metrics[f"plc_counted_{name}"] = correct, counted
      metrics[f"confident_ratio_{name}"] = jnp.sum(valid) / jnp.maximum(jnp.sum(in_image), 1)
    metrics["teacher_tv"] = metrics_lib.total_variation(probs_a, probs_b)
    # CutMix on device: one box per sample, applied to image, labels and masks alike.
    n, h, w = labels_a.shape
    box = augment.cutmix_box_masks(cutmix_rng, n, h, w, cfg.cutmix_prob, cfg.cutmix_area)
    strong, labels_a, valid_a, labels_b, valid_b = augment.cutmix(
        box, strong, labels_a, valid_a, labels_b, valid_b)
    inputs = ((labeled_images, strong) if cfg.bn_stats == "labeled"
              else jnp.concatenate([labeled_images, strong], axis=0))
    unsup_targets = (labels_a, labels_b, valid_a, valid_b)

  def loss_fn(logits: jax.Array):
    sup = losses.cross_entropy(logits[:num_labeled], labels, cfg.ignore_index)  # eq. 1
    if unsup_targets is None:
      return sup, {"sup_loss": sup}
    unsup = losses.student_mutual_loss(logits[num_labeled:], *unsup_targets)  # eq. 5
    return sup + unsup_weight * unsup, {"sup_loss": sup, "unsup_loss": unsup}

  unsup_weight = unsup_weight_at(state.step, cfg.unsup_weight, cfg.unsup_rampup_steps)

  decay = ema_decay_at(state.step, cfg.ema_decay)
  learner_a, metrics_a = _update_learner(state.learner_a, state.model_a, state.tx, inputs, rng_a,
                                         loss_fn, decay)
  learner_b, metrics_b = _update_learner(state.learner_b, state.model_b, state.tx, inputs, rng_b,
                                         loss_fn, decay)
  metrics.update({f"{k}_a": v for k, v in metrics_a.items()})
  metrics.update({f"{k}_b": v for k, v in metrics_b.items()})
  new_state = state.replace(step=state.step + 1, learner_a=learner_a, learner_b=learner_b)
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


MODEL_NAMES = ("teacher_a", "teacher_b", "student_a", "student_b")


def predict_step(state: RMLState, images: jax.Array, *, cfg: StepConfig) -> dict[str, jax.Array]:
  """uint8 [N, H, W, 3] -> {model name: softmax probs [N, H, W, K] float32} for all four."""
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
