"""Eq. 10's exact prototypes: the jitted, sharded pass over the train images equals a numpy
computation over the same images, and a stopped pass resumes to the same result."""

import dataclasses

import jax
import numpy as np

from rml_jax import datasets, inference, train
from rml_jax.program import Program
from rml_jax.workdir import Workdir
from tests.conftest import tiny_config


def _numpy_prototypes(program, train_state, images, counted):
  """Eq. 10 in numpy from each teacher's logits and features on `images` [N, H, W, 3]; a
  feature cell counts when more than half of its pixels are `counted` [N, H, W] bool."""
  cfg = program.step_config
  normalized = inference.normalize(images, cfg.mean, cfg.std)
  prototypes, seen = [], []
  for model, learner in ((train_state.model_a, train_state.learner_a),
                         (train_state.model_b, train_state.learner_b)):
    out = jax.device_get(inference.apply_eval(model, learner.teacher, normalized))
    features = np.asarray(out["features"], np.float64)  # [N, h, w, C]
    logits = np.asarray(out["logits"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n, h, w, _ = features.shape
    factor = probs.shape[1] // h
    labels = probs.reshape(n, h, factor, w, factor, -1).mean(axis=(2, 4)).argmax(-1)
    inside = counted.reshape(n, h, factor, w, factor).mean(axis=(2, 4)) > 0.5
    labels = np.where(inside, labels, -1)
    means = np.zeros((program.num_classes, features.shape[-1]))
    for k in range(program.num_classes):
      if (labels == k).any():
        means[k] = features[labels == k].mean(0)
    prototypes.append(means)
    seen.append(np.isin(np.arange(program.num_classes), labels))
  return prototypes, seen


def test_exact_prototypes_match_numpy_and_a_stopped_pass_resumes(data_dir, tmp_path):
  config = tiny_config(data_dir, "mode=rml,eval_batch_size=4")
  program = Program.create(config)
  sources = datasets.data_sources(config.data)
  indices = np.asarray([3, 0, 7, 12, 5, 9, 30, 2, 41, 11])  # 3 batches, the last one padded
  labeled, unlabeled = indices[:3], indices[3:]
  fresh = lambda: program.fresh_state(jax.random.key(0))  # noqa: E731 (the pass donates it)
  train_state = fresh()
  images = np.stack([sources.train[int(i)]["image"] for i in indices])
  # The pixels eq. 11 takes: a labeled image's void pixels stay out (here the labeled images'
  # top rows are made void), an unlabeled image's labels are never read.
  original = sources.train

  class WithVoid:
    def __len__(self):
      return len(original)

    def __getitem__(self, i):
      example = dict(original[i])
      example["label"] = np.array(example["label"])
      example["label"][:24] = 255
      return example

  sources = dataclasses.replace(sources, train=WithVoid())
  counted = np.ones(images.shape[:3], bool)
  counted[:len(labeled), :24] = False
  want_prototypes, want_seen = _numpy_prototypes(program, train_state, images, counted)

  run = Workdir(str(tmp_path / "uninterrupted"), keep_checkpoints=1)
  done = jax.device_get(train._exact_prototypes(program, run, sources, labeled, unlabeled,
                                                fresh(), step=5, should_stop=lambda: False))
  for learner, prototypes, seen in zip((done.learner_a, done.learner_b), want_prototypes,
                                       want_seen):
    np.testing.assert_array_equal(learner.prototypes_seen, seen)
    np.testing.assert_allclose(learner.prototypes, prototypes, rtol=1e-4, atol=1e-5)

  # Stopped before its second batch: the state is unchanged and one batch's sums are stored.
  run = Workdir(str(tmp_path / "stopped"), keep_checkpoints=1)
  calls = iter([False, True])
  start = fresh()
  stopped = train._exact_prototypes(program, run, sources, labeled, unlabeled, start, step=5,
                                    should_stop=lambda: next(calls))
  assert stopped is start
  assert run.read_prototype_sums(5)[0] == 4
  resumed = jax.device_get(train._exact_prototypes(program, run, sources, labeled, unlabeled,
                                                   fresh(), step=5, should_stop=lambda: False))
  for a, b in ((done.learner_a, resumed.learner_a), (done.learner_b, resumed.learner_b)):
    np.testing.assert_allclose(a.prototypes, b.prototypes, rtol=1e-6)
    np.testing.assert_array_equal(a.prototypes_seen, b.prototypes_seen)


def test_damaged_partial_sums_restart_the_pass(tmp_path):
  """A truncated partial-sums file reads as absent (the pass starts over), not a traceback."""
  run = Workdir(str(tmp_path), keep_checkpoints=1)
  run.write_prototype_sums(3, 4, np.ones((2, 3, 5)), np.full((2, 3), 2.0))
  done, sums, counts = run.read_prototype_sums(3)
  assert done == 4 and sums.shape == (2, 3, 5) and (counts == 2.0).all()
  path = tmp_path / "prototypes" / "step_3.npz"
  path.write_bytes(path.read_bytes()[:100])
  assert run.read_prototype_sums(3) is None
