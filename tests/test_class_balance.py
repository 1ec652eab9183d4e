"""Class-aware thresholds (rml_jax/class_balance.py) against numpy references on a fixed batch,
and their place in the step: after rectification, per source, in the train state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rml_jax import class_balance, inference, step
from rml_jax.program import Program
from tests.conftest import tiny_config

K, BINS = 4, 20


def _fixed_batch():
  """Labels [2, 16, 16] over 4 classes (class 3 absent), confidences drawn per class from
  different ranges (class 0 confident, class 2 unsure), a mask that drops one image's half."""
  rng = np.random.default_rng(0)
  labels = rng.choice([0, 0, 0, 1, 2], size=(2, 16, 16)).astype(np.int32)
  low = np.array([0.7, 0.4, 0.3, 0.0])[labels]
  confidence = (low + rng.uniform(0.0, 0.3, labels.shape)).astype(np.float32)
  mask = np.ones(labels.shape, bool)
  mask[1, :8] = False
  return labels, confidence, mask


def _numpy_histogram(labels, confidence, mask, k=K, bins=BINS):
  """Pixel counts per (class, bin), pixel by pixel."""
  out = np.zeros((k, bins))
  for label, c, m in zip(labels.ravel(), confidence.ravel(), mask.ravel()):
    if m:
      out[label, min(int(c * bins), bins - 1)] += 1
  return out


def _numpy_quantile(row, q):
  """The q quantile of a histogram row, the cdf linear within each bin, by walking the bins."""
  total, below = row.sum(), 0.0
  for j, count in enumerate(row):
    if count and below + count >= q * total - 1e-9:
      return (j + (q * total - below) / count) / BINS
    below += count
  return 1.0


def _numpy_share_above(row, t):
  total = row.sum()
  j = min(int(t * BINS), BINS - 1)
  inside = row[j] * ((j + 1) / BINS - t) * BINS
  return (row[j + 1:].sum() + inside) / total


def test_histogram_matches_numpy():
  labels, confidence, mask = _fixed_batch()
  got = class_balance.confidence_histogram(jnp.asarray(labels), jnp.asarray(confidence),
                                           jnp.asarray(mask), K, BINS)
  np.testing.assert_array_equal(np.asarray(got), _numpy_histogram(labels, confidence, mask))
  running = class_balance.running_mean(jnp.ones((K, BINS)), got, 0.9)
  np.testing.assert_allclose(running, 0.9 + 0.1 * np.asarray(got), rtol=1e-6)


@pytest.mark.parametrize("portion", [0.2, 0.5, 0.9])
def test_cbst_thresholds_match_numpy_quantiles(portion):
  labels, confidence, mask = _fixed_batch()
  histogram = _numpy_histogram(labels, confidence, mask)
  tau, floor = 0.8, 0.35
  got = np.asarray(class_balance.cbst_thresholds(jnp.asarray(histogram, jnp.float32), portion,
                                                 tau, floor))
  expected = [np.clip(_numpy_quantile(histogram[k], 1 - portion), floor, tau)
              for k in range(3)] + [tau]  # class 3: no pixel yet -> tau
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Within a bin of the exact quantile of the raw confidences: each class keeps its top share.
  for k in range(3):
    raw = np.quantile(confidence[mask & (labels == k)], 1 - portion)
    assert abs(got[k] - np.clip(raw, floor, tau)) <= 1 / BINS + 1e-6
  assert got[2] < got[1] < got[0] <= tau  # the unsure class gets the lowest bar


def test_adaptive_thresholds_match_numpy():
  labels, confidence, mask = _fixed_batch()
  histogram = _numpy_histogram(labels, confidence, mask)
  tau, floor = 0.55, 0.1
  got = np.asarray(class_balance.adaptive_thresholds(jnp.asarray(histogram, jnp.float32), tau,
                                                     floor))
  effect = np.array([_numpy_share_above(histogram[k], tau) for k in range(3)])
  beta = effect / effect.max()
  expected = list(np.maximum(tau * beta / (2 - beta), floor)) + [tau]
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert got[0] == pytest.approx(tau) and got[2] < got[1] < tau


def test_none_keeps_tau_for_every_class():
  histogram = jnp.asarray(np.random.default_rng(1).uniform(size=(K, BINS)), jnp.float32)
  np.testing.assert_array_equal(class_balance.class_thresholds("none", histogram, 0.9, 0.5, 0.1),
                                np.full(K, 0.9, np.float32))


def _unlabeled_batch():
  rng = np.random.default_rng(5)
  return {"weak": rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
          "strong": rng.integers(0, 255, (2, 2, 64, 64, 3), dtype=np.uint8),
          "valid": np.ones((2, 64, 64), bool),
          "label": np.full((2, 64, 64), 255, np.int32)}


@pytest.mark.parametrize("rule", ["cbst", "adaptive"])
def test_step_thresholds_each_source_with_its_own_histogram(data_dir, rule):
  """In the step: each source's histogram takes the batch, its thresholds come from it, and a
  pixel enters the loss where its confidence reaches its label's threshold."""
  config = tiny_config(data_dir, f"mode=iml,rml.class_balance={rule},"
                       "rml.class_balance_floor=0.0,rml.class_balance_momentum=0.0,"
                       "augment.cutmix_prob=0.0")
  program = Program.create(config)
  train_state = program.fresh_state(jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, _unlabeled_batch())
  weak = inference.normalize(batch["weak"], program.step_config.mean, program.step_config.std)
  outputs = step.source_outputs(train_state, weak, program.step_config.mode,
                                 program.step_config)
  probs = [np.asarray(jax.nn.softmax(o["logits"], -1)) for o in outputs]
  # tau: the 80th percentile of the fresh teachers' confidences, so that some classes pass it.
  tau = float(np.quantile(np.concatenate([p.max(-1).ravel() for p in probs]), 0.8))
  rml = program.step_config.rml.as_configdict()
  rml.threshold = tau
  cfg = dataclasses.replace(program.step_config, rml=ml_collections.FrozenConfigDict(rml))
  learners, _, targets, metrics = step.unlabeled_targets(train_state, batch, jax.random.key(1),
                                                         jnp.asarray(0), cfg)
  for i, learner in enumerate(learners):
    labels, confidence = probs[i].argmax(-1), probs[i].max(-1)
    histogram = _numpy_histogram(labels, confidence, np.ones(labels.shape, bool),
                                 cfg.num_classes, config.rml.class_balance_bins)
    np.testing.assert_allclose(learner.confidence_histogram, histogram, atol=1e-3)
    thresholds = np.asarray(metrics[f"class_threshold_{'ab'[i]}"])
    expected = np.asarray(class_balance.class_thresholds(
        rule, jnp.asarray(histogram, jnp.float32), tau, config.rml.class_balance_portion, 0.0))
    np.testing.assert_allclose(thresholds, expected, atol=1e-5)
    assert thresholds.min() < tau - 0.01  # the rule moved some class below tau
    valid = confidence >= thresholds[labels]
    assert valid.mean() > (confidence >= tau).mean()
    np.testing.assert_array_equal(targets[0][i].valid, valid)  # no CutMix: student a's labels
    np.testing.assert_array_equal(targets[0][i].labels, labels)


def test_distribution_alignment_matches_numpy():
  """ReMixMatch's alignment: p times labeled shares over predicted shares, renormalised; the
  shares from labels and from soft predictions, void and out-of-image pixels left out."""
  rng = np.random.default_rng(2)
  probs = rng.dirichlet(np.ones(K), size=(2, 5, 5)).astype(np.float32)
  labels = rng.integers(0, K, (2, 5, 5)).astype(np.int32)
  known = rng.uniform(size=(2, 5, 5)) > 0.3
  shares = np.asarray(class_balance.class_shares(jnp.asarray(labels), jnp.asarray(known), K))
  np.testing.assert_allclose(shares, np.bincount(labels[known], minlength=K) / known.sum(),
                             rtol=1e-6)
  mean = np.asarray(class_balance.mean_prediction(jnp.asarray(probs), jnp.asarray(known)))
  np.testing.assert_allclose(mean, probs[known].mean(0), rtol=1e-5)
  running = np.asarray(class_balance.running_mean(jnp.full(K, 0.25), jnp.asarray(mean),
                                                         0.9))
  np.testing.assert_allclose(running, 0.9 * 0.25 + 0.1 * mean, rtol=1e-6)
  kept = class_balance.running_mean(jnp.full(K, 0.25), jnp.asarray(mean), 0.9, False)
  np.testing.assert_array_equal(kept, np.full(K, 0.25, np.float32))
  aligned = np.asarray(class_balance.align_distribution(jnp.asarray(probs), jnp.asarray(shares),
                                                        jnp.asarray(mean)))
  expected = probs * shares / mean
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(aligned, expected, rtol=1e-5)
  # A class the source under-predicts against the labels gains argmax pixels.
  lagging = int(np.argmax(shares / mean))
  assert (aligned.argmax(-1) == lagging).sum() >= (probs.argmax(-1) == lagging).sum()
