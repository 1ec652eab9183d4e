"""Benchmark of a config's train step on the current devices:

  python -m rml_jax.bench --config=configs/digits.py [--steps=30] [--json=bench.json]

Prints compile time, step time (median over --steps after --warmup), images/s, FLOPs per step
(XLA cost analysis of the lowered step, the same count on every backend) and achieved FLOP/s,
the device's measured peak (a large matmul and a large convolution timed in the same run) and
the ratio, peak memory where the device reports it, and the input pipeline's images/s on its own.
Writes the same as JSON. Random weights, synthetic batches of the config's shapes (the input
pipeline is timed separately on the real data).

  python -m rml_jax.bench --config=configs/city.py --topology=v5e:2x4 [--num_slices=2]

compiles the train step, the eval step and the eq. 10 prototype pass for a Cloud TPU slice
instead, with no TPU here (rml_jax/tpu_compile.py), and reports what each needs per chip.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from rml_jax import (
  compilation_cache,
  config_args,
  datasets,
  inference,
  input_pipeline,
  sharding,
  step,
  storage,
  tpu_compile,
)
from rml_jax import compiled as compiled_lib
from rml_jax.constants import IGNORE_LABEL
from rml_jax.errors import run_program
from rml_jax.models.resnet import accumulates_in_float32
from rml_jax.program import Program
from rml_jax.step import MODES

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=False)
  flags.DEFINE_integer("steps", 30, "Timed steps (0: compile, FLOPs and memory only).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_integer("input_batches", 50, "Batches drawn to time the input pipeline.")
  flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
  flags.DEFINE_bool("pieces", False, "Also time the step's parts alone: both teachers' forward "
                    "passes, one student's forward and forward+backward, one update + EMA.")
  flags.DEFINE_string("compilation_cache", "", "Persistent XLA compilation cache directory "
                      "(default off, so compile times are of a fresh compilation).")
  flags.DEFINE_string("topology", "", "Compile for this Cloud TPU slice instead of running: a "
                      "topology (v5e:2x4, v4:2x2x2) or accelerator type (v5litepod-8, v4-8).")
  flags.DEFINE_integer("num_slices", 1, "With --topology: that many slices (multi-slice).")
  flags.DEFINE_list("programs", ["train", "eval", "prototypes"], "With --topology: the programs "
                    "to compile (train, eval, prototypes).")
  flags.mark_flags_as_required(["config"])


def synthetic_batch(config, rng: np.random.Generator) -> dict:
  """A batch of the config's shapes and dtypes (tpu_compile.train_batch_shapes): random
  images, labels 0 / 1 on the labeled images, every unlabeled pixel valid and unlabeled."""

  def fill(path, shape):
    key = path[-1].key
    if key == "valid":
      return np.ones(shape.shape, bool)
    if key == "label":
      values = rng.integers(0, 2, shape.shape) if path[0].key == "labeled" else IGNORE_LABEL
      return np.full(shape.shape, values, np.int32)
    return rng.integers(0, 256, shape.shape, dtype=np.uint8)

  return jax.tree_util.tree_map_with_path(fill, tpu_compile.train_batch_shapes(config))


def _timed(fn, *args, repeats: int = 5) -> float:
  """Median seconds of fn(*args) (blocking on the result) over `repeats` calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measured_peak(dtype: str = "float32") -> dict[str, float]:
  """FLOP/s of a large matmul and a large 3x3 convolution on the default device.

  The matmul is the one the models' 1x1 convolutions run: in bfloat16 on the CPU, bfloat16
  operands with a float32 result (`resnet.accumulates_in_float32`), which uses the CPU's
  bfloat16 matrix units where it has them.
  """
  on_cpu = jax.devices()[0].platform == "cpu"
  n = 1024 if on_cpu else 8192
  a = jnp.ones((n, n), dtype)
  result = jnp.float32 if accumulates_in_float32(jnp.dtype(dtype)) else None
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=result))
  matmul_s = _timed(matmul, a, a)
  batch, size, channels = (8, 56, 128) if on_cpu else (64, 56, 256)
  x = jnp.ones((batch, size, size, channels), dtype)
  kernel = jnp.ones((3, 3, channels, channels), dtype)
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  conv_s = _timed(conv, x, kernel)
  conv_flops = 2 * batch * size * size * channels * channels * 9
  return {"matmul_flops_per_s": 2 * n**3 / matmul_s, "conv_flops_per_s": conv_flops / conv_s}


def _progress(message: str) -> None:
  """One line as each phase ends: a run stopped by a time limit still shows how far it got."""
  print(f"[bench] {message}", flush=True)


def time_pieces(program, train_state, batch: dict, repeats: int = 5) -> dict[str, float]:
  """Median seconds of the train step's own functions (step.py), each jitted alone, to see where
  a step's time goes (learner a stands for both students):
    pseudo_labels: step.unlabeled_targets, both sources' pseudo labels and CutMix (absent when
      supervised);
    student_forward: step.student_logits and the student's loss;
    student_forward_backward: step.student_gradients of that loss;
    update: step.apply_update, one optimizer step and EMA teacher update of learner a.
  """
  cfg = program.step_config
  mode = cfg.mode
  learner, model, tx = train_state.learner_a, train_state.model_a, train_state.tx
  now = train_state.step
  rng = jax.random.key(0)
  labeled = inference.normalize(batch["labeled"]["image"], cfg.mean, cfg.std)
  labels = batch["labeled"]["label"]
  pieces = {}

  @jax.jit
  def targets(state, unlabeled):
    _, views, student_targets, _ = step.unlabeled_targets(state, unlabeled, rng, now, cfg,
                                                          labeled)
    inputs = ((labeled, views[0]) if cfg.rml.bn_stats == "labeled"
              else jnp.concatenate([labeled, views[0]], axis=0))
    return inputs, student_targets[0]  # student a's

  if mode.unlabeled:
    pieces["pseudo_labels"] = _timed(targets, train_state, batch["unlabeled"], repeats=repeats)
    inputs, target = targets(train_state, batch["unlabeled"])
  else:
    inputs, target = labeled, ()
  weight = cfg.unsup_weight_at(now)
  loss_fn = step.student_loss_fn(labels, target, weight)

  @jax.jit
  def forward(student, inputs):
    logits, _ = step.student_logits(model, student.params, student.batch_stats, inputs, rng)
    return loss_fn(logits)[0]

  @jax.jit
  def gradients(student, inputs):
    return step.student_gradients(student, model, inputs, rng, loss_fn, cfg)

  @jax.jit
  def update(student, loss, batch_stats, grads):
    return step.apply_update(student, tx, loss, batch_stats, grads,
                             step.ema_decay_at(now, cfg.rml.ema_decay))

  pieces["student_forward"] = _timed(forward, learner, inputs, repeats=repeats)
  pieces["student_forward_backward"] = _timed(gradients, learner, inputs, repeats=repeats)
  loss, batch_stats, _, grads = gradients(learner, inputs)
  pieces["update"] = _timed(update, learner, loss, batch_stats, grads, repeats=repeats)
  return pieces


def benchmark(config, steps: int, warmup: int, input_batches: int, pieces: bool = False
              ) -> dict:
  program = Program.create(config)
  train_fn = program.train_fn
  start = time.perf_counter()
  train_state = program.fresh_state(jax.random.key(0))
  jax.block_until_ready(train_state)
  init_s = time.perf_counter() - start  # the jitted initialisation, compilation included
  _progress(f"state initialised in {init_s:.1f} s; compiling the train step")
  batch = sharding.to_global(synthetic_batch(config, np.random.default_rng(0)), program.mesh)

  start = time.perf_counter()
  lowered = train_fn.lower(train_state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  _progress(f"train step compiled in {compile_s:.1f} s" + (
      f"; timing {warmup} + {steps} steps" if steps > 0 else ""))
  flop_notes: list[str] = []
  cpu_lowering = None
  if jax.default_backend() != "cpu":  # the device-independent count, if this backend has none
    cpu_lowering = lambda: train_fn.trace(train_state, batch).lower(  # noqa: E731
        lowering_platforms=("cpu",))
  flops = flops_per_call(lowered, compiled, flop_notes, cpu_lowering)

  compiled_memory = compiled_lib.compiled_memory_bytes(compiled)

  step_s = None  # steps = 0: compile, FLOPs and memory only
  if steps > 0:
    for _ in range(warmup):
      train_state, metrics = compiled(train_state, batch)
      jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      begin = time.perf_counter()
      train_state, metrics = compiled(train_state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - begin)
    step_s = statistics.median(times)
  with_unlabeled = MODES[config.rml.mode].unlabeled
  images = config.labeled_batch_size + (config.unlabeled_batch_size if with_unlabeled else 0)

  memory = None
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    memory = stats["peak_bytes_in_use"]

  input_images_per_s = None
  if input_batches > 0:
    sources = datasets.data_sources(config.data)
    labeled, unlabeled = datasets.split(config.data, sources)
    iterator = input_pipeline.train_iterator(config, sources.train, labeled, unlabeled,
                                             with_unlabeled)
    next(iterator)  # worker start-up is not throughput
    begin = time.perf_counter()
    for _ in range(input_batches):
      next(iterator)
    input_images_per_s = input_batches * images / (time.perf_counter() - begin)
    if hasattr(iterator, "close"):
      iterator.close()

  step_pieces = time_pieces(program, train_state, batch) if pieces else None
  peak = measured_peak(config.dtype)  # the step's compute dtype
  achieved = flops / step_s if step_s else None
  return {
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "config": {"model_a": config.model.name, "model_b": config.model_b.name or
                 config.model.name, "mode": config.rml.mode,
                 "crop_size": list(config.data.crop_size), "images_per_step": images},
      "init_s": init_s, "compile_s": compile_s, "step_s_median": step_s,
      "images_per_s": images / step_s if step_s else None,
      "flops_per_step": flops, "flops_source": "; ".join(flop_notes),
      "achieved_flops_per_s": achieved,
      "peak_matmul_flops_per_s": peak["matmul_flops_per_s"],
      "peak_conv_flops_per_s": peak["conv_flops_per_s"],
      "fraction_of_matmul_peak": achieved / peak["matmul_flops_per_s"] if achieved else None,
      "peak_memory_bytes": memory, "compiled_memory_bytes": compiled_memory,
      "input_pipeline_images_per_s": input_images_per_s, "pieces_s": step_pieces,
  }


def _flops(cost) -> float | None:
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = cost.get("flops") if cost else None
  return float(flops) if flops is not None and flops > 0 else None


def flops_per_call(lowered, compiled=None, notes: list[str] | None = None,
                   cpu_lowering=None) -> float:
  """FLOPs of one call: XLA's cost analysis of the lowered module, else of the same program
  lowered for the CPU (`cpu_lowering`: a function returning it, called only when needed), else of
  the compiled module. The compiled count depends on the backend: on GPU, convolutions become
  cuDNN custom calls that it does not count.
  `notes`, if given, receives which count was used and why the ones before it were not."""
  candidates = (("lowered", lambda: lowered), ("CPU-lowered", cpu_lowering),
                ("compiled", lambda: compiled))
  for source, get in candidates:
    if get is None:
      continue
    try:
      analysed = get()
      if analysed is None:
        continue
      flops = _flops(analysed.cost_analysis())
      reason = "no positive 'flops' entry"
    except Exception as e:  # noqa: BLE001 - some backends or versions have no cost analysis
      flops, reason = None, f"{type(e).__name__}: {str(e)[:200]}"
    if flops:
      if notes is not None:
        notes.append(f"FLOPs from the {source} module")
      return flops
    if notes is not None:
      notes.append(f"{source} cost analysis unusable ({reason})")
  return float("nan")


def format_report(result: dict) -> str:
  giga = lambda x: f"{x / 1e9:.2f} GFLOP/s"  # noqa: E731
  timed = result["step_s_median"] is not None
  lines = [
      f"device: {result['device']} x{result['num_devices']}; {result['config']}",
      f"state init: {result['init_s']:.1f} s; step compile: {result['compile_s']:.1f} s",
      (f"step: {result['step_s_median'] * 1e3:.1f} ms median -> "
       f"{result['images_per_s']:.1f} images/s") if timed else "step: not timed (--steps=0)",
      f"FLOPs per step: {result['flops_per_step'] / 1e9:.2f} GFLOP" + (
          f"; achieved {giga(result['achieved_flops_per_s'])}" if timed else "")
      + f" ({result.get('flops_source') or 'source unknown'})",
      f"measured peak: matmul {giga(result['peak_matmul_flops_per_s'])}, conv "
      f"{giga(result['peak_conv_flops_per_s'])}" + (
          f"; step / matmul peak = {result['fraction_of_matmul_peak']:.1%}" if timed else ""),
      "peak memory: " + (f"{result['peak_memory_bytes'] / 2**20:.0f} MiB"
                         if result["peak_memory_bytes"] else "not reported by this device"),
  ]
  memory = result.get("compiled_memory_bytes")
  if memory:
    lines.append("compiled step memory (XLA): " + ", ".join(
        f"{name} {memory[name] / 2**30:.2f} GiB"
        for name in ("argument", "output", "temp", "alias", "total")))
  if result["input_pipeline_images_per_s"] is not None:
    lines.append(f"input pipeline alone: {result['input_pipeline_images_per_s']:.0f} images/s")
  if result.get("pieces_s"):
    lines.append("pieces, each alone: " + ", ".join(
        f"{name} {seconds * 1e3:.1f} ms" for name, seconds in result["pieces_s"].items()))
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.topology:  # no local accelerator needed: the slice's devices come from libtpu
    jax.config.update("jax_platforms", "cpu")
  compilation_cache.enable(FLAGS.compilation_cache)
  if FLAGS.topology:
    result = tpu_compile.compile_for_slice(FLAGS.config, FLAGS.topology, FLAGS.num_slices,
                                           tuple(FLAGS.programs))
    print(tpu_compile.format_report(result), flush=True)
  else:
    result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.input_batches,
                       FLAGS.pieces)
    print(format_report(result), flush=True)
  if FLAGS.json:
    storage.write_text(storage.resolve(FLAGS.json), json.dumps(result, indent=1))


def run():
  define_flags()
  sys.argv = config_args.with_packaged_configs(sys.argv)
  run_program(main)


if __name__ == "__main__":
  run()
