"""--mode=export: one model of a run's checkpoint as a function that runs without rml_jax.

  <output>/saved_model/      format=savedmodel: TF SavedModel (orbax-export), serving_default
  <output>/model.onnx        format=onnx: ONNX (jax2onnx), opset ONNX_OPSET
  <output>/model.stablehlo   format=stablehlo: serialized jax.export.Exported
  <output>/metadata.json     classes, palette, input convention, model, config, training step

The exported function: uint8 RGB images [N, H, W, 3] -> {'probabilities' [N, H, W, K] float32,
'labels' [N, H, W] int32}, with config.data's normalisation and whole-image inference inside.
The batch is symbolic; height and width are symbolic where the model's shape logic allows
(jax.export shape polymorphism), else one fixed size (config.export.image_size). The folder is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export as jax_export
from jax.extend import core as jax_core

from rml_jax import inference, models, storage, visualize
from rml_jax.errors import UserError
from rml_jax.program import Program
from rml_jax.workdir import Workdir

ONNX_OPSET = 21
EXTRA = 'pip install "rml_jax[export]"'
# format -> (the file or folder written inside the output folder, the modules it needs)
FORMATS = {"savedmodel": ("saved_model", ("orbax.export", "tensorflow")),
           "onnx": ("model.onnx", ("jax2onnx", "onnx")),
           "stablehlo": ("model.stablehlo", ())}
# Formats whose converter takes only a symbolic batch, not symbolic image sizes.
FIXED_SIZE_FORMATS = {"onnx": "jax2onnx cannot carry symbolic image sizes"}
OUTPUTS = ("labels", "probabilities")  # the exported function's outputs, in flattening order

ServeFn = Callable[[dict[str, Any], jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """uint8 RGB images [batch, height, width, 3]: each size a jax.export dimension expression
  ('n', '8*h', '512'), with constraints on the symbols ('h >= 4')."""

  batch: str = "n"
  height: str = "h"
  width: str = "w"
  constraints: tuple[str, ...] = ()

  @classmethod
  def fixed(cls, height: int, width: int) -> "InputSpec":
    return cls(height=str(height), width=str(width))

  @classmethod
  def symbolic(cls, multiple: int, low: int) -> "InputSpec":
    """Height and width symbolic multiples of `multiple`, at least multiple * low."""
    side = lambda name: name if multiple == 1 else f"{multiple}*{name}"  # noqa: E731
    constraints = (f"h >= {low}", f"w >= {low}") if low > 1 else ()
    return cls(height=side("h"), width=side("w"), constraints=constraints)

  @property
  def dims(self) -> str:
    return f"{self.batch}, {self.height}, {self.width}, 3"

  def abstract(self) -> jax.ShapeDtypeStruct:
    """The images as a ShapeDtypeStruct with symbolic dimensions."""
    shape = jax_export.symbolic_shape(self.dims, constraints=self.constraints)
    return jax.ShapeDtypeStruct(shape, jnp.uint8)

  @property
  def tf_shape(self) -> list[int | None]:
    """[None (symbolic) or size] of the four dimensions, for a tf.TensorSpec."""
    return [int(d) if d.isdigit() else None
            for d in (self.batch, self.height, self.width)] + [3]

  def describe(self) -> str:
    """The accepted image sizes, in words."""
    if self.height.isdigit() and self.width.isdigit():
      return f"uint8 [N, {self.height}, {self.width}, 3], any N"
    multiple = self.height.partition("*")[0] if "*" in self.height else "1"
    low = max([int(c.partition(">=")[2]) for c in self.constraints] or [1]) * int(multiple)
    sides = "any height and width" if multiple == "1" else f"height and width multiples of " \
        f"{multiple}"
    return f"uint8 [N, H, W, 3], any N, {sides}" + (f", at least {low}" if low > 1 else "")


def serving_fn(model, mean: tuple[float, ...], std: tuple[float, ...], flip: bool) -> ServeFn:
  """(variables, uint8 images [N, H, W, 3]) -> {'probabilities' [N, H, W, K] float32,
  'labels' [N, H, W] int32}: normalisation and whole-image inference (inference.py), with the
  horizontal flip average when `flip`."""

  def probabilities(variables, images):
    x = inference.normalize(images, mean, std)
    return {"p": inference.softmax_probs(model, variables, x)}

  def serve(variables, images):
    predict = functools.partial(probabilities, variables)
    probs = (inference.with_flip(predict, images) if flip else predict(images))["p"]
    return {"probabilities": probs, "labels": jnp.argmax(probs, -1).astype(jnp.int32)}
  return serve


def symbolic_spec(fn: ServeFn, variables: Any, max_multiple: int = 32,
                  max_low: int = 64) -> InputSpec | None:
  """The loosest symbolic image sizes `fn` traces with, or None when it needs concrete ones.

  Height and width as multiples of 1, 2, 4, ... (strided layers whose output sizes jax.export
  cannot prove equal) with lower bounds (size comparisons in the model that hold above one);
  the smallest bound that traces is found by bisection. Only traces, compiles nothing.
  """

  def traces(multiple: int, low: int) -> None:
    jax.eval_shape(fn, variables, InputSpec.symbolic(multiple, low).abstract())

  multiple, low = 1, 1
  while True:
    if multiple > max_multiple or low > max_low:
      return None
    try:
      traces(multiple, low)
      break
    except jax.errors.InconclusiveDimensionOperation:
      low *= 2
    except (TypeError, ValueError):
      multiple *= 2
  failing = 0  # bisect (failing, low]: the bound below which tracing fails
  while low - failing > 1:
    middle = (failing + low) // 2
    try:
      traces(multiple, middle)
      low = middle
    except (jax.errors.InconclusiveDimensionOperation, TypeError, ValueError):
      failing = middle
  return InputSpec.symbolic(multiple, low)


# ---------------------------------------------------------------------------------------------
# The three formats: each writes `fn` with `variables` bound into the folder `target`.
# ---------------------------------------------------------------------------------------------


def write_stablehlo(fn: ServeFn, variables: Any, spec: InputSpec, target: str) -> InputSpec:
  """jax.export's serialized Exported: deserialize(bytes).call(images) -> the outputs.
  Returns the input spec written (each writer's)."""
  exported = jax_export.export(jax.jit(functools.partial(fn, variables)))(spec.abstract())
  with open(target, "wb") as f:
    f.write(exported.serialize())
  return spec


def write_savedmodel(fn: ServeFn, variables: Any, spec: InputSpec, target: str) -> InputSpec:
  """A TF SavedModel through orbax-export: signature serving_default(images) -> the outputs."""
  import tensorflow as tf
  from orbax.export import ExportManager, JaxModule, ServingConfig

  module = JaxModule(variables, fn, trainable=False, input_polymorphic_shape=f"({spec.dims})",
                     jax2tf_kwargs={"polymorphic_constraints": spec.constraints})
  signature = [tf.TensorSpec(spec.tf_shape, tf.uint8, name="images")]
  ExportManager(module, [ServingConfig("serving_default", input_signature=signature)]).save(
      target)
  return spec


def write_onnx(fn: ServeFn, variables: Any, spec: InputSpec, target: str) -> InputSpec:
  """ONNX (opset ONNX_OPSET) through jax2onnx: inputs ['images'], outputs OUTPUTS. A graph
  jax2onnx cannot write with a symbolic batch is written for batch 1 (the returned spec, and
  metadata.json, say so).

  jax2onnx converts the traced primitives of the function (its jaxpr), not the library calls
  it would otherwise intercept, with transposed convolutions spelled as zero interleaving and a
  plain convolution and max pools as slices (see onnx_friendly).
  """
  from jax2onnx import to_onnx

  def convert(spec: InputSpec):
    images = spec.abstract()
    closed = jax.make_jaxpr(lambda x: [fn(variables, x)[k] for k in OUTPUTS])(images)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints debug lines
      return to_onnx(onnx_friendly(closed), [images], opset=ONNX_OPSET,
                     input_names=["images"], output_names=list(OUTPUTS), model_name="rml_jax")

  # The converter logs a warning with a traceback per optional plugin it cannot import.
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [log.level for log in loggers]
  for log in loggers:
    log.setLevel(logging.ERROR)
  try:
    proto = convert(spec)
  except jax.errors.InconclusiveDimensionOperation:
    spec = dataclasses.replace(spec, batch="1")
    proto = convert(spec)
  finally:
    for log, level in zip(loggers, levels):
      log.setLevel(level)
  del proto.graph.value_info[:]  # optional shape hints, some stamped with the wrong batch size
  with open(target, "wb") as f:
    f.write(proto.SerializeToString())
  return spec


WRITERS = {"savedmodel": write_savedmodel, "onnx": write_onnx, "stablehlo": write_stablehlo}


def pad_axis(x: jax.Array, axis: int, low: int, high: int, value) -> jax.Array:
  """`x` with `low` and `high` entries of `value` added before and after along `axis`, as a
  concatenation (jax2onnx writes a pad of a symbolic batch only with batch 1). lax only:
  jax2onnx intercepts jax.numpy calls with concrete shapes."""
  pieces = [jax.lax.broadcast_in_dim(jnp.asarray(value, x.dtype),
                                     x.shape[:axis] + (n,) + x.shape[axis + 1:], ())
            for n in (low, high)]
  return jax.lax.concatenate([p for p in (pieces[0], x, pieces[1]) if p.shape[axis]], axis)


def interleave_zeros(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """factor - 1 zeros between neighbours along `axis`: size s -> (s - 1) * factor + 1."""
  x = pad_axis(jax.lax.expand_dims(x, (axis + 1,)), axis + 1, 0, factor - 1, 0)
  shape = x.shape[:axis] + (x.shape[axis] * factor,) + x.shape[axis + 2:]
  return jax.lax.slice_in_dim(jax.lax.reshape(x, shape), 0, shape[axis] - factor + 1, axis=axis)


def conv_without_input_dilation(lhs: jax.Array, rhs: jax.Array, **params) -> jax.Array:
  """conv_general_dilated with lhs_dilation > 1 (a transposed convolution) as interleave_zeros
  and an undilated convolution: the same values."""
  spatial = params["dimension_numbers"].lhs_spec[2:]
  for axis, factor in zip(spatial, params["lhs_dilation"]):
    lhs = interleave_zeros(lhs, axis, factor) if factor > 1 else lhs
  return jax.lax.conv_general_dilated_p.bind(lhs, rhs, **(params | {
      "lhs_dilation": (1,) * len(spatial)}))


def max_pool_as_slices(x: jax.Array, *, window_dimensions, window_strides, padding,
                       base_dilation, window_dilation) -> jax.Array:
  """reduce_window_max (a max pool, no dilation) as the maximum of strided slices of the
  -inf-padded input, one slice per window offset: the same values."""
  del base_dilation, window_dilation  # 1 (onnx_friendly)
  low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  for axis, (lo, hi) in enumerate(padding):
    x = pad_axis(x, axis, lo, hi, low)
  sizes = [(n - w) // s + 1 for n, w, s in zip(x.shape, window_dimensions, window_strides)]
  out = None
  for offset in itertools.product(*(range(w) for w in window_dimensions)):
    piece = jax.lax.slice(x, offset, [o + (n - 1) * s + 1 for o, n, s in
                                      zip(offset, sizes, window_strides)], window_strides)
    out = piece if out is None else jax.lax.max(out, piece)
  return out


def onnx_friendly(closed: jax_core.ClosedJaxpr) -> Callable[..., list[jax.Array]]:
  """A function evaluating `closed` that binds its primitives as they are, inlines nested jit
  calls, and spells two that jax2onnx 0.12 lowers wrongly in other primitives with the same
  values: input-dilated convolutions (conv_without_input_dilation) and max pools
  (max_pool_as_slices)."""

  def run(closed: jax_core.ClosedJaxpr, *args) -> list[jax.Array]:
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
      values, params = [read(v) for v in eqn.invars], eqn.params
      if eqn.primitive.name == "jit":
        out = run(params["jaxpr"], *values)
      elif eqn.primitive is jax.lax.conv_general_dilated_p and max(params["lhs_dilation"]) > 1:
        out = conv_without_input_dilation(*values, **params)
      elif (eqn.primitive is jax.lax.reduce_window_max_p
            and set(params["base_dilation"]) | set(params["window_dilation"]) == {1}):
        out = max_pool_as_slices(*values, **params)
      else:
        out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(params))
      multiple = eqn.primitive.multiple_results or eqn.primitive.name == "jit"
      env.update(zip(eqn.outvars, out if multiple else [out]))
    return [read(v) for v in jaxpr.outvars]
  return functools.partial(run, closed)


# ---------------------------------------------------------------------------------------------
# --mode=export
# ---------------------------------------------------------------------------------------------


def export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes config.export.model of the checkpoint config.export.step (0: the latest) of
  `workdir` as config.export.format into config.export.output (default
  <workdir>/export/<model>_<format>). Returns the output folder."""
  options = config.export
  program = Program.create(config)  # validates the config first
  require_packages(options.format)
  run = Workdir(workdir, config.keep_checkpoints, read_only=True)
  step = options.step or run.latest_checkpoint()
  if step not in run.checkpointer.all_steps():
    raise UserError(f"config.export.step: no checkpoint {step} in {run.checkpointer.directory}; "
                    f"expected one of {run.checkpointer.all_steps()} (0 = the latest)")
  output = storage.resolve(options.output) if options.output else storage.join(
      run.path, "export", f"{options.model}_{options.format}")
  check_output(output)
  train_state = run.checkpointer.restore(step, program.abstract_state, program.meta)
  run.close()
  model, variables = inference.model_variables(train_state, options.model)
  variables = jax.device_get(variables)
  fn = serving_fn(model, tuple(config.data.mean), tuple(config.data.std), config.eval.flip)
  architecture = architecture_name(config, options.model)
  spec = input_spec(fn, variables, options.image_size, architecture, options.format)
  if config.eval.protocol != "whole":
    print(f"Note: config.eval.protocol={config.eval.protocol!r}: the export runs whole-image "
          "inference (its probabilities are --mode=predict's with --config.eval.protocol=whole)")
  meta = metadata(config, program.class_names, architecture, step)
  written = []
  write_folder(output, lambda folder: written.append(write_export(
      options.format, fn, variables, spec, folder, meta, architecture)))
  print(f"Exported {options.model} ({architecture}, checkpoint step {step}) as "
        f"{options.format} to {output}; input {written[0].describe()}", flush=True)
  return output


def architecture_name(config: ml_collections.ConfigDict, model: str) -> str:
  """The registry name of the model `model` (teacher_a, ...) of the config."""
  return config.model_b.name or config.model.name if model.endswith("_b") else config.model.name


def require_packages(fmt: str) -> None:
  """One line naming the extra when a module that format `fmt` needs is missing."""
  missing = [m for m in FORMATS[fmt][1] if importlib.util.find_spec(m) is None]
  if missing:
    raise UserError(f"config.export.format={fmt!r} needs {', '.join(missing)}, which is not "
                    f"installed; install the extra: {EXTRA}")


def check_output(output: str) -> None:
  """The output folder must be new or empty, in a writable folder."""
  if storage.is_remote(output):
    raise UserError(f"config.export.output: {output}: expected a local folder (export writes "
                    "it under a temporary name, then renames it)")
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise UserError(f"config.export.output: {output} exists and is not an empty folder; "
                    "expected a new folder")
  storage.ensure_writable_dir(os.path.dirname(output), "config.export.output", "the export")


def input_spec(fn: ServeFn, variables: Any, image_size: tuple[int, int] | None,
               architecture: str, fmt: str) -> InputSpec:
  """config.export.image_size as a fixed size, else the model's symbolic sizes; one line when
  the model or the format has none."""
  if image_size:
    return InputSpec.fixed(*image_size)
  if fmt in FIXED_SIZE_FORMATS:
    raise UserError(f"config.export.image_size: format={fmt!r} takes one fixed image size "
                    f"({FIXED_SIZE_FORMATS[fmt]}); set --config.export.image_size='(H, W)'")
  spec = symbolic_spec(fn, variables)
  if spec is None:
    raise UserError(f"config.export.image_size: {architecture} cannot take symbolic image "
                    "sizes (its shape logic, e.g. position embeddings resampled for the input "
                    "size, needs concrete ones); set one fixed size, "
                    "--config.export.image_size='(H, W)'")
  return spec


def write_export(fmt: str, fn: ServeFn, variables: Any, spec: InputSpec, folder: str,
                 meta: dict[str, Any], architecture: str) -> InputSpec:
  """The format's file and metadata.json into `folder`; returns the input spec written. A
  model the converter cannot express is one line naming it and the reason."""
  try:
    spec = WRITERS[fmt](fn, variables, spec, os.path.join(folder, FORMATS[fmt][0]))
  except Exception as e:  # the converters raise many kinds
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(f"config.export.format={fmt!r}: {architecture} cannot be exported "
                    f"({type(e).__name__}: {reason})") from e
  meta = meta | {"format": fmt, "file": FORMATS[fmt][0],
                 "input": meta["input"] | {"shape": spec.dims, "sizes": spec.describe(),
                                           "constraints": list(spec.constraints)}}
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json.dump(meta | ({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}), f, indent=1)
  return spec


def write_folder(output: str, write: Callable[[str], None]) -> None:
  """Runs write(folder) on a temporary folder beside `output`, then renames it to `output`;
  on any error the temporary folder is removed and `output` is left as it was."""
  parent, name = os.path.split(output.rstrip(os.sep))
  staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the export is not
  try:
    write(staging)
    if os.path.isdir(output):
      os.rmdir(output)  # empty (check_output)
    os.rename(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def metadata(config: ml_collections.ConfigDict, class_names: tuple[str, ...], architecture: str,
             step: int) -> dict[str, Any]:
  """What a user of the export needs besides the file (metadata.json; write_export adds the
  format and the image sizes)."""
  return {
      "model": config.export.model,
      "architecture": architecture,
      "step": int(step),
      "classes": list(class_names),
      "palette": visualize.palette(len(class_names))[:len(class_names)].tolist(),
      "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                "normalisation": "inside: (x / 255 - mean) / std", "mean": list(config.data.mean),
                "std": list(config.data.std)},
      "outputs": {"probabilities": "float32 [N, H, W, K], softmax over the classes",
                  "labels": "int32 [N, H, W], the argmax class"},
      "inference": "whole image" + (", averaged with its horizontal flip"
                                    if config.eval.flip else ""),
      "config": json.loads(config.to_json_best_effort()),
  }


# ---------------------------------------------------------------------------------------------
# python -m rml_jax.export: file size, load time and CPU latency of each format (docs/export.md)
# ---------------------------------------------------------------------------------------------


def load_runtime(fmt: str, path: str) -> Callable[[Any], dict[str, Any]]:
  """The export in folder `path` loaded by its own runtime (TF, onnxruntime, JAX): a function
  uint8 images [N, H, W, 3] (numpy) -> {'probabilities', 'labels'} (numpy)."""
  target = os.path.join(path, FORMATS[fmt][0])
  if fmt == "savedmodel":
    import tensorflow as tf

    serve = tf.saved_model.load(target).signatures["serving_default"]
    return lambda images: {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
  if fmt == "onnx":
    import onnxruntime

    session = onnxruntime.InferenceSession(target, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(None, {"images": images})))
  with open(target, "rb") as f:
    exported = jax_export.deserialize(f.read())
  return lambda images: jax.device_get(exported.call(images))


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def measure(architecture: str, fmt: str, height: int, width: int, num_classes: int,
            repeats: int, folder: str) -> dict[str, float]:
  """One model with random weights, exported as `fmt` into `folder` and run on one uint8
  [1, height, width, 3] image: {'mib', 'load_s', 'first_call_s', 'latency_s', 'jax_latency_s'}
  (jax: the same function jitted in this process, as --mode=predict runs it)."""
  model = models.build_model(ml_collections.ConfigDict({"name": architecture}), num_classes,
                             image_size=(height, width))
  images = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros(images.shape, jnp.float32))
  fn = serving_fn(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), flip=False)
  fixed = fmt in FIXED_SIZE_FORMATS or symbolic_spec(fn, variables) is None
  spec = InputSpec.fixed(height, width) if fixed else symbolic_spec(fn, variables)
  spec = WRITERS[fmt](fn, variables, spec, os.path.join(folder, FORMATS[fmt][0]))
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  start = time.perf_counter()
  run = load_runtime(fmt, folder)
  loaded = time.perf_counter() - start
  first_call = _median_seconds(lambda: run(images), 1)
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(variables, images))
  return {"mib": sum(os.path.getsize(f) for f in files) / 2**20, "load_s": loaded,
          "first_call_s": first_call, "latency_s": _median_seconds(lambda: run(images), repeats),
          "jax_latency_s": _median_seconds(
              lambda: jax.block_until_ready(jitted(variables, images)), repeats),
          "sizes": spec.describe()}


def main(argv: list[str]) -> None:
  """Prints docs/export.md's table: --models, --formats, --size=H,W, --classes, --repeats."""
  options = {"models": "deeplabv2_resnet101,dpt_dinov2_vits14",
             "formats": ",".join(FORMATS), "size": "256,512", "classes": "19", "repeats": "5"}
  for arg in argv[1:]:
    key, _, value = arg.removeprefix("--").partition("=")
    if key not in options:
      raise SystemExit(f"error: {arg}: expected --{'=..., --'.join(options)}=...")
    options[key] = value
  height, width = (int(s) for s in options["size"].split(","))
  print("| model | format | input sizes | size (MiB) | load (s) | first call (s) | latency (s) "
        "| JAX jit latency (s) |\n|---|---|---|---|---|---|---|---|")
  for architecture in options["models"].split(","):
    for fmt in options["formats"].split(","):
      with tempfile.TemporaryDirectory() as folder:
        try:
          r = measure(architecture, fmt, height, width, int(options["classes"]),
                      int(options["repeats"]), folder)
        except Exception as e:  # one row per failure; the table goes on
          print(f"| {architecture} | {fmt} | fails: {type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:200]} |", flush=True)
          continue
      print(f"| {architecture} | {fmt} | {r['sizes']} | {r['mib']:.1f} | {r['load_s']:.2f} | "
            f"{r['first_call_s']:.2f} | {r['latency_s']:.3f} | {r['jax_latency_s']:.3f} |",
            flush=True)


if __name__ == "__main__":
  main(sys.argv)
