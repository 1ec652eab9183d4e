"""The benchmark script: consistent figures for the tiny config, JSON output."""

import json

from rml_jax import bench
from tests.conftest import tiny_config


def test_benchmark_figures_are_consistent(data_dir, tmp_path):
  config = tiny_config(data_dir)
  result = bench.benchmark(config, steps=3, warmup=1, input_batches=3, pieces=True)
  images = config.labeled_batch_size + config.unlabeled_batch_size
  assert result["config"]["images_per_step"] == images
  assert abs(result["images_per_s"] * result["step_s_median"] - images) < 1e-6
  assert result["flops_per_step"] > 1e6  # two students fwd+bwd and two teachers fwd
  assert abs(result["achieved_flops_per_s"] * result["step_s_median"]
             - result["flops_per_step"]) < 1e-3 * result["flops_per_step"]
  assert result["peak_matmul_flops_per_s"] > 1e8 and result["input_pipeline_images_per_s"] > 0
  memory = result["compiled_memory_bytes"]  # XLA's analysis of the compiled step
  assert memory["argument"] > 0 and memory["temp"] > 0
  assert memory["total"] == memory["argument"] + memory["output"] + memory["temp"] - \
      memory["alias"]
  pieces = result["pieces_s"]
  assert set(pieces) == {"pseudo_labels", "student_forward", "student_forward_backward",
                         "update"}
  # the backward pass adds at least the forward's work; every piece is a real, timed call
  assert pieces["student_forward_backward"] > pieces["student_forward"] > 0
  assert pieces["pseudo_labels"] > 0 and pieces["update"] > 0
  report = bench.format_report(result)
  assert "pieces, each alone: pseudo_labels" in report
  assert "compiled step memory" in report
  assert "images/s" in report and "GFLOP" in report
  path = tmp_path / "bench.json"
  path.write_text(json.dumps(result))
  assert json.loads(path.read_text())["compile_s"] == result["compile_s"]


def test_flops_count_convolutions_analytically():
  """The step's FLOPs come from the lowered module: a valid 3x3 convolution counts
  2*N*Ho*Wo*Cin*Cout*9 (on GPU the compiled module hides convolutions in cuDNN calls that XLA
  does not count)."""
  import jax
  import jax.numpy as jnp

  n, size, c_in, c_out = 2, 16, 8, 12
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  lowered = conv.lower(jnp.ones((n, size, size, c_in)), jnp.ones((3, 3, c_in, c_out)))
  expected = 2 * n * (size - 2) ** 2 * c_in * c_out * 9
  assert abs(bench.flops_per_call(lowered) - expected) <= 0.01 * expected


def test_flops_fall_back_to_the_compiled_module_and_say_why():
  class NoAnalysis:
    def cost_analysis(self):
      raise NotImplementedError("not on this backend")

  class Counted:
    def cost_analysis(self):
      return {"flops": 123.0}

  notes = []
  assert bench.flops_per_call(NoAnalysis(), Counted(), notes) == 123.0
  assert notes == ["lowered cost analysis unusable (NotImplementedError: not on this backend)",
                   "FLOPs from the compiled module"]
  notes = []
  assert bench.flops_per_call(Counted(), NoAnalysis(), notes) == 123.0
  assert notes == ["FLOPs from the lowered module"]


def test_flops_from_a_cpu_lowering_when_the_backend_gives_none():
  """The fallback a GPU run takes: the same program lowered for the CPU counts the
  convolution analytically."""
  import jax
  import jax.numpy as jnp

  class NoAnalysis:
    def cost_analysis(self):
      return {}

  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  args = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 12))
  notes = []
  flops = bench.flops_per_call(
      NoAnalysis(), NoAnalysis(), notes,
      cpu_lowering=lambda: conv.trace(*args).lower(lowering_platforms=("cpu",)))
  expected = 2 * 2 * 14 * 14 * 8 * 12 * 9
  assert abs(flops - expected) <= 0.01 * expected
  assert notes == ["lowered cost analysis unusable (no positive 'flops' entry)",
                   "FLOPs from the CPU-lowered module"]
