"""Real signals on a real process: SIGTERM saves and exits; after SIGKILL the run resumes from
the last checkpoint and ends in the same state as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, tiny_config
from tests.test_train import _leaves_equal, _restore_final

pytestmark = pytest.mark.slow

ARG = "tiny,steps=30,checkpoint_every=5,eval_every=30,log_every=5"


def _start(workdir: str, data_dir: str) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                   "rml_jax_test_jax_cache")}
  return subprocess.Popen(
      [sys.executable, "-m", "rml_jax.main", f"--config=configs/digits.py:{ARG}",
       f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _wait_for_checkpoint(process, workdir, after: int, timeout: float = 240) -> int:
  deadline = time.time() + timeout
  while time.time() < deadline:
    done = [s for s in _steps(workdir) if s > after]
    if done:
      return done[-1]
    assert process.poll() is None, process.stdout.read()[-3000:]
    time.sleep(0.2)
  raise AssertionError("no checkpoint appeared")


def test_sigterm_saves_then_sigkill_resumes_to_the_uninterrupted_state(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  process = _start(workdir, data_dir)
  _wait_for_checkpoint(process, workdir, after=0)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output[-3000:]
  assert "Stopped by SIGTERM at step" in output
  stopped_at = int(output.split("Stopped by SIGTERM at step ")[1].split(";")[0])
  assert stopped_at in _steps(workdir) and stopped_at < 30

  process = _start(workdir, data_dir)  # resumes; killed without warning after a new checkpoint
  killed_after = _wait_for_checkpoint(process, workdir, after=stopped_at)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert killed_after < 30

  process = _start(workdir, data_dir)  # resumes from the last complete checkpoint, finishes
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output[-3000:]
  assert "Evaluation at step 30" in output

  reference_dir = str(tmp_path / "reference")
  process = _start(reference_dir, data_dir)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output[-3000:]
  config = tiny_config(data_dir, "steps=30")
  assert _leaves_equal(_restore_final(config, workdir), _restore_final(config, reference_dir))
