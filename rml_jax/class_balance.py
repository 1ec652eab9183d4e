"""Class-aware confidence thresholds for pseudo labels (an addition outside the paper;
docs/fidelity.md).

One threshold tau (eq. 2) keeps the confident pixels of the large, easy classes and drops most of
the small, thin and look-alike ones, so the unlabeled loss becomes a prior towards the easy
classes. Each pseudo-label source keeps a running histogram of its labels' confidence per class,
[K, B] float32 over B equal bins of [0, 1] (`running_mean`), and a rule turns it into one
threshold per class [K]:

  cbst      class k's threshold is the confidence above which the top `portion` of the pixels
            the source labels k lie, never above tau: every class keeps at least that share of
            its pseudo labels (class-balanced self-training, Zou et al., ECCV 2018).
  adaptive  tau scaled by the class's learning effect, the share of its pixels that pass tau,
            normalised by the best class's and mapped by the convex x / (2 - x) (FlexMatch,
            Zhang et al., NeurIPS 2021); the effect is measured per class, not per image, because
            segmentation classes differ in size.

Both rules floor the thresholds at `floor`, and a class without a pixel in the histogram yet
keeps tau.

Distribution alignment (ReMixMatch, Berthelot et al., ICLR 2020) acts on the soft labels
themselves, before any threshold: p^0 is multiplied by the ratio of the labeled pixels' running
class shares to the source's running mean prediction and renormalised, so a class the teachers
under-predict gains pixels in the argmax, not only a lower bar. All functions are pure jnp,
jitted inside the train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RULES = ("none", "cbst", "adaptive")


def confidence_histogram(labels: jax.Array, confidence: jax.Array, mask: jax.Array,
                         num_classes: int, bins: int) -> jax.Array:
  """Pixel counts per (class, confidence bin) of one batch.

  Args:
    labels: [N, H, W] int32 pseudo labels in [0, K); confidence: [N, H, W] float in [0, 1];
    mask: [N, H, W] bool, the pixels counted (inside the image).
  Returns:
    [K, B] float32; bin j holds confidences in [j / B, (j + 1) / B) (1.0 in the last bin).
  """
  bin_index = jnp.clip(jnp.floor(confidence * bins).astype(jnp.int32), 0, bins - 1)
  flat = (labels * bins + bin_index).reshape(-1)
  counts = jnp.bincount(flat, weights=mask.reshape(-1).astype(jnp.float32),
                        length=num_classes * bins)
  return counts.reshape(num_classes, bins)


def _cdf_at_edges(histogram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(edges [B + 1], per-class cumulative share at each edge [K, B + 1], total mass [K])."""
  bins = histogram.shape[-1]
  total = histogram.sum(-1)
  cumulative = jnp.cumsum(histogram, axis=-1) / jnp.maximum(total, 1e-12)[:, None]
  cdf = jnp.concatenate([jnp.zeros_like(cumulative[:, :1]), cumulative], -1)
  return jnp.linspace(0.0, 1.0, bins + 1), cdf, total


def cbst_thresholds(histogram: jax.Array, portion: float, threshold: float, floor: float
                    ) -> jax.Array:
  """CBST's class-balanced thresholds from a running histogram [K, B] -> [K] float32.

  threshold_k = clip(q_k, floor, threshold), q_k the (1 - portion) quantile of class k's
  confidences (piecewise linear within a bin); threshold where class k has no mass yet.
  """
  edges, cdf, total = _cdf_at_edges(histogram)
  # The smallest confidence whose cumulative share reaches 1 - portion: the top `portion` of the
  # class lies above it. Bins without mass make flat steps of the cdf; take the first crossing.
  target = 1.0 - portion
  after = jnp.argmax(cdf >= target - 1e-7, axis=-1)  # first edge at or above the target
  before = jnp.maximum(after - 1, 0)
  low, high = jnp.take_along_axis(cdf, before[:, None], -1)[:, 0], jnp.take_along_axis(
      cdf, after[:, None], -1)[:, 0]
  fraction = jnp.where(high > low, (target - low) / jnp.maximum(high - low, 1e-12), 0.0)
  quantile = edges[before] + jnp.clip(fraction, 0.0, 1.0) * (edges[after] - edges[before])
  thresholds = jnp.clip(quantile, floor, threshold)
  return jnp.where(total > 0, thresholds, threshold).astype(jnp.float32)


def learning_effect(histogram: jax.Array, threshold: float) -> jax.Array:
  """[K, B] -> [K] float32: the share of each class's pixels whose confidence reaches
  `threshold` (piecewise linear within a bin); 0 for a class without mass."""
  edges, cdf, total = _cdf_at_edges(histogram)
  below = jax.vmap(lambda c: jnp.interp(threshold, edges, c))(cdf)
  return jnp.where(total > 0, 1.0 - below, 0.0).astype(jnp.float32)


def adaptive_thresholds(histogram: jax.Array, threshold: float, floor: float) -> jax.Array:
  """FlexMatch's class-adaptive thresholds, per pixel class, from a running histogram [K, B]
  -> [K] float32: threshold * beta / (2 - beta), beta_k = effect_k / max_j effect_j, at least
  floor; threshold where class k has no mass yet (or no class reaches it)."""
  effect = learning_effect(histogram, threshold)
  best = jnp.max(effect)
  beta = effect / jnp.maximum(best, 1e-12)
  scaled = jnp.maximum(threshold * beta / (2.0 - beta), floor)
  seen = (histogram.sum(-1) > 0) & (best > 0)
  return jnp.where(seen, scaled, threshold).astype(jnp.float32)


def class_shares(labels: jax.Array, mask: jax.Array, num_classes: int) -> jax.Array:
  """Labels [N, H, W] int, mask [N, H, W] bool -> [K] float32, the share of the masked pixels
  in each class (zeros when no pixel is masked in)."""
  counts = jnp.bincount(jnp.where(mask, labels, 0).reshape(-1),
                        weights=mask.reshape(-1).astype(jnp.float32), length=num_classes)
  return counts / jnp.maximum(counts.sum(), 1.0)


def mean_prediction(probs: jax.Array, mask: jax.Array) -> jax.Array:
  """Probs [N, H, W, K], mask [N, H, W] bool -> [K] float32, the mean of probs over the
  masked pixels (uniform when none is masked in)."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(weights)
  mean = jnp.sum(probs.astype(jnp.float32) * weights, axis=(0, 1, 2)) / jnp.maximum(total, 1.0)
  return jnp.where(total > 0, mean, 1.0 / probs.shape[-1])


def running_mean(running: jax.Array, batch: jax.Array, momentum: float,
                 present: jax.Array | bool = True) -> jax.Array:
  """The running statistics (a histogram [K, B] or class shares [K]) <- momentum * running +
  (1 - momentum) * batch, of the same shape; unchanged where `present` (scalar bool: the batch
  had pixels) is False. The rules read only each class's shape of a histogram, so a class
  absent from a batch keeps its distribution (its row only shrinks)."""
  return jnp.where(present, momentum * running + (1.0 - momentum) * batch, running)


def align_distribution(probs: jax.Array, label_shares: jax.Array, predicted_shares: jax.Array
                       ) -> jax.Array:
  """ReMixMatch's distribution alignment: probs [N, H, W, K] times label_shares [K] /
  predicted_shares [K], renormalised over K -> [N, H, W, K] float32."""
  ratio = label_shares / jnp.maximum(predicted_shares, 1e-6)
  aligned = probs.astype(jnp.float32) * ratio
  return aligned / jnp.maximum(jnp.sum(aligned, -1, keepdims=True), 1e-12)


def class_thresholds(rule: str, histogram: jax.Array, threshold: float, portion: float,
                     floor: float) -> jax.Array:
  """The thresholds [K] float32 of `rule` (RULES) from a running histogram [K, B]."""
  if rule == "cbst":
    return cbst_thresholds(histogram, portion, threshold, floor)
  if rule == "adaptive":
    return adaptive_thresholds(histogram, threshold, floor)
  if rule == "none":
    return jnp.full(histogram.shape[:1], threshold, jnp.float32)
  raise ValueError(f"unknown class-balance rule {rule!r}; expected one of {RULES}")
