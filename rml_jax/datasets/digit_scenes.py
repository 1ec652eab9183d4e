"""digit_scenes: the embedded default dataset, generated offline from real handwritten digits.

Each example is a 64x64 RGB scene holding two to four handwritten digits (the 8x8 scans of the
UCI optical-digits set that scikit-learn ships, enlarged) pasted on a cluttered background of
smooth colour gradients, strokes and blobs. Labels: 0 = background, 1 + d = digit d (11 classes).
Train and val scenes use disjoint digit scans. Every train scene keeps its ground truth, so the
accuracy of pseudo labels on the unlabeled part can be measured.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 11
CLASS_NAMES = ("background",) + tuple(f"digit_{d}" for d in range(10))
IMAGE_SIZE = 64
# A digit's label covers its strokes grown by this many pixels: the task is to find and read
# each digit, not to trace 3-pixel strokes at a feature stride of 8.
LABEL_MARGIN = 2
SPLIT_SIZES = {"train": 4096, "val": 512}
_SPLIT_SEEDS = {"train": 0, "val": 1}


def _digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns the split's digit scans ([M, 8, 8] float32 in [0, 1]) and digit values [M]."""
  from sklearn.datasets import load_digits  # the data ships inside the package

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  parity = 0 if split == "train" else 1
  keep = np.arange(len(images)) % 2 == parity
  return images[keep], digits.target[keep].astype(np.int64)


def _resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a [h, w] float array to [size, size] (align-corners=False)."""
  h, w = image.shape
  ys = (np.arange(size) + 0.5) * h / size - 0.5
  xs = (np.arange(size) + 0.5) * w / size - 0.5
  y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
  x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
  y1 = np.clip(y0 + 1, 0, h - 1)
  x1 = np.clip(x0 + 1, 0, w - 1)
  wy = np.clip(ys - y0, 0, 1)[:, None]
  wx = np.clip(xs - x0, 0, 1)[None, :]
  top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
  bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A cluttered [size, size, 3] float32 background: gradient, blobs, strokes and noise."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  c0, c1 = rng.uniform(0, 1, (2, 3)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
  bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
  for _ in range(rng.integers(3, 7)):  # soft blobs
    cy, cx = rng.uniform(0, 1, 2)
    radius = rng.uniform(0.05, 0.2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]
    bg = bg * (1 - 0.7 * blob) + 0.7 * blob * rng.uniform(0, 1, 3)
  for _ in range(rng.integers(1, 4)):  # thin pen-like strokes
    p0, p1 = rng.uniform(0, 1, (2, 2))
    d = p1 - p0
    s = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / (d @ d + 1e-6), 0, 1)
    dist = np.hypot(yy - (p0[0] + s * d[0]), xx - (p0[1] + s * d[1]))
    stroke = (dist < rng.uniform(0.004, 0.012)).astype(np.float32)[..., None]
    bg = bg * (1 - stroke) + stroke * rng.uniform(0, 1, 3)
  bg += rng.normal(0, 0.04, bg.shape)
  return np.clip(bg, 0, 1).astype(np.float32)


def _thicken(mask: np.ndarray, margin: int) -> np.ndarray:
  """Grows a [h, w] bool mask by `margin` pixels (square neighbourhood)."""
  if margin <= 0:
    return mask
  padded = np.pad(mask, margin)
  h, w = mask.shape
  out = np.zeros_like(mask)
  for dy in range(2 * margin + 1):
    for dx in range(2 * margin + 1):
      out |= padded[dy:dy + h, dx:dx + w]
  return out


def make_scene(rng: np.random.Generator, scans: np.ndarray, values: np.ndarray,
               size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """One scene: image [size, size, 3] uint8 and label [size, size] uint8 in [0, 11)."""
  image = _background(rng, size)
  label = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(2, 5)):
    index = rng.integers(len(scans))
    side = int(rng.integers(int(size * 0.35), int(size * 0.55) + 1))
    alpha = np.clip((_resize_bilinear(scans[index], side) - 0.25) * 2.5, 0, 1)
    for _ in range(10):  # prefer places that leave earlier digits mostly visible
      top, left = rng.integers(0, size - side + 1, 2)
      if (label[top:top + side, left:left + side] > 0).mean() < 0.05:
        break
    patch = image[top:top + side, left:left + side]
    # Any hue, but a luminance far from the local background so the shape stays readable.
    ink = rng.uniform(0, 1, 3).astype(np.float32)
    if patch.mean() > 0.5:
      ink *= 0.35
    else:
      ink = 0.65 + 0.35 * ink
    alpha3 = alpha[..., None]
    image[top:top + side, left:left + side] = patch * (1 - alpha3) + ink * alpha3
    region = label[top:top + side, left:left + side]
    region[_thicken(alpha > 0.5, LABEL_MARGIN)] = values[index] + 1
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


class DigitScenes(tfds.core.GeneratorBasedBuilder):
  """Scenes of real handwritten digits on clutter, with per-pixel labels (11 classes)."""

  VERSION = tfds.core.Version("1.5.0")
  RELEASE_NOTES = {"1.3.0": "4096 train scenes of 2-4 digits with luminance contrast.",
                   "1.4.0": "Images and labels stored as zlib-compressed arrays.",
                   "1.5.0": "Digit labels cover the strokes grown by 2 pixels."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Text(),
            # Raw zlib-compressed arrays: no PNG encoding when generating, no decoding when read.
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "label": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
        }),
        supervised_keys=("image", "label"),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split: str):
    scans, values = _digit_pool(split)
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    for i in range(SPLIT_SIZES[split]):
      image, label = make_scene(rng, scans, values)
      image_id = f"{split}_{i:05d}"
      yield image_id, {"image_id": image_id, "image": image, "label": label}
