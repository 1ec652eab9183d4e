"""Evaluation: whole-image and sliding-window inference, confusion matrices over the whole val set
for all four models, per-class IoU and mIoU tables, colour-coded image summaries,
`evaluate(config, workdir)` for --mode=eval and `predict(config, workdir)` for --mode=predict."""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rml_jax import metrics as metrics_lib
from rml_jax import sharding

IGNORE = 255


# ---------------------------------------------------------------------------------------------
# Inference protocols (jax, traced inside the jitted predict / eval steps).
# ---------------------------------------------------------------------------------------------

ProbsFn = Callable[[jax.Array], dict[str, jax.Array]]


def window_offsets(size: int, window: int, stride: int) -> list[int]:
  """Start positions of windows covering [0, size): every stride, the last one flush with the
  end (mmseg's grid); one window at 0 when the window covers the image."""
  if size <= window:
    return [0]
  count = -(-(size - window) // stride) + 1
  return [min(i * stride, size - window) for i in range(count)]


def with_flip(predict: ProbsFn, images: jax.Array) -> dict[str, jax.Array]:
  """Mean of the predictions of images [N, H, W, 3] and of their horizontal flip."""
  plain = predict(images)
  flipped = predict(images[:, :, ::-1])
  return {k: (plain[k] + flipped[k][:, :, ::-1]) / 2 for k in plain}


def sliding_window_probs(predict: ProbsFn, images: jax.Array, window: tuple[int, int],
                         stride_fraction: float, flip: bool) -> dict[str, jax.Array]:
  """Sliding-window inference: {name: probs [N, H, W, K]} averaged over overlapping windows.

  predict: uint8 [N, h, w, 3] -> {name: probs [N, h, w, K]}; images [N, H, W, 3]. Windows of
  `window` (clipped to the image) every round(stride_fraction * window) pixels, the last flush
  with the border; one lax.scan over the window offsets, so one trace of the models per shape.
  """
  n, height, width, channels = images.shape
  win_h, win_w = min(window[0], height), min(window[1], width)
  ys = window_offsets(height, win_h, max(1, int(round(win_h * stride_fraction))))
  xs = window_offsets(width, win_w, max(1, int(round(win_w * stride_fraction))))
  offsets = np.array([(y, x) for y in ys for x in xs], np.int32)
  counts = np.zeros((height, width), np.float32)
  for y, x in offsets:
    counts[y:y + win_h, x:x + win_w] += 1
  predict_window = functools.partial(with_flip, predict) if flip else predict
  crop_shape = jax.ShapeDtypeStruct((n, win_h, win_w, channels), images.dtype)
  shapes = jax.eval_shape(predict_window, crop_shape)
  init = {k: jnp.zeros((n, height, width) + s.shape[3:], jnp.float32) for k, s in shapes.items()}

  def add_window(totals, offset):
    y, x = offset[0], offset[1]
    crop = jax.lax.dynamic_slice(images, (0, y, x, 0), (n, win_h, win_w, channels))
    probs = predict_window(crop)
    start = (0, y, x, 0)
    return {k: jax.lax.dynamic_update_slice(
        totals[k], jax.lax.dynamic_slice(totals[k], start, probs[k].shape) + probs[k], start)
        for k in totals}, None

  totals, _ = jax.lax.scan(add_window, init, jnp.asarray(offsets))
  return {k: v / jnp.asarray(counts)[None, :, :, None] for k, v in totals.items()}


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


# ---------------------------------------------------------------------------------------------
# --mode=predict: colour-coded masks and overlays for a folder of images.
# ---------------------------------------------------------------------------------------------


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
  """[H, W, 3] uint8 image blended with [H, W, 3] uint8 class colours (alpha = colour share)."""
  mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: str) -> None:
  """Writes a PNG atomically (a complete file or none)."""
  from PIL import Image

  Image.fromarray(array).save(path + ".tmp", format="PNG")
  os.replace(path + ".tmp", path)


def predict(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=predict: for every image of config.predict.input, writes <stem>_labels.png (class
  ids), <stem>_mask.png (colours) and <stem>_overlay.png into config.predict.output (default
  <workdir>/predictions), using config.predict.model of the latest checkpoint and the eval
  protocol of config.eval. Returns {stem: mask path}."""
  from rml_jax import step as step_lib
  from rml_jax import train
  from rml_jax.datasets import files
  from rml_jax.errors import UserError

  options = config.predict
  if not options.input:
    raise UserError("config.predict.input: empty; expected a folder of images "
                    "(--config.predict.input=DIR)")
  if options.model not in step_lib.MODEL_NAMES:
    raise UserError(f"config.predict.model: expected one of {step_lib.MODEL_NAMES}, got "
                    f"{options.model!r}")
  if jax.process_count() > 1:
    raise UserError("--mode=predict runs as a single process")
  images = files.list_images(os.path.expanduser(options.input), "config.predict.input")
  if not images:
    raise UserError(f"config.predict.input: {options.input} holds no images; expected files "
                    f"ending in {', '.join(files.IMAGE_EXTENSIONS)}")
  for path in images.values():  # every file readable before anything is written
    files.read_image(path)
  run = train.Run.create(config, workdir, read_only=True, with_data=False)
  step = run.checkpointer.latest_step()
  if step is None:
    raise UserError(f"--workdir: no checkpoint in {run.checkpointer.directory}; "
                    "train first (same --config and --workdir)")
  state = run.checkpointer.restore(step, run.abstract_state, run.meta)
  output = os.path.expanduser(options.output or os.path.join(workdir, "predictions"))
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise UserError(f"config.predict.output: cannot create {output} ({e.strerror})") from None
  from rml_jax import augment

  resize = (config.get("eval") or {}).get("resize")
  batch_size = max(1, run.mesh.devices.size)
  colours = palette(run.num_classes)
  written = {}
  for i, (stem, path) in enumerate(images.items()):
    image = files.read_image(path)
    height, width = image.shape[:2]
    x = augment.resize(image, *resize, nearest=False) if resize else image
    batch = np.zeros((batch_size,) + x.shape, np.uint8)
    batch[0] = x
    probs = run.predict_fn(state, sharding.to_global(batch, run.mesh))[options.model]
    labels = np.asarray(jax.device_get(jnp.argmax(probs[:1], -1)))[0].astype(np.uint8)
    if labels.shape != (height, width):
      labels = augment.resize(labels, height, width, nearest=True)
    _save_png(labels, os.path.join(output, f"{stem}_labels.png"))
    _save_png(colours[labels], os.path.join(output, f"{stem}_mask.png"))
    _save_png(overlay(image, colours[labels], options.overlay_alpha),
              os.path.join(output, f"{stem}_overlay.png"))
    written[stem] = os.path.join(output, f"{stem}_mask.png")
    print(f"[{i + 1}/{len(images)}] {path} -> {written[stem]}", flush=True)
  print(f"Predictions of {options.model} (checkpoint step {step}) in {output}", flush=True)
  run.checkpointer.close()
  return written
