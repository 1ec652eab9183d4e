"""The command line: bad flags and config keys stop with one line and exit status 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path):
  result = subprocess.run([sys.executable, "-m", "rml_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return result.returncode, result.stderr.strip().splitlines()


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/digits.py", "--config.no_such_key=1"], "no_such_key"),
    (["--config=configs/digits.py:no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--config=configs/digits.py", "--config.total_steps=abc"], "total_steps"),
    (["--config=configs/missing.py"], "configs/missing.py"),
    (["--config=configs/digits.py:mode=bogus"], "config.rml.mode"),
])
def test_bad_config_is_one_line(args, expected, tmp_path):
  code, stderr = _main(*args, f"--workdir={tmp_path}/w", tmp_path=tmp_path)
  errors = [line for line in stderr if line.startswith("error:")]
  assert code == 2, stderr[-5:]
  assert len(errors) == 1 and expected in errors[0], stderr[-5:]
  assert not any("Traceback" in line for line in stderr)
