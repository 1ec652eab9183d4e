"""Files that are not what a flag names: a params file for config.model.init_from and a
checkpoint for `convert --src` that is garbage, a pickle or a truncated archive each stop with
one `error:` line naming the file, exit status 2, and nothing written."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from rml_jax import convert, train, weights
from rml_jax.errors import UserError
from tests.conftest import tiny_config


def _write(path, kind: str) -> str:
  """A file of `kind` at `path` (its suffix decides how convert reads it)."""
  if kind == "garbage":
    data = os.urandom(512)
  elif kind == "pickle":
    data = pickle.dumps({"params/x": np.zeros(3)})
  elif kind == "truncated":
    buffer = io.BytesIO()
    np.savez(buffer, **{"params/x": np.zeros((64, 64))})
    data = buffer.getvalue()[:300]
  elif kind == "npy":
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    data = buffer.getvalue()
  else:  # an archive of other arrays
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.zeros(3))
    data = buffer.getvalue()
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


KINDS = ["garbage", "pickle", "truncated", "npy"]


@pytest.mark.parametrize("kind", KINDS + ["other_keys"])
def test_init_from_a_bad_params_file_is_one_line_and_writes_nothing(data_dir, tmp_path, kind):
  path = _write(tmp_path / "weights.npz", kind)
  config = tiny_config(data_dir, f"model.init_from={path}")
  workdir = tmp_path / "run"
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert message.startswith(f"config.model.init_from: {path} ") and "\n" not in message
  assert "python -m rml_jax.convert" in message
  assert not workdir.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_convert_src_a_bad_file_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, kind,
                                                                      suffix):
  if suffix == ".pth":
    pytest.importorskip("torch")
  if suffix == ".safetensors":
    pytest.importorskip("safetensors")
  src = _write(tmp_path / f"source{suffix}", kind)
  out = tmp_path / "out.npz"
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["--arch=resnet101", f"--src={src}", f"--out={out}"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: --src: {src} ") and "\n" not in err
  assert not out.exists()


def test_a_good_params_file_still_loads(tmp_path):
  path = str(tmp_path / "ok.npz")
  weights.save(path, {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}}})
  assert weights.load(path)["params"]["dense"]["kernel"].shape == (2, 2)
  assert zipfile.is_zipfile(path)
