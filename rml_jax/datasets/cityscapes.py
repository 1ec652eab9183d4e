"""Cityscapes through TFDS's own `cityscapes/semantic_segmentation` builder.

The user downloads leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (registration needed)
into config.data.manual_dir; TFDS prepares train (2975), validation (500) and test from them.
Examples hold 'image_left' [1024, 2048, 3] and 'segmentation_label' [1024, 2048, 1] with the 34
Cityscapes label ids; `standardize` maps them to the 19 train ids (everything else 255).
"""

from __future__ import annotations

import os

import numpy as np

from rml_jax.constants import IGNORE_LABEL
from rml_jax.errors import UserError

TFDS_NAME = "cityscapes/semantic_segmentation"
IMAGE_SIZE = (1024, 2048)  # (h, w) of every image
REQUIRED_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
               "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
               "bus", "train", "motorcycle", "bicycle")
# Cityscapes label id -> train id (the official labels.py table); all other ids are ignored.
LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lookup_table() -> np.ndarray:
  table = np.full(256, IGNORE_LABEL, np.uint8)
  for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table


TRAIN_ID_TABLE = _lookup_table()


def check_manual_dir(manual_dir: str) -> None:
  """Stops with one line listing the zips TFDS needs when any is missing."""
  root = os.path.abspath(os.path.expanduser(manual_dir or ""))
  missing = [z for z in REQUIRED_ZIPS if not os.path.isfile(os.path.join(root, z))]
  if not manual_dir or missing:
    raise UserError(f"config.data.manual_dir: {root if manual_dir else '(empty)'} is missing "
                    f"{', '.join(missing or REQUIRED_ZIPS)}; expected {' and '.join(REQUIRED_ZIPS)}"
                    " from cityscapes-dataset.com there")


def standardize(example: dict) -> dict:
  """TFDS example -> {'image' [H, W, 3] uint8, 'label' [H, W] uint8 train ids, 'image_id'}."""
  label_ids = np.asarray(example["segmentation_label"])[..., 0]
  return {"image": np.asarray(example["image_left"]), "label": TRAIN_ID_TABLE[label_ids],
          "image_id": example["image_id"]}
