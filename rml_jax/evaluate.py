"""--mode=eval: restore a run's latest checkpoint and evaluate its four models on the val set."""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from rml_jax import datasets, input_pipeline
from rml_jax import metrics as metrics_lib
from rml_jax.program import Program
from rml_jax.workdir import Workdir


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Per-class IoU and mIoU of the latest checkpoint in `workdir`; also written to
  <workdir>/eval/step_<N>.json. Returns {model name: {'miou', 'iou'}}."""
  program = Program.create(config)
  run = Workdir(workdir, config.keep_checkpoints, read_only=True)
  step = run.latest_checkpoint()
  sources = datasets.data_sources(config.data)
  train_state = run.checkpointer.restore(step, program.abstract_state, program.meta)
  results = program.evaluate(train_state, input_pipeline.val_batches(config, sources.val))
  print(f"Evaluation of checkpoint step {step}:\n"
        + metrics_lib.format_table(results, program.class_names))
  logging.info("Wrote %s", run.write_eval(step, results))
  run.close()
  return results
