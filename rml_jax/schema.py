"""validate(config): every value of a config checked before anything runs.

The keys and their defaults live in configs/default.py; this module says what each may hold.
A bad value stops with one line naming the key, what is allowed and what was given.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Callable

import ml_collections

from rml_jax import augment, class_balance, datasets, models
from rml_jax.constants import EXPORT_FORMATS, MODEL_NAMES
from rml_jax.errors import UserError
from rml_jax.step import MODES

# ---------------------------------------------------------------------------------------------
# Value kinds: each returns None when the value fits, else what was expected.
# ---------------------------------------------------------------------------------------------

Check = Callable[[Any], "str | None"]


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Check:
  """An int in [low, high] (either bound optional)."""
  expected = "an integer" + _range_text(low, high, True, True)

  def check(value):
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    return None if ok else expected
  return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Check:
  """A real number in the interval (bounds optional, open or closed)."""
  expected = "a number" + _range_text(low, high, not low_open, not high_open)

  def check(value):
    if not _is_number(value):
      return expected
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return None if above and below else expected
  return check


def _range_text(low, high, low_closed: bool, high_closed: bool) -> str:
  if low is None and high is None:
    return ""
  if high is None:
    return f" {'>=' if low_closed else '>'} {low}"
  if low is None:
    return f" {'<=' if high_closed else '<'} {high}"
  return f" in {'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"


def boolean() -> Check:
  return lambda value: None if isinstance(value, bool) else "True or False"


def string() -> Check:
  return lambda value: None if isinstance(value, str) else "a string"


def choice(*allowed: str) -> Check:
  expected = f"one of {list(allowed)}"
  return lambda value: None if value in allowed else expected


def sequence(length: int | None, item: Check, what: str, nonempty: bool = False) -> Check:
  """A tuple or list of `length` items (any length when None), each passing `item`."""

  def check(value):
    if not isinstance(value, (tuple, list)):
      return what
    if (length is not None and len(value) != length) or (nonempty and not value):
      return what
    return None if all(item(v) is None for v in value) else what
  return check


def size() -> Check:
  """(h, w), two positive integers."""
  return sequence(2, integer(1), "(h, w): two integers >= 1")


def optional(check: Check) -> Check:
  """None, or what `check` accepts."""

  def wrapped(value):
    if value is None:
      return None
    problem = check(value)
    return None if problem is None else f"None or {problem}"
  return wrapped


def ordered_pair(low: float, high: float, low_open: bool = False) -> Check:
  """(a, b) with low <= a <= b <= high (a > low when low_open)."""
  bound = number(low, high, low_open=low_open)
  what = (f"(min, max) with {low} {'<' if low_open else '<='} min <= max <= {high}")

  def check(value):
    if sequence(2, bound, what)(value) is not None or value[0] > value[1]:
      return what
    return None
  return check


def lr_multiplier() -> Check:
  """(regex, multiplier > 0) with a regex that compiles."""

  def check(value):
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not isinstance(value[0], str)
        or not _is_number(value[1]) or value[1] <= 0):
      return "(regex, multiplier > 0)"
    try:
      re.compile(value[0])
    except re.error as e:
      return f"a valid regex ({e})"
    return None
  return check


# ---------------------------------------------------------------------------------------------
# The rules, one per key of configs/default.py.
# ---------------------------------------------------------------------------------------------

RULES: dict[str, Check] = {
    "seed": integer(0),
    "dtype": choice(*models.DTYPES),
    "data.name": choice(*datasets.DATASETS),
    "data.data_dir": string(),
    "data.prepare": boolean(),
    "data.manual_dir": string(),
    "data.train_split": string(),
    "data.val_split": string(),
    "data.labeled_fraction": number(0.0, 1.0, low_open=True),
    "data.split": string(),
    "data.split_seed": integer(0),
    "data.split_dir": string(),
    "data.resize": optional(size()),
    "data.crop_size": size(),
    "data.scale_range": ordered_pair(0.0, 10.0, low_open=True),
    "data.flip": boolean(),
    "data.mean": sequence(3, number(), "three numbers"),
    "data.std": sequence(3, number(0.0, low_open=True), "three numbers > 0"),
    "data.worker_count": integer(0),
    "data.prefetch": integer(1),
    "data.root": string(),
    "data.images_dir": string(),
    "data.labels_dir": string(),
    "data.label_suffix": string(),
    "data.unlabeled_dir": string(),
    "data.val_images_dir": string(),
    "data.val_labels_dir": string(),
    "data.val_holdout": integer(0),
    "data.val_list": string(),
    "data.train_list": string(),
    "data.class_names": sequence(None, string(), "a non-empty list of class names",
                                 nonempty=True),
    "data.label_map": sequence(None, sequence(2, integer(0, 255), ""),
                               "((raw value, class id), ...) with values in [0, 255]"),
    "data.ignore_value": integer(-1, 255),
    "augment.num_ops": integer(0),
    "augment.magnitude_range": ordered_pair(0.0, 1.0),
    "augment.ops": sequence(None, choice(*augment.PHOTOMETRIC_OPS),
                            f"a list of ops from {list(augment.PHOTOMETRIC_OPS)}"),
    "augment.strong_views": choice("per_student", "shared"),
    "augment.cutmix_prob": number(0.0, 1.0),
    "augment.cutmix_area": ordered_pair(0.0, 1.0, low_open=True),
    "model.name": choice(*models.MODELS),
    "model.dropout_rate": number(0.0, 1.0, high_open=True),
    "model.survival_prob": number(0.0, 1.0, low_open=True),
    "model.survival_schedule": choice(*models.SURVIVAL_SCHEDULES),
    "model.frozen_bn": boolean(),
    "model.train_bn_affine": boolean(),
    "model.remat": boolean(),
    "model.init_from": string(),
    "model.activation": choice(*models.ACTIVATIONS),
    "model_b.name": choice("", *models.MODELS),
    "model_b.init_from": string(),
    "optimizer.name": choice("sgd", "adamw"),
    "optimizer.learning_rate": number(0.0, low_open=True),
    "optimizer.momentum": number(0.0, 1.0, high_open=True),
    "optimizer.weight_decay": number(0.0),
    "optimizer.decay_all_params": boolean(),
    "optimizer.lr_multipliers": sequence(None, lr_multiplier(), "a tuple of (regex, multiplier) "
                                         "pairs, e.g. (('^(decoder|classifier)/', 40.0),)"),
    "optimizer.poly_power": number(0.0),
    "optimizer.warmup_steps": integer(0),
    "optimizer.lr_scaling": choice("none", "linear", "sqrt"),
    "optimizer.reference_batch_size": integer(1),
    "rml.mode": choice(*MODES),
    "rml.threshold": number(0.0, 1.0),
    "rml.unsup_weight": number(0.0),
    "rml.unsup_rampup_steps": integer(0),
    "rml.unsup_rampdown": number(0.0, 1.0),
    "rml.ema_decay": number(0.0, 1.0),
    "rml.bn_stats": choice("joint", "labeled"),
    "rml.stages": integer(1),
    "rml.stage_restart": choice("init", "continue"),
    "rml.soft_label_top_k": integer(1),
    "rml.prototype_momentum": number(0.0, 1.0, high_open=True),
    "rml.prototype_temperature": number(0.0, low_open=True),
    "rml.rectify_start_step": integer(0),
    "rml.prototypes_from_labeled": boolean(),
    "rml.class_balance": choice(*class_balance.RULES),
    "rml.class_balance_portion": number(0.0, 1.0, low_open=True),
    "rml.class_balance_floor": number(0.0, 1.0),
    "rml.class_balance_momentum": number(0.0, 1.0, high_open=True),
    "rml.class_balance_bins": integer(2),
    "rml.distribution_alignment": boolean(),
    "rml.soft_targets": boolean(),
    "rml.boundary_ignore": integer(0),
    "eval.protocol": choice("whole", "sliding"),
    "eval.window": optional(size()),
    "eval.stride": number(0.0, 1.0, low_open=True),
    "eval.flip": boolean(),
    "eval.resize": optional(size()),
    "eval.pad_to": optional(size()),
    "predict.input": string(),
    "predict.output": string(),
    "predict.model": choice(*MODEL_NAMES),
    "predict.overlay_alpha": number(0.0, 1.0),
    "export.format": choice(*EXPORT_FORMATS),
    "export.output": string(),
    "export.model": choice(*MODEL_NAMES),
    "export.step": integer(0),
    "export.image_size": optional(size()),
    "labeled_batch_size": integer(1),
    "unlabeled_batch_size": integer(1),
    "eval_batch_size": integer(1),
    "total_steps": integer(1),
    "log_every": integer(1),
    "eval_every": integer(1),
    "checkpoint_every": integer(1),
    "keep_checkpoints": integer(1),
    "max_steps_per_run": integer(0),
    "max_skipped_steps": integer(0),
    "num_image_summaries": integer(0),
    "mesh.data": integer(-1),
    "mesh.fsdp": integer(1),
}


@dataclasses.dataclass(frozen=True)
class Relation:
  """A rule between keys: `holds(config)` must be true, else `message` (a string, or a function
  of the config for a message that quotes other keys' values)."""

  key: str
  holds: Callable[[ml_collections.ConfigDict], bool]
  message: str | Callable[[ml_collections.ConfigDict], str]

  def text(self, config: ml_collections.ConfigDict) -> str:
    """The message for `config`."""
    return self.message if isinstance(self.message, str) else self.message(config)


def _rectifies_within_a_stage(config: ml_collections.ConfigDict) -> bool:
  """Whether a rectifying mode starts rectifying before its stage ends (stages restart the
  count, so a start step at or past total_steps would never rectify)."""
  return not MODES[config.rml.mode].rectify or config.rml.rectify_start_step < config.total_steps


RELATIONS = (
    Relation("rml.stages", lambda c: c.rml.stages == 1 or MODES[c.rml.mode].unlabeled,
             "expected 1 with rml.mode='supervised' (stages relabel the unlabeled images)"),
    Relation("rml.class_balance_floor",
             lambda c: (c.rml.class_balance == "none"
                        or c.rml.class_balance_floor <= c.rml.threshold),
             "expected at most rml.threshold with rml.class_balance set (no class threshold lies "
             "above tau)"),
    Relation("data.val_list", lambda c: not c.data.val_list or (
        c.data.val_holdout == 0 and not c.data.val_images_dir),
        "expected '' with data.val_holdout > 0 or data.val_images_dir (one val set)"),
    Relation("data.train_list", lambda c: not c.data.train_list or bool(c.data.val_list),
             "expected '' without data.val_list"),
    Relation("mesh.data", lambda c: c.mesh.data != 0, "expected -1 (all devices) or >= 1"),
    Relation("data.crop_size", lambda c: _fits_patches(c, c.data.crop_size),
             "expected (h, w) multiples of the students' patch size (DINOv2: 14)"),
    Relation("eval.window", lambda c: c.eval.window is None or _fits_patches(c, c.eval.window),
             "expected None or (h, w) multiples of the students' patch size (DINOv2: 14)"),
    Relation("rml.rectify_start_step", _rectifies_within_a_stage,
             lambda c: f"expected an integer in [0, {c.total_steps - 1}] with "
                       f"rml.mode={c.rml.mode!r}, below the stage length "
                       f"total_steps={c.total_steps} (each stage counts from 0)"),
)


def _fits_patches(config: ml_collections.ConfigDict, size) -> bool:
  """Whether (h, w) are multiples of the patch size of every student that needs it."""
  names = [config.model.name, config.model_b.name or config.model.name]
  multiple = max(models.input_multiple(name) for name in names if name in models.MODELS)
  return all(int(side) % multiple == 0 for side in size)


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Dotted key -> value of every leaf of `config`."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_items(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for the first key that is missing, unknown or holds a bad value."""
  values = flat_items(config)
  for key in RULES:
    if key not in values:
      raise UserError(f"config.{key}: missing; expected the key of configs/default.py "
                      "(configs start from default.get_config())")
  for key, value in values.items():
    if key not in RULES:
      raise UserError(f"config.{key}: unknown key; expected one of configs/default.py's")
    problem = RULES[key](value)
    if problem is not None:
      raise UserError(f"config.{key}: expected {problem}, got {value!r}")
  for relation in RELATIONS:
    if not relation.holds(config):
      raise UserError(f"config.{relation.key}: {relation.text(config)}, got "
                      f"{values[relation.key]!r}")
