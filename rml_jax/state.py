"""The train state: one pure pytree holding two learners (student + mean teacher each)."""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from rml_jax import models, sharding, weights

PyTree = Any


@struct.dataclass
class Learner:
  """A student, its optimizer state, its mean teacher (EMA) and the teacher's class prototypes.

  prototypes: [K, C] float32 class centres in the teacher's feature space (eq. 11);
  prototypes_seen: [K] bool, whether row k holds a real mean yet (set from the first batch that
  contains class k, so unset zero rows never enter eq. 9).
  confidence_histogram: [K, B] float32, the running per-class histogram of the confidence of
  this learner's pseudo labels (class_balance.py; zeros until its first unlabeled batch).
  label_distribution, prediction_distribution: [K] float32 running class shares of the labeled
  pixels and of this learner's soft pseudo labels (distribution alignment; uniform at first).
  """

  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree
  ema_batch_stats: PyTree
  prototypes: jax.Array
  prototypes_seen: jax.Array
  confidence_histogram: jax.Array
  label_distribution: jax.Array
  prediction_distribution: jax.Array

  @property
  def student(self) -> dict[str, PyTree]:
    """The student's variables, as model.apply takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def teacher(self) -> dict[str, PyTree]:
    """The mean teacher's variables, as model.apply takes them."""
    return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


@struct.dataclass
class RMLState:
  """step: int32 scalar; rng: the run's base key (per-step keys are folded from step)."""

  step: jax.Array
  learner_a: Learner
  learner_b: Learner
  rng: jax.Array
  model_a: nn.Module = struct.field(pytree_node=False)
  model_b: nn.Module = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def stage_length(config: ml_collections.ConfigDict) -> int:
  """Steps per stage: every stage runs config.total_steps (the paper: 90k x 2 stages); the
  schedules, EMA warm-up and rectification start restart with each stage."""
  return config.total_steps


LR_SCALING = {"none": lambda ratio: 1.0, "linear": lambda ratio: ratio, "sqrt": math.sqrt}


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optimizer.learning_rate times optimizer.lr_scaling's factor of the batch ratio
  labeled_batch_size / optimizer.reference_batch_size: none 1, linear the ratio, sqrt its root."""
  opt = config.optimizer
  ratio = config.labeled_batch_size / opt.reference_batch_size
  return opt.learning_rate * LR_SCALING[opt.lr_scaling](ratio)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup, then poly decay (1 - t/T)^power to 0 at the end of a stage (paper: poly),
  from the peak rate scaled_learning_rate(config)."""
  opt = config.optimizer
  peak = scaled_learning_rate(config)
  decay = optax.polynomial_schedule(
      peak, 0.0, opt.poly_power, max(stage_length(config) - opt.warmup_steps, 1))
  if opt.warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, opt.warmup_steps)
  return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def decays(params: PyTree) -> PyTree:
  """The weight-decay mask: True for convolution and dense kernels; False for biases,
  normalisation scales, position embeddings and class tokens."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def _path_text(path) -> str:
  """A tree path as 'encoder/blocks_0/attn/qkv/kernel'."""
  return "/".join(str(getattr(entry, "key", entry)) for entry in path)


def _in_frozen_bn(path) -> bool:
  """Whether the leaf is the scale or bias of a batch norm inside a pretrained backbone."""
  names = [getattr(entry, "key", "") for entry in path]
  return "backbone" in names and any(n.startswith(("bn", "downsample_bn")) for n in names)


def frozen_bn_labels(params: PyTree) -> PyTree:
  """'frozen' for the scale and bias of every batch norm inside a pretrained backbone
  (`backbone/.../bn*`), 'train' for everything else."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if _in_frozen_bn(path) else "train", params)


def lr_multiplier_of(path: str, multipliers: Sequence[tuple[str, float]]) -> float:
  """The learning-rate multiplier of the parameter at `path`: the first (regex, multiplier) of
  config.optimizer.lr_multipliers whose regex matches somewhere in the path, else 1."""
  for pattern, multiplier in multipliers:
    if re.search(pattern, path):
      return float(multiplier)
  return 1.0


def parameter_groups(params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
  """Each leaf's optimizer group: 'frozen' (a frozen backbone batch norm's scale or bias, when
  config.model.frozen_bn and not train_bn_affine), else `group_name` of its multiplier."""
  freeze = config.model.frozen_bn and not config.model.train_bn_affine
  multipliers = tuple(config.optimizer.lr_multipliers)

  def label(path, _) -> str:
    if freeze and _in_frozen_bn(path):
      return "frozen"
    return group_name(lr_multiplier_of(_path_text(path), multipliers))

  return jax.tree_util.tree_map_with_path(label, params)


def group_name(multiplier: float) -> str:
  """'train' for the base learning rate (the optimizer state's key since before groups
  existed, so older checkpoints restore), else 'lr_x<multiplier>'."""
  return "train" if multiplier == 1.0 else f"lr_x{float(multiplier)!r}"


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay (the paper's solver), or AdamW (decoupled decay).

  Weight decay reaches the kernels only (`decays`) unless config.optimizer.decay_all_params.
  Parameter groups (`parameter_groups`): each config.optimizer.lr_multipliers pattern's
  parameters follow the schedule times its multiplier (decay scaled with it, as torch's
  per-group lr does); with config.model.frozen_bn and not config.model.train_bn_affine, the
  backbone's batch-norm scales and biases stay fixed (DeepLab's fine-tuning).
  """
  opt = config.optimizer
  mask = None if opt.decay_all_params else decays

  def solver(multiplier: float) -> optax.GradientTransformation:
    base = learning_rate_schedule(config)
    schedule = base if multiplier == 1.0 else (lambda count: base(count) * multiplier)
    if opt.name == "sgd":
      return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=mask),
                         optax.sgd(schedule, momentum=opt.momentum, nesterov=False))
    return optax.adamw(schedule, weight_decay=opt.weight_decay, mask=mask)  # "adamw"

  multipliers = {1.0} | {float(m) for _, m in opt.lr_multipliers}
  freeze = config.model.frozen_bn and not config.model.train_bn_affine
  if multipliers == {1.0} and not freeze:
    return solver(1.0)
  transforms = {group_name(m): solver(m) for m in sorted(multipliers)}
  if freeze:
    transforms["frozen"] = optax.set_to_zero()
  return optax.multi_transform(transforms,
                               functools.partial(parameter_groups, config=config))


def build_models(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nn.Module, ...]:
  """Student architectures a and b; config.model_b.name (if set) makes the pair heterogeneous."""
  crop = tuple(config.data.crop_size)
  model_a = models.build_model(config.model, num_classes, config.dtype, crop)
  config_b = config.model.copy_and_resolve_references()
  if config.model_b.name:
    config_b.name = config.model_b.name
  model_b = models.build_model(config_b, num_classes, config.dtype, crop)
  return model_a, model_b


def _learner(model: nn.Module, tx: optax.GradientTransformation, variables: dict,
             image_shape: tuple[int, ...], num_classes: int, histogram_bins: int) -> Learner:
  """A fresh learner around initial `variables`: teacher = student, zero prototypes and
  confidence histogram [K, histogram_bins]."""
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(image_shape), train=False),
                            variables)["features"]
  return Learner(
      params=params, batch_stats=batch_stats, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
      prototypes=jnp.zeros((num_classes, features.shape[-1]), jnp.float32),
      prototypes_seen=jnp.zeros((num_classes,), jnp.bool_),
      confidence_histogram=jnp.zeros((num_classes, histogram_bins), jnp.float32),
      label_distribution=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
      prediction_distribution=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32))


def make_init_fn(config: ml_collections.ConfigDict, num_classes: int):
  """rng -> RMLState. Build it once per run: the state's static fields (models, tx) are this
  function's, and jit and checkpoint restore compare them by identity."""
  model_a, model_b = build_models(config, num_classes)
  tx = make_optimizer(config)
  image_shape = (1, *config.data.crop_size, 3)

  def model_init(model: nn.Module, rng: jax.Array) -> dict:
    return model.init({"params": rng}, jnp.zeros(image_shape, jnp.float32), train=False)

  def init(rng: jax.Array) -> RMLState:
    # Students a and b get different initial weights (independent keys), as mutual learning needs.
    rng_a, rng_b, rng_run = jax.random.split(rng, 3)
    if model_a == model_b:
      # One batched initialisation: the same values as two separate ones (jax's random
      # functions give each key of a vmap what they give it alone), half the program to
      # compile (a DeepLabv2-R101 pair's init is as slow to compile as its train step).
      both = jax.vmap(functools.partial(model_init, model_a))(jnp.stack([rng_a, rng_b]))
      variables_a, variables_b = (jax.tree.map(lambda x, i=i: x[i], both) for i in (0, 1))
    else:
      variables_a, variables_b = model_init(model_a, rng_a), model_init(model_b, rng_b)
    return RMLState(
        step=jnp.zeros((), jnp.int32),
        learner_a=_learner(model_a, tx, variables_a, image_shape, num_classes,
                           config.rml.class_balance_bins),
        learner_b=_learner(model_b, tx, variables_b, image_shape, num_classes,
                           config.rml.class_balance_bins),
        rng=rng_run, model_a=model_a, model_b=model_b, tx=tx)

  return init


def abstract_train_state(init_fn, mesh) -> tuple[RMLState, RMLState]:
  """(abstract state of jax.ShapeDtypeStruct with shardings, shardings): nothing is computed."""
  shapes = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = sharding.state_shardings(shapes, mesh)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return abstract, shardings


def create_train_state(init_fn, rng: jax.Array, shardings) -> RMLState:
  """Initialises the state directly into its shardings (no host copy of the weights)."""
  return jax.jit(init_fn, out_shardings=shardings)(rng)


def pretrained_paths(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """config.model.init_from for student a; student b uses it too unless model_b names another
  architecture (then config.model_b.init_from)."""
  path_a = config.model.init_from
  path_b = config.model_b.init_from if config.model_b.name else path_a
  return path_a, path_b


def pretrained_keys(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The config keys that name each student's params file (for messages)."""
  return ("config.model.init_from",
          "config.model_b.init_from" if config.model_b.name else "config.model.init_from")


def check_pretrained_files(config: ml_collections.ConfigDict) -> None:
  """Reads each params file the config names once, so a bad one stops before a run writes."""
  for path, key in set(zip(pretrained_paths(config), pretrained_keys(config))):
    if path:
      weights.load(path, key)


def load_pretrained(train_state: RMLState, config: ml_collections.ConfigDict,
                    shardings) -> RMLState:
  """Puts converted pretrained weights (rml_jax.convert) into both students and both teachers.

  Leaves the file does not hold (the heads) stay as initialised; a leaf of another shape stops
  with one line naming it. A ViT position embedding is resampled to the crop's token grid.
  """
  paths = pretrained_paths(config)
  if not any(paths):
    return train_state
  learners = {}
  keys = pretrained_keys(config)
  for name, model, path, key in (("learner_a", train_state.model_a, paths[0], keys[0]),
                                 ("learner_b", train_state.model_b, paths[1], keys[1])):
    learner = getattr(train_state, name)
    if not path:
      learners[name] = learner
      continue
    learner = jax.device_get(learner)
    patch = getattr(model, "patch_size", None)
    grid = (tuple(s // patch for s in config.data.crop_size) if patch else None)
    merged, kept = weights.merge_pretrained(learner.student, weights.load(path, key), path,
                                           grid)
    logging.info("%s: loaded %s; %d tensors stay initialised (e.g. %s)", name, path,
                 len(kept), ", ".join(kept[:3]))
    learners[name] = learner.replace(
        params=merged["params"], batch_stats=merged.get("batch_stats", {}),
        ema_params=merged["params"], ema_batch_stats=merged.get("batch_stats", {}))
  return jax.device_put(train_state.replace(**learners), shardings)
