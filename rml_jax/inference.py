"""Inference as pure JAX, traced inside the jitted steps: input normalisation, a model in eval
mode, the four models' probabilities on whole images, horizontal flip and sliding windows."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rml_jax.constants import MODEL_NAMES, TEACHERS
from rml_jax.state import RMLState

ProbsFn = Callable[[jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How eval, predict and stored soft labels see an image (config.eval).

  name: "whole" (the image at once) or "sliding" (windows of `window` every stride * window
  pixels); flip: also average with the horizontally flipped view.
  """

  name: str = "whole"
  window: tuple[int, int] = (0, 0)
  stride: float = 2 / 3
  flip: bool = False


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32, scaled to [0, 1] then standardised by mean / std."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean)) / jnp.asarray(std)


def apply_eval(model: nn.Module, variables: dict[str, Any], images: jax.Array
               ) -> dict[str, jax.Array]:
  """A model in eval mode, no gradient: float images [N, H, W, 3] ->
  {'logits' [N, H, W, K], 'features' [N, h, w, C]}."""
  return jax.lax.stop_gradient(model.apply(variables, images, train=False))


def model_variables(state: RMLState, name: str) -> tuple[nn.Module, dict[str, Any]]:
  """(module, variables) of one of the four models, by name (constants.MODEL_NAMES)."""
  learner, model = ((state.learner_a, state.model_a) if name.endswith("_a")
                    else (state.learner_b, state.model_b))
  return model, (learner.teacher if name in TEACHERS else learner.student)


def softmax_probs(model: nn.Module, variables: dict[str, Any], x: jax.Array) -> jax.Array:
  """One model in eval mode on whole normalised images [N, H, W, 3] -> probs [N, H, W, K]."""
  return jax.nn.softmax(apply_eval(model, variables, x)["logits"], -1)


def whole_image_probs(state: RMLState, images: jax.Array, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> dict[str, jax.Array]:
  """The four models on whole images: uint8 [N, H, W, 3] -> {name: softmax probs [N, H, W, K]}."""
  x = normalize(images, mean, std)
  return {name: softmax_probs(*model_variables(state, name), x) for name in MODEL_NAMES}


def probabilities(state: RMLState, images: jax.Array, mean: tuple[float, ...],
                  std: tuple[float, ...], protocol: Protocol) -> dict[str, jax.Array]:
  """uint8 [N, H, W, 3] -> {model name: probs [N, H, W, K] float32} under `protocol`."""
  whole = functools.partial(whole_image_probs, state, mean=mean, std=std)
  if protocol.name == "sliding":
    return sliding_window_probs(whole, images, protocol.window, protocol.stride, protocol.flip)
  return with_flip(whole, images) if protocol.flip else whole(images)


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
