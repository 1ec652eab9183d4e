"""A non-editable install: the wheel built from this checkout, installed into a fresh virtual
environment, runs the README's digits command from a directory outside the checkout."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _run(command: list[str], **kwargs) -> str:
  # Without the caller's PYTHONPATH: a checkout on it (with a build's rml_jax.egg-info) would
  # make pip take the wheel's package for installed already.
  kwargs.setdefault("env", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
  assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
  return result.stdout + result.stderr


def test_wheel_runs_the_readme_command_from_another_directory(data_dir, tmp_path):
  wheels = tmp_path / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), ROOT])
  (wheel,) = glob.glob(str(wheels / "rml_jax-*.whl"))

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])
  python = str(venv / "bin" / "python")
  # The dependencies come from this environment's site-packages (a plain path entry: its .pth
  # files, the checkout's editable install among them, are not processed); rml_jax itself only
  # from the wheel, installed without them.
  venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
  venv_site = venv_site.strip().splitlines()[-1]
  with open(os.path.join(venv_site, "test_dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["JAX_PLATFORMS"] = "cpu"
  where = _run([python, "-c", "import rml_jax, rml_jax.datasets.splits as s; "
                "print(rml_jax.__file__); print(s.REPO_SPLITS)"], cwd=elsewhere, env=env)
  package_file, splits_dir = where.strip().splitlines()[-2:]
  assert package_file.startswith(venv_site), package_file  # not the checkout
  assert splits_dir.startswith(venv_site) and os.path.isfile(
      os.path.join(splits_dir, "cityscapes", "1_8", "labeled.txt"))

  output = _run([python, "-m", "rml_jax.main", "--config=configs/digits.py:tiny",
                 "--workdir=run", f"--config.data.data_dir={data_dir}"], cwd=elsewhere, env=env)
  assert "Evaluation at step 4" in output
  assert os.path.isfile(elsewhere / "run" / "eval" / "step_4.json")
  # The paper's configs load from the package as well, and find their split lists there.
  check = (
      "import importlib.util, os, sys\n"
      "from rml_jax import config_args\n"
      "from rml_jax.datasets import splits\n"
      "path = config_args.with_packaged_configs(['x', '--config=configs/city.py'])[1][9:]\n"
      "assert path.startswith(sys.prefix), path\n"
      "spaced = config_args.with_packaged_configs(['x', '--config', 'configs/city.py:a=1'])\n"
      "assert spaced[1:] == ['--config', path + ':a=1'], spaced\n"
      "spec = importlib.util.spec_from_file_location('city', path)\n"
      "module = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(module)\n"
      "data = module.get_config().data\n"
      "folder = splits.split_folder(data, data.split)\n"
      "assert folder.startswith(sys.prefix) and os.path.isfile(os.path.join(folder, "
      "'labeled.txt')), folder\n")
  _run([python, "-c", check], cwd=elsewhere, env=env)
