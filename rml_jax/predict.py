"""--mode=predict: class-id PNGs, colour masks and overlays for a folder of images, from one model
of a run's latest checkpoint, under the config's eval protocol."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from rml_jax import augment, sharding, storage, visualize
from rml_jax.datasets import files
from rml_jax.errors import UserError
from rml_jax.program import Program
from rml_jax.workdir import Workdir


def predict(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """For every image of config.predict.input, writes <stem>_labels.png (class ids),
  <stem>_mask.png (colours) and <stem>_overlay.png into config.predict.output (default
  <workdir>/predictions), from config.predict.model of the latest checkpoint.
  Returns {stem: mask path}."""
  options = config.predict
  if not options.input:
    raise UserError("config.predict.input: empty; expected a folder of images "
                    "(--config.predict.input=DIR)")
  if jax.process_count() > 1:
    raise UserError("--mode=predict runs as a single process")
  images = files.list_images(os.path.expanduser(options.input), "config.predict.input")
  if not images:
    raise UserError(f"config.predict.input: {options.input} holds no images; expected files "
                    f"ending in {', '.join(files.IMAGE_EXTENSIONS)}")
  for path in images.values():  # every file readable before anything is written
    files.read_image(path)
  program = Program.create(config)
  run = Workdir(workdir, config.keep_checkpoints, read_only=True)
  step = run.latest_checkpoint()
  train_state = run.checkpointer.restore(step, program.abstract_state, program.meta)
  output = storage.resolve(options.output) if options.output else run.predictions_dir
  storage.ensure_writable_dir(output, "config.predict.output", "the predicted masks")
  resize = config.eval.resize
  batch_size = max(1, program.mesh.devices.size)
  colours = visualize.palette(program.num_classes)
  written = {}
  for i, (stem, path) in enumerate(images.items()):
    image = files.read_image(path)
    height, width = image.shape[:2]
    x = augment.resize(image, *resize, nearest=False) if resize else image
    batch = np.zeros((batch_size,) + x.shape, np.uint8)
    batch[0] = x
    probs = program.predict_fn(train_state, sharding.to_global(batch, program.mesh))
    # Only the chosen model's labels leave the device.
    labels = np.asarray(jax.device_get(jnp.argmax(probs[options.model][:1], -1)))[0]
    labels = labels.astype(np.uint8)
    if labels.shape != (height, width):
      labels = augment.resize(labels, height, width, nearest=True)
    _save_png(labels, storage.join(output, f"{stem}_labels.png"))
    _save_png(colours[labels], storage.join(output, f"{stem}_mask.png"))
    _save_png(visualize.overlay(image, colours[labels], options.overlay_alpha),
              storage.join(output, f"{stem}_overlay.png"))
    written[stem] = storage.join(output, f"{stem}_mask.png")
    print(f"[{i + 1}/{len(images)}] {path} -> {written[stem]}", flush=True)
  print(f"Predictions of {options.model} (checkpoint step {step}) in {output}", flush=True)
  run.close()
  return written


def _save_png(array: np.ndarray, path: str) -> None:
  """Writes a PNG atomically (a complete file or none)."""
  storage.write_bytes(path, storage.bytes_of(lambda f: Image.fromarray(array).save(f, "PNG")))
