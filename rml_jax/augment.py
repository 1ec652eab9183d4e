"""Augmentations. Host side (numpy, in grain workers): the weak geometric view (random scale,
crop, flip) and the strong photometric RandAugment ops. Device side (jax): CutMix box masks and
mixing of images, pseudo labels and confidence masks with the same box."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Host: weak geometry. Images uint8 [H, W, 3]; label maps uint8/int [H, W].
# ----------------------------------------------------------------------------------------------


def resize(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
  """PIL resize of a [H, W] or [H, W, 3] uint8 array (bilinear, or nearest for label maps).

  Nearest-neighbour maps may have any number of channels ([H, W, C], resized channel by channel).
  """
  resample = Image.NEAREST if nearest else Image.BILINEAR
  if nearest and array.ndim == 3:
    return np.stack([resize(array[..., c], height, width, True)
                     for c in range(array.shape[-1])], axis=-1)
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def weak_geometry(rng: np.random.Generator, image: np.ndarray, maps: dict[str, np.ndarray],
                  crop_size: tuple[int, int], scale_range: tuple[float, float], flip: bool,
                  pad_values: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Random scale, pad, random crop to crop_size and horizontal flip, shared by all inputs.

  image: [H, W, 3] uint8; maps: name -> [H, W] or [H, W, C] uint8 (labels, valid-pixel masks,
  stored soft labels), resized with nearest neighbour and padded with pad_values[name].
  Returns ([h, w, 3] uint8, maps [h, w] or [h, w, C]).
  """
  crop_h, crop_w = crop_size
  scale = rng.uniform(*scale_range)
  height = max(1, int(round(image.shape[0] * scale)))
  width = max(1, int(round(image.shape[1] * scale)))
  image = resize(image, height, width, nearest=False)
  maps = {k: resize(v, height, width, nearest=True) for k, v in maps.items()}
  pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    maps = {k: np.pad(v, ((0, pad_h), (0, pad_w)) + ((0, 0),) * (v.ndim - 2),
                      constant_values=pad_values[k])
            for k, v in maps.items()}
  top = int(rng.integers(0, image.shape[0] - crop_h + 1))
  left = int(rng.integers(0, image.shape[1] - crop_w + 1))
  window = (slice(top, top + crop_h), slice(left, left + crop_w))
  image = image[window]
  maps = {k: v[window] for k, v in maps.items()}
  if flip and rng.uniform() < 0.5:
    image = image[:, ::-1]
    maps = {k: v[:, ::-1] for k, v in maps.items()}
  return np.ascontiguousarray(image), {k: np.ascontiguousarray(v) for k, v in maps.items()}


# ----------------------------------------------------------------------------------------------
# Host: strong photometric RandAugment. Each op: (float32 [H, W, 3] in [0, 1], m in [0, 1]).
# ----------------------------------------------------------------------------------------------


def _gray(x: np.ndarray) -> np.ndarray:
  return (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of [H, W, C] with edge padding."""
  radius = max(1, int(round(2 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)
  padded = np.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="edge")
  x = sum(w * padded[i:i + x.shape[0]] for i, w in enumerate(taps))
  padded = np.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="edge")
  return sum(w * padded[:, i:i + x.shape[1]] for i, w in enumerate(taps))


def _signed(m: float, rng: np.random.Generator) -> float:
  return m if rng.uniform() < 0.5 else -m


def _equalize(x: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalisation on 256 levels."""
  levels = np.round(x * 255).astype(np.int64)
  out = np.empty_like(x)
  for c in range(x.shape[-1]):
    hist = np.bincount(levels[..., c].ravel(), minlength=256)
    cdf = np.cumsum(hist).astype(np.float32)
    span = cdf[-1] - cdf.min()
    lut = (cdf - cdf.min()) / span if span > 0 else np.arange(256, dtype=np.float32) / 255
    out[..., c] = lut[levels[..., c]]
  return out


PHOTOMETRIC_OPS = {
    "brightness": lambda x, m, r: x * (1 + _signed(0.9 * m, r)),
    "contrast": lambda x, m, r: (x - x.mean()) * (1 + _signed(0.9 * m, r)) + x.mean(),
    "color": lambda x, m, r: _gray(x) + (x - _gray(x)) * (1 + _signed(0.9 * m, r)),
    "sharpness": lambda x, m, r: x + _signed(0.9 * m, r) * (x - _blur(x, 1.0)),
    "posterize": lambda x, m, r: np.floor(x * 2 ** (8 - int(4 * m))) / 2 ** (8 - int(4 * m)),
    "solarize": lambda x, m, r: np.where(x >= 1 - m, 1 - x, x),
    "equalize": lambda x, m, r: _equalize(x),
    "autocontrast": lambda x, m, r: (x - x.min((0, 1))) / np.maximum(
        x.max((0, 1)) - x.min((0, 1)), 1e-3),
    "blur": lambda x, m, r: _blur(x, 0.1 + 1.9 * m),
    "invert": lambda x, m, r: 1 - x,
    "noise": lambda x, m, r: x + r.normal(0, 0.1 * m, x.shape).astype(np.float32),
}


def rand_augment(rng: np.random.Generator, image: np.ndarray, num_ops: int,
                 magnitude_range: tuple[float, float], ops: tuple[str, ...]) -> np.ndarray:
  """Strong view: `num_ops` photometric ops drawn from `ops`, each with a random magnitude.

  image: [H, W, 3] uint8 -> [H, W, 3] uint8. Geometry is untouched, so labels stay aligned.
  """
  x = image.astype(np.float32) / 255.0
  for name in rng.choice(np.asarray(ops), size=num_ops, replace=True):
    x = np.clip(PHOTOMETRIC_OPS[str(name)](x, float(rng.uniform(*magnitude_range)), rng), 0, 1)
  return (x * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Device: CutMix.
# ----------------------------------------------------------------------------------------------


def cutmix_box_masks(rng: jax.Array, batch: int, height: int, width: int, prob: float,
                     area_range: tuple[float, float] = (0.02, 0.4),
                     ratio_range: tuple[float, float] = (0.3, 1 / 0.3)) -> jax.Array:
  """[batch, height, width] bool: one random box per sample (all False with prob 1 - prob).

  Box area is a uniform fraction of the image in area_range and its aspect ratio log-uniform in
  ratio_range (the UniMatch convention).
  """
  area_rng, ratio_rng, pos_rng, apply_rng = jax.random.split(rng, 4)
  area = jax.random.uniform(area_rng, (batch,), minval=area_range[0], maxval=area_range[1])
  log_ratio = jax.random.uniform(ratio_rng, (batch,), minval=jnp.log(ratio_range[0]),
                                 maxval=jnp.log(ratio_range[1]))
  ratio = jnp.exp(log_ratio)
  box_h = jnp.minimum(jnp.sqrt(area * height * width * ratio), height)
  box_w = jnp.minimum(jnp.sqrt(area * height * width / ratio), width)
  corner = jax.random.uniform(pos_rng, (batch, 2))
  top = corner[:, 0] * (height - box_h)
  left = corner[:, 1] * (width - box_w)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
  apply = jax.random.uniform(apply_rng, (batch,)) < prob
  return inside & apply[:, None, None]


def cutmix(box: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Pastes each sample's partner (the next sample, cyclically) inside its box.

  box: [N, H, W] bool; arrays: [N, H, W, ...]. Every array is mixed with the same box, so
  images, pseudo labels and confidence masks stay aligned.
  """
  mixed = []
  for array in arrays:
    partner = jnp.roll(array, -1, axis=0)
    mask = box.reshape(box.shape + (1,) * (array.ndim - box.ndim))
    mixed.append(jnp.where(mask, partner, array))
  return tuple(mixed)
