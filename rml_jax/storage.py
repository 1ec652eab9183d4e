"""The one path abstraction of a run's files: local paths and object stores (gs://, s3://).

Every file a run writes or reads back goes through these functions. Local paths keep their
local meaning (user expanded, made absolute, written atomically through a temporary file);
remote URLs stay remote and go through `etils.epath` (TensorFlow's file system when it is
installed, else fsspec: gcsfs for gs://; `EPATH_USE_TF=false` chooses fsspec). An object store
write is atomic by itself: an object is whole or absent.
"""

from __future__ import annotations

import io
import os
import posixpath
import socket
from typing import Iterator

from etils import epath

from rml_jax.errors import UserError

REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path: str) -> bool:
  """Whether `path` names an object store (gs://bucket/..., s3://...)."""
  return str(path).startswith(REMOTE_SCHEMES)


def resolve(path: str) -> str:
  """A path as a run keeps it: remote URLs unchanged, local ones user-expanded and absolute."""
  path = str(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """`base`/`parts`, with '/' for remote URLs."""
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  path = epath.Path(path)
  return path.exists() and not path.is_dir()


def makedirs(path: str) -> None:
  """Creates `path` and its parents (object stores have no folders: a no-op there)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in folder `path` (sorted); [] when it does not exist."""
  path = epath.Path(path)
  if not path.is_dir():
    return []
  return sorted(child.name for child in path.iterdir())


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (the complete file or the previous one), creating its
  folder."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def open_read(path: str):
  """A binary file object for reading `path` (seekable: remote reads fetch byte ranges)."""
  return epath.Path(path).open("rb")


def copy_tree(source: str, target: str) -> None:
  """Copies every file under folder `source` to the same relative path under `target`."""
  for path in walk_files(source):
    relative = path[len(str(source)):].lstrip("/")
    write_bytes(join(target, relative), read_bytes(path))


def rename_dir(source: str, target: str) -> None:
  """Renames folder `source` to `target`. On an object store, where a folder is a name prefix,
  the files are copied first and the originals removed only after every copy is written."""
  if not is_remote(source):
    os.rename(source, target)
    return
  copy_tree(source, target)
  epath.Path(source).rmtree()


def walk_files(path: str) -> Iterator[str]:
  """Every file under folder `path` (full paths)."""
  for root, _, files in epath.Path(path).walk():
    for name in files:
      yield str(epath.Path(root) / name)


def bytes_of(write) -> bytes:
  """The bytes that `write(file_object)` produces (np.save, PIL's save, ...)."""
  buffer = io.BytesIO()
  write(buffer)
  return buffer.getvalue()


def ensure_writable_dir(path: str, key: str, what: str) -> None:
  """Creates `path` if needed and checks that a file can be written there.

  key: the flag or config key that named the path (for the error line); what: what will be
  written there. Raises UserError when the directory cannot be created or written.
  """
  probe = join(path, f".rml_jax_write_probe_{socket.gethostname()}_{os.getpid()}")
  try:
    makedirs(path)
    epath.Path(probe).write_bytes(b"")
    epath.Path(probe).unlink()
  except Exception as e:  # OSError locally; object stores raise their clients' own kinds
    reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"{key}: cannot write to {path} ({reason[:200]}); expected a writable "
                    f"directory for {what}") from None
