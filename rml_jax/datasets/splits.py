"""Split lists: `data/splits/<dataset>/<name>/labeled.txt` (and optional `unlabeled.txt`).

One image per line. Plain ids (`aachen_000000_000019`, `2007_000032`), file names
(`scan-10.21.jpg`) and the community's lines
(`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/...`,
`JPEGImages/2007_000032.jpg SegmentationClass/...`) all work: a line names the first of these that
is an id of the dataset (`resolve_id`): the line itself, its first field's file name, that name
without an image extension, and that without a dataset suffix (`_leftImg8bit`). Only image
extensions are taken off, so ids with dots (`scan-10.21`) stay whole. `make_split` draws the
seeded splits shipped in data/splits (data/make_splits.py).
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from rml_jax import storage
from rml_jax.datasets.files import IMAGE_EXTENSIONS
from rml_jax.errors import UserError

# The split lists: data/splits of a checkout, else the installed package's copy (rml_jax/splits).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_SPLITS = next((path for path in (os.path.join(os.path.dirname(_PACKAGE), "data", "splits"),
                                      os.path.join(_PACKAGE, "splits"))
                    if os.path.isdir(path)), os.path.join(_PACKAGE, "splits"))
_ID_SUFFIXES = ("_leftImg8bit",)


def strip_image_extension(name: str) -> str:
  """`name` without its extension when that is an image file's (png, jpg, ..., any case); any
  other dot stays, so `scan-10.21` is kept whole."""
  stem, extension = os.path.splitext(name)
  return stem if extension.lower() in IMAGE_EXTENSIONS else name


def id_candidates(line: str) -> list[str]:
  """What a split-file line may name, the most literal first: the line, its first field's file
  name, that name without an image extension, and that without a dataset suffix."""
  text = line.strip()
  name = os.path.basename(text.split()[0])
  stem = strip_image_extension(name)
  candidates = [text, name, stem]
  candidates += [stem[:-len(suffix)] for suffix in _ID_SUFFIXES if stem.endswith(suffix)]
  return list(dict.fromkeys(candidates))


def resolve_id(line: str, known_ids) -> str | None:
  """The first of id_candidates(line) in `known_ids` (the dataset's ids), or None."""
  return next((c for c in id_candidates(line) if c in known_ids), None)


def normalize_id(line: str) -> str:
  """A split-file line -> the image id when the dataset's ids are not at hand: the most reduced
  of id_candidates (file name, image extension and dataset suffixes removed)."""
  return id_candidates(line)[-1]


def read_lines(path: str) -> list[str]:
  """The entries of a split file: its lines, stripped, without blank ones and # comments."""
  try:
    with open(path) as f:
      lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
  except OSError as e:
    raise UserError(f"{path}: cannot read the split file ({e.strerror})") from None
  if not lines:
    raise UserError(f"{path}: the split file lists no images; expected one image id per line")
  return lines


def read_ids(path: str) -> list[str]:
  """The ids of a split file (normalize_id of each line), in file order, each once."""
  return list(dict.fromkeys(normalize_id(line) for line in read_lines(path)))


def write_ids(path: str, ids: list[str]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write("".join(f"{i}\n" for i in ids))
  os.replace(path + ".tmp", path)


def split_folder(data_config: ml_collections.ConfigDict, name: str) -> str:
  """The folder of split `name`: config.data.split_dir/<name>, or data/splits/<dataset>/<name>."""
  base = data_config.split_dir or os.path.join(REPO_SPLITS, data_config.name)
  folder = os.path.join(os.path.expanduser(base), name)
  if not os.path.isfile(os.path.join(folder, "labeled.txt")):
    available = sorted(d for d in os.listdir(base)
                       if os.path.isfile(os.path.join(base, d, "labeled.txt"))) \
        if os.path.isdir(base) else []
    raise UserError(f"config.data.split={name!r}: no {os.path.join(folder, 'labeled.txt')}; "
                    f"expected one of {available} (or set config.data.split_dir)")
  return folder


def cached_ids(cache_dir: str | None, data_config: ml_collections.ConfigDict,
               read: Callable[[], list[str]]) -> list[str]:
  """The train image ids, kept in cache_dir/train_image_ids.txt after the first read."""
  path = storage.join(cache_dir, "train_image_ids.txt") if cache_dir else None
  key = (f"# {data_config.name} {data_config.train_split} holdout={data_config.val_holdout} "
         f"val_list={data_config.val_list} train_list={data_config.train_list} "
         f"data_dir={data_config.data_dir} root={data_config.root}")
  if path and storage.isfile(path):
    lines = storage.read_text(path).splitlines()
    if lines and lines[0] == key:
      return lines[1:]
  ids = read()
  if path and jax.process_index() == 0:
    storage.write_text(path, "\n".join([key] + ids) + "\n")
  return ids


def indices_from_folder(folder: str, train_ids: list[str],
                        num_labeled: int) -> tuple[np.ndarray, np.ndarray]:
  """(labeled, unlabeled) sorted indices into train for the split lists in `folder`.

  train_ids: the id of every train example; the first num_labeled have labels. Every line must
  resolve (resolve_id) to a train image (labeled.txt: one with a label), else one line names the
  file and the line.
  """
  position = {image_id: i for i, image_id in enumerate(train_ids)}

  def lookup(path: str, labeled: bool) -> np.ndarray:
    lines = read_lines(path)
    ids = [resolve_id(line, position) for line in lines]
    missing = [line for line, i in zip(lines, ids)
               if i is None or (labeled and position[i] >= num_labeled)]
    if missing:
      what = "labeled train image" if labeled else "train image"
      raise UserError(f"{path}: {len(missing)} of {len(lines)} ids are not a {what} of the "
                      f"dataset (first: {missing[0]!r}); expected ids such as {train_ids[0]!r} "
                      "(or file names)")
    return np.unique(np.asarray([position[i] for i in ids], np.int64))

  labeled = lookup(os.path.join(folder, "labeled.txt"), labeled=True)
  unlabeled_path = os.path.join(folder, "unlabeled.txt")
  if os.path.isfile(unlabeled_path):
    unlabeled = np.setdiff1d(lookup(unlabeled_path, labeled=False), labeled)
  else:
    unlabeled = np.setdiff1d(np.arange(len(train_ids)), labeled)
  return labeled, unlabeled.astype(np.int64)


def make_split(candidates: list[str], num_labeled: int, seed: int,
               pool: list[str] | None = None) -> tuple[list[str], list[str]]:
  """Seeded split: num_labeled ids drawn from candidates; unlabeled = the rest of pool.

  pool defaults to candidates (e.g. VOC: labeled from the 1464 train ids, unlabeled from the
  10582 train_aug ids). Both lists come back sorted.
  """
  candidates = sorted(candidates)
  if not 0 < num_labeled <= len(candidates):
    raise ValueError(f"num_labeled={num_labeled} not in [1, {len(candidates)}]")
  order = np.random.default_rng(seed).permutation(len(candidates))
  labeled = sorted(candidates[i] for i in order[:num_labeled])
  chosen = set(labeled)
  unlabeled = sorted(i for i in (pool if pool is not None else candidates) if i not in chosen)
  return labeled, unlabeled
