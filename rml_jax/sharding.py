"""Device mesh, partition specs, and host batches placed as global arrays."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rml_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: all); config.mesh.data = -1 takes what
  fsdp leaves."""
  devices = jax.devices() if devices is None else devices
  fsdp = mesh_config.fsdp
  data = mesh_config.data if mesh_config.data > 0 else len(devices) // max(fsdp, 1)
  if data * fsdp != len(devices):
    raise UserError(f"config.mesh: data={mesh_config.data} x fsdp={fsdp} does not match the "
                    f"{len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def weights_sharding(mesh: Mesh) -> NamedSharding | None:
  """Where a forward pass wants a model's weights (step.gathered): whole on every chip when
  fsdp > 1 splits them in the state; None when they are not split."""
  return replicated(mesh) if mesh.shape["fsdp"] > 1 else None


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over both mesh axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


FSDP_MIN_SIZE = 2**14  # leaves with fewer elements stay replicated


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = FSDP_MIN_SIZE
                  ) -> NamedSharding:
  """Replicated, or (for a big leaf on a mesh with fsdp > 1) split over "fsdp" along its
  largest dimension that the fsdp size divides."""
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return replicated(mesh)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return NamedSharding(mesh, PartitionSpec(*spec))
  return replicated(mesh)


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
  """Shardings for every leaf of the state: replicated on a mesh with fsdp = 1, otherwise big
  parameters, optimizer moments and teacher weights are split over "fsdp" (ZeRO-3 style; XLA
  gathers them where a step needs them)."""
  return jax.tree.map(lambda leaf: leaf_sharding(tuple(getattr(leaf, "shape", ())), mesh,
                                                 min_size), abstract_state)


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch -> global jax.Arrays sharded on the batch axis (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
