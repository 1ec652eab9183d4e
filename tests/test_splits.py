"""Split files: community line formats, id lookup errors, and the shipped seeded splits."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from rml_jax.datasets import splits
from rml_jax.errors import UserError

SPLITS = splits.REPO_SPLITS


@pytest.mark.parametrize("line, expected", [
    ("aachen_000000_000019", "aachen_000000_000019"),
    ("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
     "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", "aachen_000000_000019"),
    ("train/aachen/aachen_000000_000019_leftImg8bit.png\ttrain/aachen/x.png",
     "aachen_000000_000019"),
    ("2007_000032", "2007_000032"),
    ("JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png", "2007_000032"),
])
def test_community_lines_reduce_to_ids(line, expected):
  assert splits.normalize_id(line) == expected


DOTTED = "2023_img-10.21op9-p-015t000"  # a timestamped id: its file is DOTTED + ".jpg"


@pytest.mark.parametrize("line, expected", [
    (DOTTED, DOTTED),  # the bare id keeps everything after its dots
    (f"{DOTTED}.jpg", DOTTED),  # the file name: the image extension comes off
    (f"{DOTTED}.JPEG", DOTTED),
    (f"images/{DOTTED}.tif labels/{DOTTED}.png", DOTTED),
    ("scan.v2.tif", "scan.v2.tif"),  # an exact id wins over the stripped name
    ("scan.v2", "scan.v2"),
    ("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", "aachen_000000_000019"),
    ("2023_img-10", None),  # what the old reading made of the dotted id
    (f"{DOTTED}.txt", None),  # not an image extension: nothing is taken off
])
def test_lines_resolve_against_the_dataset_ids(line, expected):
  known = {DOTTED, "scan.v2", "scan.v2.tif", "aachen_000000_000019", "2007_000032"}
  assert splits.resolve_id(line, known) == expected


def test_lines_without_the_dataset_ids_keep_dotted_ids_whole():
  assert splits.normalize_id(DOTTED) == DOTTED
  assert splits.normalize_id(f"JPEGImages/{DOTTED}.jpg x.png") == DOTTED


@pytest.mark.parametrize("extension", ["", ".jpg"])
def test_split_files_with_dotted_ids_with_or_without_extensions(tmp_path, extension):
  train_ids = [f"{DOTTED}{i}" for i in ("a", "b", "c")] + ["x.1", "x.2"]
  (tmp_path / "labeled.txt").write_text(f"{train_ids[2]}{extension}\n{train_ids[0]}{extension}\n")
  (tmp_path / "unlabeled.txt").write_text(f"x.1{extension}\nx.2{extension}\n")
  labeled, unlabeled = splits.indices_from_folder(str(tmp_path), train_ids, num_labeled=3)
  np.testing.assert_array_equal(labeled, [0, 2])
  np.testing.assert_array_equal(unlabeled, [3, 4])
  (tmp_path / "labeled.txt").write_text(f"{DOTTED}d{extension}\n")
  with pytest.raises(UserError, match=rf"1 of 1 ids .*\(first: '{DOTTED}d{extension}'\)"):
    splits.indices_from_folder(str(tmp_path), train_ids, num_labeled=3)


def test_indices_from_folder_and_one_line_errors(tmp_path):
  train_ids = ["a", "b", "c", "d", "u1", "u2"]  # the last two have no label
  (tmp_path / "labeled.txt").write_text("images/c.png labels/c.png\nimages/a.png x\n\n")
  labeled, unlabeled = splits.indices_from_folder(str(tmp_path), train_ids, num_labeled=4)
  np.testing.assert_array_equal(labeled, [0, 2])
  np.testing.assert_array_equal(unlabeled, [1, 3, 4, 5])
  (tmp_path / "unlabeled.txt").write_text("u1\nu2\nb\n")
  _, unlabeled = splits.indices_from_folder(str(tmp_path), train_ids, num_labeled=4)
  np.testing.assert_array_equal(unlabeled, [1, 4, 5])
  (tmp_path / "labeled.txt").write_text("a\nzz\nu1\n")
  with pytest.raises(UserError, match=r"labeled.txt: 2 of 3 ids are not a labeled train image "
                     r"of the dataset \(first: 'zz'\)"):
    splits.indices_from_folder(str(tmp_path), train_ids, num_labeled=4)
  (tmp_path / "labeled.txt").write_text("\n")
  with pytest.raises(UserError, match="lists no images"):
    splits.indices_from_folder(str(tmp_path), train_ids, num_labeled=4)


def test_unknown_split_name_lists_the_available_ones():
  config = ml_collections.ConfigDict(dict(name="cityscapes", split_dir=""))
  with pytest.raises(UserError, match=r"config.data.split='1_3': no .*labeled.txt; expected one "
                     r"of \['1_16', '1_2', '1_30', '1_4', '1_8'\]"):
    splits.split_folder(config, "1_3")


def test_make_split_is_seeded_and_disjoint():
  ids = [f"id{i:03d}" for i in range(50)]
  labeled, unlabeled = splits.make_split(ids, 7, seed=0)
  assert len(labeled) == 7 and sorted(labeled + unlabeled) == sorted(ids)
  assert splits.make_split(ids, 7, seed=0) == (labeled, unlabeled)
  assert splits.make_split(ids, 7, seed=1)[0] != labeled


@pytest.mark.parametrize("dataset, name, count, pool", [
    ("cityscapes", "1_30", 100, 2975), ("cityscapes", "1_8", 372, 2975),
    ("cityscapes", "1_4", 744, 2975), ("voc_aug", "1_100", 15, 1464),
    ("voc_aug", "1_50", 29, 1464), ("voc_aug", "1_20", 73, 1464), ("voc_aug", "1_8", 183, 1464),
    # UniMatch V2's sizes, for the DINOv2 configs
    ("cityscapes", "1_16", 186, 2975), ("cityscapes", "1_2", 1488, 2975),
    ("voc_aug", "1_16", 92, 1464), ("voc_aug", "1_4", 366, 1464), ("voc_aug", "1_2", 732, 1464),
    ("voc_aug", "1_1", 1464, 1464),
])
def test_shipped_splits_have_the_paper_sizes_and_come_from_the_script(dataset, name, count, pool):
  train_ids = splits.read_ids(os.path.join(SPLITS, dataset, "train_ids.txt"))
  labeled = splits.read_ids(os.path.join(SPLITS, dataset, name, "labeled.txt"))
  assert len(train_ids) == pool and len(labeled) == count
  assert set(labeled) <= set(train_ids)
  assert splits.make_split(train_ids, count, seed=0)[0] == labeled  # data/make_splits.py


def test_voc_lists_are_consistent():
  train = set(splits.read_ids(os.path.join(SPLITS, "voc_aug", "train_ids.txt")))
  train_aug = set(splits.read_ids(os.path.join(SPLITS, "voc_aug", "train_aug_ids.txt")))
  val = set(splits.read_ids(os.path.join(SPLITS, "voc_aug", "val_ids.txt")))
  assert (len(train_aug), len(val)) == (10582, 1449)
  assert train <= train_aug and not val & train_aug
