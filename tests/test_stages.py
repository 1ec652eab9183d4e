"""Stage-wise training: compact stored soft labels, resumable labelling, and a two-stage run that
pauses at the stage boundary and resumes to the same final state."""

import os

import jax
import numpy as np
import pytest

from rml_jax import soft_labels, train
from rml_jax.program import Program
from rml_jax.workdir import Workdir
from tests.conftest import tiny_config


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
  for name in ("classes.npy", "probs.npy"):
    np.testing.assert_array_equal(np.load(f"{parts}/{name}"), np.load(f"{whole}/{name}"))
  stored = soft_labels.StoredLabels(whole)
  classes, probs = stored[3]
  assert classes.shape == (5, 6, 4) and probs.shape == (5, 6, 4)  # teacher a's 2, then b's 2
  np.testing.assert_array_equal(classes[..., 0], _fake_teachers(images[3:4])["teacher_a"][0]
                                .argmax(-1))


@pytest.mark.slow
def test_two_stage_run_paused_at_the_boundary_resumes_bitwise(data_dir, tmp_path):
  arg = "mode=rml,rml.stages=2,rml.threshold=0.0,eval_every=100,log_every=4,checkpoint_every=4"
  whole = str(tmp_path / "whole")
  results = train.train_and_evaluate(tiny_config(data_dir, arg), whole)
  assert soft_labels.is_complete(os.path.join(whole, "soft_labels", "stage_1"))
  assert set(results) == {"teacher_a", "teacher_b", "student_a", "student_b"}

  paused = str(tmp_path / "paused")
  train.train_and_evaluate(tiny_config(data_dir, arg + ",max_steps_per_run=4"), paused)
  assert not (tmp_path / "paused" / "soft_labels").exists()  # stopped at the stage end
  train.train_and_evaluate(tiny_config(data_dir, arg), paused)

  config = tiny_config(data_dir, arg)
  program = Program.create(config)
  final = {}
  for name, workdir in (("whole", whole), ("paused", paused)):
    ckpt = Workdir(workdir, config.keep_checkpoints, read_only=True).checkpointer
    assert ckpt.latest_step() == 8
    restored = ckpt.restore(8, program.abstract_state, program.meta, None)
    final[name] = jax.device_get(restored.replace(rng=jax.random.key_data(restored.rng)))
  for x, y in zip(jax.tree.leaves(final["whole"]), jax.tree.leaves(final["paused"])):
    np.testing.assert_array_equal(x, y)
  # The students restarted from the initial weights at step 4, so they differ from stage 1's.
  initial = jax.device_get(program.fresh_state(jax.random.key(config.seed)))
  assert not np.array_equal(jax.tree.leaves(final["whole"].learner_a.params)[0],
                            jax.tree.leaves(initial.learner_a.params)[0])
