"""Losses of the paper: supervised CE (eq. 1), thresholded pseudo-label CE (eq. 2), the mutual
loss of indirect mutual learning (eqs. 4-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rml_jax.constants import IGNORE_LABEL


def _pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[N, H, W, K] logits, [N, H, W] int labels in [0, K) -> [N, H, W] float32 CE."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  ignore_index: int = IGNORE_LABEL) -> jax.Array:
  """Eq. 1. logits [N, H, W, K], labels [N, H, W] int -> scalar mean CE over labeled pixels.

  Pixels whose label is `ignore_index` are left out of the mean (0 when none is labeled).
  """
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0)
  per_pixel = _pixel_cross_entropy(logits, safe_labels)
  return jnp.sum(per_pixel * valid) / jnp.maximum(jnp.sum(valid), 1)


def pseudo_label_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Eq. 2. logits [N, H, W, K], labels [N, H, W] int, valid [N, H, W] bool -> scalar.

  Per-pixel CE times `valid`, averaged over all N*H*W pixels: pixels under the confidence
  threshold contribute 0 but count (the FixMatch / UniMatch convention).
  """
  safe_labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  per_pixel = _pixel_cross_entropy(logits, safe_labels)
  return jnp.mean(per_pixel * valid.astype(per_pixel.dtype))


def soft_pseudo_label_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Eq. 2 with the source's distribution as the target instead of its argmax (outside the
  paper: rml.soft_targets, docs/fidelity.md). logits [N, H, W, K], targets [N, H, W, K]
  summing to 1 over K, valid [N, H, W] bool -> scalar: -sum_k q_k log softmax(logits)_k times
  `valid`, averaged over all N*H*W pixels as pseudo_label_loss."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_pixel = -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)
  return jnp.mean(per_pixel * valid.astype(per_pixel.dtype))


def mutual_loss(logits_a: jax.Array, logits_b: jax.Array, labels_a: jax.Array,
                labels_b: jax.Array, valid_a: jax.Array, valid_b: jax.Array) -> jax.Array:
  """Eq. 5: the four pseudo-label terms, students a and b each taught by teachers a and b.

  logits_x [N, H, W, K] of student x; labels_x [N, H, W] int and valid_x [N, H, W] bool from
  teacher x. The train step sums the same pseudo_label_loss terms per student (step.MODES).
  """
  student_a = (pseudo_label_loss(logits_a, labels_a, valid_a)
               + pseudo_label_loss(logits_a, labels_b, valid_b))
  student_b = (pseudo_label_loss(logits_b, labels_a, valid_a)
               + pseudo_label_loss(logits_b, labels_b, valid_b))
  return student_a + student_b
