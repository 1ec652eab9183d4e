"""Confusion matrix, IoU and total variation against numpy references."""

import jax
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


def test_summary_precision_recall_and_shares_count_pixels():
  rng = np.random.default_rng(2)
  labels, preds = rng.integers(0, 3, 500), rng.integers(0, 2, 500)  # class 2 never predicted
  matrix = np.zeros((3, 3), np.int64)
  np.add.at(matrix, (labels, preds), 1)
  got = metrics.summarize({"m": matrix}, ("a", "b", "c"))["m"]
  for k, name in enumerate("ab"):
    hit = (labels == k) & (preds == k)
    assert got["precision"][name] == hit.sum() / (preds == k).sum()
    assert got["recall"][name] == hit.sum() / (labels == k).sum()
    assert got["predicted_share"][name] == (preds == k).mean()
  assert got["precision"]["c"] is None and got["recall"]["c"] == 0.0
  assert got["true_share"]["c"] == (labels == 2).mean()


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


def test_pseudo_label_class_counts_match_numpy():
  rng = np.random.default_rng(3)
  k = 4
  pseudo = rng.integers(0, k, (2, 5, 6))
  truth = np.where(rng.uniform(size=(2, 5, 6)) < 0.2, 255, rng.integers(0, k, (2, 5, 6)))
  confident = rng.uniform(size=(2, 5, 6)) < 0.6
  in_image = rng.uniform(size=(2, 5, 6)) < 0.9
  confident &= in_image
  sums = jax.device_get(metrics.pseudo_label_class_counts(
      jnp.asarray(pseudo), jnp.asarray(confident), jnp.asarray(truth), jnp.asarray(in_image), k))
  known = truth != 255
  for c in range(k):
    assert sums["confident"][c] == np.sum(confident & (pseudo == c))
    assert sums["known"][c] == np.sum(confident & known & (pseudo == c))
    assert sums["correct"][c] == np.sum(confident & (pseudo == c) & (truth == c))
    assert sums["truth"][c] == np.sum(in_image & (truth == c))
  report = metrics.pseudo_label_class_report(sums)
  np.testing.assert_allclose(report["share"].sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(report["precision"], sums["correct"] / sums["known"])
  np.testing.assert_allclose(report["recall"], sums["correct"] / sums["truth"])
