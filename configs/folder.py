"""Any folder of images and label PNGs (rml_jax/datasets/image_folder.py), e.g. two-class
electron microscopy (the ISBI 2012 layout: `isbi` preset):

  python -m rml_jax.main --config=configs/folder.py:isbi,data.root=/data/isbi2012 \
      --workdir=runs/isbi

(add the `tiny` preset for a seconds-long smoke run). The `stanford` preset reads the Stanford
Background layout (images/, labels/, splits/train.txt and splits/val.txt; 8 classes), `facade`
the CMP Facade base set (the same layout, 12 classes).

Every data field, for your own folder (set them with --config.data.<field>=... or in a copy of
this file):

  root            the folder; the other paths are relative to it
  images_dir      labeled images (png, jpg, bmp, tif, webp); greyscale is converted to RGB
  labels_dir      one label image per image: the same file stem (+ label_suffix), one channel
  label_suffix    e.g. "_mask" when images/a.png goes with labels/a_mask.png
  unlabeled_dir   images without labels ("" = none); all of them join the unlabeled set
  val_images_dir, val_labels_dir
                  a separate labeled val set ("" = none: val_holdout labeled images are held out)
  val_holdout     how many labeled images become the val set when there is no val folder
  val_list, train_list
                  or: a text file of the images of images_dir that form the val set (file
                  names, with or without the extension), and optionally one of the images that
                  train ("" = all the others)
  class_names     one name per class; the number of classes is their count
  label_map       ((raw value, class id), ...); () = the raw values are the class ids
  ignore_value    the raw value that means "not labeled" (-1 = none); any value that is neither
                  mapped nor ignore stops preparation with the file named
  labeled_fraction / split
                  which labeled images train with labels: a seeded fraction, or a split folder
                  (split_dir/<split>/labeled.txt listing file stems)

The folder is checked and converted once into TFDS files under data_dir; editing the folder or
these fields prepares a new copy.
"""

import ml_collections

from configs import digits
from rml_jax.config_args import apply_overrides


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = digits.get_config()
  config.data.update(dict(  # the folder fields' defaults are configs/default.py's
      name="image_folder",
      labeled_fraction=1.0,
      crop_size=(128, 128),
      scale_range=(0.5, 1.0),
      flip=True,
  ))
  config.eval_batch_size = 4
  config.eval.update(dict(protocol="sliding", window=None, stride=2 / 3))
  return apply_overrides(config, arg, presets=presets())


def presets() -> dict:
  """Arg presets: `tiny`, `isbi`, `stanford` and `facade`."""
  return {"tiny": _tiny, "isbi": _isbi, "stanford": _stanford, "facade": _facade}


def _tiny(config: ml_collections.ConfigDict) -> None:
  """digits.py's seconds-long smoke run, with eval batches sized for big images."""
  digits.presets()["tiny"](config)
  config.eval_batch_size = 2


def _isbi(config: ml_collections.ConfigDict) -> None:
  """ISBI 2012 (train/image, train/label, unlabeled/): membrane 0 -> class 0, cell 255 -> 1."""
  config.data.images_dir = "train/image"
  config.data.labels_dir = "train/label"
  config.data.unlabeled_dir = "unlabeled"
  config.data.class_names = ("membrane", "cell")
  config.data.label_map = ((0, 0), (255, 1))
  config.data.ignore_value = -1
  config.data.val_holdout = 6


def _stanford(config: ml_collections.ConfigDict) -> None:
  """Stanford Background (Gould et al., ICCV 2009): 8 classes, label 15 = unknown; 1/8 of
  splits/train.txt labeled, the rest unlabeled, splits/val.txt the val set. Images (mostly
  320x240) are trained and evaluated at half size, 160x120, to fit the CPU."""
  config.data.update(dict(
      images_dir="images", labels_dir="labels", unlabeled_dir="",
      class_names=("sky", "tree", "road", "grass", "water", "building", "mountain",
                   "foreground"),
      label_map=(), ignore_value=15,
      train_list="splits/train.txt", val_list="splits/val.txt", labeled_fraction=1 / 8,
      resize=(120, 160), crop_size=(96, 96), scale_range=(0.75, 1.25),
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))  # ImageNet statistics
  config.eval.update(dict(protocol="whole", resize=(120, 160)))
  config.eval_batch_size = 16


def _facade(config: ml_collections.ConfigDict) -> None:
  """CMP Facade base (Tylecek and Sara, GCPR 2013): 12 classes, several thin or small (door,
  sill, blind, deco, pillar); 1/8 of splits/train.txt labeled, the rest unlabeled,
  splits/val.txt the val set. The rectified facades (about 271x512, portrait) are trained and
  evaluated at half size."""
  config.data.update(dict(
      images_dir="images", labels_dir="labels", unlabeled_dir="",
      class_names=("background", "facade", "window", "door", "cornice", "sill", "balcony",
                   "blind", "deco", "molding", "pillar", "shop"),
      label_map=(), ignore_value=-1,
      train_list="splits/train.txt", val_list="splits/val.txt", labeled_fraction=1 / 8,
      resize=(256, 136), crop_size=(96, 96), scale_range=(0.75, 1.25),
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))  # ImageNet statistics
  config.eval.update(dict(protocol="whole", resize=(256, 136)))
  config.eval_batch_size = 16
