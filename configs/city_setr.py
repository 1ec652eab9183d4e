"""Table 5: heterogeneous students on Cityscapes 1/8, DeepLabv2-ResNet101 and SETR (ViT).

  python -m rml_jax.main --config=configs/city_setr.py --workdir=runs/city_setr \
      --config.data.manual_dir=/data/cityscapes_zips \
      --config.model.init_from=weights/r101.npz --config.model_b.init_from=weights/vit_l16.npz

The paper studies this pair as plain IML (no model noise, no rectification). SETR-PUP on ViT-L/16
is the SETR paper's Cityscapes model; setr_naive_vit_b16 is a lighter choice (model_b.name=...).
The arg takes city.py's splits and overrides.
"""

import ml_collections

from configs import city
from rml_jax.config_args import apply_overrides


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = city.get_config("1_8")
  config.model.dropout_rate = 0.0  # Table 5: without noise injection ...
  config.model.survival_prob = 1.0
  config.model_b.name = "setr_pup_vit_l16"
  config.rml.mode = "iml"  # ... nor self-rectification
  config.rml.stages = 1
  return apply_overrides(config, arg, presets=presets())


def presets() -> dict:
  """Arg presets: city.py's (the split names, `full` and `cpu`)."""
  return city.presets()
