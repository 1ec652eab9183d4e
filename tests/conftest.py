"""Shared fixtures: the digit_scenes dataset generated once per session, small configs."""

from __future__ import annotations

import os

# The tests run on the CPU; with libtpu installed (the test extra) jax would first probe for a
# TPU and hold libtpu's lock file. Subprocesses inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import digits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout

# Runs in one test session compile the same steps: reuse compiled executables across them
# (the environment variable carries it to the subprocesses that run rml_jax.main).
TEST_JAX_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "rml_jax_test_jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", TEST_JAX_CACHE)
jax.config.update("jax_compilation_cache_dir", TEST_JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A prepared TFDS data dir holding digit_scenes (generated here, about 15 s)."""
  path = os.environ.get("RML_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  from rml_jax import datasets

  datasets.get_builder(tiny_config(path).data)
  return path


def tiny_config(data_dir: str, arg: str = ""):
  """configs/digits.py with the `tiny` preset, reading data from data_dir."""
  config = digits.get_config("tiny" + ("," + arg if arg else ""))
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="session")
def emulator():
  """An emulated Google Cloud Storage server on 127.0.0.1 with the bucket gs://bucket."""
  from tests.gcs_emulator import Emulator

  server = Emulator()
  yield server
  server.close()


@pytest.fixture
def remote_env(emulator, monkeypatch):
  """This process reaches the emulator for gs:// paths; returns the environment that carries
  it to subprocesses."""
  for key, value in emulator.environment().items():
    monkeypatch.setenv(key, value)
  _forget_epath_backend()  # etils.epath caches whether to use TensorFlow's file system
  yield {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  monkeypatch.undo()
  _forget_epath_backend()


def _forget_epath_backend():
  from etils.epath import gpath

  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()
