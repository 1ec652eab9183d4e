"""schema.validate: every key of configs/default.py has a rule, and a table of bad values (one per
kind of field) each stops with one line naming the key and what it allows; from the command
line: exit status 2 and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs import default, digits
from rml_jax import schema
from rml_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_key_of_the_default_config_has_a_rule_and_every_rule_a_key():
  assert set(schema.flat_items(default.get_config())) == set(schema.RULES)


# (key, bad value, what the message must say). Values of other Python types than the default's
# are stopped by ml_collections itself (type-safe fields); None-valued fields take any type.
BAD_VALUES = [
    ("total_steps", -5, "an integer >= 1"),  # integer, lower bound
    ("labeled_batch_size", 0, "an integer >= 1"),
    ("mesh.data", -2, "an integer >= -1"),
    ("rml.threshold", 1.5, r"a number in \[0.0, 1.0\], got 1.5"),  # number, closed interval
    ("rml.prototype_momentum", 1.0, r"a number in \[0.0, 1.0\)"),  # number, open bound
    ("optimizer.learning_rate", 0.0, "a number > 0.0"),
    ("data.labeled_fraction", 0.0, r"a number in \(0.0, 1.0\]"),
    ("rml.mode", "fixmatch", "one of"),  # enum
    ("model.name", "unet", "one of"),
    ("model_b.name", "unet", "one of"),
    ("data.name", "coco", "one of"),
    ("dtype", "float16", "one of"),
    ("predict.model", "teacher_c", "one of"),
    ("eval.protocol", "tiles", "one of"),
    ("data.crop_size", (0, 64), r"\(h, w\): two integers >= 1"),  # shape
    ("data.crop_size", (64, 64, 3), r"\(h, w\)"),
    ("data.resize", (512,), r"None or \(h, w\)"),  # optional shape
    ("eval.window", "big", r"None or \(h, w\)"),
    ("eval.pad_to", (512, -1), r"None or \(h, w\)"),
    ("data.scale_range", (1.5, 0.5), "min <= max"),  # ordered pair
    ("augment.cutmix_area", (0.0, 0.4), "0.0 < min"),
    ("augment.magnitude_range", (0.1, 1.2), "max <= 1.0"),
    ("data.std", (0.25, 0.0, 0.25), "three numbers > 0"),  # fixed-length sequence
    ("data.mean", (0.5, 0.5), "three numbers"),
    ("augment.ops", ("brightness", "rotate"), "a list of ops from"),  # sequence of enum
    ("data.class_names", (), "a non-empty list"),
    ("data.label_map", ((0, 0), (256, 1)), r"\(\(raw value, class id\), ...\)"),
    ("eval.stride", 0.0, r"a number in \(0.0, 1.0\]"),
    ("rml.stages", 2, "supervised"),  # a relation between keys (with mode=supervised below)
    ("augment.strong_views", "both", "one of"),
    ("data.train_list", "train.txt", "expected '' without data.val_list"),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key(key, value, expected):
  config = digits.get_config("mode=supervised" if key == "rml.stages" else "")
  schema.validate(config)  # the shipped value passes
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(UserError, match=rf"^config\.{key}: (expected )?.*{expected}") as error:
    schema.validate(config)
  assert "\n" not in str(error.value) and repr(value) in str(error.value)


def test_missing_and_unknown_keys_are_named():
  config = digits.get_config()
  del config.rml["threshold"]
  with pytest.raises(UserError, match=r"^config\.rml\.threshold: missing"):
    schema.validate(config)
  config = digits.get_config()
  config.rml.thresold = 0.5
  with pytest.raises(UserError, match=r"^config\.rml\.thresold: unknown key"):
    schema.validate(config)


@pytest.mark.parametrize("override, line", [
    ("--config.total_steps=-5", "error: config.total_steps: expected an integer >= 1, got -5"),
    ("--config.data.crop_size=(0,64)",
     "error: config.data.crop_size: expected (h, w): two integers >= 1, got (0, 64)"),
])
def test_bad_values_from_the_command_line_exit_2_and_write_nothing(tmp_path, override, line):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "rml_jax.main", "--config=configs/digits.py:tiny",
       f"--workdir={workdir}", override], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == line
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_rectify_start_step_must_fall_within_a_stage():
  """rml rectifies from this step of every stage; at or past the stage length it never would.
  Modes that do not rectify take any start step."""
  config = digits.get_config("tiny,mode=rml")
  for start in (0, config.total_steps - 1):
    config.rml.rectify_start_step = start
    schema.validate(config)
  for start in (config.total_steps, 100_000):
    config.rml.rectify_start_step = start
    with pytest.raises(UserError) as error:
      schema.validate(config)
    assert str(error.value) == (
        "config.rml.rectify_start_step: expected an integer in [0, 3] with rml.mode='rml', "
        f"below the stage length total_steps=4 (each stage counts from 0), got {start}")
  config.rml.mode = "iml"
  schema.validate(config)


def test_rectify_start_step_past_the_stage_from_the_command_line(tmp_path):
  """The rml run that would train as iml stops before anything is written: one line, exit 2."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "rml_jax.main", "--config=configs/digits.py:tiny,mode=rml",
       "--config.rml.rectify_start_step=100000", f"--workdir={workdir}"], cwd=ROOT,
      capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: config.rml.rectify_start_step: expected an integer in [0, 3] with "
                    "rml.mode='rml', below the stage length total_steps=4 (each stage counts "
                    "from 0), got 100000"], result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()
