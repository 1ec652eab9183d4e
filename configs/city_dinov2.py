"""Cityscapes with DINOv2 students: DINOv2-B/14 + DPT, UniMatch V2's training protocol, in RML.

  python -m rml_jax.convert --arch=dinov2 --src=dinov2_vitb14_pretrain.pth \
      --out=weights/dinov2_b14.npz
  python -m rml_jax.main --config=configs/city_dinov2.py:1_8 --workdir=runs/city_dinov2_1_8 \
      --config.data.manual_dir=/data/cityscapes_zips \
      --config.model.init_from=weights/dinov2_b14.npz

The arg picks the labeled split, UniMatch V2's sizes (data/splits/cityscapes/<name>):
1_16 (186 labeled), 1_8 (372), 1_4 (744), 1_2 (1488); and the pair: by default two DINOv2
students, `deeplab` makes student b DeepLabv2-ResNet101 (the paper's Table 5 idea: a CNN and a
transformer; also pass --config.model_b.init_from=weights/r101.npz); `iml` switches off
rectification; `small` / `large` pick ViT-S/14 or ViT-L/14 for the DINOv2 students; `cpu` is a
CPU-sized smoke run of the same pipeline, applied after the other presets whatever their order.
Then key=value overrides as in digits.py (after every preset).

Settings from UniMatch V2 (LiheYoung/UniMatch-V2, configs/cityscapes.yaml and unimatch_v2.py),
each recorded in docs/fidelity.md: 798 x 798 crops of the full-resolution images after a random
rescale in [0.5, 2.0] and a flip; 8 labeled + 8 unlabeled images per step (2 + 2 on each of 4
GPUs); 180 epochs of the unlabeled images; AdamW (betas 0.9 / 0.999, weight decay 0.01 on every
parameter) at 5e-6 for the encoder and 40x for the decoder, poly decay 0.9; confidence
threshold 0.95; mean teachers with decay 0.996; sliding 798 x 798 windows with stride 2/3 at the
full 1024 x 2048 resolution for evaluation.
"""

import ml_collections

from configs import city
from rml_jax.config_args import apply_overrides

SPLITS = {"1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}  # UniMatch V2's labeled counts
TRAIN_IMAGES = 2975
EPOCHS = 180  # UniMatch V2: epochs over the unlabeled images
SIZES = {"small": "dpt_dinov2_vits14", "base": "dpt_dinov2_vitb14", "large": "dpt_dinov2_vitl14"}


def steps_for(num_labeled: int, batch_size: int, epochs: int, num_train: int) -> int:
  """UniMatch V2's schedule: `epochs` passes over the unlabeled images, drop_last batches."""
  return epochs * ((num_train - num_labeled) // batch_size)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = city.get_config("1_8")
  config.data.update(dict(resize=None, crop_size=(798, 798), scale_range=(0.5, 2.0)))
  config.model.update(dict(
      name=SIZES["base"], frozen_bn=True,  # frozen_bn reaches only a DeepLabv2 student b
      # The paper's model noise (section 4.1): dropout before the classifier, stochastic depth
      # falling linearly to 0.8 at the last block (docs/fidelity.md).
      dropout_rate=0.5, survival_prob=0.8, survival_schedule="linear"))
  config.optimizer.update(dict(
      name="adamw", learning_rate=5e-6, weight_decay=0.01, decay_all_params=True,
      poly_power=0.9, warmup_steps=0,
      # The decoders and heads at 40x the encoders' rate; a DeepLabv2 student b's ResNet
      # ('backbone/') learns at the base rate.
      lr_multipliers=(("^(decoder|classifier|head)/", 40.0),),
      reference_batch_size=8))  # UniMatch V2's rates are for 8 labeled images per step
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 8
  config.rml.update(dict(mode="rml", threshold=0.95, ema_decay=0.996, unsup_weight=1.0,
                         stages=1))
  config.eval.update(dict(protocol="sliding", resize=None, window=None, stride=2 / 3))
  config.eval_batch_size = 2  # full-resolution images, each 8 sliding windows
  _split(config, "1_8")
  return apply_overrides(config, cpu_last(arg), presets=presets())


def cpu_last(arg: str | None) -> str | None:
  """The arg with its presets first, `cpu` the last of them, then the key=value overrides: the
  CPU preset shrinks whatever split, size and pair the other presets chose."""
  if not arg:
    return arg
  items = [item for item in arg.split(",") if item]
  presets = [item for item in items if "=" not in item]
  overrides = [item for item in items if "=" in item]
  presets = [p for p in presets if p != "cpu"] + (["cpu"] if "cpu" in presets else [])
  return ",".join(presets + overrides)


def _split(config: ml_collections.ConfigDict, name: str) -> None:
  config.data.split = name
  config.total_steps = steps_for(SPLITS[name], config.unlabeled_batch_size, EPOCHS, TRAIN_IMAGES)
  config.rml.rectify_start_step = config.total_steps // 10  # as city.py: 10% of the stage
  config.eval_every = max(config.total_steps // 20, 1)
  config.checkpoint_every = min(config.eval_every, 1_000)


def presets() -> dict:
  """Arg presets: the split names, the pair (`deeplab`), `iml`, the encoder size and `cpu`."""
  out = {name: (lambda c, name=name: _split(c, name)) for name in SPLITS}
  out.update({"deeplab": _deeplab, "iml": _iml, "cpu": _cpu})
  out.update({size: (lambda c, size=size: _size(c, size)) for size in ("small", "large")})
  return out


def _deeplab(config: ml_collections.ConfigDict) -> None:
  """Student b: DeepLabv2-ResNet101 (ImageNet weights through config.model_b.init_from)."""
  config.model_b.name = "deeplabv2_resnet101"


def _iml(config: ml_collections.ConfigDict) -> None:
  config.rml.mode = "iml"


def _size(config: ml_collections.ConfigDict, size: str) -> None:
  config.model.name = SIZES[size]


def _cpu(config: ml_collections.ConfigDict) -> None:
  """A CPU-sized smoke run of the same pipeline: tiny students, 56 x 112 crops, a few steps."""
  city.presets()["cpu"](config)
  config.model.name = "dpt_dinov2_tiny"
  if config.model_b.name:
    config.model_b.name = "deeplabv2_tiny"
  config.data.crop_size = (56, 112)
  config.data.scale_range = (1.0, 1.0)
  config.eval.window = (56, 112)
  config.rml.rectify_start_step = 2
