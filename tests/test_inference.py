"""Inference protocols: sliding windows against a numpy reference and against whole images."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rml_jax import inference, state, step
from rml_jax.constants import MODEL_NAMES
from tests.conftest import tiny_config


@pytest.mark.parametrize("size, window, stride, expected", [
    (10, 4, 3, [0, 3, 6]), (10, 4, 4, [0, 4, 6]), (4, 4, 2, [0]), (3, 4, 2, [0]),
    (1024, 256, 171, [0, 171, 342, 513, 684, 768]),
])
def test_window_offsets(size, window, stride, expected):
  assert inference.window_offsets(size, window, stride) == expected


def _position_probs(images):
  """A fake model whose output depends on the pixel and on its place in the window."""
  x = images.astype(jnp.float32)
  n, h, w, _ = x.shape
  ramp = jnp.arange(h)[:, None] * 0.1 + jnp.arange(w)[None, :] * 0.05
  logits = jnp.stack([x[..., 0] / 50.0 + ramp, x[..., 1] / 70.0 - ramp, x[..., 2] / 90.0], -1)
  return {"m": jax.nn.softmax(logits, -1)}


@pytest.mark.parametrize("flip", [False, True])
def test_sliding_window_matches_a_numpy_reference(flip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 13, 17, 3), dtype=np.uint8)
  window, fraction = (6, 8), 2 / 3
  got = jax.jit(lambda x: inference.sliding_window_probs(_position_probs, x, window, fraction,
                                                        flip))(images)["m"]
  total = np.zeros((2, 13, 17, 3))
  count = np.zeros((13, 17))
  for y in inference.window_offsets(13, 6, 4):
    for x in inference.window_offsets(17, 8, 5):
      crop = images[:, y:y + 6, x:x + 8]
      probs = np.asarray(_position_probs(crop)["m"])
      if flip:
        probs = (probs + np.asarray(_position_probs(crop[:, :, ::-1])["m"])[:, :, ::-1]) / 2
      total[:, y:y + 6, x:x + 8] += probs
      count[y:y + 6, x:x + 8] += 1
  assert count.min() >= 1
  np.testing.assert_allclose(np.asarray(got), total / count[None, :, :, None], atol=1e-6)


def test_sliding_window_covering_the_image_equals_whole_image_inference():
  config = tiny_config("/unused")
  cfg = step.StepConfig.from_config(config, num_classes=11)
  init = state.make_init_fn(config, 11)
  train_state = jax.jit(init)(jax.random.key(0))
  images = np.random.default_rng(1).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
  whole = step.predict_step(train_state, images, cfg=cfg)
  sliding_cfg = dataclasses.replace(cfg, evaluation=inference.Protocol("sliding", (64, 64)))
  sliding = step.predict_step(train_state, images, cfg=sliding_cfg)
  assert set(whole) == set(MODEL_NAMES)
  for name in whole:
    np.testing.assert_allclose(np.asarray(sliding[name]), np.asarray(whole[name]), atol=1e-6)
  # Overlapping windows differ from the whole image, but stay probabilities.
  overlapping = step.predict_step(train_state, images, cfg=dataclasses.replace(
      cfg, evaluation=inference.Protocol("sliding", (32, 32))))
  np.testing.assert_allclose(np.asarray(overlapping["teacher_a"]).sum(-1), 1.0, atol=1e-5)
  assert not np.allclose(np.asarray(overlapping["teacher_a"]), np.asarray(whole["teacher_a"]))
