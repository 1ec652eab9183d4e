"""Stage-wise training: compact stored soft labels, resumable labelling, and a two-stage run that
pauses at the stage boundary and resumes to the same final state."""

import json
import os

import jax
import numpy as np
import pytest

from rml_jax import soft_labels, train
from rml_jax.program import Program
from rml_jax.workdir import Workdir
from tests.conftest import TEST_JAX_CACHE, tiny_config
from tests.test_remote_workdir import finish, kill_when, start_main


def test_top_k_storage_round_trip_matches_numpy():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(6) * 0.3, size=(2, 3, 4)).astype(np.float32)
  classes, quantized = soft_labels.quantize_top_k(probs, 3)
  assert classes.dtype == np.uint8 and quantized.dtype == np.uint8
  np.testing.assert_array_equal(classes[..., 0], probs.argmax(-1))
  dense = np.asarray(soft_labels.decode(classes, quantized, 6))
  want = np.zeros_like(probs)
  order = np.argsort(-probs, -1)[..., :3]
  np.put_along_axis(want, order, np.take_along_axis(probs, order, -1), -1)
  np.testing.assert_allclose(dense, want, atol=0.5 / 255 + 1e-6)  # quantisation only


def _fake_teachers(images):
  """Deterministic 'teachers': class scores from the pixel values."""
  x = images.astype(np.float32) / 255.0
  logits_a = np.stack([x[..., 0], x[..., 1], x[..., 2], 1 - x[..., 0]], -1) * 4
  logits_b = logits_a[..., ::-1]
  softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return {"teacher_a": softmax(logits_a), "teacher_b": softmax(logits_b)}


def _batches(images, batch_size):
  def make(start):
    for i in range(start, len(images), batch_size):
      chunk = images[i:i + batch_size]
      if len(chunk) < batch_size:  # padded like input_pipeline.eval_batches
        chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                                chunk.dtype)])
      yield {"image": chunk}
  return make


def test_labelling_resumes_after_an_interruption(tmp_path):
  images = np.random.default_rng(1).integers(0, 255, (11, 5, 6, 3), dtype=np.uint8)
  whole = str(tmp_path / "whole")
  assert soft_labels.generate(whole, _batches(images, 4), _fake_teachers, 11, (5, 6), 2)

  calls = {"n": 0}

  def crashing(batch_images):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt  # killed while the second batch is being labelled
    return _fake_teachers(batch_images)

  parts = str(tmp_path / "parts")
  with pytest.raises(KeyboardInterrupt):
    soft_labels.generate(parts, _batches(images, 4), crashing, 11, (5, 6), 2)
  assert soft_labels.read_progress(parts)["done"] == 4 and not soft_labels.is_complete(parts)
  # A stop request between batches leaves a consistent partial store as well.
  assert not soft_labels.generate(parts, _batches(images, 4), _fake_teachers, 11, (5, 6), 2,
                                  should_stop=lambda: soft_labels.read_progress(parts)["done"]
                                  >= 8)
  assert soft_labels.read_progress(parts)["done"] == 8
  assert soft_labels.generate(parts, _batches(images, 4), _fake_teachers, 11, (5, 6), 2)
  resumed, uninterrupted = soft_labels.StoredLabels(parts), soft_labels.StoredLabels(whole)
  for row in range(11):  # rows of every chunk, the last one (3 rows) included
    for got, want in zip(resumed[row], uninterrupted[row]):
      np.testing.assert_array_equal(got, want)
  classes, probs = uninterrupted[9]
  assert classes.shape == (5, 6, 4) and probs.shape == (5, 6, 4)  # teacher a's 2, then b's 2
  teachers = _fake_teachers(images[9:10])
  for t, name in enumerate(("teacher_a", "teacher_b")):
    order = np.argsort(-teachers[name][0], axis=-1, kind="stable")[..., :2]
    np.testing.assert_array_equal(classes[..., 2 * t:2 * t + 2], order)
    np.testing.assert_array_equal(
        probs[..., 2 * t:2 * t + 2],
        np.round(np.take_along_axis(teachers[name][0], order, -1) * 255).astype(np.uint8))


TWO_STAGES = "mode=rml,rml.stages=2,rml.threshold=0.0,eval_every=100,log_every=4,checkpoint_every=4"


@pytest.fixture(scope="module")
def two_stage_run(data_dir, tmp_path_factory):
  """An uninterrupted local two-stage run (4 + 4 steps): (its workdir, its final results)."""
  whole = str(tmp_path_factory.mktemp("two_stages") / "whole")
  results = train.train_and_evaluate(tiny_config(data_dir, TWO_STAGES), whole)
  return whole, results


def _final_state(config, workdir: str):
  program = Program.create(config)
  ckpt = Workdir(workdir, config.keep_checkpoints, read_only=True).checkpointer
  assert ckpt.latest_step() == 8
  restored = ckpt.restore(8, program.abstract_state, program.meta, None)
  return jax.device_get(restored.replace(rng=jax.random.key_data(restored.rng)))


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_two_stage_run_paused_at_the_boundary_resumes_bitwise(data_dir, tmp_path, two_stage_run):
  whole, results = two_stage_run
  assert soft_labels.is_complete(os.path.join(whole, "soft_labels", "stage_1"))
  assert set(results) == {"teacher_a", "teacher_b", "student_a", "student_b"}

  paused = str(tmp_path / "paused")
  train.train_and_evaluate(tiny_config(data_dir, TWO_STAGES + ",max_steps_per_run=4"), paused)
  assert not (tmp_path / "paused" / "soft_labels").exists()  # stopped at the stage end
  train.train_and_evaluate(tiny_config(data_dir, TWO_STAGES), paused)

  config = tiny_config(data_dir, TWO_STAGES)
  final = {name: _final_state(config, workdir)
           for name, workdir in (("whole", whole), ("paused", paused))}
  _assert_same_state(final["whole"], final["paused"])
  # The students restarted from the initial weights at step 4, so they differ from stage 1's.
  program = Program.create(config)
  initial = jax.device_get(program.fresh_state(jax.random.key(config.seed)))
  assert not np.array_equal(jax.tree.leaves(final["whole"].learner_a.params)[0],
                            jax.tree.leaves(initial.learner_a.params)[0])


@pytest.mark.slow
@pytest.mark.remote_kill  # left out of CI's 15 minutes: -m remote_kill
def test_two_stage_remote_run_killed_while_labelling(emulator, remote_env, data_dir, tmp_path,
                                                      two_stage_run):
  """A gs:// workdir (the emulated bucket): SIGKILL while the stage-1 teachers label, then the
  same command finishes; the stored labels and the final state equal the local run's."""
  bucket = emulator.bucket()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = dict(remote_env, JAX_COMPILATION_CACHE_DIR=TEST_JAX_CACHE)
  progress = "stages/soft_labels/stage_1/progress.json"

  def labelling_under_way() -> bool:
    if progress not in bucket.names(progress):
      return False
    state = json.loads(bucket.read(progress))
    return 0 < state["done"] < state["num_images"]

  process = start_main("gs://bucket/stages", TWO_STAGES, data_dir, str(cwd), env)
  kill_when(process, labelling_under_way, "labelling under way")
  partial = json.loads(bucket.read(progress))["done"]
  output = finish(start_main("gs://bucket/stages", TWO_STAGES, data_dir, str(cwd), env))
  assert "labelled by the stage-1 teachers" in output
  state = json.loads(bucket.read(progress))
  assert state["done"] == state["num_images"] > partial
  assert len(bucket.names("stages/soft_labels/stage_1/rows_")) == len(state["chunk_starts"]) > 1
  assert os.listdir(cwd) == [], f"written under the working directory: {os.listdir(cwd)}"

  whole, _ = two_stage_run
  remote = soft_labels.StoredLabels("gs://bucket/stages/soft_labels/stage_1")
  local = soft_labels.StoredLabels(os.path.join(whole, "soft_labels", "stage_1"))
  for row in (0, partial - 1, partial, state["num_images"] - 1):  # both sides of the kill
    for got, want in zip(remote[row], local[row]):
      np.testing.assert_array_equal(got, want)
  config = tiny_config(data_dir, TWO_STAGES)
  _assert_same_state(_final_state(config, "gs://bucket/stages"), _final_state(config, whole))
