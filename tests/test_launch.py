"""launch/*.sh --dry-run: the exact commands they would run, and one-line errors; shellcheck."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "RML_"))}
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], env=env,
                        capture_output=True, text=True, timeout=60)


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
