"""Model building blocks against their plain definitions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rml_jax import models
from rml_jax.models.resnet import Conv1x1, Conv3x3


def _full_conv(x, kernel, stride, dilation):
  """The definition: all nine taps, zero padding `dilation` on each side."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(dilation, dilation)] * 2,
                                      rhs_dilation=(dilation, dilation),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("dilation", [1, 4, 6, 9, 24])  # 5x9 map: skips rows from 5, cols from 9
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_that_skips_padding_taps_is_the_full_convolution(dilation, stride):
  rng = np.random.default_rng(dilation + 10 * stride)
  x = jnp.asarray(rng.normal(size=(2, 5, 9, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=_full_conv(x, kernel, stride, dilation).shape),
                          jnp.float32)
  module = Conv3x3(4, stride, dilation, use_bias=True)
  params = {"params": {"kernel": kernel, "bias": bias}}

  def ours(x, params):
    return jnp.sum(module.apply(params, x) * cotangent)

  def reference(x, params):
    p = params["params"]
    return jnp.sum((_full_conv(x, p["kernel"], stride, dilation) + p["bias"]) * cotangent)

  got, want = module.apply(params, x), _full_conv(x, kernel, stride, dilation) + bias
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got_grads, want_grads = jax.grad(ours, (0, 1))(x, params), jax.grad(reference, (0, 1))(x, params)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)  # skipped taps: exactly zero in both


def test_conv3x3_parameters_are_those_of_nn_conv():
  """Same names, shapes and initial values: checkpoints and weight import are unaffected."""
  x = jnp.zeros((1, 8, 8, 5))
  init = nn.initializers.normal(0.01)
  ours = Conv3x3(7, dilation=2, use_bias=True, kernel_init=init).init(jax.random.key(3), x)
  flax_conv = nn.Conv(7, (3, 3), padding=2, kernel_dilation=2, kernel_init=init).init(
      jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_conv)):
    np.testing.assert_array_equal(a, b)


def test_conv1x1_in_bfloat16_rounds_a_float32_sum_once():
  """bfloat16 inputs, products summed in float32, one rounding to bfloat16 (CPU path): over a
  4096-long sum the result stays within one bfloat16 step of the exact sum of the rounded inputs.
  Same parameters as the float32 module; the gradient matches float32's to bfloat16 precision."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 4096)), jnp.float32)
  module16, module32 = Conv1x1(16, dtype=jnp.bfloat16), Conv1x1(16)
  params = module32.init(jax.random.key(0), x)
  assert jax.tree.structure(module16.init(jax.random.key(0), x)) == jax.tree.structure(params)
  kernel = params["params"]["kernel_dense"]["kernel"]
  got = module16.apply(params, x)
  assert got.dtype == jnp.bfloat16
  if jax.default_backend() == "cpu":  # the fast CPU path: bfloat16 operands, a float32 result
    dots = [line for line in jax.jit(module16.apply).lower(params, x).as_text().splitlines()
            if "dot_general" in line]
    assert len(dots) == 1 and "bf16>) -> tensor<2x3x4x16xf32>" in dots[0], dots
  as64 = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
  exact = np.einsum("nhwc,cd->nhwd", as64(x), as64(kernel))
  step = np.abs(exact) * 2.0**-8 + 1e-30  # one bfloat16 rounding (8 significant bits)
  assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= step)
  cotangent = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
  loss = lambda module: lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) * cotangent)  # noqa: E731
  grad16, grad32 = jax.grad(loss(module16))(params), jax.grad(loss(module32))(params)
  g16, g32 = (g["params"]["kernel_dense"]["kernel"] for g in (grad16, grad32))
  assert g16.dtype == jnp.float32
  np.testing.assert_allclose(g16, g32, rtol=0, atol=2e-2 * float(jnp.max(jnp.abs(g32))))


@pytest.mark.parametrize("schedule", ["uniform", "linear"])
def test_stochastic_depth_schedule_reaches_every_block(monkeypatch, schedule):
  """Each residual block draws with its own survival probability: survival_prob everywhere
  (uniform), or 1 - l / L * (1 - survival_prob) for block l of L (linear), in the ResNet and in
  the ViTs of the students (SETR's and DINOv2's)."""
  import ml_collections

  from rml_jax.models import resnet, vit

  seen = []

  def recording_drop_path(x, survival_prob, deterministic, rng):
    seen.append(survival_prob)
    return x

  monkeypatch.setattr(resnet, "drop_path", recording_drop_path)
  monkeypatch.setattr(vit, "drop_path", recording_drop_path)
  for name, blocks in (("deeplabv2_tiny", 4), ("setr_naive_tiny", 4 * 2),  # ViT: 2 per block
                       ("dpt_dinov2_tiny", 4 * 2)):
    seen.clear()
    model = models.build_model(ml_collections.ConfigDict(dict(
        name=name, survival_prob=0.6, survival_schedule=schedule)), 3)
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    seen.clear()
    model.apply(variables, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)})
    depth = 4
    want = ([0.6] * depth if schedule == "uniform"
            else [1 - (i + 1) / depth * 0.4 for i in range(depth)])
    per_block = seen if blocks == depth else seen[::2]
    np.testing.assert_allclose(per_block, want, rtol=1e-12)
    if blocks != depth:  # the ViT block's two residual branches share the block's probability
      np.testing.assert_allclose(seen[1::2], want, rtol=1e-12)
