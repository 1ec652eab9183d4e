"""Compiling for a Cloud TPU slice without a TPU: slice names, the module's collectives, the
one-line errors, and (slow) configs/digits.py:tiny compiled for a v5e 2x2 slice."""

import functools
import math
import subprocess

import jax
import pytest

from rml_jax import compiled, datasets, sharding, state, tpu, tpu_compile
from rml_jax.errors import UserError
from tests.conftest import tiny_config

needs_libtpu = pytest.mark.skipif(tpu.libtpu_missing() is not None, reason=str(
    tpu.libtpu_missing()))


@pytest.mark.parametrize("name, topology, chips, accelerator", [
    ("v5e:2x4", "v5e:2x4", 8, "v5litepod-8"), ("v5litepod-16", "v5e:4x4", 16, "v5litepod-16"),
    ("v6e-8", "v6e:2x4", 8, "v6e-8"), ("v4-32", "v4:2x2x4", 16, "v4-32"),
    ("v5p-8", "v5p:2x2x1", 4, "v5p-8"), ("v5p:2x4x4", "v5p:2x4x4", 32, "v5p-64"),
])
def test_slice_names(name, topology, chips, accelerator):
  """Topologies pass through; accelerator types (cores for v4 / v5p) get Cloud TPU's shape."""
  tpu_slice = tpu.parse_slice(name)
  assert (tpu_slice.topology, tpu_slice.chips, tpu_slice.accelerator_type) == (
      topology, chips, accelerator)


@pytest.mark.parametrize("name", ["v5e:2x2x2", "v7:2x2", "v5litepod-12", "tpu"])
def test_bad_slice_names_are_one_line(name):
  with pytest.raises(UserError, match=f"--topology={name}"):
    tpu.parse_slice(name)


def test_lower_bounds_take_the_published_chip_figures():
  chip = tpu.CHIPS["v5e"]
  bounds = tpu.lower_bounds(197e12, 819e9 * 2, chip)  # 1 s of FLOPs, 2 s of bytes
  assert bounds == {"compute_s": 1.0, "memory_s": 2.0, "bound": "memory"}


HLO = """\
HloModule m

%fused_computation (p0: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  ROOT %n = f32[1024]{0} negate(%p0)
}

ENTRY %main (param.1: f32[1024], param.2: bf16[8,128]) -> f32[4096] {
  %param.1 = f32[1024]{0:T(128)} parameter(0), sharding={devices=[4]<=[4]}
  %param.2 = bf16[8,128]{1,0} parameter(1)
  %all-reduce.1 = (f32[1024]{0}, bf16[8,128]{1,0}) all-reduce(%param.1, %param.2), \
replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, to_apply=%add
  %all-gather-start = (f32[1024]{0}, f32[4096]{0}) all-gather-start(%param.1), \
replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done = f32[4096]{0} all-gather-done(%all-gather-start)
  %all-gather.2 = f32[2048]{0} all-gather(%param.1), replica_groups=mesh['axis_0'=1,'axis_1'=2,\
'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={0}
  %fusion = f32[1024]{0} fusion(%param.1), kind=kLoop, calls=%fused_computation, \
metadata={op_name="jit(f)/neg"}
  ROOT %cp = f32[4096]{0} collective-permute(%all-gather-done), \
source_target_pairs={{0,1},{1,0}}
}
"""


def test_collectives_of_a_module_text():
  """Kind, devices per group, count and result bytes; an async pair counts once."""
  assert compiled.collectives(HLO) == [
      {"kind": "all-gather", "group_size": 4, "count": 1, "bytes": 4096 * 4},
      {"kind": "collective-permute", "group_size": None, "count": 1, "bytes": 4096 * 4},
      {"kind": "all-gather", "group_size": 2, "count": 1, "bytes": 2048 * 4},
      {"kind": "all-reduce", "group_size": 2, "count": 1, "bytes": 1024 * 4 + 8 * 128 * 2},
  ]


def test_largest_instructions_count_outputs_and_operands():
  rows = compiled.largest_instructions(HLO, top=10)
  fusion = next(row for row in rows if row["name"] == "fusion")
  assert fusion["bytes"] == 2 * 1024 * 4 and fusion["source"] == "jit(f)/neg"
  assert "n" not in [row["name"] for row in rows]  # inside a fusion: not run on its own


@pytest.mark.parametrize("returncode, stderr, kept", [
    (2, "warning\nerror: the train program does not fit a v5e chip\n", True),
    (-9, "", False),  # the host's out-of-memory killer: a rerun must compile the row again
])
def test_table_rows_keep_errors_but_not_kills(monkeypatch, tmp_path, returncode, stderr, kept):
  from rml_jax.experiments import tpu_slices
  monkeypatch.setattr(tpu_slices.subprocess, "run", lambda command, **kwargs:
                      subprocess.CompletedProcess(command, returncode, "", stderr))
  name = "city_f32_v5e-4"
  assert not tpu_slices.run_row(name, str(tmp_path))
  error_file = tmp_path / f"{name}.error.txt"
  assert error_file.exists() == kept
  if kept:
    assert error_file.read_text() == "error: the train program does not fit a v5e chip\n"


def test_libtpu_missing_names_the_package(monkeypatch):
  monkeypatch.setattr(tpu.importlib.util, "find_spec", lambda name: None)
  message = tpu.libtpu_missing()
  assert "libtpu" in message and "pip install" in message and "\n" not in message
  with pytest.raises(UserError, match="libtpu"):
    tpu.slice_devices(tpu.parse_slice("v5e:2x2"))


def test_only_the_batches_of_the_compiled_programs_must_split(data_dir):
  config = tiny_config(data_dir, "mode=iml,labeled_batch_size=4,unlabeled_batch_size=4,"
                                 "eval_batch_size=2")
  tpu_compile.check_batches_split(config, 4, "v5e:2x2", ("train",))  # eval's 2 is not taken
  for programs in (("eval",), ("train", "prototypes")):
    with pytest.raises(UserError, match=r"^config.eval_batch_size=2 does not split over the 4 "):
      tpu_compile.check_batches_split(config, 4, "v5e:2x2", programs)
  config.unlabeled_batch_size = 6
  with pytest.raises(UserError, match=r"config.unlabeled_batch_size=6 .* set labeled_batch_size "
                                      r"and unlabeled_batch_size to a multiple of 4"):
    tpu_compile.check_batches_split(config, 4, "v5e:2x2", ("train",))


@functools.lru_cache(maxsize=None)
def _compile_tiny(data_dir: str, fsdp: int) -> tuple[dict, object]:
  """digits:tiny (supervised, 4 + 4 images) train step compiled for v5e:2x2 with mesh.fsdp (each
  once per test session: the fsdp test compares with the data-parallel one)."""
  config = tiny_config(data_dir, f"mode=supervised,labeled_batch_size=4,unlabeled_batch_size=4,"
                                 f"eval_batch_size=4,mesh.fsdp={fsdp}")
  return tpu_compile.compile_for_slice(config, "v5e:2x2", programs=("train",)), config


def _state_bytes(config) -> tuple[int, int]:
  """Bytes of the whole train state, and of one chip's shards of it (before the TPU's tiling)
  on a v5e:2x2 mesh of config.mesh."""
  devices = tpu.slice_devices(tpu.parse_slice("v5e:2x2"))
  init_fn = state.make_init_fn(config, len(datasets.class_names(config.data)))
  abstract, _ = state.abstract_train_state(init_fn, sharding.create_mesh(config.mesh, devices))
  leaves = jax.tree.leaves(abstract)
  return (sum(leaf.size * leaf.dtype.itemsize for leaf in leaves),
          sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
              for leaf in leaves))


@pytest.mark.slow
@needs_libtpu
def test_tiny_compiles_for_v5e_with_data_parallelism(data_dir):
  """4 x 1 mesh: XLA's memory analysis is there and within HBM; the gradients are all-reduced
  over the 4 chips of the data axis."""
  result, config = _compile_tiny(data_dir, fsdp=1)
  assert result["slice"]["chips"] == 4 and result["config"]["mesh"] == {"data": 4, "fsdp": 1}
  train = result["programs"]["train"]
  memory = train["memory_bytes"]
  whole, per_chip = _state_bytes(config)
  assert whole == per_chip and memory["argument"] >= whole and memory["output"] > 0
  assert 0 < train["hbm_fraction"] < 1 and train["flops"] > 0
  reduced = sum(r["bytes"] for r in train["collectives"]
                if r["kind"] == "all-reduce" and r["group_size"] == 4)
  # two students' gradients: the state holds params, the EMA copies and two AdamW moments of
  # each, about 4x the parameters
  assert reduced >= whole / 5
  assert not any(r["kind"] in ("all-gather", "reduce-scatter") for r in train["collectives"])
  assert "collectives: all-reduce" in tpu_compile.format_report(result)


@pytest.mark.slow
@needs_libtpu
def test_tiny_compiles_for_v5e_with_fsdp(data_dir):
  """2 x 2 mesh with fsdp: each chip holds about half the state, its compiled arguments shrink
  against data parallelism, and the parameters are all-gathered over the 2 chips of the fsdp
  axis. The weights are gathered at use, so the activations stay split by images: the gradients
  are all-reduced over all 4 chips as with data parallelism, and nothing but scalars is summed
  over the fsdp axis alone (no partial sums of activations split by channels)."""
  result, config = _compile_tiny(data_dir, fsdp=2)
  assert result["config"]["mesh"] == {"data": 2, "fsdp": 2}
  whole, per_chip = _state_bytes(config)
  assert per_chip < 0.6 * whole
  argument = result["programs"]["train"]["memory_bytes"]["argument"]
  replicated = _compile_tiny(data_dir, fsdp=1)[0]["programs"]["train"]["memory_bytes"]
  assert argument < 0.8 * replicated["argument"]
  collectives = result["programs"]["train"]["collectives"]
  assert any(r["kind"] == "all-gather" and r["group_size"] == 2 for r in collectives)
  reduced_over_all = sum(r["bytes"] for r in collectives
                         if r["kind"] == "all-reduce" and r["group_size"] == 4)
  reduced_over_fsdp = sum(r["bytes"] for r in collectives
                          if r["kind"] == "all-reduce" and r["group_size"] == 2)
  assert reduced_over_all >= whole / 5, (reduced_over_all, whole)
  assert reduced_over_fsdp < 1024, collectives
