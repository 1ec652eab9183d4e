"""Losses against numpy references of eqs. 1, 2 and 5."""

import jax.numpy as jnp
import numpy as np
import pytest

from rml_jax import losses


def np_log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels, ignore_index=255):
  log_probs = np_log_softmax(logits.astype(np.float64))
  total, count = 0.0, 0
  for index in np.ndindex(labels.shape):
    if labels[index] != ignore_index:
      total -= log_probs[index][labels[index]]
      count += 1
  return total / max(count, 1)


def np_pseudo_label_loss(logits, labels, valid):
  log_probs = np_log_softmax(logits.astype(np.float64))
  per_pixel = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  return (per_pixel * valid).sum() / valid.size


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_cross_entropy_matches_numpy_with_ignored_pixels(rng):
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (2, 5, 6))
  labels[rng.uniform(size=labels.shape) < 0.3] = 255
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, np_cross_entropy(logits, labels), rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero(rng):
  logits = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
  labels = np.full((1, 3, 3), 255)
  assert float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == 0.0


def test_pseudo_label_loss_counts_masked_pixels_in_the_mean(rng):
  logits = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 2
  labels = rng.integers(0, 6, (3, 4, 5))
  valid = rng.uniform(size=labels.shape) < 0.4
  got = losses.pseudo_label_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
  np.testing.assert_allclose(got, np_pseudo_label_loss(logits, labels, valid), rtol=1e-5)
  # Not the mean over valid pixels only: masked pixels count in the denominator.
  only_valid = np_pseudo_label_loss(logits, labels, valid) * valid.size / valid.sum()
  assert not np.isclose(float(got), only_valid)


def test_soft_pseudo_label_loss_matches_numpy_and_equals_eq2_on_one_hot_targets(rng):
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32) * 2
  targets = rng.dirichlet(np.ones(3), size=(2, 4, 5)).astype(np.float32)
  valid = rng.uniform(size=(2, 4, 5)) < 0.5
  expected = (-(targets * np_log_softmax(logits.astype(np.float64))).sum(-1) * valid).mean()
  got = losses.soft_pseudo_label_loss(*map(jnp.asarray, (logits, targets, valid)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  labels = rng.integers(0, 3, (2, 4, 5))
  one_hot = np.eye(3, dtype=np.float32)[labels]
  np.testing.assert_allclose(
      losses.soft_pseudo_label_loss(*map(jnp.asarray, (logits, one_hot, valid))),
      np_pseudo_label_loss(logits, labels, valid), rtol=1e-5)


def test_mutual_loss_is_the_four_terms_of_eq5(rng):
  shape = (2, 4, 4)
  logits_a, logits_b = (rng.normal(size=shape + (5,)).astype(np.float32) for _ in range(2))
  labels_a, labels_b = (rng.integers(0, 5, shape) for _ in range(2))
  valid_a, valid_b = (rng.uniform(size=shape) < 0.6 for _ in range(2))
  expected = sum(np_pseudo_label_loss(lg, lb, v) for lg in (logits_a, logits_b)
                 for lb, v in ((labels_a, valid_a), (labels_b, valid_b)))
  got = losses.mutual_loss(*map(jnp.asarray, (logits_a, logits_b, labels_a, labels_b, valid_a,
                                               valid_b)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
