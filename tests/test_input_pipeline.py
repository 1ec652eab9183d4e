"""The grain train stream: determinism, resumable position, weak/strong pairs."""

import numpy as np
import pytest

from rml_jax import datasets, input_pipeline
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def train_source(data_dir):
  config = tiny_config(data_dir)
  return datasets.data_sources(config.data).train


def _iterator(config, source):
  labeled, unlabeled = datasets.labeled_indices(len(source), config.data.labeled_fraction,
                                                config.data.split_seed)
  return input_pipeline.train_iterator(config, source, labeled, unlabeled, True)


def _equal(a, b):
  return all(np.array_equal(a[g][k], b[g][k]) for g in a for k in a[g])


def test_same_seed_same_batches_and_other_seed_other_batches(data_dir, train_source):
  config = tiny_config(data_dir)
  first = [next(_iterator(config, train_source)) for _ in range(1)][0]
  again = next(_iterator(config, train_source))
  assert _equal(first, again)
  other = next(_iterator(tiny_config(data_dir, "seed=7"), train_source))
  assert not _equal(first, other)


def test_batch_layout(data_dir, train_source):
  config = tiny_config(data_dir)
  batch = next(_iterator(config, train_source))
  assert batch["labeled"]["image"].shape == (2, 64, 64, 3)
  assert batch["labeled"]["image"].dtype == np.uint8
  assert batch["labeled"]["label"].dtype == np.int32
  assert batch["unlabeled"]["weak"].shape == (2, 64, 64, 3)
  assert batch["unlabeled"]["strong"].shape == (2, 2, 64, 64, 3)  # digits: one view per student
  labels = batch["labeled"]["label"]
  assert set(np.unique(labels)) <= set(range(11)) | {255}


def test_iterator_state_restores_the_following_batches(data_dir, train_source):
  config = tiny_config(data_dir, "workers=1")
  iterator = _iterator(config, train_source)
  for _ in range(3):
    next(iterator)
  saved = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  resumed = _iterator(config, train_source)
  resumed.set_state(saved)
  for want in expected:
    assert _equal(want, next(resumed))


def test_strong_view_shares_the_weak_geometry(data_dir, train_source):
  # With `invert` as the only strong op, strong must be exactly 255 - weak, pixel for pixel.
  config = tiny_config(data_dir, "augment.num_ops=1")
  config.augment.ops = ("invert",)
  batch = next(_iterator(config, train_source))["unlabeled"]
  np.testing.assert_array_equal(batch["strong"][:, 0], 255 - batch["weak"])
  # Hidden ground truth follows the same geometry: padding is invalid and ignored.
  assert (batch["label"][~batch["valid"]] == 255).all()


def test_labeled_split_is_seeded_and_disjoint():
  labeled, unlabeled = datasets.labeled_indices(2048, 1 / 16, 0)
  assert len(labeled) == 128 and len(unlabeled) == 1920
  assert not set(labeled) & set(unlabeled)
  np.testing.assert_array_equal(labeled, datasets.labeled_indices(2048, 1 / 16, 0)[0])
  assert not np.array_equal(labeled, datasets.labeled_indices(2048, 1 / 16, 1)[0])


def test_stored_soft_labels_follow_their_unlabeled_image(data_dir, train_source, tmp_path):
  from rml_jax import soft_labels

  config = tiny_config(data_dir, "augment.num_ops=0")
  config.data.scale_range = (1.0, 1.0)  # no resampling: stored labels stay checkable
  labeled, unlabeled = datasets.labeled_indices(len(train_source), config.data.labeled_fraction,
                                                config.data.split_seed)
  unlabeled = unlabeled[:6]

  def teachers(images):  # classes from pixel values: checkable after the pipeline
    x = images.astype(np.float32)
    scores = np.stack([x[..., 0], x[..., 1], x[..., 2], 255 - x[..., 0]], -1)
    probs = np.exp(scores / 40) / np.exp(scores / 40).sum(-1, keepdims=True)
    return {"teacher_a": probs, "teacher_b": probs[..., ::-1]}

  def batches(start):
    for i in range(start, len(unlabeled), 4):
      images = np.stack([np.asarray(train_source[int(j)]["image"]) for j in unlabeled[i:i + 4]])
      yield {"image": images}

  directory = str(tmp_path / "stage_1")
  assert soft_labels.generate(directory, batches, teachers, len(unlabeled), (64, 64), 2)
  iterator = input_pipeline.train_iterator(config, train_source, labeled, unlabeled, True,
                                           stored_labels=directory)
  for _ in range(3):
    batch = next(iterator)["unlabeled"]
    assert batch["soft_classes"].shape == (2, 64, 64, 4)  # 2 teachers x top 2
    expected = teachers(batch["weak"])
    np.testing.assert_array_equal(batch["soft_classes"][..., 0],
                                  expected["teacher_a"].argmax(-1))
    np.testing.assert_array_equal(batch["soft_classes"][..., 2],
                                  expected["teacher_b"].argmax(-1))


def test_per_student_strong_views_are_independent_draws_on_one_geometry(data_dir, train_source):
  config = tiny_config(data_dir, "augment.strong_views=per_student")
  batch = next(_iterator(config, train_source))["unlabeled"]
  assert batch["strong"].shape == (2, 2, 64, 64, 3)
  assert not np.array_equal(batch["strong"][:, 0], batch["strong"][:, 1])
  # A deterministic op shows that both views keep the weak view's geometry.
  config.augment.num_ops, config.augment.ops = 1, ("invert",)
  batch = next(_iterator(config, train_source))["unlabeled"]
  for view in range(2):
    np.testing.assert_array_equal(batch["strong"][:, view], 255 - batch["weak"])
