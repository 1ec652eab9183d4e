"""Stage-wise training's offline labels: the previous stage's two teachers label every unlabeled
image once, stored compactly in the workdir and resumable after a kill.

Layout of `<workdir>/soft_labels/stage_<s>/`:
  classes.npy  uint8 [U, 2, H, W, k]  the k most likely classes per pixel, teachers a and b
  probs.npy    uint8 [U, 2, H, W, k]  their probabilities, quantised to 1/255
  progress.json {"done": n, "num_images": U, ...}: rows [0, n) are written and flushed
Row i belongs to the i-th unlabeled image (the order of the run's unlabeled ids). Top-k storage
keeps Cityscapes-sized stores at a few bytes per pixel; the classes left out get probability 0.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from rml_jax.constants import TEACHERS
from rml_jax.errors import UserError


def read_progress(directory: str) -> dict | None:
  path = os.path.join(directory, "progress.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_progress(directory: str, progress: dict) -> None:
  tmp = os.path.join(directory, "progress.json.tmp")
  with open(tmp, "w") as f:
    json.dump(progress, f)
  os.replace(tmp, os.path.join(directory, "progress.json"))  # atomic: never half written


def is_complete(directory: str) -> bool:
  progress = read_progress(directory)
  return progress is not None and progress["done"] >= progress["num_images"]


def quantize_top_k(probs: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
  """[..., K] float probabilities -> (classes [..., k] uint8, probs [..., k] uint8 = round(255 p)),
  classes ordered from the most likely."""
  order = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  kept = np.take_along_axis(probs, order, axis=-1)
  return order.astype(np.uint8), np.round(np.clip(kept, 0, 1) * 255).astype(np.uint8)


def decode(classes: jax.Array, probs: jax.Array, num_classes: int) -> jax.Array:
  """(classes [..., k] int, probs [..., k] uint8) -> dense probabilities [..., K] float32."""
  onehot = jax.nn.one_hot(classes.astype(jnp.int32), num_classes, dtype=jnp.float32)
  return jnp.sum(onehot * (probs.astype(jnp.float32) / 255.0)[..., None], axis=-2)


def generate(directory: str, batches: Callable[[int], Iterator[dict]], predict: Callable,
             num_images: int, image_shape: tuple[int, int], top_k: int,
             should_stop: Callable[[], bool] = lambda: False) -> bool:
  """Labels every unlabeled image with both teachers, resuming where a previous call stopped.

  Args:
    directory: the stage's folder (created if needed).
    batches: start -> iterator of {'image': [B, H, W, 3] uint8} over unlabeled images start,
      start + 1, ... (the last batch may be padded past num_images).
    predict: images -> {'teacher_a': probs [B, H, W, K], 'teacher_b': ...} (host arrays).
    num_images, image_shape: U and (H, W).
    should_stop: checked before each batch; True stops early (a signal arrived), leaving a
      consistent partial store that the next call completes.
  Returns:
    True when every row is written.
  """
  os.makedirs(directory, exist_ok=True)
  shape = (num_images, len(TEACHERS), *image_shape, top_k)
  progress = read_progress(directory)
  expected = {"num_images": num_images, "shape": list(shape)}
  if progress is not None and any(progress.get(k) != v for k, v in expected.items()):
    raise UserError(f"{directory}: stored labels have shape {progress.get('shape')}, this run "
                    f"needs {list(shape)}; remove the folder to relabel")
  mode = "r+" if progress is not None else "w+"
  classes = np.lib.format.open_memmap(os.path.join(directory, "classes.npy"), mode, np.uint8,
                                      shape)
  probs = np.lib.format.open_memmap(os.path.join(directory, "probs.npy"), mode, np.uint8, shape)
  done = 0 if progress is None else progress["done"]
  if progress is None:
    _write_progress(directory, dict(expected, done=0))
  if done < num_images:
    logging.info("Labelling unlabeled images %d..%d into %s", done, num_images, directory)
  for batch in batches(done):
    if done >= num_images or should_stop():
      break
    outputs = predict(batch["image"])
    rows = min(batch["image"].shape[0], num_images - done)
    for t, name in enumerate(TEACHERS):
      top_classes, top_probs = quantize_top_k(np.asarray(outputs[name][:rows]), top_k)
      classes[done:done + rows, t] = top_classes
      probs[done:done + rows, t] = top_probs
    classes.flush()
    probs.flush()
    done += rows
    _write_progress(directory, dict(expected, done=done))  # only after the rows are on disk
  del classes, probs
  return done >= num_images


class StoredLabels:
  """Random access to one stage's stored labels; opens the memmaps lazily (picklable for grain
  worker processes)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._arrays = None

  def __getstate__(self):
    return {"directory": self.directory, "_arrays": None}

  def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (classes [H, W, 2k] uint8, probs [H, W, 2k] uint8): teacher a's k, then teacher b's."""
    if self._arrays is None:
      self._arrays = tuple(np.load(os.path.join(self.directory, name), mmap_mode="r")
                           for name in ("classes.npy", "probs.npy"))
    out = []
    for array in self._arrays:
      item = np.asarray(array[row])  # [2, H, W, k]
      out.append(np.concatenate([item[0], item[1]], axis=-1))
    return out[0], out[1]
