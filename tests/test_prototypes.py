"""Self-rectification (eqs. 6, 9, 11) against straightforward numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rml_jax import prototypes


def _numpy_update(protos, features, labels, momentum):
  """Eq. 11 with explicit loops over classes."""
  out = protos.copy()
  flat_f = features.reshape(-1, features.shape[-1])
  flat_l = labels.reshape(-1)
  for k in range(protos.shape[0]):
    members = flat_f[flat_l == k]
    if len(members):
      out[k] = momentum * protos[k] + (1 - momentum) * members.mean(0)
  return out


def _numpy_confidence(features, protos, temperature):
  """Eq. 9 pixel by pixel."""
  n, h, w, _ = features.shape
  out = np.zeros((n, h, w, protos.shape[0]))
  for idx in np.ndindex(n, h, w):
    d = np.array([np.linalg.norm(features[idx] - p) for p in protos])
    e = np.exp(-(d - d.min()) / temperature)
    out[idx] = e / e.sum()
  return out


def test_update_prototypes_matches_numpy_with_absent_and_ignored_labels():
  rng = np.random.default_rng(0)
  k, c = 5, 7
  protos = rng.normal(size=(k, c)).astype(np.float32)
  features = rng.normal(size=(2, 4, 3, c)).astype(np.float32)
  labels = rng.choice([0, 1, 3, 255, -1], size=(2, 4, 3)).astype(np.int32)  # 2 and 4 absent
  got = np.asarray(prototypes.update_prototypes(jnp.asarray(protos), features, labels, 0.9))
  want = _numpy_update(protos, features, labels, 0.9)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[[2, 4]], protos[[2, 4]])  # absent classes keep old values
  assert not np.allclose(got[[0, 1, 3]], protos[[0, 1, 3]])


def test_update_prototypes_is_jittable_with_traced_momentum():
  rng = np.random.default_rng(1)
  protos = rng.normal(size=(3, 4)).astype(np.float32)
  features = rng.normal(size=(1, 2, 2, 4)).astype(np.float32)
  labels = np.array([[[0, 0], [2, 2]]], np.int32)
  got = jax.jit(prototypes.update_prototypes)(protos, features, labels, jnp.float32(0.5))
  np.testing.assert_allclose(got, _numpy_update(protos, features, labels, 0.5), rtol=1e-5)


def test_first_sighting_initialises_from_the_batch_mean():
  rng = np.random.default_rng(2)
  k, c = 4, 3
  protos = np.zeros((k, c), np.float32)
  seen = np.array([False, True, False, False])
  protos[1] = 5.0
  features = rng.normal(size=(1, 3, 3, c)).astype(np.float32)
  labels = np.array([[[0, 0, 1], [1, 1, 255], [0, 1, 0]]], np.int32)
  got = prototypes.update_prototypes(protos, features, labels, 0.99, seen=seen)
  got_seen = seen | np.asarray(prototypes.classes_present(labels, k))
  flat_f, flat_l = features.reshape(-1, c), labels.reshape(-1)
  np.testing.assert_allclose(got[0], flat_f[flat_l == 0].mean(0), rtol=1e-5)  # no momentum
  np.testing.assert_allclose(got[1], 0.99 * 5.0 + 0.01 * flat_f[flat_l == 1].mean(0), rtol=1e-5)
  np.testing.assert_array_equal(got[2:], 0.0)
  np.testing.assert_array_equal(got_seen, [True, True, False, False])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_class_confidence_matches_numpy(temperature):
  rng = np.random.default_rng(3)
  features = rng.normal(size=(2, 3, 2, 6)).astype(np.float32)
  protos = rng.normal(size=(4, 6)).astype(np.float32)
  got = np.asarray(prototypes.class_confidence(features, protos, temperature))
  want = _numpy_confidence(features, protos, temperature)
  assert got.shape == (2, 3, 2, 4)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_class_confidence_of_a_feature_on_a_prototype_peaks_there():
  protos = np.eye(3, dtype=np.float32) * 10
  features = protos[None, :, None, :]  # [1, 3, 1, 3]: each pixel sits on one prototype
  got = np.asarray(prototypes.class_confidence(features, protos))
  np.testing.assert_array_equal(got[0, :, 0].argmax(-1), [0, 1, 2])


def test_rectify_matches_numpy_including_ties():
  rng = np.random.default_rng(4)
  probs = rng.dirichlet(np.ones(5), size=(2, 3, 3)).astype(np.float32)
  confidence = rng.dirichlet(np.ones(5), size=(2, 3, 3)).astype(np.float32)
  probs[0, 0, 0] = [0.4, 0.4, 0.2, 0.0, 0.0]  # a tie: the first maximum wins, like np.argmax
  confidence[0, 0, 0] = [0.2] * 5
  labels, label_confidence = prototypes.rectify(probs, confidence)
  weighted = probs.astype(np.float64) * confidence
  np.testing.assert_array_equal(labels, weighted.argmax(-1))
  assert labels.dtype == jnp.int32 and int(labels[0, 0, 0]) == 0
  np.testing.assert_allclose(label_confidence, weighted.max(-1) / weighted.sum(-1), rtol=1e-5)


def test_rectification_can_overturn_the_teacher():
  probs = np.array([[[[0.6, 0.4]]]], np.float32)
  confidence = np.array([[[[0.1, 0.9]]]], np.float32)
  labels, label_confidence = prototypes.rectify(probs, confidence)
  assert int(labels[0, 0, 0]) == 1
  np.testing.assert_allclose(float(label_confidence[0, 0, 0]), 0.36 / 0.42, rtol=1e-5)


def test_resize_to_area_averages_when_shrinking():
  maps = np.zeros((1, 4, 4, 2), np.float32)
  maps[0, :2, :2, 0] = 1.0
  small = np.asarray(prototypes.resize_to(maps, 2, 2))
  np.testing.assert_allclose(small[0, :, :, 0], [[1, 0], [0, 0]], atol=1e-6)
