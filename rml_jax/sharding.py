"""Device mesh, partition specs, and host batches placed as global arrays."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rml_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")


def create_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """A ("data", "fsdp") mesh over all devices; config.mesh.data = -1 takes what fsdp leaves."""
  devices = jax.devices()
  fsdp = mesh_config.fsdp
  data = mesh_config.data if mesh_config.data > 0 else len(devices) // max(fsdp, 1)
  if data * fsdp != len(devices):
    raise UserError(f"config.mesh: data={mesh_config.data} x fsdp={fsdp} does not match the "
                    f"{len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over both mesh axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of the state: replicated (fsdp sharding comes with big ViTs)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch -> global jax.Arrays sharded on the batch axis (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
