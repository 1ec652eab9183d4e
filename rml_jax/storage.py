"""File-system helpers shared by the run directory and the dataset preparation."""

from __future__ import annotations

import os
import socket

from rml_jax.errors import UserError


def ensure_writable_dir(path: str, key: str, what: str) -> None:
  """Creates `path` if needed and checks that a file can be written there.

  key: the flag or config key that named the path (for the error line); what: what will be
  written there. Raises UserError when the directory cannot be created or written.
  """
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".rml_jax_write_probe_{socket.gethostname()}_{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{key}: cannot write to {path} ({e.strerror}); expected a writable "
                    f"directory for {what}") from None
