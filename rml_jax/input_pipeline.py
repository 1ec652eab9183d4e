"""grain pipelines: labeled batches (weak view) and unlabeled weak/strong pairs, and eval batches.

Train batches are a dict
  {'labeled':   {'image': [Bl, h, w, 3] uint8, 'label': [Bl, h, w] int32 (255 = ignore)},
   'unlabeled': {'weak': [Bu, h, w, 3] uint8, 'strong': [Bu, V, h, w, 3] uint8 (V = 2 strong
                 views, one per student, with config.augment.strong_views='per_student'; V = 1
                 shared by both with 'shared'),
                 'valid': [Bu, h, w] bool (False on padding), 'label': [Bu, h, w] int32
                 (hidden ground truth, only for pseudo-label accuracy; 255 where unknown),
                 in later stages also 'soft_classes', 'soft_probs': [Bu, h, w, 2k] uint8
                 (the stored top-k soft labels of teachers a and b, soft_labels.py)}}
with per-process batch sizes; the two streams are zipped into one grain iterator, so one
iterator state checkpoints both.
"""

from __future__ import annotations

import functools
import signal
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from rml_jax import augment, datasets, soft_labels
from rml_jax.constants import IGNORE_LABEL
from rml_jax.errors import UserError


def _ensure_flags_parsed():
  # grain reads absl flags in its worker processes; library use (tests) has none parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _label_map(example: dict[str, Any]) -> np.ndarray:
  label = np.asarray(example["label"])
  return label[..., 0] if label.ndim == 3 else label


def resize_example(image: np.ndarray, maps: dict[str, np.ndarray], size
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Resizes an image (bilinear) and its label maps (nearest) to size (h, w); None keeps them."""
  if not size or tuple(image.shape[:2]) == tuple(size):
    return image, maps
  height, width = size
  return (augment.resize(image, height, width, nearest=False),
          {k: augment.resize(v, height, width, nearest=True) for k, v in maps.items()})


def labeled_example(example: dict[str, Any], rng: np.random.Generator, *,
                    crop_size, scale_range, flip, resize=None) -> dict[str, np.ndarray]:
  """Weak view of a labeled example: {'image' [h, w, 3] uint8, 'label' [h, w] int32}.

  resize: (H, W) every image is first resized to (the paper's Cityscapes 1024x512), or None.
  """
  image, maps = resize_example(np.asarray(example["image"]), {"label": _label_map(example)},
                               resize)
  image, maps = augment.weak_geometry(rng, image, maps, tuple(crop_size), tuple(scale_range),
                                      flip, {"label": IGNORE_LABEL})
  return {"image": image, "label": maps["label"].astype(np.int32)}


def unlabeled_example(example: dict[str, Any], rng: np.random.Generator, *, crop_size,
                      scale_range, flip, num_ops, magnitude_range, ops, resize=None,
                      num_strong: int = 1) -> dict[str, np.ndarray]:
  """A weak view and `num_strong` strong views with one geometry: each strong view is an
  independent RandAugment draw on the weak one. 'strong': [num_strong, h, w, 3] uint8."""
  image = np.asarray(example["image"])
  maps = {"valid": np.ones(image.shape[:2], np.uint8)}
  maps["label"] = (_label_map(example) if "label" in example
                   else np.full(image.shape[:2], IGNORE_LABEL, np.uint8))
  pad_values = {"valid": 0, "label": IGNORE_LABEL}
  image, maps = resize_example(image, maps, resize)
  if "soft_classes" in example:  # a later stage: the stored labels share the view's geometry
    height, width = image.shape[:2]  # stored padded to a common size: the image's part
    maps["soft_classes"] = example["soft_classes"][:height, :width]
    maps["soft_probs"] = example["soft_probs"][:height, :width]
    pad_values.update(soft_classes=0, soft_probs=0)
  weak, maps = augment.weak_geometry(rng, image, maps, tuple(crop_size), tuple(scale_range),
                                     flip, pad_values)
  strong = np.stack([augment.rand_augment(rng, weak, num_ops, tuple(magnitude_range), tuple(ops))
                     for _ in range(num_strong)])
  out = {"weak": weak, "strong": strong, "valid": maps["valid"].astype(bool),
         "label": maps["label"].astype(np.int32)}
  if "soft_classes" in maps:
    out.update(soft_classes=maps["soft_classes"], soft_probs=maps["soft_probs"])
  return out


def _process_shard(dataset: grain.MapDataset) -> grain.MapDataset:
  return dataset[jax.process_index()::jax.process_count()]


def _per_process(global_batch: int, key: str) -> int:
  if global_batch % jax.process_count():
    raise UserError(f"config.{key}={global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def train_dataset(config: ml_collections.ConfigDict, source, labeled_idx: np.ndarray,
                  unlabeled_idx: np.ndarray, with_unlabeled: bool,
                  stored_labels: str | None = None) -> grain.IterDataset:
  """The infinite train stream: reshuffled every epoch, deterministic for config.seed.

  stored_labels: a stage's soft-label folder (soft_labels.py); its rows follow unlabeled_idx and
  come with each unlabeled view as 'soft_classes' / 'soft_probs' [h, w, 2k] uint8.
  """
  data = config.data
  labeled = _process_shard(grain.MapDataset.source(datasets.Subset(source, labeled_idx)))
  labeled = (labeled.shuffle(seed=config.seed).repeat(None)
             .random_map(functools.partial(labeled_example, crop_size=data.crop_size,
                                           scale_range=data.scale_range, flip=data.flip,
                                           resize=_size(data.resize)),
                         seed=config.seed)
             .batch(_per_process(config.labeled_batch_size, "labeled_batch_size"),
                    drop_remainder=True))
  streams = {"labeled": labeled}
  if with_unlabeled:
    strong = config.augment
    unlabeled_source = datasets.Subset(source, unlabeled_idx)
    if stored_labels is not None:
      unlabeled_source = _WithStoredLabels(unlabeled_source, stored_labels)
    unlabeled = _process_shard(grain.MapDataset.source(unlabeled_source))
    unlabeled = (unlabeled.shuffle(seed=config.seed + 1).repeat(None)
                 .random_map(functools.partial(
                     unlabeled_example, crop_size=data.crop_size, scale_range=data.scale_range,
                     flip=data.flip, num_ops=strong.num_ops,
                     magnitude_range=strong.magnitude_range, ops=tuple(strong.ops),
                     resize=_size(data.resize), num_strong=num_strong_views(config)),
                     seed=config.seed + 1)
                 .batch(_per_process(config.unlabeled_batch_size, "unlabeled_batch_size"),
                        drop_remainder=True))
    streams["unlabeled"] = unlabeled
  length = min(len(s) for s in streams.values())
  names = sorted(streams)
  zipped = grain.experimental.ZipMapDataset([streams[n][:length] for n in names])
  return zipped.map(functools.partial(_as_dict, names=tuple(names))).to_iter_dataset()


def num_strong_views(config: ml_collections.ConfigDict) -> int:
  """Strong views per unlabeled image: 2 (one per student) or 1 (shared)."""
  return 2 if config.augment.strong_views == "per_student" else 1


def _as_dict(batches: tuple, names: tuple[str, ...]) -> dict[str, Any]:
  return dict(zip(names, batches))


class _WithStoredLabels:
  """Adds row i of a stage's stored soft labels to example i of `source`."""

  def __init__(self, source, directory: str):
    self._source = source
    self._stored = soft_labels.StoredLabels(directory)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    example = dict(self._source[index])
    example["soft_classes"], example["soft_probs"] = self._stored[index]
    return example


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """Workers leave SIGINT / SIGTERM to the main process, which checkpoints before exiting."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_iterator(config: ml_collections.ConfigDict, source, labeled_idx: np.ndarray,
                   unlabeled_idx: np.ndarray, with_unlabeled: bool,
                   stored_labels: str | None = None) -> grain.DatasetIterator:
  """Iterator over train batches, prepared in config.data.worker_count worker processes."""
  _ensure_flags_parsed()
  dataset = train_dataset(config, source, labeled_idx, unlabeled_idx, with_unlabeled,
                          stored_labels)
  if config.data.worker_count > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count, per_worker_buffer_size=config.data.prefetch),
        worker_init_fn=_ignore_stop_signals)
  return iter(dataset)


def eval_batches(config: ml_collections.ConfigDict, source, indices: np.ndarray | None = None,
                 resize=None, pad_to=None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size eval batches {'image' [B, H, W, 3] uint8, 'label' [B, H, W] int32,
  'valid' [B, H, W] bool (False on padding)}.

  resize (h, w): images (bilinear) and labels (nearest) are resized first. pad_to (h, w): each
  image is padded at the bottom and right to this size (labels with ignore), so images of
  different sizes (VOC) share one shape. The last batch is padded with ignore labels, so every
  batch has one shape (one compile) and padding never reaches the confusion matrix.
  """
  batch_size = _per_process(config.eval_batch_size, "eval_batch_size")
  dataset = grain.MapDataset.source(source if indices is None else datasets.Subset(source, indices))
  dataset = _process_shard(dataset).map(functools.partial(
      _eval_example, resize=_size(resize), pad_to=_size(pad_to))).batch(
          batch_size, batch_fn=_stack_same_size)
  for batch in dataset:
    missing = batch_size - batch["image"].shape[0]
    if missing:
      batch = {"image": np.concatenate([batch["image"], np.zeros(
                   (missing,) + batch["image"].shape[1:], batch["image"].dtype)]),
               "label": np.concatenate([batch["label"], np.full(
                   (missing,) + batch["label"].shape[1:], IGNORE_LABEL, np.int32)]),
               "valid": np.concatenate([batch["valid"], np.zeros(
                   (missing,) + batch["valid"].shape[1:], bool)])}
    yield batch


def val_batches(config: ml_collections.ConfigDict, source) -> Iterator[dict[str, np.ndarray]]:
  """eval_batches over a val source at config.eval's resize / pad_to."""
  return eval_batches(config, source, resize=config.eval.resize, pad_to=config.eval.pad_to)


def _size(size) -> tuple[int, int] | None:
  return tuple(int(v) for v in size) if size else None


def _eval_example(example: dict[str, Any], resize=None, pad_to=None) -> dict[str, np.ndarray]:
  image, maps = resize_example(np.asarray(example["image"]), {"label": _label_map(example)},
                               resize)
  label = maps["label"].astype(np.int32)
  valid = np.ones(label.shape, bool)
  if pad_to:
    height, width = image.shape[:2]
    if height > pad_to[0] or width > pad_to[1]:
      raise UserError(f"config.eval.pad_to={tuple(pad_to)}: image {example.get('image_id', '')!r}"
                      f" is {height}x{width} (h x w); expected pad_to to be at least as large")
    pad = ((0, pad_to[0] - height), (0, pad_to[1] - width))
    image = np.pad(image, pad + ((0, 0),))
    label = np.pad(label, pad, constant_values=IGNORE_LABEL)
    valid = np.pad(valid, pad)
  return {"image": image, "label": label, "valid": valid}


def _stack_same_size(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  shapes = sorted({e["image"].shape[:2] for e in examples})
  if len(shapes) > 1:
    raise UserError(f"eval images have different sizes {shapes[:3]}; set config.eval.pad_to to "
                    "the largest (h, w), or config.eval.resize")
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
