"""Run under 8 fake CPU devices (tests/test_sharding.py): a few train steps and an eval step on
one device and on several meshes, printing the largest differences as JSON. The models use GELU
(config.model.activation) here: tests/README.md says why."""

import json
import sys

import jax
import numpy as np

from configs import digits
from rml_jax import metrics as metrics_lib
from rml_jax import sharding
from rml_jax.program import Program

NUM_CLASSES = 11


def _batch(seed, config):
  rng = np.random.default_rng(seed)
  h, w = config.data.crop_size
  bl, bu = config.labeled_batch_size, config.unlabeled_batch_size
  image = lambda n: rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)  # noqa: E731
  return {"labeled": {"image": image(bl), "label": rng.integers(0, NUM_CLASSES, (bl, h, w))
                      .astype(np.int32)},
          "unlabeled": {"weak": image(bu), "strong": np.stack([image(bu), image(bu)], axis=1),
                        "valid": np.ones((bu, h, w), bool),
                        "label": rng.integers(0, NUM_CLASSES, (bu, h, w)).astype(np.int32)}}


def run(config, devices, fsdp: int, steps: int = 3):
  config.mesh.fsdp = fsdp
  config.mesh.data = len(devices) // fsdp
  program = Program.create(config, devices)
  mesh, train_fn, eval_fn = program.mesh, program.train_fn, program.eval_fn
  train_state = program.fresh_state(jax.random.key(0))
  sharded = sum(1 for s in jax.tree.leaves(program.state_shardings) if any(s.spec))
  history = []
  for i in range(steps):
    train_state, metrics = train_fn(train_state, sharding.to_global(_batch(i, config), mesh))
    history.append(jax.device_get(metrics))
  eval_batch = _batch(99, config)["labeled"]
  matrices = eval_fn(train_state, sharding.to_global(eval_batch, mesh))
  miou = {k: metrics_lib.mean_iou(jax.device_get(v.matrix)) for k, v in matrices.items()}
  final = jax.device_get(train_state.replace(rng=jax.random.key_data(train_state.rng)))
  return final, history, miou, sharded


def main():
  # "rml" or "iml", optionally with config overrides after a colon: "rml:augment.cutmix_prob=0.0"
  mode, _, extra = sys.argv[1].partition(":")
  # Prototypes move from the first step; each student has its own strong view.
  arg = (f"tiny,mode={mode},optimizer.name=sgd,optimizer.learning_rate=0.01,"
         "optimizer.warmup_steps=0,rml.threshold=0.0,model.activation=gelu,"
         "rml.rectify_start_step=0,augment.strong_views=per_student")
  config = digits.get_config(f"{arg},{extra}" if extra else arg)
  config.labeled_batch_size = config.unlabeled_batch_size = 8
  devices = jax.devices()
  assert len(devices) == 8, devices
  steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
  reference = run(config.copy_and_resolve_references(), devices[:1], 1, steps)
  report = {}
  for data, fsdp in ((8, 1), (4, 2)):
    final, history, miou, sharded = run(config.copy_and_resolve_references(), devices, fsdp,
                                        steps)
    # Largest absolute difference over the state's leaves (integer leaves must be equal).
    diffs = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(reference[0]),
                            jax.tree.leaves(final)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      diffs.append((float(np.max(np.abs(a - b))) if a.size else 0.0, jax.tree_util.keystr(path)))
    state_diff, worst = max(diffs)
    metric_diff, worst_metric = max(
        (float(np.max(np.abs(np.asarray(h[k]) - r[k]) / np.maximum(np.abs(r[k]), 1.0))),
         f"step {i + 1} {k}")
        for i, (h, r) in enumerate(zip(history, reference[1])) for k in r)
    report[f"{data}x{fsdp}"] = {"state_max_abs_diff": state_diff, "worst_leaf": worst,
                                "metric_max_rel_diff": metric_diff, "worst_metric": worst_metric,
                                "sharded_leaves": sharded,
                                "miou": miou, "reference_miou": reference[2]}
  print("RESULT " + json.dumps(report))


if __name__ == "__main__":
  main()
