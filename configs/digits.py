"""The embedded default: indirect mutual learning on digit_scenes, minutes on a laptop CPU.

  python -m rml_jax.main --config=configs/digits.py --workdir=runs/digits
  python -m rml_jax.main --config=configs/digits.py:mode=supervised,seed=1 --workdir=runs/sup1

The arg string takes presets (`tiny`: a seconds-long smoke run) and key=value overrides
(`mode`, `seed`, `steps` or any dotted config path).
"""

import ml_collections

from rml_jax.config_args import apply_overrides


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"

  config.data = ml_collections.ConfigDict(dict(
      name="digit_scenes",
      data_dir="",  # "" = TFDS default (~/tensorflow_datasets)
      prepare=True,  # generate the dataset when it is not there yet (about 20 s)
      train_split="train",
      val_split="val",
      labeled_fraction=1 / 16,  # 256 labeled scenes, 3840 unlabeled
      split="",  # a folder of data/splits/digit_scenes/ ("" = a seeded labeled_fraction)
      split_seed=0,
      resize=None,  # (h, w) every train image is resized to first (None = as stored)
      crop_size=(64, 64),
      scale_range=(0.75, 1.5),
      flip=False,  # digits are not mirror-symmetric
      mean=(0.5, 0.5, 0.5),
      std=(0.25, 0.25, 0.25),
      worker_count=1,  # grain worker processes (0 = in the main process)
      prefetch=4,
  ))
  config.augment = ml_collections.ConfigDict(dict(
      num_ops=2,
      magnitude_range=(0.1, 0.9),
      ops=("brightness", "contrast", "color", "sharpness", "posterize", "solarize", "equalize",
           "autocontrast", "blur", "noise"),
      cutmix_prob=0.5,  # UniMatch: CutMix with p = 0.5, box area 2-40%
      cutmix_area=(0.02, 0.4),
  ))
  config.model = ml_collections.ConfigDict(dict(
      name="deeplabv2_tiny",
      dropout_rate=0.0,  # model noise, off for plain IML (paper: 0.5)
      survival_prob=1.0,  # stochastic depth, off for plain IML (paper: 0.8)
      frozen_bn=False,
      remat=False,  # recompute block activations in the backward pass: less memory, more FLOPs
      init_from="",  # a params file from `python -m rml_jax.convert` ("" = from scratch)
  ))
  # "" = the same architecture as config.model (and its init_from); a name makes the pair
  # heterogeneous (Table 5), e.g. model_b.name=setr_naive_tiny.
  config.model_b = ml_collections.ConfigDict(dict(name="", init_from=""))
  # The paper fine-tunes pretrained DeepLabv2 with SGD (lr 1e-4, poly); this tiny model learns
  # from scratch in minutes, which AdamW does far more reliably. The schedule stays poly.
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=0.003, momentum=0.9, weight_decay=1e-4, poly_power=0.9,
      warmup_steps=50))
  config.rml = ml_collections.ConfigDict(dict(
      mode="iml",  # supervised | mean_teacher | direct | iml | rml (the paper's ladder)
      # tau in eq. 2. On digit_scenes 0.8 beat 0.9 and 0.7 (iml, seed 0: 39.8 vs 38.6 and
      # 39.4 mean teacher mIoU); confident pixels at 0.9 are almost all background.
      threshold=0.8,
      unsup_weight=0.5,  # lambda on the two teachers' terms of eq. 5
      unsup_rampup_steps=0,  # > 0: sigmoid ramp-up of lambda over these steps (mean teacher)
      ema_decay=0.99,
      # labeled: running BN statistics from the labeled pass only (two passes per student);
      # joint: one pass over concat(labeled, strong). labeled gave +1.9 mIoU on digit_scenes.
      bn_stats="labeled",
      stages=1,  # > 1: stage-wise training (paper: 2); each stage runs total_steps
      stage_restart="init",  # at a new stage students restart from: init | continue
      soft_label_top_k=3,  # stored soft labels keep each pixel's k most likely classes
      # Self-rectification (rml mode, section 4.2). The paper's momentum 0.9999 suits 90k
      # steps; over this 2000-step schedule prototypes must follow the features faster.
      prototype_momentum=0.99,
      prototype_temperature=1.0,  # eq. 9: softmax(-distance / temperature)
      rectify_start_step=0,  # rectify once every class has a prototype and from this step on
  ))
  # Inference for eval, predict and stored soft labels: "whole" images (at eval.resize, None =
  # as stored) or "sliding" windows (eval.window, default the crop; stride a fraction of it).
  config.eval = ml_collections.ConfigDict(dict(
      protocol="whole", window=None, stride=2 / 3, flip=False, resize=None, pad_to=None))
  # --mode=predict: colour masks and overlays for a folder of images, from the latest checkpoint.
  config.predict = ml_collections.ConfigDict(dict(
      input="", output="", model="teacher_a", overlay_alpha=0.5))
  config.max_skipped_steps = 20  # stop when this many steps in a row are non-finite (0 = never)
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 8
  config.eval_batch_size = 64
  # From-scratch students need the longer schedule for the unlabeled data to pay off: iml led
  # supervised by 1.1 mIoU after 1000 steps and by 5.95 after 2000 (means of 2 seeds, README).
  config.total_steps = 2000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.max_steps_per_run = 0  # > 0: stop (with a checkpoint) after this many steps; rerun resumes
  config.num_image_summaries = 4
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  return apply_overrides(config, arg, presets=presets())


def presets() -> dict:
  """Arg presets: `tiny`."""
  return {"tiny": _tiny}


def _tiny(config: ml_collections.ConfigDict) -> None:
  """Seconds-long smoke run: a few steps, small batches, no worker processes."""
  config.total_steps = 4
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 2
  config.labeled_batch_size = 2
  config.unlabeled_batch_size = 2
  config.eval_batch_size = 128
  config.data.worker_count = 0
