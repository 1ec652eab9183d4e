"""The compiled program of a config: models, state layout, shardings and the jitted steps.

A Program reads no run directory: training, evaluation, prediction, the benchmark and the tests
build the same one from a config (schema.validate runs first), then pair it with their own data
and files.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from rml_jax import datasets, schema, sharding, state, step
from rml_jax import metrics as metrics_lib
from rml_jax.state import RMLState


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything a run computes with, built without initialising any weights.

  init_fn: rng -> RMLState (its static fields, the models and the optimizer, are this
  program's); abstract_state: the state as jax.ShapeDtypeStructs with shardings;
  train_fn / eval_fn / predict_fn: step.train_step / eval_step / predict_step jitted with
  explicit shardings (train_fn donates the state).
  """

  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  mesh: jax.sharding.Mesh
  step_config: step.StepConfig
  init_fn: Callable[[jax.Array], RMLState]
  abstract_state: RMLState
  state_shardings: Any
  train_fn: Callable
  eval_fn: Callable
  predict_fn: Callable

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, devices: list | None = None) -> "Program":
    """Validates the config, then builds the program on `devices` (default: all)."""
    schema.validate(config)
    class_names = datasets.class_names(config.data)
    mesh = sharding.create_mesh(config.mesh, devices)
    step_config = dataclasses.replace(step.StepConfig.from_config(config, len(class_names)),
                                      weights_sharding=sharding.weights_sharding(mesh))
    init_fn = state.make_init_fn(config, len(class_names))
    abstract_state, shardings = state.abstract_train_state(init_fn, mesh)
    train_fn, eval_fn, predict_fn = step.jit_steps(step_config, shardings, mesh)
    return cls(config, class_names, mesh, step_config, init_fn, abstract_state, shardings,
               train_fn, eval_fn, predict_fn)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def meta(self) -> dict[str, Any]:
    """What a checkpoint of this program records and restore checks."""
    config = self.config
    return {"dataset": config.data.name, "num_classes": self.num_classes,
            "model_a": config.model.name, "model_b": config.model_b.name or config.model.name,
            "mode": config.rml.mode}

  def fresh_state(self, rng: jax.Array) -> RMLState:
    """A state initialised from `rng` directly into its shardings."""
    return state.create_train_state(self.init_fn, rng, self.state_shardings)

  def initial_state(self) -> RMLState:
    """The run's initial state: seeded init, then the pretrained weights that
    config.model.init_from / config.model_b.init_from name."""
    fresh = self.fresh_state(jax.random.key(self.config.seed))
    return state.load_pretrained(fresh, self.config, self.state_shardings)

  @functools.cached_property
  def stored_labels_train_fn(self) -> Callable:
    """The jitted train step of the stages after the first (p^0 from stored soft labels)."""
    cfg = dataclasses.replace(self.step_config, stored_labels=True)
    return step.jit_steps(cfg, self.state_shardings, self.mesh)[0]

  def stage_train_fn(self, stage: int) -> Callable:
    """The jitted train step of stage `stage` (0-based)."""
    return self.train_fn if stage == 0 else self.stored_labels_train_fn

  def restart_students(self, train_state: RMLState, restart: str) -> RMLState:
    """The state a new stage starts from (config.rml.stage_restart).

    'init': students, teachers and prototypes back to the initial weights; 'continue': keep
    the weights and prototypes, fresh optimizer state (the schedule restarts). The step and the
    run's rng carry on.
    """
    if restart == "init":
      fresh = self.initial_state()
      return fresh.replace(step=train_state.step, rng=train_state.rng)

    def reset_optimizer(current: RMLState) -> RMLState:
      return current.replace(**{name: getattr(current, name).replace(
          opt_state=current.tx.init(getattr(current, name).params))
          for name in ("learner_a", "learner_b")})

    return jax.jit(reset_optimizer, out_shardings=self.state_shardings,
                   donate_argnums=0)(train_state)

  @functools.cached_property
  def prototype_sums_fn(self) -> Callable:
    """step.prototype_sums_step jitted: (state, {'image', 'valid'}) -> replicated sums."""
    return jax.jit(functools.partial(step.prototype_sums_step, cfg=self.step_config),
                   in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
                   out_shardings=sharding.replicated(self.mesh))

  def with_exact_prototypes(self, train_state: RMLState, sums: np.ndarray,
                            counts: np.ndarray) -> RMLState:
    """The state with eq. 10 prototypes from dataset-wide sums [2, K, C] and counts [2, K]."""
    return jax.jit(step.with_exact_prototypes, out_shardings=self.state_shardings,
                   donate_argnums=0)(train_state, sums, counts)

  def predict(self, train_state: RMLState, images: np.ndarray) -> dict[str, np.ndarray]:
    """Host uint8 images [B, H, W, 3] -> {model name: host probs [B, H, W, K]}."""
    return jax.device_get(self.predict_fn(train_state, sharding.to_global(images, self.mesh)))

  def confusion_matrices(self, train_state: RMLState,
                         batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{model name: [K, K] int64} summed on device over `batches`; one transfer at the end."""
    totals = None
    for batch in batches:
      matrices = self.eval_fn(train_state, sharding.to_global(batch, self.mesh))
      totals = matrices if totals is None else {k: totals[k].merge(v)
                                                for k, v in matrices.items()}
    return {k: np.asarray(jax.device_get(v.matrix), np.int64) for k, v in totals.items()}

  def evaluate(self, train_state: RMLState, batches: Iterable[dict[str, np.ndarray]]
               ) -> dict[str, Any]:
    """{model name: {'miou', 'iou': {class: IoU or None}}} over all `batches`."""
    return metrics_lib.summarize(self.confusion_matrices(train_state, batches),
                                 self.class_names)
