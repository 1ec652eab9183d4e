"""A run's directory: what a run writes and where.

  <workdir>/config.json             the config of the latest training start
  <workdir>/labeled_ids.txt         the train indices that trained with labels
  <workdir>/checkpoints/<step>/     orbax: state, grain iterator, run description
  <workdir>/eval/step_<N>.json      per-class IoU and mIoU of the four models
  <workdir>/soft_labels/stage_<s>/  stage-wise training's stored soft labels (soft_labels.py)
  <workdir>/prototypes/step_<t>.npz the eq. 10 pass before step t + 1: partial sums, resumable
  <workdir>/predictions/            --mode=predict's default output
  <workdir>/events.out.tfevents.*   clu / TensorBoard scalars and images
Only process 0 writes the files besides checkpoints, which orbax coordinates. Every path goes
through `storage`, so a workdir on an object store (gs://bucket/run) holds all of them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from rml_jax import checkpoint, storage
from rml_jax.errors import UserError


class Workdir:
  """The directory `path` of one run and its checkpointer.

  read_only: for --mode=eval / predict, which need checkpoints written by a training run and
  write only their own results.
  """

  def __init__(self, path: str, keep_checkpoints: int, read_only: bool = False):
    self.path = storage.resolve(path)
    self.read_only = read_only
    if read_only:
      if not storage.isdir(storage.join(self.path, "checkpoints")):
        raise UserError(f"--workdir: no checkpoints under {self.path}; expected a workdir "
                        "written by a training run")
    else:
      storage.ensure_writable_dir(self.path, "--workdir", "the run's checkpoints and logs")
    self.checkpointer = checkpoint.Checkpointer(storage.join(self.path, "checkpoints"),
                                                keep=keep_checkpoints, read_only=read_only)

  @staticmethod
  def has_checkpoints(path: str) -> bool:
    """Whether `path` holds a checkpoints folder (a run to resume), without creating anything."""
    return storage.isdir(storage.join(storage.resolve(path), "checkpoints"))

  @property
  def is_writer(self) -> bool:
    """Whether this process writes the run's own files (process 0)."""
    return jax.process_index() == 0

  def write_start(self, config: ml_collections.ConfigDict, labeled_idx: np.ndarray) -> None:
    """config.json and labeled_ids.txt of a training start."""
    if not self.is_writer:
      return
    storage.write_text(storage.join(self.path, "config.json"),
                       config.to_json_best_effort(indent=1))
    storage.write_text(storage.join(self.path, "labeled_ids.txt"),
                       "\n".join(str(i) for i in labeled_idx) + "\n")

  def write_eval(self, step: int, results: dict[str, Any]) -> str:
    """eval/step_<step>.json (process 0 only); returns its path."""
    path = storage.join(self.path, "eval", f"step_{step}.json")
    if self.is_writer:
      storage.write_text(path, json.dumps({"step": step, "results": results}, indent=1))
    return path

  def soft_labels_dir(self, stage: int) -> str:
    return storage.join(self.path, "soft_labels", f"stage_{stage}")

  def metric_writer(self) -> metric_writers.MetricWriter:
    """clu's writer for this run: console logging everywhere, TensorBoard event files from
    process 0. A remote workdir's event files are written to a local staging folder and copied
    to the workdir through `storage` whenever the writer is flushed (every log interval) or
    closed; TensorBoard reads the copies there."""
    if not self.is_writer:
      return metric_writers.create_default_writer(None, just_logging=True)
    if not storage.is_remote(self.path):
      return metric_writers.create_default_writer(self.path)
    staging = tempfile.mkdtemp(prefix="rml_jax_events_")
    return metric_writers.AsyncMultiWriter([
        metric_writers.LoggingWriter(), metric_writers.SummaryWriter(staging),
        _EventFileMirror(staging, self.path)])

  def read_prototype_sums(self, step: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(images done, sums [2, K, C], counts [2, K]) of the eq. 10 pass at `step`, or None."""
    path = self._prototype_sums_path(step)
    if not storage.isfile(path):
      return None
    try:
      with np.load(io.BytesIO(storage.read_bytes(path))) as stored:
        return int(stored["done"]), stored["sums"], stored["counts"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      logging.warning("%s is unreadable (%s); the prototype pass starts over.", path, e)
      return None

  def write_prototype_sums(self, step: int, done: int, sums: np.ndarray,
                           counts: np.ndarray) -> None:
    """Stores the eq. 10 pass's partial sums atomically (process 0 only)."""
    if not self.is_writer:
      return
    path = self._prototype_sums_path(step)
    storage.write_bytes(path, storage.bytes_of(
        lambda f: np.savez(f, done=done, sums=sums, counts=counts)))

  def _prototype_sums_path(self, step: int) -> str:
    return storage.join(self.path, "prototypes", f"step_{step}.npz")

  @property
  def predictions_dir(self) -> str:
    return storage.join(self.path, "predictions")

  def latest_checkpoint(self) -> int:
    """The latest checkpointed step; one line when there is none (eval / predict)."""
    step = self.checkpointer.latest_step()
    if step is None:
      raise UserError(f"--workdir: no checkpoint in {self.checkpointer.directory}; "
                      "train first (same --config and --workdir)")
    return step

  def kept_checkpoint_note(self) -> str:
    """Where the last good checkpoint is, for a message after a failed run."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {latest}) is kept in {self.checkpointer.directory}"

  def close(self) -> None:
    """Waits for pending checkpoint writes, then releases the checkpointer."""
    self.checkpointer.wait()
    self.checkpointer.close()


class _EventFileMirror(metric_writers.MultiWriter):
  """A writer that writes nothing itself: flush() and close() copy the event files of the
  local folder `staging` that changed since the last copy to the folder `target` (close()
  then removes `staging`). Placed after the SummaryWriter of `staging` in a MultiWriter, so
  each copy follows that writer's flush and close."""

  def __init__(self, staging: str, target: str):
    super().__init__([])
    self._staging, self._target = staging, target
    self._copied_sizes: dict[str, int] = {}

  def flush(self):
    for name in storage.listdir(self._staging):
      path = storage.join(self._staging, name)
      size = os.path.getsize(path)  # the staging folder is local
      if self._copied_sizes.get(name) != size:
        storage.write_bytes(storage.join(self._target, name), storage.read_bytes(path))
        self._copied_sizes[name] = size

  def close(self):
    self.flush()
    shutil.rmtree(self._staging, ignore_errors=True)  # every event file is in the workdir now
