"""Reading a user's image and label files, with one-line errors that name the file.

Used by the builders that read user folders (voc_aug, image_folder) while they generate, and by
--mode=predict. Images come back as uint8 [H, W, 3] (greyscale and palette images converted),
label maps as uint8 [H, W] holding class ids and the ignore value 255.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
from PIL import Image

from rml_jax.constants import IGNORE_LABEL
from rml_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str) -> np.ndarray:
  """Any PIL-readable image file -> [H, W, 3] uint8."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e}); expected an image "
                    "file PIL can decode") from None


def read_label_values(path: str) -> np.ndarray:
  """A single-channel label image (greyscale, palette indices or 16-bit) -> [H, W] raw values.

  An RGB label is accepted when its three channels are equal (a greyscale PNG saved as RGB).
  """
  try:
    with Image.open(path) as image:
      values = np.asarray(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f"{path}: unreadable label image ({type(e).__name__}: {e}); expected a "
                    "single-channel PNG") from None
  if values.ndim == 3:
    if values.shape[-1] >= 3 and np.array_equal(values[..., 0], values[..., 1]) and \
        np.array_equal(values[..., 0], values[..., 2]):
      values = values[..., 0]
    else:
      raise UserError(f"{path}: label image has {values.shape[-1]} different channels; expected "
                      "one channel of class values (greyscale or palette PNG)")
  return values


def map_label_values(values: np.ndarray, path: str, num_classes: int,
                     value_map: dict[int, int] | None = None,
                     ignore_value: int | None = IGNORE_LABEL) -> np.ndarray:
  """Raw label values [H, W] -> class ids [H, W] uint8 (255 = ignore).

  value_map: raw value -> class id (None: raw values are the class ids). ignore_value: the raw
  value meaning "no label" (None: there is none). Any other value stops with the file named.
  """
  values = np.asarray(values)
  out = np.full(values.shape, IGNORE_LABEL, np.uint8)
  known = np.zeros(values.shape, bool)
  if value_map is None:
    value_map = {v: v for v in range(num_classes)}
  for raw, class_id in value_map.items():
    hit = values == raw
    out[hit] = class_id
    known |= hit
  if ignore_value is not None:
    known |= values == ignore_value
  if not known.all():
    bad = np.unique(values[~known])
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
    expected = sorted(value_map) + ([ignore_value] if ignore_value is not None else [])
    raise UserError(f"{path}: label values {shown} are neither a class nor ignore; expected "
                    f"values in {expected} (config.data.label_map / ignore_value)")
  return out


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: str,
                    label_path: str) -> None:
  if image.shape[:2] != label.shape[:2]:
    raise UserError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image "
                    f"{image_path} is {image.shape[1]}x{image.shape[0]} (width x height); "
                    "expected the same size")


def list_images(directory: str, what: str) -> dict[str, str]:
  """{file stem: path} of the image files in `directory` (not recursive), sorted by stem."""
  if not os.path.isdir(directory):
    raise UserError(f"{what}: {directory} is not a directory; expected a folder of images")
  found: dict[str, str] = {}
  for name in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
      if stem in found:
        raise UserError(f"{what}: {directory} holds two images with the stem {stem!r} "
                        f"({os.path.basename(found[stem])}, {name}); expected one per stem")
      found[stem] = os.path.join(directory, name)
  return found


def require_paths(root: str, relative_paths: Iterable[str], what: str) -> None:
  """Stops with one line listing every expected path that is missing under root."""
  missing = [p for p in relative_paths if not os.path.exists(os.path.join(root, p))]
  if missing:
    raise UserError(f"{what}: {root} is missing {', '.join(missing)}; expected "
                    f"{', '.join(relative_paths)} there")
