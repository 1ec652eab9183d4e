"""orbax checkpoints: the train state and the grain iterator as items of one checkpoint, plus a
small JSON description of the run that restore checks before touching any array."""

from __future__ import annotations

import logging
from typing import Any

import grain
import orbax.checkpoint as ocp

from rml_jax.errors import UserError


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
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"]

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
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"{self.directory}/{step}: checkpoint does not fit this config's state "
                      f"({first_line[:300]})") from None
    logging.info("Restored checkpoint %s/%d", self.directory, step)
    return restored["state"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
