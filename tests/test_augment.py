"""CutMix and host augmentations against direct references."""

import jax
import jax.numpy as jnp
import numpy as np

from rml_jax import augment


def test_cutmix_mixes_images_labels_and_masks_with_one_box():
  rng = np.random.default_rng(0)
  n, h, w = 4, 12, 10
  images = rng.uniform(size=(n, h, w, 3)).astype(np.float32)
  labels = rng.integers(0, 5, (n, h, w)).astype(np.int32)
  valid = rng.uniform(size=(n, h, w)) < 0.5
  box = np.asarray(augment.cutmix_box_masks(jax.random.key(3), n, h, w, prob=1.0))
  assert box.any(axis=(1, 2)).all() and not box.all(axis=(1, 2)).any()
  got = augment.cutmix(jnp.asarray(box), jnp.asarray(images), jnp.asarray(labels),
                       jnp.asarray(valid))
  for i in range(n):
    partner = (i + 1) % n
    for y in range(h):
      for x in range(w):
        source = partner if box[i, y, x] else i
        np.testing.assert_array_equal(got[0][i, y, x], images[source, y, x])
        assert got[1][i, y, x] == labels[source, y, x]
        assert got[2][i, y, x] == valid[source, y, x]


def test_cutmix_boxes_are_rectangles_within_the_area_range():
  n, h, w = 64, 32, 48
  box = np.asarray(augment.cutmix_box_masks(jax.random.key(0), n, h, w, prob=1.0,
                                            area_range=(0.1, 0.3)))
  for mask in box:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a filled box
    assert 0.1 * h * w * 0.6 <= mask.sum() <= 0.3 * h * w * 1.4  # area, up to pixel rounding
  none = augment.cutmix_box_masks(jax.random.key(0), n, h, w, prob=0.0)
  assert not np.asarray(none).any()


def test_weak_geometry_keeps_labels_aligned_with_pixels():
  # An image whose red channel is its label: after crop / flip / nearest scale they must agree.
  rng = np.random.default_rng(0)
  label = np.kron(rng.integers(0, 6, (8, 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
  image = np.stack([label * 40, label * 0, label * 0], -1).astype(np.uint8)
  for seed in range(5):
    out_image, maps = augment.weak_geometry(
        np.random.default_rng(seed), image, {"label": label}, (40, 40), (1.0, 1.0), True,
        {"label": 255})
    np.testing.assert_array_equal(out_image[..., 0], maps["label"] * 40)
  out_image, maps = augment.weak_geometry(
      np.random.default_rng(1), image, {"label": label}, (80, 80), (0.5, 0.5), False,
      {"label": 255})
  assert out_image.shape == (80, 80, 3) and maps["label"].shape == (80, 80)
  assert (maps["label"][32:, :] == 255).all() and (maps["label"][:, 32:] == 255).all()


def test_rand_augment_is_photometric_and_deterministic():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
  inverted = augment.rand_augment(np.random.default_rng(0), image, 1, (0.5, 0.5), ("invert",))
  np.testing.assert_array_equal(inverted, 255 - image)
  ops = tuple(augment.PHOTOMETRIC_OPS)
  first = augment.rand_augment(np.random.default_rng(5), image, 3, (0.1, 0.9), ops)
  again = augment.rand_augment(np.random.default_rng(5), image, 3, (0.1, 0.9), ops)
  np.testing.assert_array_equal(first, again)
  for name in ops:  # every op keeps shape and dtype
    out = augment.rand_augment(np.random.default_rng(1), image, 1, (0.9, 0.9), (name,))
    assert out.shape == image.shape and out.dtype == np.uint8


def test_weak_geometry_moves_multichannel_maps_like_single_channel_ones():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
  stacked = rng.integers(0, 11, (20, 30, 4), dtype=np.uint8)  # e.g. stored top-k classes
  maps = {"stacked": stacked, **{f"c{c}": stacked[..., c] for c in range(4)}}
  pads = {"stacked": 7, **{f"c{c}": 7 for c in range(4)}}
  for seed in range(5):  # scales below 1 pad, above 1 crop
    _, out = augment.weak_geometry(np.random.default_rng(seed), image, maps, (24, 24),
                                   (0.5, 1.5), True, pads)
    assert out["stacked"].shape == (24, 24, 4)
    for c in range(4):
      np.testing.assert_array_equal(out["stacked"][..., c], out[f"c{c}"])
