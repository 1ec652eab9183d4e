"""Segmentation metrics: confusion matrices summed over the whole eval set, mIoU computed once
from the sum, and its results table; teacher coupling (total variation); pseudo-label accuracy."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from rml_jax.constants import IGNORE_LABEL


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_LABEL) -> jax.Array:
  """[K, K] int32 counts, rows = ground truth, cols = prediction; ignore_index pixels skipped.

  labels, predictions: [N, H, W] int.
  """
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
  """Per-class IoU [K] = TP / (TP + FP + FN); NaN for a class absent from labels and predictions."""
  matrix = np.asarray(matrix, np.float64)
  true_pos = np.diag(matrix)
  union = matrix.sum(0) + matrix.sum(1) - true_pos
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, true_pos / union, np.nan)


def mean_iou(matrix: np.ndarray) -> float:
  """mIoU over the classes present in labels or predictions."""
  return float(np.nanmean(iou_from_confusion(matrix)))


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """clu metric: a [K, K] confusion matrix, merged by summation; compute() -> per-class IoU."""

  matrix: jax.Array

  @classmethod
  def empty(cls, num_classes: int = 1) -> "ConfusionMatrix":
    return cls(matrix=jnp.zeros((num_classes, num_classes), jnp.int32))

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(matrix=self.matrix + other.matrix)

  def compute(self) -> np.ndarray:
    return iou_from_confusion(jax.device_get(self.matrix))


def total_variation(probs_a: jax.Array, probs_b: jax.Array) -> jax.Array:
  """Mean over pixels of 0.5 * sum_k |probs_a - probs_b| (the paper's Figure 2 coupling).

  probs_a, probs_b: [..., K] -> scalar float32.
  """
  return jnp.mean(0.5 * jnp.sum(jnp.abs(probs_a - probs_b), axis=-1))


def pseudo_label_accuracy(pseudo_labels: jax.Array, labels: jax.Array, mask: jax.Array,
                          ignore_index: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
  """(correct count, counted pixels) of pseudo labels against ground truth where mask and known.

  All inputs [N, H, W]; returns two float32 scalars (sum them over steps before dividing).
  """
  counted = mask & (labels != ignore_index)
  correct = jnp.sum((pseudo_labels == labels) & counted)
  return correct.astype(jnp.float32), jnp.sum(counted).astype(jnp.float32)


def pseudo_label_class_counts(pseudo_labels: jax.Array, confident: jax.Array, labels: jax.Array,
                              in_image: jax.Array, num_classes: int,
                              ignore_index: int = IGNORE_LABEL) -> dict[str, jax.Array]:
  """Per-class sums behind the pseudo-label diagnostics (sum them over steps, then divide).

  pseudo_labels, labels (hidden ground truth, ignore_index where unknown): [N, H, W] int;
  confident, in_image: [N, H, W] bool. Returns [K] float32 arrays:
    'confident': confident pixels labelled k (their share is the class's share);
    'known': those of them with a known ground truth; 'correct': those whose truth is k;
    'truth': in-image pixels whose truth is k.
  precision_k = correct / known, recall_k = correct / truth.
  """
  known = labels != ignore_index

  def per_class(mask: jax.Array, values: jax.Array) -> jax.Array:
    # one_hot(-1) is all zeros: masked pixels count nowhere; XLA fuses this into one reduction.
    return jax.nn.one_hot(jnp.where(mask, values, -1), num_classes,
                          dtype=jnp.float32).sum(axis=(0, 1, 2))

  return {"confident": per_class(confident, pseudo_labels),
          "known": per_class(confident & known, pseudo_labels),
          "correct": per_class(confident & known & (pseudo_labels == labels), pseudo_labels),
          "truth": per_class(in_image & known, labels)}


def pseudo_label_class_report(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pseudo_label_class_counts summed over steps -> {'share', 'truth_share', 'precision',
  'recall'} [K]: the class's share of the confident pixels, its share of the ground-truth
  pixels of the same images, and the confident pixels' precision and recall (NaN where a class
  has no pixel to divide by)."""
  def shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.full_like(counts, np.nan)

  with np.errstate(invalid="ignore", divide="ignore"):
    return {"share": shares(sums["confident"]), "truth_share": shares(sums["truth"]),
            "precision": np.where(sums["known"] > 0, sums["correct"] / sums["known"], np.nan),
            "recall": np.where(sums["truth"] > 0, sums["correct"] / sums["truth"], np.nan)}


def class_rates(matrix: np.ndarray) -> dict[str, np.ndarray]:
  """From a confusion matrix [K, K] (rows: truth, columns: prediction), each [K]: 'precision'
  TP / predicted, 'recall' TP / true (NaN where the class is never predicted / present),
  'predicted_share' and 'true_share' of all counted pixels."""
  matrix = np.asarray(matrix, np.float64)
  true_pos, predicted, true = np.diag(matrix), matrix.sum(0), matrix.sum(1)
  total = max(matrix.sum(), 1.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return {"precision": np.where(predicted > 0, true_pos / predicted, np.nan),
            "recall": np.where(true > 0, true_pos / true, np.nan),
            "predicted_share": predicted / total, "true_share": true / total}


def summarize(matrices: dict[str, np.ndarray], class_names: tuple[str, ...]) -> dict[str, Any]:
  """{model: {'miou': float, 'iou', 'precision', 'recall', 'predicted_share', 'true_share':
  {class: float or None}}} from summed confusion matrices (None: undefined for the class)."""

  def per_class(values: np.ndarray) -> dict[str, float | None]:
    return {c: (None if np.isnan(v) else float(v)) for c, v in zip(class_names, values)}

  results = {}
  for name, matrix in matrices.items():
    rates = class_rates(matrix)
    results[name] = {"miou": mean_iou(matrix), "iou": per_class(iou_from_confusion(matrix)),
                     **{key: per_class(values) for key, values in rates.items()}}
  return results


def format_table(results: dict[str, Any], class_names: tuple[str, ...]) -> str:
  """A fixed-width table: one row per class, one column per model, mIoU last (in %)."""
  names = list(results)
  width = max(len(c) for c in class_names + ("mIoU",))
  lines = [" " * width + "".join(f"{n:>11}" for n in names)]
  for c in class_names:
    cells = [results[n]["iou"][c] for n in names]
    lines.append(f"{c:<{width}}" + "".join(
        f"{'-':>11}" if v is None else f"{100 * v:11.2f}" for v in cells))
  lines.append(f"{'mIoU':<{width}}" + "".join(f"{100 * results[n]['miou']:11.2f}" for n in names))
  return "\n".join(lines)
