"""Confusion matrix, IoU and total variation against numpy references."""

import jax.numpy as jnp
import numpy as np

from rml_jax import metrics


def test_confusion_matrix_and_miou_match_numpy():
  rng = np.random.default_rng(1)
  k = 5
  labels = rng.integers(0, k, (3, 8, 9))
  labels[rng.uniform(size=labels.shape) < 0.2] = 255
  preds = rng.integers(0, k, labels.shape)
  expected = np.zeros((k, k), np.int64)
  for gt, pr in zip(labels.ravel(), preds.ravel()):
    if gt != 255:
      expected[gt, pr] += 1
  got = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), k))
  np.testing.assert_array_equal(got, expected)
  ious = [expected[c, c] / (expected[c].sum() + expected[:, c].sum() - expected[c, c])
          for c in range(k)]
  np.testing.assert_allclose(metrics.iou_from_confusion(got), ious)
  np.testing.assert_allclose(metrics.mean_iou(got), np.mean(ious))


def test_confusion_metric_merges_by_summing_and_skips_absent_classes():
  a = metrics.ConfusionMatrix(jnp.asarray([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
  b = metrics.ConfusionMatrix(jnp.asarray([[1, 0, 0], [1, 1, 0], [0, 0, 0]]))
  iou = a.merge(b).compute()
  np.testing.assert_allclose(iou[:2], [4 / 6, 3 / 5])
  assert np.isnan(iou[2])  # class 2 absent from labels and predictions: left out of the mean
  np.testing.assert_allclose(metrics.mean_iou(a.merge(b).matrix), (4 / 6 + 3 / 5) / 2)


def test_total_variation_matches_numpy():
  rng = np.random.default_rng(2)
  p, q = (rng.dirichlet(np.ones(4), size=(2, 3, 3)) for _ in range(2))
  expected = np.mean([0.5 * np.abs(p[i] - q[i]).sum() for i in np.ndindex(p.shape[:-1])])
  np.testing.assert_allclose(metrics.total_variation(jnp.asarray(p), jnp.asarray(q)), expected,
                             rtol=1e-6)
