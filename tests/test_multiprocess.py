"""Two local JAX processes (coordinator on 127.0.0.1, 4 fake CPU devices each) train a few steps
on their own shards of the data and checkpoint to the emulated gs:// bucket; the state equals a
single process with 8 devices fed the same global batches, which restores the two processes'
checkpoint from the bucket (tests/multiprocess_check.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory, emulator):
  """(single-process result, two-process result, single state, two-process state, the
  two-process checkpoint as the single process restored it from the bucket)."""
  tmp_path = tmp_path_factory.mktemp("multiprocess")
  check = [sys.executable, "-m", "tests.multiprocess_check"]
  bucket_dir = "gs://bucket/multiprocess/checkpoints"
  port = _free_port()
  env = dict(_env(4), **emulator.environment(), RML_CHECK_CHECKPOINTS=bucket_dir)
  workers = [subprocess.Popen(check + ["multi", data_dir, str(tmp_path / "multi"), str(port),
                                       str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  assert "multiprocess/checkpoints/3/commit_success.txt" in emulator.bucket().names(
      "multiprocess/")
  # One process with all 8 devices restores the two processes' checkpoint from the bucket.
  env = dict(_env(8), **emulator.environment(), RML_CHECK_RESTORE_FROM=bucket_dir)
  single = subprocess.run(check + ["single", data_dir, str(tmp_path / "single")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  return tuple(json.load(open(tmp_path / run / "result.json")) for run in ("single", "multi")) \
      + tuple(np.load(tmp_path / run / "state.npz") for run in ("single", "multi")) \
      + (np.load(tmp_path / "single" / "restored_foreign.npz"),)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_read_the_same_global_batch_and_checkpoint(runs):
  reference, result, _, _, _ = runs
  assert (result["processes"], result["local_devices"]) == (2, 4)
  assert (reference["processes"], reference["local_devices"]) == (1, 8)
  # Each process checkpointed and restored the global state (and its own iterator) bitwise.
  assert result["restored_equal"] and reference["restored_equal"]
  # The first step sees the same global batch (each process read its own shard) and computes
  # the same losses and gradients.
  first, want = result["history"][0], reference["history"][0]
  for key in want:
    assert first[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
  # The losses of the later steps agree too.
  for got, want in zip(result["history"], reference["history"]):
    assert got["loss_a"] == pytest.approx(want["loss_a"], rel=1e-4)
    assert got["loss_b"] == pytest.approx(want["loss_b"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process_over_all_steps(runs):
  reference, result, single_state, multi_state, _ = runs
  for got, want in zip(result["history"], reference["history"]):
    for key in want:
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
  worst = max(float(np.max(np.abs(single_state[k].astype(np.float64) -
                                  multi_state[k].astype(np.float64)), initial=0.0))
              for k in single_state.files)
  assert worst <= 1e-5, worst


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_process_restores_the_two_processes_checkpoint_from_the_bucket(runs):
  _, _, _, multi_state, restored = runs
  assert len(restored.files) == len(multi_state.files)
  for i in range(len(multi_state.files)):
    np.testing.assert_array_equal(restored[f"arr_{i}"], multi_state[f"arr_{i}"])
