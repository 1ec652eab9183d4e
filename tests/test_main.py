"""The command line: bad flags and config keys stop with one line and exit status 2."""

import os
import subprocess
import sys

import pytest

from rml_jax import config_args

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


# A config file that does not load: (its text, how the error line goes on after
# `error: --config: <file>`).
BROKEN_CONFIGS = {
    "syntax_error": ("import ml_collections\n\n\ndef get_config(:\n  pass\n",
                     ", line 4: SyntaxError: invalid syntax; expected a Python file defining "
                     "get_config"),
    "raises_on_import": ("import ml_collections\nSTEPS = 4\nraise RuntimeError('no dataset "
                         "here')\n", ", line 3: RuntimeError: no dataset here"),
    "imports_a_missing_module": ("from configs import no_such_config\n",
                                 ", line 1: ImportError: cannot import name 'no_such_config' "
                                 "from 'configs'"),
    "raises_in_get_config": ("def get_config(arg=None):\n  raise ValueError(f'bad arg {arg}')"
                             "\n", ", line 2: ValueError: bad arg tiny"),
    "no_get_config": ("import ml_collections\n\nCONFIG = ml_collections.ConfigDict()\n",
                      " has no get_config; expected a function get_config(arg=None) returning "
                      "an ml_collections.ConfigDict"),
}


@pytest.mark.parametrize("kind", list(BROKEN_CONFIGS))
def test_a_config_file_that_does_not_load_is_one_line_naming_the_file(kind, tmp_path):
  """Exit 2, one line: the file, the line of it that failed and the error; no traceback, no
  workdir."""
  text, rest = BROKEN_CONFIGS[kind]
  path = tmp_path / "my_config.py"
  path.write_text(text)
  code, stderr = _main(f"--config={path}:tiny", f"--workdir={tmp_path}/w", tmp_path=tmp_path)
  errors = [line for line in stderr if line.startswith("error:")]
  assert code == 2, stderr[-5:]
  assert len(errors) == 1 and errors[0].startswith(f"error: --config: {path}{rest}"), stderr[-5:]
  assert stderr[-1] == errors[0] and not any("Traceback" in line for line in stderr)
  assert not (tmp_path / "w").exists()


def test_config_file_is_the_last_config_flag_without_its_arg():
  assert config_args.config_file(["main", "--config=a.py:tiny", "--workdir=w"]) == "a.py"
  assert config_args.config_file(["main", "--config", "b.py", "--config=c.py:x,y=1"]) == "c.py"
  assert config_args.config_file(["main", "-config", "d.py:tiny"]) == "d.py"
  assert config_args.config_file(["main", "--workdir=w"]) is None


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
