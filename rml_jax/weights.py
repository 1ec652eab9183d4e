"""Params files (`.npz` of flat keys `params/<module path>`, `batch_stats/<module path>`): reading,
writing, and merging pretrained weights into a model's variables."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from rml_jax.errors import UserError

Tree = dict[str, Any]


def flatten(tree: Tree, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = np.asarray(value)
  return out


def unflatten(flat: dict[str, np.ndarray]) -> Tree:
  tree: Tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def save(path: str, variables: Tree) -> None:
  """{'params': ..., 'batch_stats': ...} -> an .npz of flat '/'-joined keys."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flatten(variables))
  os.replace(tmp, path)


def first_sentence(error: Exception) -> str:
  """The first sentence of an exception's message (its type name when it has none)."""
  text = (str(error).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
  return text[:150] or type(error).__name__


def read_npz(path: str, key: str, expected: str) -> dict[str, np.ndarray]:
  """Every array of the .npz archive `path`; anything else (a missing file, garbage bytes, a
  pickle, a truncated archive, a single .npy array) stops with one line naming `key` (the flag
  or config key that named the file) and `expected`."""
  if not os.path.isfile(path):
    raise UserError(f"{key}: {path} does not exist; expected {expected}")
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz archive")
    with data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    reason = first_sentence(e)
    raise UserError(f"{key}: {path} is not readable as an .npz archive ({reason}); expected "
                    f"{expected}") from None


def load(path: str, key: str = "config.model.init_from") -> Tree:
  """A params file -> {'params': ..., 'batch_stats': ...}; one line for anything else."""
  expected = "a params file written by `python -m rml_jax.convert`"
  flat = read_npz(path, key, expected)
  if not flat or not all(k.startswith(("params/", "batch_stats/")) for k in flat):
    shown = ", ".join(sorted(flat)[:3]) or "no arrays"
    raise UserError(f"{key}: {path} holds {shown}; expected {expected} (keys params/... and "
                    "batch_stats/...)")
  return unflatten(flat)


def resize_pos_embed(pos_embed: np.ndarray, num_tokens: int, grid: tuple[int, int]
                     ) -> np.ndarray:
  """[1, 1 + g*g, D] (square pretraining grid) -> [1, 1 + h*w, D] by bilinear resampling."""
  import jax

  cls, tokens = pos_embed[:, :1], pos_embed[:, 1:]
  side = int(round(np.sqrt(tokens.shape[1])))
  if side * side != tokens.shape[1] or grid[0] * grid[1] + 1 != num_tokens:
    raise UserError(f"pos_embed: cannot resize {pos_embed.shape} to {num_tokens} tokens")
  grid_tokens = tokens.reshape(1, side, side, -1)
  resized = jax.image.resize(grid_tokens, (1, *grid, tokens.shape[-1]), "bilinear",
                             antialias=False)
  return np.concatenate([cls, np.asarray(resized).reshape(1, -1, tokens.shape[-1])], axis=1)


def merge_pretrained(variables: Tree, pretrained: Tree, source: str,
                     token_grid: tuple[int, int] | None = None) -> tuple[Tree, list[str]]:
  """Overwrites every leaf of `variables` that `pretrained` holds.

  Returns (new variables, model leaves left as initialised: the heads). A pretrained leaf the
  model lacks, one of another shape (a position embedding of another token count is resampled to
  `token_grid` instead), or a leaf of a pretrained part (`backbone`, `encoder`) that the file
  does not hold stops with one line naming it.
  """
  flat_model = flatten(variables)
  flat_new = dict(flat_model)
  for path, value in flatten(pretrained).items():
    if path not in flat_model:
      raise UserError(f"{source}: parameter {path} {tuple(value.shape)} does not exist in this "
                      "model (wrong architecture or depth?)")
    want = tuple(flat_model[path].shape)
    if tuple(value.shape) != want:
      if path.endswith("pos_embed") and token_grid is not None and value.shape[-1] == want[-1]:
        value = resize_pos_embed(value, want[1], token_grid)
      else:
        raise UserError(f"{source}: parameter {path} has shape {tuple(value.shape)} but the "
                        f"model expects {want}")
    flat_new[path] = np.asarray(value, flat_model[path].dtype)
  kept = sorted(set(flat_model) - set(flatten(pretrained)))
  for part in sorted({path.split("/")[1] for path in flatten(pretrained) if "/" in path}):
    missing = [path for path in kept if path.split("/")[1:2] == [part]]
    if missing:  # a pretrained trunk must come whole: another variant of the architecture
      raise UserError(f"{source}: parameter {missing[0]} {tuple(flat_model[missing[0]].shape)} "
                      f"of this model's {part} is not in the file (another variant, e.g. a "
                      "checkpoint without registers for a _reg4 model?)")
  return unflatten(flat_new), kept
