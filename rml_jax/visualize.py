"""Colour-coded label maps for image summaries and --mode=predict (host numpy)."""

from __future__ import annotations

import numpy as np

from rml_jax.constants import IGNORE_LABEL


def palette(num_classes: int) -> np.ndarray:
  """[256, 3] uint8 colours: distinct colours for classes, black for the ignore label."""
  rng = np.random.default_rng(7)
  colours = np.zeros((256, 3), np.uint8)
  colours[:num_classes] = rng.integers(40, 256, (num_classes, 3))
  colours[0] = (20, 20, 20)
  colours[IGNORE_LABEL] = 0
  return colours


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[N, H, W] int labels (IGNORE_LABEL = ignore) -> [N, H, W, 3] uint8."""
  return palette(num_classes)[np.clip(labels, 0, 255).astype(np.int64)]


def image_summary(images: np.ndarray, label_maps: list[np.ndarray], num_classes: int,
                  count: int) -> np.ndarray:
  """Side-by-side panels per sample: [count, H, W * (1 + len(label_maps)), 3] uint8."""
  panels = [images[:count]] + [colorize(m[:count], num_classes) for m in label_maps]
  return np.concatenate(panels, axis=2)


def summary_count(requested: int, batch: dict[str, np.ndarray]) -> int:
  """How many image summaries an eval batch gives: `requested`, or fewer when the batch holds
  fewer images. Padding rows (their 'valid' mask all False) are not images; they come last."""
  valid = np.asarray(batch["valid"])
  images = int(valid.reshape(valid.shape[0], -1).any(axis=1).sum())
  return max(0, min(int(requested), images))


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
  """[H, W, 3] uint8 image blended with [H, W, 3] uint8 class colours (alpha = colour share)."""
  mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
