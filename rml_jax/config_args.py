"""Parsing of the config arg string: `--config=configs/digits.py:mode=iml,seed=1`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types

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


def _config_values(argv: list[str]) -> list[tuple[int, str, str]]:
  """(index, prefix, value) of every --config value in argv: argv[index] == prefix + value, the
  prefix being `--config=` (or `-config=`), or '' when the value follows the flag as an item."""
  found = []
  for i, item in enumerate(argv):
    for flag in ("--config", "-config"):
      if item.startswith(flag + "="):
        found.append((i, flag + "=", item[len(flag) + 1:]))
      elif item == flag and i + 1 < len(argv):
        found.append((i + 1, "", argv[i + 1]))
  return found


def with_packaged_configs(argv: list[str]) -> list[str]:
  """argv with `--config=configs/<file>.py[:arg]` (or `--config configs/...`) pointing at the
  installed package's copy when no such file exists from the working directory (a wheel install
  run from anywhere); the configs' own `from configs import ...` then resolves to that copy as
  well. In a checkout, or for any other path, argv is returned unchanged."""
  out = list(argv)
  for i, prefix, value in _config_values(out):
    out[i] = prefix + _packaged_config(value)
  return out


def config_file(argv: list[str]) -> str | None:
  """The file of the last --config flag in argv (its :arg left off), or None without one."""
  values = _config_values(argv)
  return values[-1][2].partition(":")[0] if values else None


def check_config_source(path: str) -> None:
  """Stops with one line (the file, the line and the error) when the config file at `path` does
  not compile. A file that cannot be read is left to the config flag, which names it."""
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError:
    return
  try:
    compile(source, path, "exec", dont_inherit=True)
  except SyntaxError as e:
    raise UserError(f"--config: {path}, line {e.lineno}: {type(e).__name__}: {e.msg}; expected "
                    "a Python file defining get_config") from None
  except ValueError as e:  # e.g. null bytes
    raise UserError(f"--config: {path}: {e}; expected a Python file defining get_config") from None


def load_error(error: BaseException, path: str) -> str | None:
  """One line for an exception raised while the config file at `path` was imported or its
  get_config ran: the file, the line of it the error came from, and the error; or, when the
  file has no get_config, that. None when the error (and what it was raised from) did not come
  from the file."""
  target = os.path.abspath(path)
  for exc in _exception_chain(error):
    if (isinstance(exc, AttributeError) and getattr(exc, "name", None) == "get_config"
        and _module_file(getattr(exc, "obj", None)) == target):
      return (f"--config: {path} has no get_config; expected a function get_config(arg=None) "
              "returning an ml_collections.ConfigDict")
    if isinstance(exc, SyntaxError) and exc.filename and os.path.abspath(exc.filename) == target:
      return f"--config: {path}, line {exc.lineno}: {type(exc).__name__}: {exc.msg}"
    line = _last_line_in(exc.__traceback__, target)
    if line is not None:
      message = (str(exc).strip().splitlines() or [""])[0]
      return f"--config: {path}, line {line}: {type(exc).__name__}" + (
          f": {message}" if message else "")
  return None


def _exception_chain(error: BaseException) -> list[BaseException]:
  """error and every exception it was raised from or while handling, each once."""
  chain: list[BaseException] = []
  pending: list[BaseException | None] = [error]
  while pending:
    exc = pending.pop(0)
    if exc is not None and not any(exc is seen for seen in chain):
      chain.append(exc)
      pending += [exc.__cause__, exc.__context__]
  return chain


def _module_file(module) -> str | None:
  """The absolute path of a module object's file, or None for anything else."""
  path = getattr(module, "__file__", None) if isinstance(module, types.ModuleType) else None
  return os.path.abspath(path) if path else None


def _last_line_in(tb: types.TracebackType | None, target: str) -> int | None:
  """The line number of the innermost traceback frame that runs the file `target`."""
  line = None
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
      line = tb.tb_lineno
    tb = tb.tb_next
  return line


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
