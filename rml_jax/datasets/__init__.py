"""Dataset registry: TFDS builders read through `tfds` data sources (array_record) into grain.

`data_sources(config.data)` returns a `Sources`: random-access train and val sources whose examples
are {'image' [H, W, 3] uint8, 'label' [H, W] uint8 (255 = ignore), 'image_id' str}, whatever the
dataset's own feature names. `split(config.data, sources)` picks the labeled and unlabeled train
indices: from a split list (`data/splits/<dataset>/<name>/labeled.txt`) or a seeded fraction.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rml_jax import storage
from rml_jax.datasets import cityscapes, digit_scenes, image_folder, splits, voc_aug
from rml_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How one dataset is built and read.

  make_builder(data_config, data_dir) -> an unprepared TFDS builder; class_names(data_config);
  standardize: dataset example -> the common example (None: already common); manual: needs
  config.data.manual_dir (checked by check_manual before anything is prepared); image_features:
  features skipped when only image ids are read; unlabeled_split: a split of images without
  labels appended to train; image_size: (h, w) of every stored image (None: sizes vary).
  """

  make_builder: Callable[[ml_collections.ConfigDict, str], tfds.core.DatasetBuilder]
  class_names: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
  standardize: Callable[[dict], dict] | None = None
  manual: bool = False
  check_manual: Callable[[str], None] | None = None
  image_features: tuple[str, ...] = ("image", "label")
  unlabeled_split: str = ""
  image_size: tuple[int, int] | None = None


DATASETS: dict[str, DatasetSpec] = {
    "digit_scenes": DatasetSpec(
        make_builder=lambda cfg, d: digit_scenes.DigitScenes(data_dir=d,
                                                             file_format="array_record"),
        class_names=lambda cfg: digit_scenes.CLASS_NAMES,
        image_size=(digit_scenes.IMAGE_SIZE, digit_scenes.IMAGE_SIZE)),
    "cityscapes": DatasetSpec(
        make_builder=lambda cfg, d: tfds.builder(cityscapes.TFDS_NAME, data_dir=d,
                                                 file_format="array_record"),
        class_names=lambda cfg: cityscapes.CLASS_NAMES,
        standardize=cityscapes.standardize, manual=True,
        check_manual=cityscapes.check_manual_dir,
        image_features=("image_left", "segmentation_label"), image_size=cityscapes.IMAGE_SIZE),
    "voc_aug": DatasetSpec(
        make_builder=lambda cfg, d: voc_aug.VocAug(data_dir=d, file_format="array_record"),
        class_names=lambda cfg: voc_aug.CLASS_NAMES, manual=True),
    "image_folder": DatasetSpec(
        make_builder=lambda cfg, d: image_folder.ImageFolder(
            config=image_folder.ImageFolderConfig(cfg), data_dir=d, file_format="array_record"),
        class_names=lambda cfg: tuple(cfg.class_names), unlabeled_split="unlabeled"),
}


def _spec(data_config: ml_collections.ConfigDict) -> DatasetSpec:
  if data_config.name not in DATASETS:
    raise UserError(f"config.data.name: unknown dataset {data_config.name!r}; "
                    f"expected one of {sorted(DATASETS)}")
  return DATASETS[data_config.name]


def stored_image_size(data_config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(h, w) of every stored image of the dataset, or None when their sizes vary."""
  return _spec(data_config).image_size


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(data_config.data_dir or tfds.core.constants.DATA_DIR)


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for config.data; prepares it when config.data.prepare is set."""
  spec = _spec(data_config)
  data_dir = _data_dir(data_config)
  builder = spec.make_builder(data_config, data_dir)
  if builder.is_prepared():
    return builder
  if not data_config.prepare:
    raise UserError(f"dataset {data_config.name!r} is not prepared under {builder.data_dir} "
                    "(config.data.data_dir); expected a prepared TFDS directory there, or set "
                    "config.data.prepare=True to generate it")
  download_config = None
  if spec.manual:
    manual_dir = os.path.abspath(os.path.expanduser(data_config.manual_dir))
    if spec.check_manual is not None:
      spec.check_manual(data_config.manual_dir)
    elif not data_config.manual_dir or not os.path.isdir(manual_dir):
      shown = manual_dir if data_config.manual_dir else "(empty)"
      raise UserError(f"config.data.manual_dir: {shown} is not a directory; expected the "
                      f"downloaded {data_config.name} files")
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  storage.ensure_writable_dir(data_dir, "config.data.data_dir", "the prepared dataset")
  builder.download_and_prepare(download_config=download_config)
  return builder


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(_spec(data_config).class_names(data_config))


# ---------------------------------------------------------------------------------------------
# Random-access sources (picklable: grain worker processes receive them).
# ---------------------------------------------------------------------------------------------


class Standardized:
  """A TFDS data source whose examples pass through a dataset's standardize function (if any);
  image ids come back as str."""

  def __init__(self, source, standardize: Callable[[dict], dict] | None):
    self._source = source
    self._standardize = standardize

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    example = self._source[index]
    example = dict(self._standardize(example) if self._standardize else example)
    if isinstance(example.get("image_id"), bytes):
      example["image_id"] = example["image_id"].decode()
    return example


class Subset:
  """A random-access view of `source` at `indices`."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


class Concat:
  """Random access over several sources, one after the other."""

  def __init__(self, sources):
    self._sources = list(sources)
    self._starts = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int):
    which = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._sources[which][index - int(self._starts[which])]


@dataclasses.dataclass
class Sources:
  """train [N] (train[:num_labeled] have labels), val, and a lazy reader of train's image ids."""

  train: Any
  val: Any
  num_labeled: int
  read_train_ids: Callable[[], list[str]]


def _split_source(builder, split: str, spec: DatasetSpec):
  return Standardized(builder.as_data_source(split), spec.standardize)


def _read_ids(builder, split: str, spec: DatasetSpec) -> list[str]:
  skip = {name: tfds.decode.SkipDecoding() for name in spec.image_features}
  source = builder.as_data_source(split, decoders=skip)
  ids = []
  for i in range(len(source)):
    image_id = source[i]["image_id"]
    ids.append(image_id.decode() if isinstance(image_id, bytes) else str(image_id))
  return ids


def _require_split(builder, split: str, key: str) -> None:
  if split not in builder.info.splits:
    raise UserError(f"config.data.{key}: dataset {builder.name!r} has no split {split!r}; "
                    f"expected one of {sorted(builder.info.splits)}")


def data_sources(data_config: ml_collections.ConfigDict) -> Sources:
  """Train and val sources of config.data, preparing the dataset when needed.

  config.data.val_holdout > 0 holds that many labeled train images out as the val set (seeded by
  config.data.split_seed; for folders without a val folder); config.data.val_list names them
  instead (and config.data.train_list, optionally, the train images among the rest). An
  unlabeled split (image_folder's 'unlabeled/') is appended to train after the labeled images.
  """
  spec = _spec(data_config)
  builder = get_builder(data_config)
  _require_split(builder, data_config.train_split, "train_split")
  labeled = _split_source(builder, data_config.train_split, spec)
  holdout = data_config.val_holdout
  keep = np.arange(len(labeled))
  if data_config.val_list:
    keep, held = _listed_indices(data_config, _read_ids(builder, data_config.train_split, spec))
    val = Subset(labeled, held)
  elif holdout > 0:
    if holdout >= len(labeled):
      raise UserError(f"config.data.val_holdout={holdout}: the train split has only "
                      f"{len(labeled)} labeled images; expected fewer")
    order = np.random.default_rng(data_config.split_seed).permutation(len(labeled))
    held, keep = np.sort(order[:holdout]), np.sort(order[holdout:])
    val = Subset(labeled, held)
  else:
    if spec.unlabeled_split and data_config.val_split not in builder.info.splits:
      raise UserError(f"config.data.val_images_dir: {data_config.name!r} has no val folder; "
                      "expected val_images_dir and val_labels_dir, or val_holdout > 0 to hold "
                      "labeled images out as the val set")
    _require_split(builder, data_config.val_split, "val_split")
    val = _split_source(builder, data_config.val_split, spec)
  held_out = holdout > 0 or bool(data_config.val_list)
  parts = [Subset(labeled, keep) if held_out else labeled]
  id_splits = [data_config.train_split]
  if spec.unlabeled_split and spec.unlabeled_split in builder.info.splits:
    parts.append(_split_source(builder, spec.unlabeled_split, spec))
    id_splits.append(spec.unlabeled_split)

  def read_train_ids() -> list[str]:
    ids = [_read_ids(builder, s, spec) for s in id_splits]
    ids[0] = [ids[0][i] for i in keep]
    return [i for part in ids for i in part]

  train = parts[0] if len(parts) == 1 else Concat(parts)
  return Sources(train=train, val=val, num_labeled=len(keep), read_train_ids=read_train_ids)


def read_id_list(data_config: ml_collections.ConfigDict, key: str) -> list[str]:
  """The lines (image ids or file names, one per line) of the list file config.data.<key>,
  relative to config.data.root."""
  path = os.path.join(os.path.expanduser(data_config.root), data_config[key])
  try:
    with open(path) as f:
      ids = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"config.data.{key}: cannot read {path} ({e.__class__.__name__}); expected "
                    "a text file of image ids, one per line") from None
  if not ids:
    raise UserError(f"config.data.{key}: {path} lists no image ids; expected one per line")
  return ids


def _listed_indices(data_config: ml_collections.ConfigDict, ids: list[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) indices into the labeled images whose ids are `ids`: val from
  config.data.val_list; train from config.data.train_list, or every image not in val. Each
  line names an id as split files do (splits.resolve_id: the id, or the file name)."""
  position = {image_id: i for i, image_id in enumerate(ids)}

  def indices(key: str) -> np.ndarray:
    listed = read_id_list(data_config, key)
    resolved = [splits.resolve_id(line, position) for line in listed]
    missing = [line for line, image_id in zip(listed, resolved) if image_id is None]
    if missing:
      raise UserError(f"config.data.{key}: image id {missing[0]!r} ({len(missing)} of "
                      f"{len(listed)} listed) is not among the labeled images of "
                      f"config.data.images_dir; expected the file names of its images, with or "
                      "without the extension")
    return np.unique([position[i] for i in resolved])

  val = indices("val_list")
  train = (indices("train_list") if data_config.train_list
           else np.setdiff1d(np.arange(len(ids)), val))
  overlap = np.intersect1d(train, val)
  if overlap.size:
    raise UserError(f"config.data.train_list: image id {ids[overlap[0]]!r} is also in "
                    "config.data.val_list; expected disjoint lists")
  return train, val


def labeled_indices(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split of train indices: (labeled [n_l] sorted, unlabeled [n - n_l] sorted)."""
  if not 0 < fraction <= 1:
    raise UserError(f"config.data.labeled_fraction: expected a number in (0, 1], got {fraction}")
  order = np.random.default_rng(seed).permutation(num_train)
  num_labeled = max(1, int(round(num_train * fraction)))
  return np.sort(order[:num_labeled]), np.sort(order[num_labeled:])


def split(data_config: ml_collections.ConfigDict, sources: Sources,
          cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(labeled, unlabeled) sorted train indices.

  config.data.split names a folder of data/splits/<dataset>/ (or config.data.split_dir) whose
  labeled.txt (and optional unlabeled.txt; default: every other train image) lists image ids.
  Without a split name, a seeded config.data.labeled_fraction of the labeled images is labeled
  and everything else in train is unlabeled. cache_dir keeps the train image ids read for a split
  file (reading them touches every record once).
  """
  name = data_config.split
  if not name:
    labeled, rest = labeled_indices(sources.num_labeled, data_config.labeled_fraction,
                                    data_config.split_seed)
    unlabeled = np.concatenate([rest, np.arange(sources.num_labeled, len(sources.train))])
    return labeled, unlabeled.astype(np.int64)
  folder = splits.split_folder(data_config, name)
  ids = splits.cached_ids(cache_dir, data_config, sources.read_train_ids)
  return splits.indices_from_folder(folder, ids, sources.num_labeled)
