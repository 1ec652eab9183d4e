"""--mode=export: each format, loaded by its own runtime, gives --mode=predict's probabilities;
bad input is one line and leaves nothing behind."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rml_jax import export, train
from rml_jax.constants import EXPORT_FORMATS
from rml_jax.errors import UserError
from rml_jax.program import Program
from rml_jax.workdir import Workdir
from tests.conftest import ROOT, tiny_config

# The runtime each format's test loads the export with.
RUNTIMES = {"savedmodel": ("tensorflow", "orbax.export"), "onnx": ("onnxruntime", "jax2onnx"),
            "stablehlo": ()}


def _skip_without(fmt: str) -> None:
  missing = [m for m in RUNTIMES[fmt] if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"{fmt}: {', '.join(missing)} not installed ({export.EXTRA})")


def _run_export(path: str, fmt: str, images: np.ndarray) -> dict[str, np.ndarray]:
  """The export in `path`, loaded and run by its own runtime (TF, onnxruntime, JAX)."""
  return export.load_runtime(fmt, path)(images)


def _check_same(got: dict[str, np.ndarray], probs: np.ndarray) -> None:
  """Probabilities within float tolerance; labels equal wherever the top two are not tied."""
  assert got["probabilities"].dtype == np.float32 and got["labels"].dtype == np.int32
  np.testing.assert_allclose(got["probabilities"], probs, atol=2e-5)
  top2 = np.sort(probs, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4
  np.testing.assert_array_equal(got["labels"][clear], probs.argmax(-1)[clear])


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A 2-step supervised run of a heterogeneous pair: DeepLabv2 tiny (a) and DINOv2 tiny + DPT
  (b), 56 x 56 crops (multiples of the patch). Returns (config, workdir, program, state)."""
  config = tiny_config(data_dir, "model_b.name=dpt_dinov2_tiny,mode=supervised,steps=2")
  config.data.crop_size = (56, 56)
  workdir = str(tmp_path_factory.mktemp("export_run"))
  train.train_and_evaluate(config, workdir)
  program = Program.create(config)
  run = Workdir(workdir, config.keep_checkpoints, read_only=True)
  state = run.checkpointer.restore(run.latest_checkpoint(), program.abstract_state, program.meta)
  run.close()
  return config, workdir, program, state


def _predicted(trained, images: np.ndarray, model: str) -> np.ndarray:
  """--mode=predict's probabilities (Program.predict, the config's eval protocol)."""
  _, _, program, state = trained
  return np.asarray(program.predict(state, images)[model])


def _images(*shape: int) -> np.ndarray:
  return np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_deeplab_export_matches_predict_at_two_sizes(trained, fmt, tmp_path):
  """teacher_a (DeepLabv2 tiny) at the training size and a second one: one export with symbolic
  sizes, or one export per size for a format that takes fixed sizes only."""
  _skip_without(fmt)
  config, workdir = trained[:2]
  config = config.copy_and_resolve_references()
  sizes = [(64, 64), (48, 80)]
  outputs = {}
  for size in ([None] if fmt not in export.FIXED_SIZE_FORMATS else sizes):
    config.export.update(dict(format=fmt, output=str(tmp_path / f"out_{size}"), image_size=size))
    outputs[size] = export.export(config, workdir)
  meta = json.load(open(os.path.join(outputs[size], "metadata.json")))
  assert meta["model"] == "teacher_a" and meta["architecture"] == "deeplabv2_tiny"
  assert meta["step"] == config.total_steps and len(meta["classes"]) == len(meta["palette"])
  for size, batch in zip(sizes, (2, 1)):
    images = _images(batch, *size)
    got = _run_export(outputs.get(size) or outputs[None], fmt, images)
    _check_same(got, _predicted(trained, images, "teacher_a"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_dinov2_export_pads_inside_and_matches_predict(trained, fmt, tmp_path):
  """student_b (DINOv2 tiny + DPT) at one fixed size that is no multiple of 14."""
  _skip_without(fmt)
  config, workdir = trained[:2]
  config = config.copy_and_resolve_references()
  config.export.update(dict(format=fmt, output=str(tmp_path / "out"), model="student_b",
                            image_size=(50, 66)))
  output = export.export(config, workdir)
  meta = json.load(open(os.path.join(output, "metadata.json")))
  images = _images(1 if meta["input"]["shape"].startswith("1,") else 2, 50, 66)
  _check_same(_run_export(output, fmt, images), _predicted(trained, images, "student_b"))


def _random_model(name: str, size: tuple[int, int], abstract: bool = True):
  """(serving function, variables) of registry model `name`, 5 classes: random weights, or
  their shapes only (abstract: enough to trace)."""
  model = export.models.build_model(ml_collections.ConfigDict({"name": name}), 5,
                                    image_size=size)
  init = functools.partial(model.init, jax.random.key(0), jnp.zeros((1, *size, 3)), train=False)
  variables = jax.eval_shape(init) if abstract else jax.jit(init)()
  return export.serving_fn(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False), variables


@pytest.mark.parametrize("name,sizes", [
    ("deeplabv2_tiny", "uint8 [N, H, W, 3], any N, height and width multiples of 8, at least 40"),
    ("setr_naive_tiny", "uint8 [N, H, W, 3], any N, any height and width, at least 8"),
    ("dpt_dinov2_tiny", None)])
def test_symbolic_image_sizes_where_the_model_allows(name, sizes):
  """DeepLabv2's strides need multiples; DINOv2 builds resampling matrices for each size."""
  serve, variables = _random_model(name, (56, 56))
  spec = export.symbolic_spec(serve, variables)
  assert (spec and spec.describe()) == sizes
  if sizes is None:
    with pytest.raises(UserError, match=rf"^config.export.image_size: {name} cannot take"):
      export.input_spec(serve, variables, None, name, "stablehlo")
    return
  with pytest.raises(UserError, match=r"^config.export.image_size: format='onnx' takes one"):
    export.input_spec(serve, variables, None, name, "onnx")
  assert export.input_spec(serve, variables, (50, 66), name, "onnx").dims == "n, 50, 66, 3"


@pytest.mark.slow
def test_setr_stablehlo_takes_sizes_it_was_not_traced_at():
  serve, variables = _random_model("setr_naive_tiny", (64, 64), abstract=False)
  spec = export.symbolic_spec(serve, variables)
  with tempfile.TemporaryDirectory() as folder:
    export.write_stablehlo(serve, variables, spec, f"{folder}/model.stablehlo")
    run = export.load_runtime("stablehlo", folder)
    for size in ((64, 64), (67, 93)):
      images = _images(2, *size)
      expected = jax.jit(serve)(variables, images)
      _check_same(run(images), np.asarray(expected["probabilities"]))


class _Upsample(nn.Module):
  """A transposed convolution and a max pool: the two primitives export.onnx_friendly
  rewrites for jax2onnx."""

  @nn.compact
  def __call__(self, x):
    x = nn.ConvTranspose(4, (2, 3), strides=(2, 3), padding=((1, 0), (2, 1)))(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def test_onnx_rewrites_keep_the_values():
  layer = _Upsample()
  images = _images(2, 5, 4)
  variables = layer.init(jax.random.key(0), jnp.zeros(images.shape))
  expected = layer.apply(variables, images.astype(jnp.float32))
  closed = jax.make_jaxpr(lambda x: [layer.apply(variables, x)])(images.astype(jnp.float32))
  rewritten = export.onnx_friendly(closed)
  text = str(jax.make_jaxpr(rewritten)(images.astype(jnp.float32)))
  assert "lhs_dilation=(1, 1)" in text and "reduce_window_max" not in text
  np.testing.assert_allclose(rewritten(images.astype(jnp.float32))[0], expected, atol=1e-6)
  if importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime"):
    def serve(variables, images):
      out = layer.apply(variables, images.astype(jnp.float32))
      return {"probabilities": out, "labels": jnp.argmax(out, -1).astype(jnp.int32)}

    with tempfile.TemporaryDirectory() as folder:
      export.write_onnx(serve, variables, export.InputSpec.fixed(5, 4), f"{folder}/model.onnx")
      got = export.load_runtime("onnx", folder)(images)
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: None if name == "jax2onnx" else real(name))
  with pytest.raises(UserError, match=r"format='onnx' needs jax2onnx.*rml_jax\[export\]"):
    export.require_packages("onnx")
  export.require_packages("stablehlo")


@pytest.mark.parametrize("what", ["unknown_model", "no_checkpoint"])
def test_bad_input_is_one_line_naming_the_key(what, data_dir, tmp_path):
  """Each stops before anything is read or written (the workdir has an empty checkpoints
  folder)."""
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  config = tiny_config(data_dir)
  key = {"unknown_model": "^config.export.model: expected one of",
         "no_checkpoint": "^--workdir: no checkpoint in"}[what]
  if what == "unknown_model":
    config.export.model = "teacher_c"
  with pytest.raises(UserError, match=key) as error:
    export.export(config, str(tmp_path / "run"))
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]


@pytest.mark.parametrize("what", ["unwritable", "not_empty", "remote"])
def test_a_bad_output_folder_is_one_line_naming_the_key(what, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  output, message = {
      "unwritable": (str(blocker / "out"), "^config.export.output: cannot write to .*a_file"),
      "not_empty": (str(tmp_path / "full"), "^config.export.output: .* not an empty folder"),
      "remote": ("gs://bucket/out", "^config.export.output: gs://bucket/out: expected a local"),
  }[what]
  with pytest.raises(UserError, match=message) as error:
    export.check_output(output)
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["a_file", "full"]
  assert os.listdir(tmp_path / "full") == ["x"]


def test_a_failed_write_leaves_no_folder(tmp_path):
  def write(folder):
    open(os.path.join(folder, "model.onnx"), "wb").write(b"half")
    raise UserError("config.export.format='onnx': cannot be exported")

  with pytest.raises(UserError):
    export.write_folder(str(tmp_path / "out"), write)
  assert os.listdir(tmp_path) == []


def test_export_mode_without_a_checkpoint_is_one_line_and_exit_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "rml_jax.main", "--config=configs/digits.py:tiny", "--mode=export",
       f"--workdir={tmp_path}/none", f"--config.export.output={tmp_path}/out"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert "--workdir: no checkpoints under" in errors[0]
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_a_folder_run_exports_its_own_normalisation_and_classes(tmp_path):
  """An image-folder run (the stanford preset: 8 classes, ImageNet mean and std) exported with
  symbolic sizes gives --mode=predict's probabilities at two sizes other than its crop."""
  from configs import folder
  from tests.test_configs import _write_folder

  root = str(tmp_path / "folder")
  _write_folder(root, "stanford")
  config = folder.get_config(f"stanford,tiny,steps=1,eval_every=1,log_every=1,"
                             f"checkpoint_every=1,data.root={root},"
                             f"data.data_dir={tmp_path / 'tfds'}")
  config.eval.resize = None  # the export leaves resizing to its caller
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  config.export.update(dict(format="stablehlo", output=str(tmp_path / "out")))
  output = export.export(config, workdir)
  meta = json.load(open(os.path.join(output, "metadata.json")))
  assert len(meta["classes"]) == 8 and meta["classes"][0] == "sky"
  program = Program.create(config)
  run = Workdir(workdir, config.keep_checkpoints, read_only=True)
  state = run.checkpointer.restore(run.latest_checkpoint(), program.abstract_state, program.meta)
  run.close()
  for size in ((48, 64), (40, 72)):
    images = _images(2, *size)
    _check_same(_run_export(output, "stablehlo", images),
                np.asarray(program.predict(state, images)["teacher_a"]))
