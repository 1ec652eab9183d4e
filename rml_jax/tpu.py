"""Cloud TPU slices without a TPU: each generation's chip, slice names, and the compile-only
devices of a slice (libtpu's topology description, no TPU attached).

A slice is named either by a topology, as `jax.experimental.topologies.get_topology_desc` takes
it ('v5e:2x4', 'v4:2x2x2', 'v5p:2x2x1', 'v6e:4x4'), or by a Cloud TPU accelerator type as
`gcloud compute tpus tpu-vm create --accelerator-type` takes it ('v5litepod-8', 'v6e-8',
'v4-8', 'v5p-8'; for v4 and v5p the number counts TensorCores, two per chip).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from rml_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip as Google Cloud publishes it (per chip; `source` is the page).

  hbm_bytes: HBM capacity; peak_bf16_flops: peak bfloat16 FLOP/s; hbm_bytes_per_s: HBM
  bandwidth; cores: TensorCores per chip (v4 and v5p name slices by cores); dims: the rank of
  its slice topologies (2D torus or 3D).
  """

  generation: str
  device_kind: str  # jax's Device.device_kind for this chip
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  cores: int
  dims: int
  source: str


GIB, GB = 2**30, 10**9
# Key specifications tables of the Cloud TPU system architecture pages (units as printed there).
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200 * GB, 2, 3,
               "https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2, 1200 GBps, 275 TFLOPs)"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819 * GB, 1, 2,
                "https://cloud.google.com/tpu/docs/v5e (16 GiB HBM, 819 GBps, 197 TFLOPs bf16)"),
    "v5p": Chip("v5p", "TPU v5", 95 * GB, 459e12, 2765 * GB, 2, 3,
                "https://cloud.google.com/tpu/docs/v5p (95 GB HBM2e, 2765 GBps, 459 TFLOPs bf16)"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GB, 918e12, 1638 * GB, 1, 2,
                "https://cloud.google.com/tpu/docs/v6e (32 GB HBM, 1638 GBps, 918 TFLOPs bf16)"),
}
ACCELERATOR_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_ACCELERATOR = re.compile(r"^(v4|v5litepod|v5e|v5p|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A slice: its chip, the topology name libtpu takes ('v5e:2x4') and its chip count."""

  chip: Chip
  topology: str
  chips: int

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU accelerator type of this slice ('v5litepod-8', 'v4-8')."""
    return f"{ACCELERATOR_PREFIX[self.chip.generation]}-{self.chips * self.chip.cores}"


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU gives a power-of-two chip count: 2D (v5e, v6e) 1x1, 1x2, 2x2,
  2x4, 4x4, ... 16x16; 3D (v4, v5p, from 4 chips) 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
  Raises ValueError for any other count."""
  if chips < 1 or chips & (chips - 1) or (dims == 3 and chips < 4):
    raise ValueError(chips)
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    if dims == 2:
      shape[1 if shape[0] == shape[1] else 0] *= 2
    elif shape[2] <= shape[1] and shape[1] == shape[0]:
      shape[2] *= 2  # 2x2x1 -> 2x2x2 -> 2x2x4, 4x4x4 -> 4x4x8
    else:
      shape[1 if shape[1] < shape[2] else 0] *= 2
  return tuple(shape)


def parse_slice(name: str) -> Slice:
  """'v5e:2x4' or 'v5litepod-8' (and 'v6e-8', 'v4-8', 'v5p-8', 'v5e-8') -> Slice."""
  topology = _TOPOLOGY.match(name)
  if topology:
    chip = CHIPS[topology.group(1)]
    shape = tuple(int(d) for d in topology.group(2).split("x"))
    if len(shape) != chip.dims:
      raise UserError(f"--topology={name}: a {chip.generation} topology has {chip.dims} "
                      f"dimensions, e.g. {chip.generation}:{'x'.join(['2'] * chip.dims)}")
    return Slice(chip, name, math.prod(shape))
  accelerator = _ACCELERATOR.match(name)
  if not accelerator:
    raise UserError(f"--topology={name}: expected a topology such as v5e:2x4, v4:2x2x2, "
                    "v5p:2x2x1, v6e:4x4, or an accelerator type such as v5litepod-8, v6e-8, v4-8")
  generation = {"v5litepod": "v5e"}.get(accelerator.group(1), accelerator.group(1))
  chip = CHIPS[generation]
  count = int(accelerator.group(2))
  try:
    if count % chip.cores:
      raise ValueError(count)
    shape = default_shape(count // chip.cores, chip.dims)
  except ValueError:
    raise UserError(f"--topology={name}: no default shape for it; name the topology instead "
                    f"({generation}:{'x'.join(['4'] * chip.dims)})") from None
  return Slice(chip, f"{generation}:{'x'.join(map(str, shape))}", math.prod(shape))


def libtpu_missing() -> str | None:
  """None when libtpu can be imported, else the one line that says what to install."""
  if importlib.util.find_spec("libtpu") is not None:
    return None
  import jax

  return (f"compiling for a TPU slice needs the libtpu package: pip install "
          f"'jax[tpu]=={jax.__version__}' (it pins the matching libtpu; the test extra has it)")


def slice_devices(tpu_slice: Slice, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` copies of the slice, one per chip (v4 and v5p as
  megacore chips, as Cloud TPU VMs run them), slice after slice."""
  missing = libtpu_missing()
  if missing:
    raise UserError(missing)
  if os.environ.get("TPU_SKIP_MDS_QUERY") == "1":
    # jax sets TPU_SKIP_MDS_QUERY at import on a machine without TPU chips
    # (jax/_src/cloud_tpu_init.py); libtpu then reads these two from the environment and warns
    # when they are missing. The topology name alone decides the devices. Without chips there
    # is no device to guard: several processes may compile at once (libtpu otherwise holds
    # /tmp/libtpu_lockfile for the life of the first process that loaded it).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  options = {"chip_config_name": "megacore"} if tpu_slice.chip.cores == 2 else {}
  if num_slices > 1:
    options["num_slices"] = num_slices
  try:
    description = topologies.get_topology_desc(tpu_slice.topology, "tpu", **options)
  except Exception as e:  # noqa: BLE001 - libtpu rejects a shape it does not know
    raise UserError(f"--topology={tpu_slice.topology}: libtpu does not take it "
                    f"({str(e).splitlines()[0][:200]})") from None
  return list(description.devices)


def lower_bounds(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, float]:
  """Two lower bounds on one chip's step time [s]: its FLOPs at the chip's peak bf16 rate, and
  the bytes it moves at the chip's HBM bandwidth. 'bound' names the larger."""
  compute = flops / chip.peak_bf16_flops
  memory = bytes_accessed / chip.hbm_bytes_per_s
  return {"compute_s": compute, "memory_s": memory,
          "bound": "memory" if memory > compute else "compute"}
