"""Cityscapes, the paper's protocol (section 5): DeepLabv2-ResNet101 students, RML, two stages.

  python -m rml_jax.main --config=configs/city.py:1_30 --workdir=runs/city_1_30 \
      --config.data.manual_dir=/data/cityscapes_zips --config.model.init_from=weights/r101.npz

The arg picks the labeled split (data/splits/cityscapes/<name>/labeled.txt): 1_30 (100 labeled),
1_8 (372), 1_4 (744) or full (all 2975, supervised), plus key=value overrides as in digits.py.
config.data.manual_dir holds leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip; TFDS
prepares them once under config.data.data_dir. ImageNet weights come from
`python -m rml_jax.convert --arch=resnet101` (README).
"""

import ml_collections

from configs import default
from rml_jax.config_args import apply_overrides, split_presets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("1_30", "1_8", "1_4")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()  # the paper's method: RML, DeepLabv2-R101, SGD, two stages
  config.data.update(dict(
      name="cityscapes",
      val_split="validation",
      split="1_8",
      resize=(512, 1024),  # paper: images resized to 1024x512 ...
      crop_size=(256, 512),  # ... and randomly cropped to 512x256
      scale_range=(1.0, 1.0),
      flip=True,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      worker_count=8,
  ))
  # DeepLabv2 fine-tunes with frozen ImageNet batch-norm statistics; the ImageNet ResNet-101
  # comes from `python -m rml_jax.convert` (config.model.init_from).
  config.model.frozen_bn = True
  # The randomly initialised layers learn at 10x the pretrained backbone's rate, DeepLabv2's
  # fine-tuning protocol (its classifier; SETR's new decoder when it is model_b).
  config.optimizer.lr_multipliers = ((r"^(head|decode_conv\d*|decode_bn\d*|classifier)/", 10.0),)
  # Paper protocol: whole images at the training resolution (1024x512). For full resolution
  # sliding windows: eval.protocol=sliding, eval.resize=None (window = the crop, stride 2/3).
  config.eval.resize = (512, 1024)
  return apply_overrides(config, arg, presets=presets())


def presets() -> dict:
  """Arg presets: the split names, `full` and `cpu`."""
  return {**split_presets(SPLITS), "full": _full, "cpu": _cpu}


def _full(config: ml_collections.ConfigDict) -> None:
  """All 2975 train images labeled: the supervised upper bound of Table 1."""
  config.data.split = ""
  config.data.labeled_fraction = 1.0
  config.rml.mode = "supervised"
  config.rml.stages = 1


def _cpu(config: ml_collections.ConfigDict) -> None:
  """A CPU-sized smoke run of the same pipeline: tiny models, small crops, a few steps."""
  config.model.name = "deeplabv2_tiny"
  if config.model_b.name:
    config.model_b.name = "setr_naive_tiny"
  config.data.resize = (128, 256)
  config.data.crop_size = (64, 128)
  config.data.worker_count = 0
  config.labeled_batch_size = 2
  config.unlabeled_batch_size = 2
  config.eval_batch_size = 2
  config.total_steps = 4
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 2
  config.eval.resize = (128, 256)
  config.rml.stages = 1
  config.rml.rectify_start_step = 2  # within the 4 steps: the smoke run rectifies
