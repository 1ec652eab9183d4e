"""End to end: train, evaluate from the checkpoint, resume, checkpoint round trip, bad input."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from rml_jax import (
  checkpoint,
  datasets,
  evaluate,
  input_pipeline,
  predict,
  sharding,
  step,
  train,
  visualize,
)
from rml_jax.constants import MODEL_NAMES
from rml_jax.errors import UserError
from rml_jax.program import Program
from rml_jax.workdir import Workdir
from tests.conftest import tiny_config


def _leaves_equal(a, b) -> bool:
  """Same leaf paths and bitwise-equal leaves (static fields such as the optax tx are not
  compared: each run builds its own)."""
  paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
  paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
  return paths_a == paths_b and all(
      np.array_equal(np.asarray(jax.random.key_data(x) if _is_key(x) else x),
                     np.asarray(jax.random.key_data(y) if _is_key(y) else y))
      for x, y in zip(leaves_a, leaves_b))


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _restore_final(config, workdir):
  program = Program.create(config)
  ckpt = Workdir(workdir, config.keep_checkpoints, read_only=True).checkpointer
  return ckpt.restore(ckpt.latest_step(), program.abstract_state, program.meta)


# The module's run balances its pseudo labels per class (cbst), so that the running confidence
# histograms it reads are part of every resume and round trip checked here.
TRAINED = "rml.class_balance=cbst,rml.threshold=0.5,rml.class_balance_floor=0.3"


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """One uninterrupted 4-step run: (config, workdir, results)."""
  config = tiny_config(data_dir, TRAINED)
  workdir = str(tmp_path_factory.mktemp("run_full"))
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_end_to_end_run_writes_checkpoints_logs_and_results(trained):
  config, workdir, results = trained
  assert set(results) == set(MODEL_NAMES)
  for r in results.values():
    assert 0.0 <= r["miou"] <= 1.0 and len(r["iou"]) == 11
  saved = json.load(open(os.path.join(workdir, "eval", "step_4.json")))
  assert saved["results"] == json.loads(json.dumps(results))
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  labeled_ids = open(os.path.join(workdir, "labeled_ids.txt")).read().split()
  assert len(labeled_ids) == round(4096 * config.data.labeled_fraction)
  final = _restore_final(config, workdir)
  assert int(final.step) == config.total_steps
  # The two students start from different weights and stay different (EMA: test_step.py).
  assert not _leaves_equal(final.learner_a.params, final.learner_b.params)


def test_eval_mode_reproduces_the_training_time_miou(trained):
  config, workdir, results = trained
  again = evaluate.evaluate(config, workdir)
  assert again == results


def test_interrupted_run_resumes_to_the_same_state(trained, data_dir, tmp_path):
  """A run stopped after step 3 and resumed ends bitwise where the uninterrupted run ends, the
  class-balance histograms included."""
  config, workdir, _ = trained
  reference = _restore_final(config, workdir)
  assert float(np.sum(reference.learner_a.confidence_histogram)) > 0
  paused = tiny_config(data_dir, TRAINED + ",max_steps_per_run=3")
  resumed_dir = str(tmp_path / "resumed")
  train.train_and_evaluate(paused, resumed_dir)  # stops after step 3 with a checkpoint
  assert checkpoint.Checkpointer(os.path.join(resumed_dir, "checkpoints")).latest_step() == 3
  train.train_and_evaluate(paused, resumed_dir)  # resumes at 3 and finishes step 4
  assert _leaves_equal(_restore_final(config, resumed_dir), reference)


def test_checkpoint_round_trip_is_bitwise(data_dir, tmp_path):
  config = tiny_config(data_dir)
  program = Program.create(config)
  run = Workdir(str(tmp_path), config.keep_checkpoints)
  original = program.fresh_state(jax.random.key(3))
  batch = {"labeled": {"image": np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3),
                                                                  dtype=np.uint8),
                       "label": np.zeros((2, 64, 64), np.int32)},
           "unlabeled": {"weak": np.zeros((2, 64, 64, 3), np.uint8),
                         "strong": np.zeros((2, 2, 64, 64, 3), np.uint8),
                         "valid": np.ones((2, 64, 64), bool),
                         "label": np.full((2, 64, 64), 255, np.int32)}}
  original, _ = program.train_fn(original, sharding.to_global(batch, program.mesh))
  expected = jax.device_get(original)
  sources = datasets.data_sources(config.data)
  labeled, unlabeled = datasets.labeled_indices(len(sources.train), 1 / 16, 0)
  iterator = input_pipeline.train_iterator(config, sources.train, labeled, unlabeled, True)
  next(iterator)
  run.checkpointer.save(1, original, iterator, program.meta)
  run.checkpointer.wait()
  restored = run.checkpointer.restore(1, program.abstract_state, program.meta)
  assert _leaves_equal(jax.device_get(restored), expected)
  assert restored.model_a is program.abstract_state.model_a
  assert restored.learner_a.params["head"]["branch0"]["kernel"].sharding == \
      program.state_shardings.learner_a.params["head"]["branch0"]["kernel"]


@pytest.mark.parametrize("override,key", [("model.name='deeplabv2_resnet50'", "model_a"),
                                          ("mode=supervised", "mode")])
def test_incompatible_checkpoint_is_one_clear_error(trained, data_dir, override, key):
  _, workdir, _ = trained
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(data_dir, override), workdir)
  message = str(error.value)
  assert "\n" not in message and key in message and "checkpoint" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing lost


def test_missing_dataset_and_unwritable_workdir_are_one_line_errors(tmp_path, data_dir):
  config = tiny_config(str(tmp_path / "no_such_dir"), "data.prepare=False")
  with pytest.raises(UserError, match="not prepared under .*no_such_dir"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(UserError, match="cannot write to .*a_file"):
    train.train_and_evaluate(tiny_config(data_dir), str(blocker / "sub"))


def test_predict_mode_writes_label_mask_and_overlay_pngs(trained, tmp_path):
  import copy

  from PIL import Image

  config, workdir, _ = trained
  config = copy.deepcopy(config)
  rng = np.random.default_rng(0)
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  images = {"square": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "wide": rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)}
  for stem, image in images.items():
    Image.fromarray(image).save(inputs / f"{stem}.png")
  config.predict.update(dict(input=str(inputs), output=str(tmp_path / "out"), model="teacher_b"))
  written = predict.predict(config, workdir)
  assert sorted(written) == ["square", "wide"]
  final = _restore_final(config, workdir)
  cfg = step.StepConfig.from_config(config, 11)
  colours = visualize.palette(11)
  for stem, image in images.items():
    labels = np.asarray(Image.open(tmp_path / "out" / f"{stem}_labels.png"))
    expected = np.asarray(step.predict_step(final, image[None], cfg=cfg)["teacher_b"][0]).argmax(-1)
    np.testing.assert_array_equal(labels, expected)
    mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_mask.png"))
    np.testing.assert_array_equal(mask, colours[labels])
    blended = np.asarray(Image.open(tmp_path / "out" / f"{stem}_overlay.png"))
    np.testing.assert_array_equal(blended, visualize.overlay(image, mask, 0.5))
  # An unreadable image stops before anything is written.
  (inputs / "broken.png").write_bytes(b"\x89PNG broken")
  config.predict.output = str(tmp_path / "out2")
  with pytest.raises(UserError, match=r"broken\.png: unreadable image"):
    predict.predict(config, workdir)
  assert not os.path.exists(tmp_path / "out2")


def test_train_summary_sums_counts_over_the_interval_before_dividing():
  step = lambda correct, counted, confident, hits: {  # noqa: E731
      "loss_a": np.float32(correct), "plc_correct_a": np.float32(correct),
      "plc_counted_a": np.float32(counted),
      "plk_confident_a": np.asarray(confident, np.float32),
      "plk_known_a": np.asarray(confident, np.float32),
      "plk_correct_a": np.asarray(hits, np.float32),
      "plk_truth_a": np.asarray([10, 0], np.float32),
      "class_threshold_a": np.asarray([0.8, 0.5 + 0.1 * correct], np.float32)}
  out = train.summarize_train_metrics([step(1, 4, [3, 1], [1, 1]), step(3, 4, [5, 3], [4, 2])],
                                      ("sky", "road"))
  assert out["pseudo_labels/a/sky/truth_share"] == 1.0  # all truth pixels are sky
  assert out["pseudo_labels/a/road/threshold"] == pytest.approx(0.7)  # mean of 0.6 and 0.8
  assert "class_threshold_a" not in out
  assert out["loss_a"] == 2.0
  assert out["confident_pseudo_label_acc_a"] == 0.5  # (1 + 3) / (4 + 4)
  assert out["pseudo_labels/a/sky/share"] == pytest.approx(8 / 12)
  assert out["pseudo_labels/a/road/precision"] == pytest.approx(3 / 4)
  assert out["pseudo_labels/a/sky/recall"] == pytest.approx(5 / 20)  # truth: 10 per step
  assert "pseudo_labels/a/road/recall" not in out  # no truth pixels: nothing to divide by


def test_a_mode_that_learns_from_unlabeled_images_needs_some():
  config = tiny_config("", "mode=iml")
  train.check_unlabeled(config, 1)
  with pytest.raises(UserError, match=r"^config.rml.mode='iml' learns from unlabeled images, "
                     "but the split leaves none; expected"):
    train.check_unlabeled(config, 0)
  train.check_unlabeled(tiny_config("", "mode=supervised"), 0)


def test_image_summaries_take_at_most_the_images_of_one_eval_batch():
  """num_image_summaries above the batch gives the batch's images, never its padding rows."""
  valid = np.zeros((4, 3, 5), bool)
  valid[:3, 1:, 2:] = True  # three images, one padding row
  batch = {"image": np.arange(4 * 3 * 5 * 3, dtype=np.uint8).reshape(4, 3, 5, 3),
           "label": np.zeros((4, 3, 5), np.int32), "valid": valid}
  assert [visualize.summary_count(n, batch) for n in (0, 2, 3, 4, 64)] == [0, 2, 3, 3, 3]
  panels = visualize.image_summary(batch["image"], [batch["label"]], 2,
                                   visualize.summary_count(64, batch))
  assert panels.shape == (3, 3, 10, 3)
  np.testing.assert_array_equal(panels[:, :, :5], batch["image"][:3])


@pytest.mark.parametrize("damage", ["removed", "emptied"])
def test_a_damaged_latest_checkpoint_is_kept_aside_and_the_run_resumes_from_the_previous(
    trained, data_dir, tmp_path, damage):
  """A file of step 4 removed or emptied after it was written: the run names step 4, keeps it
  as 4.unreadable, resumes from step 2 and ends in the uninterrupted run's state."""
  config, workdir, _ = trained
  reference = _restore_final(config, workdir)
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  target = os.path.join(damaged, "checkpoints", "4", "state", "manifest.ocdbt")
  if damage == "removed":
    os.remove(target)
  else:
    open(target, "w").close()
  train.train_and_evaluate(config, damaged)
  assert os.path.isfile(os.path.join(damaged, "checkpoints", "4.unreadable", "state",
                                     "commit_success.txt"))
  assert _leaves_equal(_restore_final(config, damaged), reference)


def test_no_readable_checkpoint_is_one_line_and_changes_nothing(trained, data_dir, tmp_path):
  config, workdir, _ = trained
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  steps = sorted(os.listdir(os.path.join(damaged, "checkpoints")))
  for name in steps:
    open(os.path.join(damaged, "checkpoints", name, "state", "manifest.ocdbt"),
         "w").close()
  with pytest.raises(UserError, match=r"checkpoints: no readable checkpoint \(step 4: ") as error:
    train.train_and_evaluate(config, damaged)
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(os.path.join(damaged, "checkpoints"))) == steps
