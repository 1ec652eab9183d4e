"""image_folder: any folder of images and label PNGs, prepared once into TFDS array_record files.

Layout under config.data.root (folder names are config fields):

  images/<stem>.png|jpg|...     labeled images
  labels/<stem><label_suffix>.png  their label maps (one channel; values mapped by label_map)
  unlabeled/<any>.png|jpg|...   optional: images without labels
  val images / val labels       optional: a separate labeled val set (else config.data.val_holdout
                                labeled images are held out as val)

Splits of the prepared dataset: 'train' (the labeled images), 'unlabeled', 'val'. Each example:
{'image_id': stem, 'image': [H, W, 3] uint8, 'label': [H, W, 1] uint8 class ids, 255 = ignore}.
Every file is checked while preparing: unreadable images, label values outside label_map, and
image/label size mismatches stop with one line naming the file, and TFDS leaves nothing prepared.
The prepared copy is keyed by the folder's listing (names, sizes, times) and the label settings,
so editing the folder or the config prepares a new copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rml_jax.constants import IGNORE_LABEL
from rml_jax.datasets import files
from rml_jax.errors import UserError


def value_map_from_config(data_config: ml_collections.ConfigDict) -> dict[int, int] | None:
  """config.data.label_map ((raw, class), ...) -> {raw: class}; empty -> None (raw = class)."""
  pairs = tuple(data_config.label_map)
  value_map = {}
  for pair in pairs:
    if len(pair) != 2:
      raise UserError(f"config.data.label_map: {pair!r} is not a (raw value, class id) pair")
    raw, class_id = int(pair[0]), int(pair[1])
    if not 0 <= class_id < len(data_config.class_names):
      raise UserError(f"config.data.label_map: class id {class_id} for value {raw} is outside "
                      f"[0, {len(data_config.class_names)}) (config.data.class_names)")
    value_map[raw] = class_id
  return value_map or None


def _listing(directory: str) -> list:
  if not directory or not os.path.isdir(directory):
    return []
  entries = []
  for name in sorted(os.listdir(directory)):
    stat = os.stat(os.path.join(directory, name))
    entries.append((name, stat.st_size, int(stat.st_mtime)))
  return entries


class ImageFolderConfig(tfds.core.BuilderConfig):
  """The folder and its label settings; the config name fingerprints both."""

  def __init__(self, data_config: ml_collections.ConfigDict):
    root = os.path.abspath(os.path.expanduser(data_config.root or ""))
    if not data_config.root or not os.path.isdir(root):
      raise UserError(f"config.data.root: {root if data_config.root else '(empty)'} is not a "
                      "directory; expected the folder holding images/ and labels/")
    self.root = root
    self.folders = {
        split: tuple(os.path.join(root, d) if d else "" for d in dirs) for split, dirs in {
            "train": (data_config.images_dir, data_config.labels_dir),
            "unlabeled": (data_config.unlabeled_dir, ""),
            "val": (data_config.val_images_dir, data_config.val_labels_dir)}.items()}
    self.label_suffix = data_config.label_suffix
    self.value_map = value_map_from_config(data_config)
    ignore = data_config.ignore_value
    self.ignore_value = None if ignore is None or ignore < 0 else int(ignore)
    self.num_classes = len(data_config.class_names)
    fingerprint = json.dumps([
        {s: [_listing(d) for d in dirs] for s, dirs in self.folders.items()},
        self.label_suffix, sorted((self.value_map or {}).items()), self.ignore_value,
        self.num_classes], sort_keys=True)
    digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
    base = re.sub(r"[^a-zA-Z0-9_]", "_", os.path.basename(root)).strip("_") or "folder"
    super().__init__(name=f"{base}_{digest}", version="1.0.0",
                     description=f"image folder {root}")

  def present_splits(self) -> tuple[str, ...]:
    """The splits this folder has: 'train', plus 'unlabeled' and 'val' when configured."""
    images, labels = self.folders["train"]
    files.list_images(images, "config.data.images_dir")
    if not os.path.isdir(labels):
      raise UserError(f"config.data.labels_dir: {labels} is not a directory; expected the label "
                      "images of config.data.images_dir")
    splits = ["train"]
    if self.folders["unlabeled"][0]:
      if not os.path.isdir(self.folders["unlabeled"][0]):
        raise UserError(f"config.data.unlabeled_dir: {self.folders['unlabeled'][0]} is not a "
                        "directory; expected a folder of images, or '' for none")
      splits.append("unlabeled")
    if self.folders["val"][0]:
      splits.append("val")
    return tuple(splits)


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A user's folder of images and label maps (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS: list = []

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        }),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the user's own files
    return {split: self._generate_examples(split)
            for split in self.builder_config.present_splits()}

  def _generate_examples(self, split: str):
    cfg: ImageFolderConfig = self.builder_config
    images_dir, labels_dir = cfg.folders[split]
    what = {"train": "config.data.images_dir", "unlabeled": "config.data.unlabeled_dir",
            "val": "config.data.val_images_dir"}[split]
    images = files.list_images(images_dir, what)
    if not images:
      raise UserError(f"{what}: {images_dir} holds no images; expected files ending in "
                      f"{', '.join(files.IMAGE_EXTENSIONS)}")
    labels = files.list_images(labels_dir, "labels") if labels_dir else {}
    for stem, image_path in images.items():
      image = files.read_image(image_path)
      if labels_dir:
        label_path = labels.get(stem + cfg.label_suffix)
        if label_path is None:
          raise UserError(f"{image_path}: no label {stem + cfg.label_suffix}.png in "
                          f"{labels_dir}; expected one label per image (matching stems)")
        label = files.map_label_values(files.read_label_values(label_path), label_path,
                                       cfg.num_classes, cfg.value_map, cfg.ignore_value)
        files.check_same_size(image, label, image_path, label_path)
      else:
        label = np.full(image.shape[:2], IGNORE_LABEL, np.uint8)
      yield stem, {"image_id": stem, "image": image, "label": label[..., None]}
