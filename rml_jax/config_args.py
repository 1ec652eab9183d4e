"""Parsing of the config arg string: `--config=configs/digits.py:mode=iml,seed=1`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys

import ml_collections

from rml_jax.errors import UserError

# Where an installed wheel keeps the checkout's configs/ (as the package rml_jax.configs).
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Short names accepted in the arg string, mapped to their config paths.
ALIASES = {"mode": "rml.mode", "steps": "total_steps", "workers": "data.worker_count"}


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, arg: str | None,
                    presets: dict | None = None) -> ml_collections.ConfigDict:
  """Applies `name` presets and `key=value` overrides (comma separated) to `config`.

  A preset is a function config -> None from `presets`. Unknown names stop with one line.
  """
  presets = presets or {}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      if item not in presets:
        raise UserError(f"config arg {item!r}: unknown preset; expected one of "
                        f"{sorted(presets)} or key=value")
      presets[item](config)
      continue
    key, text = item.split("=", 1)
    path = ALIASES.get(key.strip(), key.strip())
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise UserError(f"config arg {key!r}: unknown config key {path!r}")
      node = node[part]
    if parts[-1] not in node:
      raise UserError(f"config arg {key!r}: unknown config key {path!r}")
    value = _parse_value(text.strip())
    if isinstance(node[parts[-1]], float) and isinstance(value, int):
      value = float(value)
    if isinstance(node[parts[-1]], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise UserError(f"config arg {key!r}: {e}") from None
  return config


def split_presets(names: tuple[str, ...]) -> dict:
  """Arg presets that set config.data.split, one per split folder name."""

  def preset(name: str):
    def set_split(config: ml_collections.ConfigDict) -> None:
      config.data.split = name
    return set_split

  return {name: preset(name) for name in names}


def with_packaged_configs(argv: list[str]) -> list[str]:
  """argv with `--config=configs/<file>.py[:arg]` (or `--config configs/...`) pointing at the
  installed package's copy when no such file exists from the working directory (a wheel install
  run from anywhere); the configs' own `from configs import ...` then resolves to that copy as
  well. In a checkout, or for any other path, argv is returned unchanged."""
  out = list(argv)
  for i, item in enumerate(out):
    for flag in ("--config", "-config"):
      if item.startswith(flag + "="):
        out[i] = flag + "=" + _packaged_config(item[len(flag) + 1:])
      elif item == flag and i + 1 < len(out):
        out[i + 1] = _packaged_config(out[i + 1])
  return out


def _packaged_config(value: str) -> str:
  """`configs/<file>.py[:arg]` -> the installed copy's path[:arg] when only that exists."""
  path, sep, arg = value.partition(":")
  relative = os.path.normpath(path)
  packaged = os.path.join(PACKAGED_CONFIGS, os.path.relpath(relative, "configs"))
  if (os.path.exists(path) or not relative.startswith("configs" + os.sep)
      or not os.path.isfile(packaged)):
    return value
  _alias_packaged_configs()
  return packaged + sep + arg


def _alias_packaged_configs() -> None:
  """Makes `import configs` mean rml_jax.configs when no configs package is importable."""
  if "configs" not in sys.modules and importlib.util.find_spec("configs") is None:
    sys.modules["configs"] = importlib.import_module("rml_jax.configs")
