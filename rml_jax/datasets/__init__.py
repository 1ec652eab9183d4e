"""Dataset registry: TFDS builders read through `tfds` data sources (array_record) into grain."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rml_jax.datasets import digit_scenes
from rml_jax.errors import UserError

# name -> (builder class, class names). Generated builders need no manual files.
DATASETS: dict[str, tuple[type[tfds.core.DatasetBuilder], tuple[str, ...]]] = {
    "digit_scenes": (digit_scenes.DigitScenes, digit_scenes.CLASS_NAMES),
}


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
  data_dir = os.path.expanduser(data_config.data_dir or tfds.core.constants.DATA_DIR)
  return data_dir


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for config.data; prepares it when config.data.prepare is set."""
  if data_config.name not in DATASETS:
    raise UserError(f"config.data.name: unknown dataset {data_config.name!r}; "
                    f"expected one of {sorted(DATASETS)}")
  builder_cls, _ = DATASETS[data_config.name]
  data_dir = _data_dir(data_config)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  if not data_config.prepare:
    raise UserError(f"dataset {data_config.name!r} is not prepared under {builder.data_dir} "
                    "(config.data.data_dir); expected a prepared TFDS directory there, or set "
                    "config.data.prepare=True to generate it")
  try:
    os.makedirs(data_dir, exist_ok=True)
    probe = os.path.join(data_dir, ".rml_jax_write_probe")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"config.data.data_dir: cannot write the dataset to {data_dir} "
                    f"({e.strerror}); expected a writable directory") from None
  builder.download_and_prepare()
  return builder


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return DATASETS[data_config.name][1]


def data_sources(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Random-access sources: {'train': ..., 'val': ...} of dicts image/label/image_id."""
  builder = get_builder(data_config)
  return {
      "train": builder.as_data_source(data_config.train_split),
      "val": builder.as_data_source(data_config.val_split),
  }


def labeled_indices(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split of train indices: (labeled [n_l] sorted, unlabeled [n - n_l] sorted)."""
  if not 0 < fraction <= 1:
    raise UserError(f"config.data.labeled_fraction: expected a number in (0, 1], got {fraction}")
  order = np.random.default_rng(seed).permutation(num_train)
  num_labeled = max(1, int(round(num_train * fraction)))
  return np.sort(order[:num_labeled]), np.sort(order[num_labeled:])
