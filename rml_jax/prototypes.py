"""Pseudo-label self-rectification (paper section 4.2) as jitted array ops.

Each mean teacher keeps K class prototypes in its own feature space (the input of its classifier
head). Prototypes follow a moving average of per-class feature means (eq. 11), the distance of a
feature to every prototype gives a class-wise confidence (eq. 9), and the teacher's soft label is
re-weighted by that confidence before the argmax (eq. 6).

Memory stays bounded: prototype updates and class confidences work at the feature map's
resolution [N, h, w, C]; only the K-channel confidence map is resized to label resolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def class_sums(features: jax.Array, labels: jax.Array, num_classes: int
               ) -> tuple[jax.Array, jax.Array]:
  """Per-class feature sums of one batch: the terms of eq. 10's numerator and denominator.

  Args:
    features: [N, H, W, C] float.
    labels: [N, H, W] int; values outside [0, num_classes) are ignored.
    num_classes: K.
  Returns:
    (sums [K, C] float32, counts [K] float32 pixel counts).
  """
  flat = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  onehot = jax.nn.one_hot(labels.reshape(-1), num_classes, dtype=jnp.float32)  # out of range -> 0
  return onehot.T @ flat, onehot.sum(axis=0)


def class_means(features: jax.Array, labels: jax.Array, num_classes: int
                ) -> tuple[jax.Array, jax.Array]:
  """Per-class feature means of one batch (class_sums divided by the counts).

  Returns (means [K, C] float32, zero where a class has no pixel; counts [K] float32).
  """
  sums, counts = class_sums(features, labels, num_classes)
  return sums / jnp.maximum(counts, 1.0)[:, None], counts


def exact_prototypes(sums: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 10 from class_sums accumulated over a whole dataset: (prototypes [K, C] float32, the
  mean feature of the pixels assigned to class k, zero for a class with none; seen [K] bool,
  whether class k had a pixel)."""
  return sums / jnp.maximum(counts, 1.0)[:, None], counts > 0


def update_prototypes(prototypes: jax.Array, features: jax.Array, labels: jax.Array,
                      momentum: float | jax.Array, seen: jax.Array | None = None) -> jax.Array:
  """Eq. 11: eta_k <- momentum * eta_k + (1 - momentum) * eta'_k for classes present in the batch.

  Args:
    prototypes: [K, C] float32.
    features: [N, H, W, C].
    labels: [N, H, W] int32 (the teacher's argmax; values outside [0, K) ignored).
    momentum: the share of the old value (paper: 0.9999).
    seen: optional [K] bool, which rows hold a real mean yet; a present class whose row is not
      seen starts at its batch mean (so unset zero rows never enter the average).
  Returns:
    [K, C] float32; a class with no pixel in the batch keeps its old prototype.
  """
  means, counts = class_means(features, labels, prototypes.shape[0])
  present = counts > 0
  moved = momentum * prototypes + (1.0 - momentum) * means
  updated = jnp.where(present[:, None], moved, prototypes).astype(jnp.float32)
  if seen is None:
    return updated
  first_seen = present & ~seen
  return jnp.where(first_seen[:, None], means, updated).astype(jnp.float32)


def classes_present(labels: jax.Array, num_classes: int) -> jax.Array:
  """[N, H, W] int labels -> [K] bool: whether class k has a pixel (values outside [0, K)
  ignored)."""
  onehot = jax.nn.one_hot(labels.reshape(-1), num_classes, dtype=jnp.float32)
  return onehot.sum(axis=0) > 0


def class_confidence(features: jax.Array, prototypes: jax.Array,
                     temperature: float = 1.0, seen: jax.Array | None = None) -> jax.Array:
  """Eq. 9: omega = softmax_k(-||f - eta_k||_2 / temperature).

  Args:
    features: [N, H, W, C]; prototypes: [K, C].
    seen: optional [K] bool, the classes that have a prototype; the softmax runs over those
      only (omega = 0 for the others). At least one class must be seen.
  Returns:
    [N, H, W, K] float32, summing to 1 over k.
  """
  f = features.astype(jnp.float32)
  p = prototypes.astype(jnp.float32)
  # ||f - eta||^2 = ||f||^2 - 2 f.eta + ||eta||^2, without materialising [N, H, W, K, C].
  squared = (jnp.sum(f * f, -1, keepdims=True) - 2.0 * jnp.einsum("nhwc,kc->nhwk", f, p)
             + jnp.sum(p * p, -1))
  distance = jnp.sqrt(jnp.maximum(squared, 0.0))
  return jax.nn.softmax(-distance / temperature, axis=-1, where=seen)


def rectified_distribution(probs: jax.Array, confidence: jax.Array) -> jax.Array:
  """Eq. 6 as a distribution: omega * p^0 renormalised over the classes.

  Args:
    probs: [N, H, W, K] soft pseudo labels p^0; confidence: [N, H, W, K] class-wise omega.
  Returns:
    [N, H, W, K] float32, summing to 1 over K (all 0 where omega * p^0 is 0 everywhere).
  """
  weighted = confidence.astype(jnp.float32) * probs.astype(jnp.float32)
  total = jnp.sum(weighted, -1, keepdims=True)
  return weighted / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def rectify(probs: jax.Array, confidence: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 6: rectified hard labels and their confidence.

  Args:
    probs: [N, H, W, K] soft pseudo labels p^0; confidence: [N, H, W, K] class-wise omega.
  Returns:
    (labels [N, H, W] int32 = argmax_k(omega * p),
     label_confidence [N, H, W] float32 = max_k(omega * p) / sum_k(omega * p)).
  """
  distribution = rectified_distribution(probs, confidence)
  return jnp.argmax(distribution, -1).astype(jnp.int32), jnp.max(distribution, -1)


def omega_entropy(confidence: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean entropy (nats) of eq. 9's omega [N, H, W, K] over the pixels of mask [N, H, W] bool:
  near 0 when omega is one-hot (then eq. 6 simply picks the nearest prototype's class)."""
  p = confidence.astype(jnp.float32)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), -1)
  return jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1)


def resize_to(maps: jax.Array, height: int, width: int) -> jax.Array:
  """Resizes [N, h, w, K] maps to [N, height, width, K].

  Shrinking by an integer factor averages each block (area resampling); other sizes use
  antialiased bilinear resampling; growing is bilinear.
  """
  n, h, w, k = maps.shape
  if h % height == 0 and w % width == 0 and (h, w) != (height, width):
    blocks = maps.reshape(n, height, h // height, width, w // width, k)
    return blocks.mean(axis=(2, 4))
  return jax.image.resize(maps, (n, height, width, k), method="linear", antialias=True)
