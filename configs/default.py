"""The config schema: every key a run reads, with the paper's method settings as values.

Every other config imports this one and overrides what differs (dataset, model size, schedule).
`rml_jax.schema.validate` checks every value before anything runs. Where the paper (section 5)
states a setting the value here is the paper's; docs/fidelity.md lists the rest and their sources.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # initialisation, dropout, CutMix and data order
  config.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and losses stay float32)

  config.data = ml_collections.ConfigDict(dict(
      name="digit_scenes",  # digit_scenes | cityscapes | voc_aug | image_folder
      data_dir="",  # where TFDS keeps the prepared dataset ("" = ~/tensorflow_datasets)
      prepare=True,  # prepare the dataset when it is not there yet
      manual_dir="",  # the downloaded files of a dataset that needs them (cityscapes, voc_aug)
      train_split="train",
      val_split="val",
      labeled_fraction=1 / 16,  # without data.split: a seeded share of the images is labeled
      split="",  # a split folder of data/splits/<dataset>/ (or data.split_dir); "" = the fraction
      split_seed=0,  # draws the labeled fraction and the val holdout
      split_dir="",  # another folder of split folders ("" = data/splits/<dataset>)
      resize=None,  # (h, w) every train image is resized to first (None = as stored)
      crop_size=(64, 64),  # (h, w) of the random training crops
      scale_range=(0.75, 1.5),  # random rescale before the crop
      flip=False,  # random horizontal flip
      mean=(0.5, 0.5, 0.5),  # input standardisation, on [0, 1] pixel values
      std=(0.25, 0.25, 0.25),
      worker_count=1,  # grain worker processes (0 = in the main process)
      prefetch=4,  # batches each worker prepares ahead
      # image_folder only (configs/folder.py documents each):
      root="",
      images_dir="images",
      labels_dir="labels",
      label_suffix="",
      unlabeled_dir="unlabeled",
      val_images_dir="",
      val_labels_dir="",
      val_holdout=0,  # labeled images held out as the val set (0 = none)
      val_list="",  # a file of image ids (stems) of images_dir that form the val set ("" = none)
      train_list="",  # with val_list: a file of the ids that train ("" = all not in val_list)
      class_names=("background", "foreground"),
      label_map=((0, 0), (255, 1)),  # ((raw value, class id), ...); () = raw values are ids
      ignore_value=-1,  # the raw label value meaning "not labeled" (-1 = none)
  ))
  config.augment = ml_collections.ConfigDict(dict(
      num_ops=2,  # RandAugment photometric ops per strong view (paper: RandAugment)
      magnitude_range=(0.1, 0.9),  # each op's magnitude is drawn from this range
      ops=("brightness", "contrast", "color", "sharpness", "posterize", "solarize", "equalize",
           "autocontrast", "blur", "noise"),
      # per_student: each student its own strong view (RandAugment draw) and CutMix box, so
      # input noise keeps the two learners apart (paper section 4.1); shared: one for both.
      strong_views="per_student",
      cutmix_prob=0.5,  # paper: CutMix; probability and box area as UniMatch
      cutmix_area=(0.02, 0.4),  # box area range, a fraction of the crop
  ))
  config.model = ml_collections.ConfigDict(dict(
      name="deeplabv2_resnet101",  # paper: DeepLabv2-ResNet101 (rml_jax.models.MODELS)
      dropout_rate=0.5,  # paper: dropout 0.5 before the classifier
      survival_prob=0.8,  # paper: stochastic depth, "layer-wise survival probability 0.8"
      # uniform: every block survives with survival_prob; linear: stochastic depth's own rule,
      # survival falls linearly with depth to survival_prob at the last block (docs/fidelity.md).
      survival_schedule="linear",
      frozen_bn=False,  # batch norm of the pretrained backbone uses its stored statistics
      train_bn_affine=False,  # with frozen_bn: its scales and biases still train (DeepLab: no)
      remat=False,  # recompute block activations in the backward pass: less memory, more FLOPs
      init_from="",  # a params file from `python -m rml_jax.convert` ("" = from scratch)
      activation="relu",  # relu | gelu, the CNN blocks' and decoders' nonlinearity
  ))
  # "" = the same architecture as config.model (and its init_from); a name makes the pair
  # heterogeneous (paper Table 5), e.g. model_b.name=setr_naive_tiny.
  config.model_b = ml_collections.ConfigDict(dict(name="", init_from=""))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd",  # sgd | adamw (paper: SGD)
      learning_rate=1e-4,  # paper: 1e-4 with polynomial decay
      momentum=0.9,  # sgd only
      weight_decay=5e-4,
      decay_all_params=False,  # False: kernels only (no decay on biases, norms, embeddings)
      # Per-group learning rates: (regex, multiplier) pairs matched against each parameter's
      # path ('decoder/refinenet1/out_conv/kernel'); the first match wins, the rest get 1x.
      lr_multipliers=(),
      poly_power=0.9,  # lr * (1 - t / total_steps) ** poly_power
      warmup_steps=0,  # linear warm-up before the decay
      # The peak rate at another global batch: none | linear | sqrt, times (labeled_batch_size /
      # reference_batch_size) or its square root (docs/fidelity.md).
      lr_scaling="none",
      reference_batch_size=4,  # the batch learning_rate was set for (paper: 4 on Cityscapes)
  ))
  config.rml = ml_collections.ConfigDict(dict(
      mode="rml",  # supervised | mean_teacher | direct | iml | rml (the paper's ladder)
      threshold=0.9,  # tau in eq. 2: confidence a pseudo label needs
      unsup_weight=1.0,  # weight of each student's two terms of eq. 5 (paper: unit weights)
      unsup_rampup_steps=0,  # > 0: sigmoid ramp-up of lambda over these steps (mean teacher)
      # > 0 (outside the paper): lambda ramps down to zero over this fraction of each stage's
      # last steps, so the low-learning-rate tail fits the labeled images alone.
      unsup_rampdown=0.0,
      ema_decay=0.999,  # eq. 4's mean-teacher decay (warmed up as min(decay, (t+1)/(t+10)))
      # labeled: running BN statistics from the labeled pass only (two passes per student);
      # joint: one pass over concat(labeled, strong).
      bn_stats="joint",
      stages=2,  # paper: two stages; each stage runs total_steps
      stage_restart="init",  # at a new stage students restart from: init | continue
      soft_label_top_k=3,  # stored soft labels keep each pixel's k most likely classes
      prototype_momentum=0.9999,  # paper: lambda in eq. 11
      prototype_temperature=1.0,  # eq. 9: softmax(-distance / temperature)
      # From this step of each stage on: exact eq. 10 prototypes over the train images with the
      # current mean teachers, then eq. 11 online, and rectified labels (eq. 6).
      # The paper is silent on when; its teachers start from an ImageNet backbone and a random
      # head, so they first learn from the labeled images for 10% of the stage (docs/fidelity.md).
      rectify_start_step=9_000,
      prototypes_from_labeled=True,  # eq. 11 also averages the labeled images' teacher features
      # Class-aware pseudo-label thresholds, an addition outside the paper (docs/fidelity.md;
      # rml_jax/class_balance.py): none (the paper's single tau) | cbst | adaptive. Applied to
      # every rung with pseudo labels, after rectification and before CutMix.
      class_balance="none",
      class_balance_portion=0.5,  # cbst: each class keeps at least its top share of pixels
      class_balance_floor=0.5,  # no class threshold goes below this
      class_balance_momentum=0.99,  # decay of the running per-class confidence histograms
      class_balance_bins=50,  # the histograms' bins over [0, 1]
      # Distribution alignment (outside the paper): p^0 times the labeled pixels' class shares
      # over the source's mean prediction, renormalised, before rectification.
      distribution_alignment=False,
      # Soft targets (outside the paper): eq. 2's cross-entropy against the source's whole
      # distribution (p^0, or eq. 6's renormalised after rectification) on the pixels that pass
      # the threshold, instead of against its argmax.
      soft_targets=False,
      # > 0 (outside the paper): a pseudo label counts only where every pixel within this many
      # pixels has the same label: the band along class boundaries, where the teachers' labels
      # are least reliable, is left out on both sides.
      boundary_ignore=0,
  ))
  # Inference for eval, predict and stored soft labels: "whole" images (at eval.resize, None =
  # as stored) or "sliding" windows (eval.window, None = the crop; stride a fraction of it).
  config.eval = ml_collections.ConfigDict(dict(
      protocol="whole", window=None, stride=2 / 3, flip=False, resize=None, pad_to=None))
  # --mode=predict: colour masks and overlays for a folder of images, from the latest checkpoint.
  config.predict = ml_collections.ConfigDict(dict(
      input="",  # the folder of images
      output="",  # "" = <workdir>/predictions
      model="teacher_a",  # teacher_a | teacher_b | student_a | student_b
      overlay_alpha=0.5,  # colour share of the overlays
  ))
  # --mode=export: one model of a checkpoint for serving outside rml_jax (rml_jax/export.py).
  config.export = ml_collections.ConfigDict(dict(
      format="savedmodel",  # savedmodel (TF) | onnx | stablehlo (jax.export)
      output="",  # a new folder ("" = <workdir>/export/<model>_<format>)
      model="teacher_a",  # teacher_a | teacher_b | student_a | student_b
      step=0,  # the checkpoint step (0 = the latest)
      # (h, w): one fixed input size; None = any size the model allows
      image_size=ml_collections.config_dict.placeholder(tuple),
  ))
  config.labeled_batch_size = 4  # paper: batch size 4 (Cityscapes)
  config.unlabeled_batch_size = 4
  config.eval_batch_size = 8
  config.total_steps = 90_000  # steps per stage (paper: 90k on Cityscapes)
  config.log_every = 100
  config.eval_every = 5_000
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 2  # checkpoints kept in the workdir
  config.max_steps_per_run = 0  # > 0: stop (with a checkpoint) after this many steps; rerun resumes
  config.max_skipped_steps = 20  # stop when this many steps in a row are non-finite (0 = never)
  # val and pseudo-label images in each eval's summaries, taken from one eval batch (fewer when
  # eval_batch_size or the val set is smaller)
  config.num_image_summaries = 2
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # devices along the batch axis (-1 = all that fsdp leaves)
      fsdp=1,  # devices the big parameters are split over
  ))
  return config
