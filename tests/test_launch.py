"""launch/*.sh --dry-run: the exact commands they would run, and one-line errors; shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from rml_jax import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = {k: v for k, v in (env or os.environ).items() if not k.startswith(("TPU_", "RML_"))}
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], env=env,
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  common = ["--name=rml", "--zone=us-central2-b", "--project=p1", "--dry-run"]
  create = _run("tpu_vm.sh", "create", *common, "--accelerator=v4-32")
  assert create.returncode == 0, create.stderr
  assert shlex.split(create.stdout) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "rml", "--zone=us-central2-b",
      "--project=p1", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]

  train = _run("tpu_vm.sh", "train", *common, "--config=configs/digits.py:mode=rml",
               "--workdir=gs://bucket/run 1", "--config.total_steps=10")
  assert train.returncode == 0, train.stderr
  words = shlex.split(train.stdout)
  assert words[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rml",
                       "--zone=us-central2-b", "--project=p1"]
  assert "--worker=all" in words  # one process per worker of the slice
  remote = shlex.split(words[-1].split("=", 1)[1])
  main = remote[remote.index("rml_jax.main") - 2:]
  assert main[:7] == ["python", "-m", "rml_jax.main", "--config=configs/digits.py:mode=rml",
                      "--workdir=gs://bucket/run 1", "--mode=train", "--config.total_steps=10"]

  delete = _run("tpu_vm.sh", "delete", *common)
  assert shlex.split(delete.stdout)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete",
                                            "rml"]
  setup = _run("tpu_vm.sh", "setup", *common, "--repo=https://example.com/rml_jax.git")
  remote = shlex.split(setup.stdout)[-1].split("=", 1)[1]
  assert "git clone --quiet https://example.com/rml_jax.git" in remote
  assert "pip install -q -e . 'jax[tpu]'" in remote


def test_tpu_vm_check_compiles_before_create_in_the_dry_run():
  result = _run("tpu_vm.sh", "create", "--name=rml", "--zone=z", "--accelerator=v5litepod-8",
                "--check", "--config=configs/city.py", "--config.dtype=bfloat16", "--dry-run")
  assert result.returncode == 0, result.stderr
  check, create = [shlex.split(line) for line in result.stdout.splitlines()]
  assert check[1:] == ["-m", "rml_jax.bench", "--config=configs/city.py",
                       "--topology=v5litepod-8", "--config.dtype=bfloat16"]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]


@pytest.mark.skipif(tpu.libtpu_missing() is not None, reason=str(tpu.libtpu_missing()))
def test_tpu_vm_check_stops_before_create(tmp_path):
  """digits:tiny's 2 + 2 images do not split over the 8 chips of v5litepod-8: the check's one
  error line, exit 2, and gcloud never runs."""
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(f"#!/bin/sh\ntouch {tmp_path / 'gcloud_ran'}\n")
  gcloud.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable,
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  result = _run("tpu_vm.sh", "create", "--name=rml", "--zone=z", "--accelerator=v5litepod-8",
                "--check", "--config=configs/digits.py:tiny", env=env)
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.labeled_batch_size=2 does not split over the 8 chips")
  assert "unlabeled_batch_size" in last and "optimizer.lr_scaling" in last
  assert not (tmp_path / "gcloud_ran").exists()


@pytest.mark.parametrize("args,message", [
    (["train", "--zone=z", "--dry-run"], "--name"),
    (["train", "--name=n", "--zone=z", "--dry-run"], "--config is required"),
    (["frobnicate", "--name=n", "--zone=z"], "unknown subcommand"),
    (["create", "--name=n", "--zone=z", "--bogus"], "unknown argument '--bogus'"),
])
def test_tpu_vm_bad_arguments_are_one_line(args, message):
  result = _run("tpu_vm.sh", *args)
  assert result.returncode == 2
  assert result.stderr.startswith("error:") and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_slurm_dry_run_prints_the_batch_script():
  result = _run("gpu_slurm.sh", "--nodes=2", "--gpus-per-node=4", "--partition=gpu",
                "--config=configs/digits.py", "--workdir=/shared/runs/a b",
                "--config.rml.stages=2", "--dry-run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                    "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu"):
    assert directive in lines
  srun = next(line for line in lines if line.startswith("srun "))
  assert shlex.split(srun) == ["srun", "python", "-m", "rml_jax.main",
                               "--config=configs/digits.py", "--workdir=/shared/runs/a b",
                               "--mode=train", "--config.rml.stages=2"]
  bad = _run("gpu_slurm.sh", "--nodes=zero", "--config=c", "--workdir=w", "--dry-run")
  assert bad.returncode == 2 and "--nodes: expected a positive integer" in bad.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_are_shellcheck_clean():
  scripts = [os.path.join(ROOT, "launch", s) for s in ("tpu_vm.sh", "gpu_slurm.sh")]
  result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script, args", [
    ("tpu_vm.sh", ["--help"]), ("tpu_vm.sh", ["help"]), ("tpu_vm.sh", ["train", "-h"]),
    ("gpu_slurm.sh", ["--help"]),
])
def test_help_prints_the_usage_and_exits_0(script, args):
  result = _run(script, *args)
  assert result.returncode == 0, result.stderr
  assert "--workdir" in result.stdout and result.stderr == ""


def test_tpu_vm_without_a_subcommand_prints_the_usage_and_exits_2():
  result = _run("tpu_vm.sh")
  assert result.returncode == 2 and "--workdir" in result.stdout
