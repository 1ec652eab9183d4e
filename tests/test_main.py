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


def test_runs_fill_the_compilation_cache_that_later_runs_reuse(data_dir, tmp_path):
  """--compilation_cache: the state init and the train step are stored there after a run."""
  cache = tmp_path / "cache"
  result = subprocess.run(
      [sys.executable, "-m", "rml_jax.main", f"--workdir={tmp_path}/run",
       "--config=configs/digits.py:tiny,steps=2,eval_every=2,log_every=1,checkpoint_every=2",
       f"--config.data.data_dir={data_dir}", f"--compilation_cache={cache}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  entries = os.listdir(cache)
  assert any(e.startswith("jit_train_step-") for e in entries), entries
  assert any(e.startswith("jit_init-") for e in entries), entries


def test_compilation_cache_off_or_unwritable_leaves_the_run_uncached(tmp_path):
  from rml_jax import compilation_cache

  assert compilation_cache.enable("") is None
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert compilation_cache.enable(str(blocker / "cache")) is None  # a file is in the way
  import jax

  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    assert compilation_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
    assert (tmp_path / "c").is_dir() and jax.config.jax_compilation_cache_dir == str(
        tmp_path / "c")
  finally:  # the rest of the session keeps the test cache
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
