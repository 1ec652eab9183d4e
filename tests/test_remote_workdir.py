"""A run whose workdir is a gs:// bucket, against an emulated Google Cloud Storage server
(tests/gcs_emulator.py): killed and resumed, evaluated, predicted. Everything must land in the
bucket, nothing in the working directory, and the resumed state must equal an uninterrupted
local run bitwise. (A two-stage run killed while labelling: tests/test_stages.py.)"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from rml_jax import evaluate, predict, train
from tests.conftest import ROOT, tiny_config
from tests.test_train import _leaves_equal, _restore_final

pytestmark = pytest.mark.slow

ONE_STAGE = "steps=12,checkpoint_every=3,eval_every=12,log_every=3"


def start_main(workdir: str, arg: str, data_dir: str, cwd: str, env: dict, *flags: str):
  return subprocess.Popen(
      [sys.executable, "-m", "rml_jax.main",
       f"--config={os.path.join(ROOT, 'configs', 'digits.py')}:tiny,{arg}",
       f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", *flags],
      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process) -> str:
  output = process.communicate(timeout=600)[0]
  assert process.returncode == 0, output[-4000:]
  return output


def kill_when(process, condition, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      process.send_signal(signal.SIGKILL)
      process.wait(timeout=60)
      return
    if process.poll() is not None:
      raise AssertionError(f"ended before {what}: " + process.stdout.read()[-3000:])
    time.sleep(0.02)
  process.kill()
  raise AssertionError(f"timed out waiting for {what}")


def committed_steps(bucket, prefix: str) -> list[int]:
  pattern = re.compile(re.escape(prefix) + r"/checkpoints/(\d+)/commit_success\.txt")
  return sorted(int(m[1]) for m in map(pattern.fullmatch, bucket.names(prefix)) if m)


@pytest.mark.remote_kill  # left out of CI's 15 minutes: -m remote_kill
def test_remote_run_killed_resumed_evaluated_predicted(emulator, remote_env, data_dir,
                                                      tmp_path, monkeypatch):
  bucket = emulator.bucket()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  # The first process compiles into a cache in the bucket; the resumed one reads it back.
  env = dict(remote_env, JAX_COMPILATION_CACHE_DIR="gs://bucket/xla_cache")
  process = start_main("gs://bucket/run", ONE_STAGE, data_dir, str(cwd), env)
  kill_when(process, lambda: any(0 < s < 12 for s in committed_steps(bucket, "run")),
            "a checkpoint in the bucket")
  killed_at = max(committed_steps(bucket, "run"))
  written = bucket.names("xla_cache/")
  assert written, "the compilation cache was not written to the bucket"

  output = finish(start_main("gs://bucket/run", ONE_STAGE, data_dir, str(cwd), env))
  assert f"Resumed from step {killed_at}." in output
  assert "Evaluation at step 12" in output
  assert bucket.downloaded & set(written), "the resumed run read nothing of the bucket's cache"

  # Evaluation and prediction read the bucket's checkpoint and write their results there.
  images = tmp_path / "images"
  images.mkdir()
  for i, size in enumerate([(40, 56), (64, 64)]):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, size + (3,), np.uint8)).save(
        images / f"scene{i}.png")
  # --mode=eval and --mode=predict, in this process (what main runs for them), from cwd.
  config = tiny_config(data_dir, ONE_STAGE)
  config.predict.input = str(images)
  monkeypatch.chdir(cwd)
  evaluate.evaluate(config, "gs://bucket/run")
  predict.predict(config, "gs://bucket/run")

  names = set(bucket.names("run/"))
  for expected in ("run/config.json", "run/labeled_ids.txt",
                   "run/eval/step_12.json", "run/checkpoints/12/commit_success.txt",
                   "run/predictions/scene0_labels.png", "run/predictions/scene1_mask.png",
                   "run/predictions/scene1_overlay.png"):
    assert expected in names, f"{expected} not in the bucket: {sorted(names)[:40]}"
  assert json.loads(bucket.read("run/eval/step_12.json"))["step"] == 12
  labels = np.asarray(Image.open(io.BytesIO(bucket.read("run/predictions/scene0_labels.png"))))
  assert labels.shape == (40, 56) and labels.max() < 11
  events = [n for n in names if n.startswith("run/events.out.tfevents.")]
  assert len(events) >= 2  # one file per training process, both copied to the bucket
  assert "miou/teacher_a" in _event_tags(bucket, events)
  assert os.listdir(cwd) == [], f"written under the working directory: {os.listdir(cwd)}"

  reference = str(tmp_path / "reference")  # uninterrupted, local
  train.train_and_evaluate(tiny_config(data_dir, ONE_STAGE), reference)

  assert _leaves_equal(_restore_final(config, "gs://bucket/run"),
                       _restore_final(config, reference))


def _event_tags(bucket, names: list[str]) -> set[str]:
  """The scalar tags in the bucket's TensorBoard event files."""
  from tensorboard.backend.event_processing import event_file_loader

  tags = set()
  for name in names:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), os.path.basename(name))
    with open(path, "wb") as f:
      f.write(bucket.read(name))
    for event in event_file_loader.EventFileLoader(path).Load():
      tags.update(value.tag for value in event.summary.value)
    os.remove(path)
  return tags
