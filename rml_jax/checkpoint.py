"""orbax checkpoints: the train state and the grain iterator as items of one checkpoint, plus a
small JSON description of the run that restore checks before touching any array."""

from __future__ import annotations

import logging
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from rml_jax import storage
from rml_jax.errors import UserError

# How tensorstore, orbax and JSON report files that are missing, empty or corrupt.
_DAMAGE = re.compile(r"DATA_LOSS|NOT_FOUND|No such file|Error decoding|Expecting value|"
                     r"Unexpected end|truncated|corrupt", re.IGNORECASE)


class UnreadableCheckpoint(Exception):
  """A checkpoint step whose files are missing, empty or corrupt (the message says which)."""


class Checkpointer:
  """Saves and restores {'state', 'data' (grain iterator), 'meta'} in `directory` (one
  subdirectory per step)."""

  def __init__(self, directory: str, keep: int = 3, save_every: int = 1, read_only: bool = False):
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, create=not read_only,
            read_only=read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Writes asynchronously; returns whether a checkpoint was started for this step."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # a missing or emptied meta file
      raise UnreadableCheckpoint((str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                                 ) from None

  def restore(self, step: int, abstract_state: Any, meta: dict[str, Any],
              data_iterator: Any | None = None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings) after checking that
    the checkpoint's meta matches `meta`; sets `data_iterator`'s position when given."""
    saved = self.read_meta(step)
    for key, expected in meta.items():
      if key in saved and saved[key] != expected:
        raise UserError(
            f"{self.directory}/{step}: checkpoint has {key}={saved[key]!r} but the config asks "
            f"for {expected!r}; use another --workdir or the config that wrote it")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    # tensorstore's failed reads also surface as asyncio "never retrieved" tracebacks.
    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging.CRITICAL)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax, tensorstore, grain and JSON raise many kinds
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      if isinstance(e, (ValueError, KeyError)) and not _DAMAGE.search(first_line):
        raise UserError(f"{self.directory}/{step}: checkpoint does not fit this config's state "
                        f"({first_line})") from None
      raise UnreadableCheckpoint(first_line) from None
    finally:
      asyncio_logger.setLevel(level)
    logging.info("Restored checkpoint %s/%d", self.directory, step)
    return restored["state"]

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def set_aside(self, step: int) -> str:
    """Renames an unreadable step to `<step>.unreadable` (kept, no longer a checkpoint);
    returns its new path."""
    source = storage.join(self.directory, str(step))
    target = f"{source}.unreadable"
    suffix = 1
    while storage.exists(target):
      target, suffix = f"{source}.unreadable{suffix}", suffix + 1
    if jax.process_index() == 0:
      storage.rename_dir(source, target)
    self._manager.reload()
    return target

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
