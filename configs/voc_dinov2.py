"""PASCAL VOC 2012 with DINOv2 students: DINOv2-B/14 + DPT, UniMatch V2's protocol, in RML.

  python -m rml_jax.main --config=configs/voc_dinov2.py:366 --workdir=runs/voc_dinov2_366 \
      --config.data.manual_dir=/data/voc --config.model.init_from=weights/dinov2_b14.npz

The arg picks the labeled split by UniMatch V2's labeled counts of the 1464 VOC train images:
92, 183, 366, 732 or 1464 (data/splits/voc_aug/1_16, 1_8, 1_4, 1_2, 1_1); the other images of the
10582 train_aug set are unlabeled. Pair, mode, size and `cpu` presets as city_dinov2.py.

Settings from UniMatch V2 (configs/pascal.yaml, unimatch_v2.py), each recorded in
docs/fidelity.md: 518 x 518 crops after a random rescale in [0.5, 2.0] and a flip; 16 labeled +
16 unlabeled images per step (4 + 4 on each of 4 GPUs); 60 epochs of the unlabeled images;
the optimizer, threshold and teacher decay of city_dinov2.py; whole-image evaluation (here
zero-padded to 504 x 504, a multiple of 14, with the padding ignored).
"""

import ml_collections

from configs import city_dinov2, voc
from rml_jax.config_args import apply_overrides

# UniMatch V2's labeled count -> our split folder (seed-0 draws, data/make_splits.py).
SPLITS = {"92": "1_16", "183": "1_8", "366": "1_4", "732": "1_2", "1464": "1_1"}
TRAIN_AUG_IMAGES = 10582
EPOCHS = 60


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = city_dinov2.get_config()
  base = voc.get_config()
  config.data = base.data
  config.data.update(dict(resize=None, crop_size=(518, 518), scale_range=(0.5, 2.0),
                          worker_count=8))
  config.labeled_batch_size = 16
  config.optimizer.reference_batch_size = 16  # UniMatch V2: 4 per GPU on 4 GPUs
  config.unlabeled_batch_size = 16
  config.eval.update(dict(protocol="whole", resize=None, pad_to=(504, 504), window=None))
  config.eval_batch_size = 8
  _split(config, "366")
  return apply_overrides(config, city_dinov2.cpu_last(arg), presets=presets())


def _split(config: ml_collections.ConfigDict, count: str) -> None:
  config.data.split = SPLITS[count]
  config.total_steps = city_dinov2.steps_for(int(count), config.unlabeled_batch_size, EPOCHS,
                                             TRAIN_AUG_IMAGES)
  config.rml.rectify_start_step = config.total_steps // 10
  config.eval_every = max(config.total_steps // 20, 1)
  config.checkpoint_every = min(config.eval_every, 1_000)


def presets() -> dict:
  """Arg presets: the labeled counts, `deeplab`, `iml`, `small` / `large` and `cpu`."""
  out = {count: (lambda c, count=count: _split(c, count)) for count in SPLITS}
  shared = city_dinov2.presets()
  out.update({name: shared[name] for name in ("deeplab", "iml", "small", "large")})
  out["cpu"] = _cpu
  return out


def _cpu(config: ml_collections.ConfigDict) -> None:
  city_dinov2.presets()["cpu"](config)
  config.data.resize = None
  config.data.crop_size = (56, 56)
  config.eval.update(dict(resize=None, pad_to=(70, 70), window=None))
