"""PASCAL VOC 2012 + SBD, the paper's protocol: DeepLabv2-ResNet101 students, RML, two stages.

  python -m rml_jax.main --config=configs/voc.py:1_8 --workdir=runs/voc_1_8 \
      --config.data.manual_dir=/data/voc --config.model.init_from=weights/r101.npz

The arg picks the labeled split (data/splits/voc_aug/<name>/labeled.txt): 1_100, 1_50, 1_20 or
1_8 of the 1464 VOC train images (15, 29, 73, 183 labeled); the other images of the 10582
train_aug set are unlabeled. config.data.manual_dir holds VOCdevkit/VOC2012 and either
SegmentationClassAug/ or SBD's benchmark_RELEASE/ (rml_jax/datasets/voc_aug).
"""

import ml_collections

from configs import city
from rml_jax.config_args import apply_overrides, split_presets

SPLITS = ("1_100", "1_50", "1_20", "1_8")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = city.get_config()
  config.data.update(dict(
      name="voc_aug",
      train_split="train_aug",
      val_split="val",
      split="1_8",
      resize=None,
      crop_size=(321, 321),  # paper: random scale 0.5-1.5, 321x321 crops
      scale_range=(0.5, 1.5),
  ))
  config.labeled_batch_size = 10  # paper: batch size 10
  config.optimizer.reference_batch_size = 10
  config.unlabeled_batch_size = 10
  config.total_steps = 60_000  # paper: 60k iterations per stage
  config.rml.rectify_start_step = 6_000  # 10% of the stage, as city.py (docs/fidelity.md)
  config.eval_batch_size = 8
  # VOC images differ in size (at most 500x500): padded to one shape, ignore in the padding, and
  # evaluated with sliding 321x321 windows (stride 2/3).
  config.eval.update(dict(protocol="sliding", resize=None, pad_to=(512, 512), window=None))
  return apply_overrides(config, arg, presets=presets())


def presets() -> dict:
  """Arg presets: the split names and `cpu`."""
  return {**split_presets(SPLITS), "cpu": _cpu}


def _cpu(config: ml_collections.ConfigDict) -> None:
  """A CPU-sized smoke run of the same pipeline."""
  city.presets()["cpu"](config)
  config.data.resize = None
  config.data.crop_size = (65, 65)
  config.eval.resize = None
