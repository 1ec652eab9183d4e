"""Stage-wise training's offline labels: the previous stage's two teachers label every unlabeled
image once, stored compactly in the workdir (local or on an object store) and resumable after a
kill.

Layout of `<workdir>/soft_labels/stage_<s>/`:
  rows_<start>.npy  uint8 [n, 2, 2, H, W, k]: rows start .. start + n - 1, each with (the k most
                    likely classes per pixel, their probabilities quantised to 1/255) of
                    teachers a and b; one file per labelling batch, written whole
  progress.json     {"done": d, "chunk_starts": [...], "num_images": U, ...}: the files of
                    chunk_starts hold rows [0, d); written after each file
Row i belongs to the i-th unlabeled image (the order of the run's unlabeled ids). Top-k storage
keeps Cityscapes-sized stores at a few bytes per pixel; the classes left out get probability 0.
Readers fetch one row at a time (a byte range of its file), so grain workers read a remote store
without copying it.
"""

from __future__ import annotations

import bisect
import json
import logging
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from rml_jax import storage
from rml_jax.constants import TEACHERS
from rml_jax.errors import UserError

LAYOUT = "row_chunks"


def read_progress(directory: str) -> dict | None:
  path = storage.join(directory, "progress.json")
  if not storage.isfile(path):
    return None
  return json.loads(storage.read_text(path))


def _write_progress(directory: str, progress: dict) -> None:
  storage.write_text(storage.join(directory, "progress.json"), json.dumps(progress))


def is_complete(directory: str) -> bool:
  progress = read_progress(directory)
  return progress is not None and progress["done"] >= progress["num_images"]


def _chunk_path(directory: str, start: int) -> str:
  return storage.join(directory, f"rows_{start:08d}.npy")


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
  shape = (num_images, len(TEACHERS), *image_shape, top_k)
  progress = read_progress(directory)
  expected = {"num_images": num_images, "shape": list(shape), "layout": LAYOUT}
  if progress is not None and any(progress.get(k) != v for k, v in expected.items()):
    raise UserError(f"{directory}: stored labels have shape {progress.get('shape')} "
                    f"({progress.get('layout', 'an older layout')}), this run needs "
                    f"{list(shape)} ({LAYOUT}); remove the folder to relabel")
  done = 0 if progress is None else progress["done"]
  starts = [] if progress is None else list(progress["chunk_starts"])
  if progress is None:
    _write_progress(directory, dict(expected, done=0, chunk_starts=[]))
  if done < num_images:
    logging.info("Labelling unlabeled images %d..%d into %s", done, num_images, directory)
  for batch in batches(done):
    if done >= num_images or should_stop():
      break
    outputs = predict(batch["image"])
    rows = min(batch["image"].shape[0], num_images - done)
    chunk = np.zeros((rows, 2, len(TEACHERS), *image_shape, top_k), np.uint8)
    for t, name in enumerate(TEACHERS):
      chunk[:, 0, t], chunk[:, 1, t] = quantize_top_k(np.asarray(outputs[name][:rows]), top_k)
    storage.write_bytes(_chunk_path(directory, done),
                        storage.bytes_of(lambda f, c=chunk: np.save(f, c)))
    starts.append(done)
    done += rows
    # Only after the rows are stored: a kill in between relabels (and rewrites) this chunk.
    _write_progress(directory, dict(expected, done=done, chunk_starts=starts))
  return done >= num_images


class StoredLabels:
  """Random access to one stage's stored labels, a row at a time (picklable for grain worker
  processes: each reads progress.json and the file headers on first use)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._starts: list[int] | None = None
    self._offsets: dict[int, tuple[int, tuple[int, ...]]] = {}  # file start -> (offset, shape)

  def __getstate__(self):
    return {"directory": self.directory, "_starts": None, "_offsets": {}}

  def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (classes [H, W, 2k] uint8, probs [H, W, 2k] uint8): teacher a's k, then teacher b's."""
    if self._starts is None:
      progress = read_progress(self.directory)
      if progress is None or progress.get("layout") != LAYOUT:
        raise UserError(f"{self.directory}: no stored labels of layout {LAYOUT}")
      self._starts = list(progress["chunk_starts"])
    start = self._starts[bisect.bisect_right(self._starts, row) - 1]
    with storage.open_read(_chunk_path(self.directory, start)) as f:
      if start not in self._offsets:  # the file's header: where row 0 begins, and the shape
        version = np.lib.format.read_magic(f)
        shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
        self._offsets[start] = (f.tell(), shape)
      offset, shape = self._offsets[start]
      row_shape = shape[1:]  # [2, 2, H, W, k]
      row_bytes = int(np.prod(row_shape))
      f.seek(offset + (row - start) * row_bytes)
      item = np.frombuffer(f.read(row_bytes), np.uint8).reshape(row_shape)
    classes, probs = item[0], item[1]  # [2, H, W, k] each
    return (np.concatenate([classes[0], classes[1]], axis=-1),
            np.concatenate([probs[0], probs[1]], axis=-1))
