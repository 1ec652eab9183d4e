"""voc_aug: PASCAL VOC 2012 segmentation plus the SBD augmented set, from the user's folders.

config.data.manual_dir must hold

  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<id>.png           (palette PNGs, 255 = boundary/ignore)
  VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt, val.txt
and the augmented labels, either as
  SegmentationClassAug/<id>.png                           (the DeepLab release; also accepted
                                                           inside VOCdevkit/VOC2012/)
or as SBD itself
  benchmark_RELEASE/dataset/cls/<id>.mat, train.txt, val.txt

Splits: 'train_aug' = (VOC train + SBD train + SBD val) - VOC val, 10582 images with the full
data; 'val' = VOC val, 1449 images. A VOC id's label comes from SegmentationClass when it has one,
otherwise from the augmented labels. Each example: {'image_id': '2007_000032', 'image': JPEG as
shipped, 'label': [H, W, 1] uint8, 21 classes, 255 = ignore}.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from rml_jax.datasets import files
from rml_jax.errors import UserError

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC = os.path.join("VOCdevkit", "VOC2012")
SBD = os.path.join("benchmark_RELEASE", "dataset")
VOC_REQUIRED = (os.path.join(VOC, "JPEGImages"), os.path.join(VOC, "SegmentationClass"),
                os.path.join(VOC, "ImageSets", "Segmentation", "train.txt"),
                os.path.join(VOC, "ImageSets", "Segmentation", "val.txt"))
AUG_DIRS = ("SegmentationClassAug", os.path.join(VOC, "SegmentationClassAug"))
SBD_REQUIRED = (os.path.join(SBD, "cls"), os.path.join(SBD, "train.txt"),
                os.path.join(SBD, "val.txt"))


def expected_layout() -> str:
  return (f"{', '.join(VOC_REQUIRED)} and either SegmentationClassAug/ or "
          f"{', '.join(SBD_REQUIRED)}")


def _read_ids(path: str) -> list[str]:
  with open(path) as f:
    return [line.split()[0] for line in f if line.strip()]


class _Layout:
  """Where each id's image and label live in the user's folders."""

  def __init__(self, root: str):
    if not root or not os.path.isdir(root):
      raise UserError(f"config.data.manual_dir: {root or '(empty)'} is not a directory; "
                      f"expected {expected_layout()} under it")
    files.require_paths(root, VOC_REQUIRED, "config.data.manual_dir")
    self.root = root
    self.aug_dir = next((os.path.join(root, d) for d in AUG_DIRS
                         if os.path.isdir(os.path.join(root, d))), None)
    has_sbd = all(os.path.exists(os.path.join(root, p)) for p in SBD_REQUIRED)
    if self.aug_dir is None and not has_sbd:
      raise UserError(f"config.data.manual_dir: {root} has neither SegmentationClassAug/ nor "
                      f"{', '.join(SBD_REQUIRED)}; expected one of them for the 10582 train_aug "
                      "labels")
    segmentation_sets = os.path.join(root, VOC, "ImageSets", "Segmentation")
    self.voc_train = _read_ids(os.path.join(segmentation_sets, "train.txt"))
    self.val = _read_ids(os.path.join(segmentation_sets, "val.txt"))
    if self.aug_dir is not None:
      extra = sorted(os.path.splitext(n)[0] for n in os.listdir(self.aug_dir)
                     if n.endswith(".png"))
    else:
      extra = (_read_ids(os.path.join(root, SBD, "train.txt"))
               + _read_ids(os.path.join(root, SBD, "val.txt")))
    val = set(self.val)
    self.train_aug = sorted((set(self.voc_train) | set(extra)) - val)
    self.voc_labeled = {os.path.splitext(n)[0] for n in
                        os.listdir(os.path.join(root, VOC, "SegmentationClass"))}

  def image_path(self, image_id: str) -> str:
    return os.path.join(self.root, VOC, "JPEGImages", image_id + ".jpg")

  def label_path(self, image_id: str) -> str:
    if image_id in self.voc_labeled:
      return os.path.join(self.root, VOC, "SegmentationClass", image_id + ".png")
    if self.aug_dir is not None:
      return os.path.join(self.aug_dir, image_id + ".png")
    return os.path.join(self.root, SBD, "cls", image_id + ".mat")


def read_label(path: str) -> np.ndarray:
  """A VOC palette PNG, an augmented PNG or an SBD .mat -> [H, W] raw values."""
  if not os.path.exists(path):
    raise UserError(f"{path}: missing label file; expected it for this image id")
  if path.endswith(".mat"):
    import scipy.io

    try:
      mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
      return np.asarray(mat["GTcls"].Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
      raise UserError(f"{path}: unreadable SBD label ({type(e).__name__}: {e}); expected a "
                      ".mat with GTcls.Segmentation") from None
  return files.read_label_values(path)


class VocAug(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 + SBD: 21 classes, 255 = ignore (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place under config.data.manual_dir: {expected_layout()}."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        }),
        description=__doc__,
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    )

  def _split_generators(self, dl_manager):
    layout = _Layout(os.fspath(dl_manager.manual_dir))
    return {"train_aug": self._generate_examples(layout, layout.train_aug),
            "val": self._generate_examples(layout, layout.val)}

  def _generate_examples(self, layout: _Layout, image_ids: list[str]):
    for image_id in image_ids:
      image_path = layout.image_path(image_id)
      if not os.path.exists(image_path):
        raise UserError(f"{image_path}: missing image; expected JPEGImages/{image_id}.jpg for "
                        "every id of the split lists")
      label_path = layout.label_path(image_id)
      label = files.map_label_values(read_label(label_path), label_path, len(CLASS_NAMES))
      image = files.read_image(image_path)
      files.check_same_size(image, label, image_path, label_path)
      with Image.open(image_path) as raw:
        as_shipped = raw.format == "JPEG" and raw.mode == "RGB"
      yield image_id, {"image_id": image_id, "image": image_path if as_shipped else image,
                       "label": label[..., None]}
