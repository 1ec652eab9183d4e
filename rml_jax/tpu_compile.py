"""A config's programs compiled for a Cloud TPU slice that is not here, and what each needs:

  python -m rml_jax.bench --config=configs/city.py --topology=v5e:2x4 [--num_slices=2] [--json=f]

libtpu's compile-only devices of the slice (`tpu.slice_devices`) take the place of
`jax.devices()` in `Program.create`; the train step, the eval step and the eq. 10 prototype pass
are lowered with abstract arguments (shapes and shardings, no arrays) and compiled by the TPU
compiler. Per chip: XLA's memory analysis against the chip's HBM, its cost analysis (FLOPs,
bytes accessed), the collectives of the compiled module, compile time, and two lower bounds on
the step time (`tpu.lower_bounds`). A batch the slice cannot split, or a program that does not
fit, is a UserError naming the config keys to change.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from rml_jax import compiled as compiled_lib
from rml_jax import datasets, input_pipeline, sharding, state, tpu
from rml_jax.errors import UserError
from rml_jax.program import Program
from rml_jax.step import MODES


def train_batch_shapes(config: ml_collections.ConfigDict) -> dict:
  """The train batch as jax.ShapeDtypeStructs (input_pipeline's layout): 'labeled' {'image'
  [Bl, h, w, 3] uint8, 'label' [Bl, h, w] int32}; with unlabeled images 'unlabeled' {'weak'
  [Bu, h, w, 3] uint8, 'strong' [Bu, V, h, w, 3] uint8, 'valid' [Bu, h, w] bool, 'label'}."""
  h, w = config.data.crop_size
  bl, bu = config.labeled_batch_size, config.unlabeled_batch_size
  spec = jax.ShapeDtypeStruct
  batch = {"labeled": {"image": spec((bl, h, w, 3), np.uint8),
                       "label": spec((bl, h, w), np.int32)}}
  if MODES[config.rml.mode].unlabeled:
    views = input_pipeline.num_strong_views(config)
    batch["unlabeled"] = {"weak": spec((bu, h, w, 3), np.uint8),
                          "strong": spec((bu, views, h, w, 3), np.uint8),
                          "valid": spec((bu, h, w), np.bool_),
                          "label": spec((bu, h, w), np.int32)}
  return batch


def image_batch_shapes(config: ml_collections.ConfigDict, size: tuple[int, int]) -> dict:
  """An eval batch (input_pipeline.eval_batches) of eval_batch_size images of `size` (h, w):
  {'image' [B, h, w, 3] uint8, 'label' [B, h, w] int32, 'valid' [B, h, w] bool}."""
  b, (h, w) = config.eval_batch_size, size
  spec = jax.ShapeDtypeStruct
  return {"image": spec((b, h, w, 3), np.uint8), "label": spec((b, h, w), np.int32),
          "valid": spec((b, h, w), np.bool_)}


def image_size(config: ml_collections.ConfigDict, resize) -> tuple[int, int]:
  """(h, w) of the images a pass over whole images reads: `resize`, else config.eval.pad_to,
  else the dataset's stored size."""
  size = resize or config.eval.pad_to or datasets.stored_image_size(config.data)
  if not size:
    raise UserError(f"config.data.name={config.data.name!r} stores images of varying sizes: "
                    "set config.eval.pad_to (or eval.resize) for the compile")
  return tuple(size)


def with_sharding(shapes: Any, mesh) -> Any:
  """Each ShapeDtypeStruct of `shapes` split on its batch axis over the mesh."""
  batch = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch), shapes)


def check_batches_split(config: ml_collections.ConfigDict, chips: int, where: str,
                        programs: tuple[str, ...] = ("train", "eval", "prototypes")) -> None:
  """Raises a UserError when a batch that one of `programs` takes does not split over `chips`
  chips (train: the labeled and unlabeled batches; eval and prototypes: eval_batch_size)."""
  train = ["labeled_batch_size"] + (["unlabeled_batch_size"]
                                    if MODES[config.rml.mode].unlabeled else [])
  keys = (train if "train" in programs else []) + (
      ["eval_batch_size"] if {"eval", "prototypes"} & set(programs) else [])
  for key in keys:
    if config[key] % chips:
      to_change = " and ".join(train) if key in train else key
      raise UserError(
          f"config.{key}={config[key]} does not split over the {chips} chips of {where}: set "
          f"{to_change} to a multiple of {chips}" + (
              " (optimizer.lr_scaling=linear or sqrt rescales the learning rate from "
              f"optimizer.reference_batch_size={config.optimizer.reference_batch_size})"
              if key in train else ""))


def _compile(fn, *args) -> tuple[Any, float]:
  """fn.lower(*args).compile() and its seconds; the TPU compiler's out-of-memory is a
  MemoryError with its own first lines."""
  start = time.perf_counter()
  try:
    executable = fn.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; matched on its text
    if "RESOURCE_EXHAUSTED" in str(e) or "hbm" in str(e).lower():
      raise MemoryError(" ".join(str(e).split())[:600]) from None
    raise
  return executable, time.perf_counter() - start


def program_figures(executable, seconds: float, chip: tpu.Chip, top: int = 5) -> dict:
  """Per-chip figures of one compiled program (see the module docstring)."""
  cost = executable.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  text = executable.as_text()
  memory = compiled_lib.compiled_memory_bytes(executable)
  return {"compile_s": seconds, "memory_bytes": memory,
          "hbm_fraction": memory["total"] / chip.hbm_bytes if memory else None,
          "flops": flops, "bytes_accessed": moved,
          "collectives": compiled_lib.collectives(text),
          "largest_instructions": compiled_lib.largest_instructions(text, top),
          "lower_bounds": tpu.lower_bounds(flops, moved, chip)}


def _not_fitting(config: ml_collections.ConfigDict, program: str, need: str,
                 chip: tpu.Chip, chips: int) -> UserError:
  """The one line for a program that does not fit a chip's HBM, with the keys to change."""
  keys = []
  if config.mesh.fsdp < chips:
    keys.append(f"mesh.fsdp (now {config.mesh.fsdp}; up to {chips})")
  if not config.model.remat:
    keys.append("model.remat=True")
  if config.dtype == "float32":
    keys.append("dtype=bfloat16")
  keys.append("labeled_batch_size/unlabeled_batch_size" if program == "train"
              else "eval_batch_size")
  return UserError(f"the {program} program does not fit a {chip.generation} chip "
                   f"({chip.hbm_bytes / 2**30:.1f} GiB HBM): {need}; change "
                   + ", ".join(keys))


def compile_for_slice(config: ml_collections.ConfigDict, slice_name: str, num_slices: int = 1,
                      programs: tuple[str, ...] = ("train", "eval", "prototypes")) -> dict:
  """Compiles `programs` of the config for `num_slices` slices named `slice_name`; returns the
  figures of each (program_figures) and of the slice. Raises UserError (batch split, HBM)."""
  tpu_slice = tpu.parse_slice(slice_name)
  devices = tpu.slice_devices(tpu_slice, num_slices)
  chips = len(devices)
  where = f"{num_slices} x {tpu_slice.topology}" if num_slices > 1 else tpu_slice.topology
  check_batches_split(config, chips, where, programs)
  program = Program.create(config, devices)
  mesh = program.mesh
  args = {
      "train": lambda: (program.train_fn, program.abstract_state,
                        with_sharding(train_batch_shapes(config), mesh)),
      "eval": lambda: (program.eval_fn, program.abstract_state, with_sharding(
          image_batch_shapes(config, image_size(config, config.eval.resize)), mesh)),
      "prototypes": lambda: (program.prototype_sums_fn, program.abstract_state, with_sharding(
          _prototype_batch(config), mesh)),
  }
  unknown = sorted(set(programs) - set(args))
  if unknown:
    raise UserError(f"--programs: unknown {unknown}; expected some of {sorted(args)}")
  chip = tpu_slice.chip
  figures = {}
  for name in programs:
    try:
      executable, seconds = _compile(*args[name]())
    except MemoryError as e:
      raise _not_fitting(config, name, f"the TPU compiler says: {e}", chip, chips) from None
    figures[name] = program_figures(executable, seconds, chip)
    memory = figures[name]["memory_bytes"]
    if memory and memory["total"] > chip.hbm_bytes:
      raise _not_fitting(config, name, f"{memory['total'] / 2**30:.2f} GiB per chip", chip, chips)
  return {
      "slice": {"topology": tpu_slice.topology, "accelerator_type": tpu_slice.accelerator_type,
                "num_slices": num_slices, "chips": chips, "device_kind": devices[0].device_kind,
                "chip": {"generation": chip.generation, "hbm_bytes": chip.hbm_bytes,
                         "peak_bf16_flops": chip.peak_bf16_flops,
                         "hbm_bytes_per_s": chip.hbm_bytes_per_s, "source": chip.source}},
      "config": config_summary(config, dict(mesh.shape)),
      "programs": figures,
  }


def _prototype_batch(config: ml_collections.ConfigDict) -> dict:
  """The eq. 10 pass's batch: {'image', 'valid'} at the train pipeline's resolution."""
  shapes = image_batch_shapes(config, image_size(config, config.data.resize))
  return {"image": shapes["image"], "valid": shapes["valid"]}


def config_summary(config: ml_collections.ConfigDict, mesh_shape: dict) -> dict:
  """The config values a compiled slice depends on, and the learning rate it trains at."""
  return {"model_a": config.model.name, "model_b": config.model_b.name or config.model.name,
          "mode": config.rml.mode, "dtype": config.dtype, "remat": config.model.remat,
          "crop_size": list(config.data.crop_size),
          "labeled_batch_size": config.labeled_batch_size,
          "unlabeled_batch_size": config.unlabeled_batch_size,
          "eval_batch_size": config.eval_batch_size, "mesh": mesh_shape,
          "lr_scaling": config.optimizer.lr_scaling,
          "learning_rate": state.scaled_learning_rate(config)}


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _size(n: float) -> str:
  """Bytes in the largest binary unit that keeps a digit before the point."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n:.0f} B"


def _collective_text(rows: list[dict]) -> str:
  if not rows:
    return "none"
  return ", ".join(f"{r['kind']} x{r['count']}"
                   + (f" over {r['group_size']}" if r["group_size"] else "")
                   + f" ({_size(r['bytes'])})" for r in rows)


def format_report(result: dict) -> str:
  """The human-readable report of compile_for_slice's result."""
  s, c = result["slice"], result["config"]
  chip = s["chip"]
  lines = [f"slice: {s['num_slices']} x {s['topology']} ({s['accelerator_type']}), "
           f"{s['chips']} chips of {s['device_kind']}; HBM {_gib(chip['hbm_bytes'])}, "
           f"peak {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
           f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s ({chip['source']})",
           f"config: {c['model_a']} + {c['model_b']}, {c['mode']}, {c['dtype']}, batch "
           f"{c['labeled_batch_size']} + {c['unlabeled_batch_size']}, mesh {c['mesh']}, "
           f"learning rate {c['learning_rate']:.3g} (lr_scaling={c['lr_scaling']})"]
  for name, p in result["programs"].items():
    m, b = p["memory_bytes"], p["lower_bounds"]
    lines += [
        f"{name}: compiled in {p['compile_s']:.1f} s",
        f"  memory per chip: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])}, "
        f"temporaries {_gib(m['temp'])}, aliased {_gib(m['alias'])} -> {_gib(m['total'])} "
        f"= {p['hbm_fraction']:.0%} of HBM",
        f"  per chip: {p['flops'] / 1e9:.1f} GFLOP, {_size(p['bytes_accessed'])} "
        f"accessed; lower bounds {b['compute_s'] * 1e3:.1f} ms (FLOPs / peak), "
        f"{b['memory_s'] * 1e3:.1f} ms (bytes / bandwidth): {b['bound']}-bound",
        f"  collectives: {_collective_text(p['collectives'])}"]
    if b["bound"] == "memory":
      lines.append("  most bytes: " + "; ".join(
          f"{r['name']} {_size(r['bytes'])} ({_short(r['source'])})"
          for r in p["largest_instructions"][:3]))
  return "\n".join(lines)


def _short(source: str) -> str:
  """The last parts of a jax op name: 'jit(f)/jvp(M)/backbone/conv1/conv' -> 'conv1/conv'."""
  return "/".join(re.sub(r"\w+\((\w*)\)", r"\1", source).split("/")[-3:]) or "?"

