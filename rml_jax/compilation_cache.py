"""The persistent XLA compilation cache: compiled steps are reused by later runs.

A DeepLabv2-R101 RML step and its state initialisation take minutes to compile on a GPU
(docs/performance.md); with the cache, a resumed run, `--mode=eval` or a rerun of the same config
skips both. Entries are keyed by the program, its shardings, the devices and the jax/XLA version,
so a stale entry is never used.
"""

from __future__ import annotations

import os

from absl import logging

DEFAULT_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "~/.cache/rml_jax/xla"
HELP = ("Persistent XLA compilation cache directory, reused by later runs (resume, eval, "
        "reruns); empty string: off. Default: $JAX_COMPILATION_CACHE_DIR, else "
        "~/.cache/rml_jax/xla.")


def enable(directory: str, min_compile_seconds: float = 1.0) -> str | None:
  """Turns the cache on at `directory` (created if missing) for programs that took at least
  `min_compile_seconds` to compile. Returns the directory used, or None when it is off: an empty
  `directory`, or one that cannot be created (a warning names it; the run goes on uncached)."""
  if not directory:
    return None
  import jax

  path = os.path.expanduser(directory)
  if "://" not in path:  # local; remote paths (gs://) are created by jax on first write
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      logging.warning("Compilation cache off: cannot create %s (%s).", path, e.strerror or e)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  return path
