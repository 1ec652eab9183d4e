"""Datasets built from tiny replicas written here (the real layouts and file names), read through
the same TFDS -> grain path as training; bad input stops with one line and nothing prepared."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from configs import city, folder, voc
from rml_jax import datasets, input_pipeline
from rml_jax.datasets import cityscapes, voc_aug
from rml_jax.errors import UserError

ISBI = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "shared", "data", "isbi2012")


def _png(path: str, array: np.ndarray, palette: bool = False) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array)
  if palette:
    image = image.convert("P")
    image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    image.frombytes(array.tobytes())
  image.save(path)


def _prepared_dirs(data_dir: str) -> list[str]:
  return [root for root, _, names in os.walk(data_dir) if "dataset_info.json" in names]


# ---------------------------------------------------------------------------------------------
# image_folder
# ---------------------------------------------------------------------------------------------


def _folder_replica(root: str) -> dict:
  """images/ a, b (RGB, greyscale), labels/ raw values {0, 255} plus 128 = ignore, unlabeled/ c."""
  rng = np.random.default_rng(0)
  raws = {}
  for stem, shape, grey in (("a", (40, 48), False), ("b", (36, 30), True)):
    image = rng.integers(0, 256, shape + (() if grey else (3,)), dtype=np.uint8)
    _png(os.path.join(root, "images", f"{stem}.png"), image)
    raw = rng.choice(np.array([0, 255, 128], np.uint8), shape)
    _png(os.path.join(root, "labels", f"{stem}.png"), raw)
    raws[stem] = raw
  os.makedirs(os.path.join(root, "unlabeled"))
  Image.fromarray(rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)).save(
      os.path.join(root, "unlabeled", "c.jpg"), quality=90)
  _png(os.path.join(root, "val", "images", "v.png"),
       rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  _png(os.path.join(root, "val", "labels", "v_mask.png"), np.full((40, 48), 255, np.uint8))
  return raws


def _folder_config(root: str, data_dir: str, arg: str = ""):
  config = folder.get_config("tiny" + ("," + arg if arg else ""))
  config.data.update(dict(root=root, data_dir=data_dir, class_names=("dark", "bright"),
                          label_map=((0, 0), (255, 1)), ignore_value=128))
  return config


def test_image_folder_maps_labels_keeps_sizes_and_appends_unlabeled(tmp_path):
  raws = _folder_replica(str(tmp_path / "folder"))
  config = _folder_config(str(tmp_path / "folder"), str(tmp_path / "tfds"))
  with pytest.raises(UserError, match="has no val folder; expected val_images_dir"):
    datasets.data_sources(config.data)
  # A separate val folder whose labels carry a suffix; all 255 = bright.
  config = _folder_config(str(tmp_path / "folder"), str(tmp_path / "tfds"),
                          "data.val_images_dir=val/images,data.val_labels_dir=val/labels")
  config.data.label_suffix = "_mask"
  for stem in raws:  # the labeled images' labels get the suffix too
    os.rename(tmp_path / "folder" / "labels" / f"{stem}.png",
              tmp_path / "folder" / "labels" / f"{stem}_mask.png")
  sources = datasets.data_sources(config.data)
  assert datasets.class_names(config.data) == ("dark", "bright")
  assert (len(sources.train), sources.num_labeled, len(sources.val)) == (3, 2, 1)
  assert sources.val[0]["image_id"] == "v" and (sources.val[0]["label"] == 1).all()
  by_id = {sources.train[i]["image_id"]: sources.train[i] for i in range(len(sources.train))}
  for stem, raw in raws.items():
    example = by_id[stem]
    assert example["image"].shape == raw.shape + (3,) and example["image"].dtype == np.uint8
    expected = np.select([raw == 0, raw == 255], [0, 1], 255)
    np.testing.assert_array_equal(example["label"][..., 0], expected)
  unlabeled = by_id["c"]
  assert unlabeled["image"].shape == (50, 44, 3) and (unlabeled["label"] == 255).all()
  # The unlabeled image comes after the labeled ones: never drawn as labeled.
  assert sorted(sources.read_train_ids()[:2]) == ["a", "b"]
  labeled, unlabeled_idx = datasets.split(config.data, sources)
  np.testing.assert_array_equal(labeled, [0, 1])
  np.testing.assert_array_equal(unlabeled_idx, [2])
  # Through the train pipeline: fixed crops, labels only {0, 1, 255}.
  batch = next(input_pipeline.train_iterator(config, sources.train, labeled, unlabeled_idx, True))
  assert batch["labeled"]["image"].shape == (2, 128, 128, 3)
  assert set(np.unique(batch["labeled"]["label"])) <= {0, 1, 255}
  assert batch["unlabeled"]["strong"].shape == (2, 2, 128, 128, 3)  # one view per student
  # Eval batches of mixed sizes share one padded shape, padding ignored.
  eval_batch = next(input_pipeline.eval_batches(config, sources.train, labeled,
                                                pad_to=(40, 48)))
  assert eval_batch["image"].shape == (2, 40, 48, 3)
  ids = sources.read_train_ids()
  b_row = ids.index("b")
  assert (eval_batch["label"][b_row, 36:] == 255).all() and \
      (eval_batch["label"][b_row, :, 30:] == 255).all()
  with pytest.raises(UserError, match="different sizes"):
    next(input_pipeline.eval_batches(config, sources.train, labeled))


def test_image_folder_val_holdout(tmp_path):
  _folder_replica(str(tmp_path / "folder"))
  config = _folder_config(str(tmp_path / "folder"), str(tmp_path / "tfds"), "data.val_holdout=1")
  sources = datasets.data_sources(config.data)
  assert (len(sources.train), sources.num_labeled, len(sources.val)) == (2, 1, 1)
  ids = sources.read_train_ids()
  assert ids[1] == "c" and ids[0] in ("a", "b") and sources.val[0]["image_id"] != ids[0]


def _write_list(path, ids) -> None:
  with open(path, "w") as f:
    f.write("".join(f"{i}\n" for i in ids))


def test_image_folder_val_list_and_train_list(tmp_path):
  """The Stanford Background layout: list files pick the val images and the train images
  among the labeled ones; the unlabeled folder still joins train after the labeled."""
  root = tmp_path / "folder"
  _folder_replica(str(root))
  _write_list(root / "val.txt", ["b"])
  config = _folder_config(str(root), str(tmp_path / "tfds"), "data.val_list=val.txt")
  sources = datasets.data_sources(config.data)
  assert (len(sources.train), sources.num_labeled, len(sources.val)) == (2, 1, 1)
  assert sources.read_train_ids() == ["a", "c"]
  assert sources.val[0]["image_id"] == "b"
  _write_list(root / "train.txt", ["b"])  # overlaps val
  config.data.train_list = "train.txt"
  with pytest.raises(UserError, match=r"config.data.train_list: image id 'b' is also in "):
    datasets.data_sources(config.data)
  _write_list(root / "train.txt", ["a"])
  _write_list(root / "val.txt", [])
  with pytest.raises(UserError, match=r"config.data.val_list: .*val.txt lists no image ids"):
    datasets.data_sources(config.data)


def test_image_folder_lists_name_dotted_ids_with_or_without_the_extension(tmp_path):
  """Files named with dots (`..._img-10.21op9-p-015t000.jpg`): val_list and train_list name them
  by id or by file name, and the whole id resolves either way."""
  root = tmp_path / "folder"
  rng = np.random.default_rng(0)
  stems = [f"2023_img-10.21op9-p-015t00{i}" for i in range(3)]
  for stem in stems:
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
        _path(root / "images", f"{stem}.jpg"), quality=90)
    _png(str(root / "labels" / f"{stem}.png"), rng.choice(np.array([0, 255], np.uint8), (20, 24)))
  for val_extension, train_extension in (("", ".jpg"), (".jpg", ""), (".JPG", ".jpg")):
    _write_list(root / "val.txt", [stems[1] + val_extension])
    _write_list(root / "train.txt", [stems[2] + train_extension])
    config = _folder_config(str(root), str(tmp_path / "tfds"), "data.val_list=val.txt,"
                            "data.train_list=train.txt,data.unlabeled_dir=")
    sources = datasets.data_sources(config.data)
    assert sources.val[0]["image_id"] == stems[1]
    assert sources.read_train_ids() == [stems[2]]
  _write_list(root / "val.txt", ["2023_img-10"])  # what the old reading made of the id
  with pytest.raises(UserError, match=r"config.data.val_list: image id '2023_img-10' \(1 of 1 "):
    datasets.data_sources(config.data)


def _path(directory, name: str) -> str:
  os.makedirs(directory, exist_ok=True)
  return os.path.join(directory, name)


@pytest.mark.parametrize("listed, message", [
    (["b", "zz"], r"config.data.val_list: image id 'zz' \(1 of 2 listed\) is not among the "
                  r"labeled images of config.data.images_dir"),
    (None, r"config.data.val_list: cannot read .*missing.txt \(FileNotFoundError\)"),
])
def test_image_folder_bad_val_list_is_one_line(tmp_path, listed, message):
  root = tmp_path / "folder"
  _folder_replica(str(root))
  name = "missing.txt"
  if listed is not None:
    name = "val.txt"
    _write_list(root / name, listed)
  config = _folder_config(str(root), str(tmp_path / "tfds"), f"data.val_list={name}")
  with pytest.raises(UserError, match=message) as error:
    datasets.data_sources(config.data)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage, message", [
    ("label_value", r"labels/b\.png: label values 7 are neither a class nor ignore"),
    ("unreadable", r"images/b\.png: unreadable image"),
    ("size", r"labels/b\.png: label is 31x36 but its image .*images/b\.png is 30x36"),
    ("missing_label", r"images/b\.png: no label b\.png"),
])
def test_image_folder_bad_input_is_one_line_and_prepares_nothing(tmp_path, damage, message):
  root = str(tmp_path / "folder")
  raws = _folder_replica(root)
  label_b = os.path.join(root, "labels", "b.png")
  if damage == "label_value":
    raw = raws["b"].copy()
    raw[3, 4] = 7
    _png(label_b, raw)
  elif damage == "unreadable":
    with open(os.path.join(root, "images", "b.png"), "wb") as f:
      f.write(b"not a png at all")
  elif damage == "size":
    _png(label_b, np.zeros((36, 31), np.uint8))
  else:
    os.remove(label_b)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(UserError, match=message) as error:
    datasets.data_sources(_folder_config(root, data_dir).data)
  assert "\n" not in str(error.value)
  assert _prepared_dirs(data_dir) == []


def test_image_folder_missing_root_names_the_key(tmp_path):
  config = _folder_config(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
  with pytest.raises(UserError, match=r"config.data.root: .*nowhere is not a directory"):
    datasets.data_sources(config.data)
  config.data.root = ""  # the folder presets leave it to the user
  with pytest.raises(UserError, match=r"^config.data.root: \(empty\) is not a directory"):
    datasets.data_sources(config.data)


def test_a_bad_data_folder_stops_training_before_the_workdir_is_written(tmp_path):
  from rml_jax import train

  config = _folder_config(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=r"config.data.root: .*nowhere is not a directory"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # no empty checkpoints/ folder that a rerun would resume from


@pytest.mark.skipif(not os.path.isdir(ISBI), reason="../shared/data/isbi2012 is not here")
def test_isbi2012_folder_two_classes(tmp_path):
  config = folder.get_config(f"isbi,tiny,data.root={ISBI}")
  config.data.data_dir = str(tmp_path / "tfds")
  sources = datasets.data_sources(config.data)
  assert (len(sources.train), sources.num_labeled, len(sources.val)) == (54, 24, 6)
  example = sources.val[0]
  assert example["image"].shape == (512, 512, 3)
  values, counts = np.unique(example["label"], return_counts=True)
  assert set(values) == {0, 1}  # membrane, cell; no ignore in ISBI
  assert 0.5 < counts[1] / counts.sum() < 0.95  # cell interiors dominate
  raw = np.asarray(Image.open(os.path.join(ISBI, "train", "label",
                                           f"{example['image_id']}.png")))
  np.testing.assert_array_equal(example["label"][..., 0], (raw == 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Cityscapes (TFDS's builder over zips with the real layout)
# ---------------------------------------------------------------------------------------------

CITY_IDS = {"train": ["aachen_000000_000019", "bochum_000000_000313"],
            "val": ["frankfurt_000000_000294"], "test": ["berlin_000000_000019"]}


def _png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def _city_label_ids(index: int) -> np.ndarray:
  """[1024, 2048] label ids: bands of road (7), car (26), sky (23), unlabeled (0), ego (1)."""
  ids = np.full((1024, 2048), 7, np.uint8)
  ids[:200] = 23
  ids[300:400, 100 + index * 10:900] = 26
  ids[900:] = 1
  ids[:, :16] = 0
  return ids


def _cityscapes_zips(manual_dir: str) -> None:
  os.makedirs(manual_dir)
  image = np.zeros((1024, 2048, 3), np.uint8)
  with zipfile.ZipFile(os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip"), "w") as images, \
      zipfile.ZipFile(os.path.join(manual_dir, "gtFine_trainvaltest.zip"), "w") as labels:
    index = 0
    for split, ids in CITY_IDS.items():
      for image_id in ids:
        town = image_id.split("_")[0]
        image[..., 0] = index * 40
        images.writestr(f"leftImg8bit/{split}/{town}/{image_id}_leftImg8bit.png",
                        _png_bytes(image))
        stem = f"gtFine/{split}/{town}/{image_id}_gtFine"
        labels.writestr(f"{stem}_labelIds.png", _png_bytes(_city_label_ids(index)))
        labels.writestr(f"{stem}_instanceIds.png", _png_bytes(_city_label_ids(index)))
        labels.writestr(f"{stem}_polygons.json", "{}")
        index += 1
    images.writestr("license.txt", "replica")


def test_cityscapes_zips_to_train_ids_through_the_pipeline(tmp_path):
  manual_dir = str(tmp_path / "zips")
  _cityscapes_zips(manual_dir)
  config = city.get_config("cpu,1_30")
  config.data.update(dict(data_dir=str(tmp_path / "tfds"), manual_dir=manual_dir))
  sources = datasets.data_sources(config.data)
  assert (len(sources.train), len(sources.val)) == (2, 1)
  assert datasets.class_names(config.data)[13] == "car"
  example = sources.val[0]
  assert example["image_id"] == "frankfurt_000000_000294"
  assert example["image"].shape == (1024, 2048, 3)
  expected = cityscapes.TRAIN_ID_TABLE[_city_label_ids(2)]
  np.testing.assert_array_equal(example["label"], expected)
  assert set(np.unique(example["label"])) == {0, 10, 13, 255}  # road, sky, car, ignore
  # A split file in the community's format selects by id.
  split_dir = tmp_path / "splits" / "mine"
  split_dir.mkdir(parents=True)
  (split_dir / "labeled.txt").write_text(
      "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png "
      "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png\n")
  config.data.update(dict(split_dir=str(tmp_path / "splits"), split="mine"))
  labeled, unlabeled = datasets.split(config.data, sources, cache_dir=str(tmp_path / "work"))
  ids = sources.read_train_ids()
  assert [ids[i] for i in labeled] == ["bochum_000000_000313"]
  assert [ids[i] for i in unlabeled] == ["aachen_000000_000019"]
  assert os.path.isfile(tmp_path / "work" / "train_image_ids.txt")
  # Resized to the paper's 1024x512, cropped to 512x256 (here the cpu preset's sizes).
  batch = next(input_pipeline.train_iterator(config, sources.train, labeled, unlabeled, True))
  assert batch["labeled"]["image"].shape == (2, 64, 128, 3)
  eval_batch = next(input_pipeline.eval_batches(config, sources.val, resize=(128, 256)))
  assert eval_batch["image"].shape == (2, 128, 256, 3)
  assert (eval_batch["label"][0, :, :2] == 255).all()  # id 0 -> ignore at the left edge


def test_cityscapes_missing_zips_lists_them(tmp_path):
  (tmp_path / "zips").mkdir()
  (tmp_path / "zips" / "gtFine_trainvaltest.zip").write_bytes(b"")
  config = city.get_config("cpu")
  config.data.update(dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "zips")))
  with pytest.raises(UserError, match=r"config.data.manual_dir: .*zips is missing "
                     r"leftImg8bit_trainvaltest.zip; expected"):
    datasets.data_sources(config.data)
  assert _prepared_dirs(str(tmp_path / "tfds")) == []


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD
# ---------------------------------------------------------------------------------------------

VOC_TRAIN, VOC_VAL, SBD_ONLY = ["2007_000032", "2008_000002"], ["2007_000033"], ["2009_000001"]


def _voc_label(index: int, shape) -> np.ndarray:
  label = np.zeros(shape, np.uint8)
  label[4:12, 5:15] = 1 + index  # a class-(1 + index) object
  label[3, 4:16] = 255  # VOC's boundary band
  return label


def _voc_replica(root: str, aug: str = "sbd") -> dict:
  import scipy.io

  rng = np.random.default_rng(0)
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  labels = {}
  for index, image_id in enumerate(VOC_TRAIN + VOC_VAL + SBD_ONLY):
    shape = (20 + index, 24)
    os.makedirs(os.path.join(voc, "JPEGImages"), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(
        os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), quality=95)
    label = _voc_label(index, shape)
    if image_id in SBD_ONLY:
      label[label == 255] = 0  # SBD has no boundary band
      if aug == "sbd":
        cls = os.path.join(root, "benchmark_RELEASE", "dataset", "cls")
        os.makedirs(cls, exist_ok=True)
        scipy.io.savemat(os.path.join(cls, f"{image_id}.mat"),
                         {"GTcls": {"Segmentation": label, "Boundaries": np.zeros(1)}})
      else:
        _png(os.path.join(root, "SegmentationClassAug", f"{image_id}.png"), label)
    else:
      _png(os.path.join(voc, "SegmentationClass", f"{image_id}.png"), label, palette=True)
    labels[image_id] = label
  sets = os.path.join(voc, "ImageSets", "Segmentation")
  os.makedirs(sets)
  (open(os.path.join(sets, "train.txt"), "w")).write("\n".join(VOC_TRAIN) + "\n")
  (open(os.path.join(sets, "val.txt"), "w")).write("\n".join(VOC_VAL) + "\n")
  if aug == "sbd":
    sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
    open(os.path.join(sbd, "train.txt"), "w").write(SBD_ONLY[0] + "\n" + VOC_VAL[0] + "\n")
    open(os.path.join(sbd, "val.txt"), "w").write(VOC_TRAIN[0] + "\n")
  return labels


@pytest.mark.parametrize("aug", ["sbd", "segmentation_class_aug"])
def test_voc_aug_train_aug_and_val_with_labels_from_voc_and_sbd(tmp_path, aug):
  labels = _voc_replica(str(tmp_path / "voc"), aug)
  config = voc.get_config("cpu,1_8")
  config.data.update(dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "voc")))
  sources = datasets.data_sources(config.data)
  ids = sources.read_train_ids()
  assert sorted(ids) == sorted(VOC_TRAIN + SBD_ONLY)  # train_aug: VOC val left out
  assert [sources.val[i]["image_id"] for i in range(len(sources.val))] == VOC_VAL
  assert len(datasets.class_names(config.data)) == 21
  for i, image_id in enumerate(ids):
    example = sources.train[i]
    np.testing.assert_array_equal(example["label"][..., 0], labels[image_id])
    assert example["image"].shape == labels[image_id].shape + (3,)
  # Split lists select VOC train ids; the rest of train_aug is unlabeled.
  split_dir = tmp_path / "splits" / "one"
  split_dir.mkdir(parents=True)
  (split_dir / "labeled.txt").write_text(f"JPEGImages/{VOC_TRAIN[1]}.jpg "
                                         f"SegmentationClassAug/{VOC_TRAIN[1]}.png\n")
  config.data.update(dict(split_dir=str(tmp_path / "splits"), split="one"))
  labeled, unlabeled = datasets.split(config.data, sources)
  assert [ids[i] for i in labeled] == [VOC_TRAIN[1]]
  assert sorted(ids[i] for i in unlabeled) == sorted([VOC_TRAIN[0]] + SBD_ONLY)
  batch = next(input_pipeline.train_iterator(config, sources.train, labeled, unlabeled, True))
  assert batch["labeled"]["image"].shape == (2, 65, 65, 3)


def test_voc_aug_bad_label_value_names_the_file(tmp_path):
  _voc_replica(str(tmp_path / "voc"))
  bad = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{VOC_VAL[0]}.png"
  label = _voc_label(2, (22, 24))
  label[0, 0] = 30
  _png(str(bad), label, palette=True)
  config = voc.get_config("cpu")
  config.data.update(dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "voc")))
  with pytest.raises(UserError, match=rf"{VOC_VAL[0]}\.png: label values 30 are neither"):
    datasets.data_sources(config.data)
  assert _prepared_dirs(str(tmp_path / "tfds")) == []


def test_voc_aug_incomplete_manual_dir_lists_what_is_expected(tmp_path):
  (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
  config = voc.get_config("cpu")
  config.data.update(dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "voc")))
  with pytest.raises(UserError, match=r"config.data.manual_dir: .*voc is missing "
                     r"VOCdevkit/VOC2012/SegmentationClass, .*train.txt"):
    datasets.data_sources(config.data)
  config.data.manual_dir = ""
  with pytest.raises(UserError, match=r"config.data.manual_dir: \(empty\)"):
    datasets.data_sources(config.data)
  assert voc_aug.expected_layout().startswith("VOCdevkit/VOC2012/JPEGImages")
