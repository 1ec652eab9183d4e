"""Evaluation: confusion matrices over the whole val set for all four models, per-class IoU and
mIoU tables, colour-coded image summaries, and `evaluate(config, workdir)` for --mode=eval."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from rml_jax import metrics as metrics_lib
from rml_jax import sharding

IGNORE = 255


def run_evaluation(eval_fn: Callable, state: Any, batches: Iterable[dict[str, np.ndarray]],
                   mesh) -> dict[str, np.ndarray]:
  """Sums the eval step's confusion matrices on device; one host transfer at the end.

  Returns {model name: [K, K] int64}.
  """
  totals = None
  for batch in batches:
    matrices = eval_fn(state, sharding.to_global(batch, mesh))
    totals = matrices if totals is None else {k: totals[k].merge(v) for k, v in matrices.items()}
  return {k: np.asarray(jax.device_get(v.matrix), np.int64) for k, v in totals.items()}


def summarize(matrices: dict[str, np.ndarray], class_names: tuple[str, ...]) -> dict[str, Any]:
  """{model: {'miou': float, 'iou': {class: float or None}}} from summed confusion matrices."""
  results = {}
  for name, matrix in matrices.items():
    iou = metrics_lib.iou_from_confusion(matrix)
    results[name] = {"miou": metrics_lib.mean_iou(matrix),
                     "iou": {c: (None if np.isnan(v) else float(v))
                             for c, v in zip(class_names, iou)}}
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


def palette(num_classes: int) -> np.ndarray:
  """[256, 3] uint8 colours: distinct colours for classes, black for ignore (255)."""
  rng = np.random.default_rng(7)
  colours = np.zeros((256, 3), np.uint8)
  colours[:num_classes] = rng.integers(40, 256, (num_classes, 3))
  colours[0] = (20, 20, 20)
  return colours


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[N, H, W] int labels (255 = ignore) -> [N, H, W, 3] uint8."""
  return palette(num_classes)[np.clip(labels, 0, 255).astype(np.int64)]


def image_summary(images: np.ndarray, label_maps: list[np.ndarray], num_classes: int,
                  count: int) -> np.ndarray:
  """Side-by-side panels per sample: [count, H, W * (1 + len(label_maps)), 3] uint8."""
  panels = [images[:count]] + [colorize(m[:count], num_classes) for m in label_maps]
  return np.concatenate(panels, axis=2)


def write_results(workdir: str, step: int, results: dict[str, Any]) -> str:
  """Writes workdir/eval/step_<N>.json (process 0 only) and returns its path."""
  path = os.path.join(workdir, "eval", f"step_{step}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"step": step, "results": results}, f, indent=1)
    os.replace(path + ".tmp", path)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: restore the latest checkpoint into the abstract sharded state and evaluate."""
  from rml_jax import train  # the run setup lives with training

  run = train.Run.create(config, workdir, read_only=True)
  step = run.checkpointer.latest_step()
  if step is None:
    raise train.UserError(f"--workdir: no checkpoint in {run.checkpointer.directory}; "
                          "train first (same --config and --workdir)")
  state = run.checkpointer.restore(step, run.abstract_state, run.meta)
  results = run.evaluate(state)
  print(f"Evaluation of checkpoint step {step}:\n" + format_table(results, run.class_names))
  path = write_results(workdir, step, results)
  logging.info("Wrote %s", path)
  run.checkpointer.close()
  return results
