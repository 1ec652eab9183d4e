"""1 device vs 8 fake CPU devices: meshes (8, 1) and (4, 2) (fsdp-sharded state) give the same
state, metrics and eval mIoU as one device for the same global batch. Runs in a subprocess so
the other tests keep one device."""

import json
import os
import subprocess
import sys

import pytest

from rml_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mode, steps", [
    # The richest step: teachers, prototypes, per-student CutMix across shard boundaries. Two
    # steps: later, float-rounding differences between meshes can flip a near-tie rectified
    # argmax, and the states then differ by that one label.
    ("rml", 2),
    ("iml:rml.bn_stats=joint", 3),  # one student pass over labeled + strong concatenated
])
def test_meshes_match_one_device(mode, steps):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-m", "tests.sharding_check", mode, str(steps)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
  report = json.loads(line[len("RESULT "):])
  for mesh, figures in report.items():
    print(mesh, figures)
    assert figures["state_max_abs_diff"] <= 1e-5, (mesh, figures)
    assert figures["metric_max_rel_diff"] <= 1e-5, (mesh, figures)
    assert figures["miou"] == pytest.approx(figures["reference_miou"], abs=1e-9), mesh
  assert report["8x1"]["sharded_leaves"] == 0  # fsdp = 1: everything replicated
  assert report["4x2"]["sharded_leaves"] > 0  # fsdp = 2: the big leaves are split


def test_leaf_sharding_splits_the_largest_divisible_dimension(monkeypatch):
  from jax.sharding import PartitionSpec

  monkeypatch.setattr(sharding, "NamedSharding", lambda mesh, spec: spec)  # specs only
  fsdp4 = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 4}})()
  fsdp1 = type("FakeMesh", (), {"shape": {"data": 8, "fsdp": 1}})()
  assert sharding.leaf_sharding((3, 3, 64, 4096), fsdp4) == PartitionSpec(None, None, None, "fsdp")
  assert sharding.leaf_sharding((1027, 12), fsdp4, min_size=1) == PartitionSpec(None, "fsdp")
  assert sharding.leaf_sharding((1027, 13), fsdp4, min_size=1) == PartitionSpec()  # indivisible
  assert sharding.leaf_sharding((64, 64), fsdp4) == PartitionSpec()  # small: replicated
  assert sharding.leaf_sharding((4096, 4096), fsdp1) == PartitionSpec()  # no fsdp axis
