"""train_and_evaluate(config, workdir): the training loop of two students and two mean teachers,
with periodic logging, evaluation and checkpointing, resuming and preemption handling."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions

from rml_jax import (
  checkpoint,
  datasets,
  evaluate,
  input_pipeline,
  sharding,
  soft_labels,
  state,
  step,
)
from rml_jax.errors import UserError

__all__ = ["train_and_evaluate", "Run", "UserError"]


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir: cannot write to {workdir} ({e.strerror}); expected a writable "
                    "directory") from None


# ---------------------------------------------------------------------------------------------
# Setup shared by training, evaluation and prediction.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything a run needs besides the state itself; built without initialising any weights."""

  config: ml_collections.ConfigDict
  workdir: str
  sources: Any  # datasets.Sources (None when created with with_data=False)
  class_names: tuple[str, ...]
  mesh: Any
  step_config: step.StepConfig
  init_fn: Any
  abstract_state: Any
  state_shardings: Any
  train_fn: Any
  eval_fn: Any
  predict_fn: Any
  checkpointer: checkpoint.Checkpointer
  meta: dict[str, Any]

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, workdir: str, read_only: bool = False,
             with_data: bool = True):
    """with_data=False skips the datasets (sources None): enough to restore and predict."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not read_only:
      _check_writable(workdir)
    sources = datasets.data_sources(config.data) if with_data else None
    class_names = datasets.class_names(config.data)
    num_classes = len(class_names)
    mesh = sharding.create_mesh(config.mesh)
    step_config = step.StepConfig.from_config(config, num_classes)
    init_fn = state.make_init_fn(config, num_classes)
    abstract_state, shardings = state.abstract_train_state(init_fn, mesh)
    train_fn, eval_fn, predict_fn = step.jit_steps(step_config, shardings, mesh)
    checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                           read_only=read_only)
    meta = {"dataset": config.data.name, "num_classes": num_classes,
            "model_a": config.model.name,
            "model_b": config.model_b.name or config.model.name, "mode": config.rml.mode}
    return cls(config, workdir, sources, class_names, mesh, step_config, init_fn,
               abstract_state, shardings, train_fn, eval_fn, predict_fn, checkpointer, meta)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def evaluate(self, train_state) -> dict[str, Any]:
    """Per-class IoU and mIoU of the four models on the whole val split."""
    batches = input_pipeline.eval_batches(self.config, self.sources.val, **eval_sizes(self.config))
    matrices = evaluate.run_evaluation(self.eval_fn, train_state, batches, self.mesh)
    return evaluate.summarize(matrices, self.class_names)

  def initial_state(self):
    """The run's initial state: seeded init, then pretrained weights when the config names them."""
    fresh = state.create_train_state(self.init_fn, jax.random.key(self.config.seed),
                                     self.state_shardings)
    return state.load_pretrained(fresh, self.config, self.state_shardings)

  def stage_train_fn(self, stage: int):
    """The jitted train step of a stage (stages after the first read stored soft labels)."""
    if stage == 0:
      return self.train_fn
    cfg = dataclasses.replace(self.step_config, stored_labels=True)
    return step.jit_steps(cfg, self.state_shardings, self.mesh)[0]

  def split(self) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) train indices: config.data.split's lists or a seeded fraction."""
    return datasets.split(self.config.data, self.sources, cache_dir=self.workdir)


def eval_sizes(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """eval_batches' resize / pad_to for the val set (config.eval)."""
  evaluation = config.get("eval") or {}
  return {"resize": evaluation.get("resize"), "pad_to": evaluation.get("pad_to")}


# ---------------------------------------------------------------------------------------------
# Logging helpers.
# ---------------------------------------------------------------------------------------------

def summarize_train_metrics(history: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means of per-step scalars; pseudo-label accuracies from summed counts.

  Count pairs `pl_correct_X` / `pl_counted_X` (all in-image pixels) and `plc_...` (confident
  pixels only) become `pseudo_label_acc_X` and `confident_pseudo_label_acc_X`.
  """
  stacked = {k: np.stack([h[k] for h in history]) for k in history[0]}
  counters = [k for k in stacked if k.startswith(("pl_correct_", "pl_counted_", "plc_correct_",
                                                   "plc_counted_"))]
  out = {k: float(v.mean()) for k, v in stacked.items() if k not in counters}
  for prefix, name in (("pl", "pseudo_label_acc"), ("plc", "confident_pseudo_label_acc")):
    for key in counters:
      if key.startswith(f"{prefix}_counted_"):
        learner = key[len(f"{prefix}_counted_"):]
        out[f"{name}_{learner}"] = float(stacked[f"{prefix}_correct_{learner}"].sum()
                                         / max(stacked[key].sum(), 1.0))
  return out


def trailing_skips(history: list[dict[str, np.ndarray]], carried: int) -> int:
  """Steps in a row, ending at the last one, whose update was skipped (non-finite) by a learner.

  carried: the same count at the end of the previous interval.
  """
  count = carried
  for metrics in history:
    skipped = any(float(v) > 0 for k, v in metrics.items() if k.startswith("skipped_"))
    count = count + 1 if skipped else 0
  return count


class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:  # second signal: give up immediately
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("Received signal %d: saving a checkpoint, then stopping.", signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir's latest checkpoint), evaluates, returns the last eval."""
  run = Run.create(config, workdir)
  workdir = run.workdir
  labeled_idx, unlabeled_idx = run.split()
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
    with open(os.path.join(workdir, "labeled_ids.txt"), "w") as f:
      f.write("\n".join(str(i) for i in labeled_idx) + "\n")
  logging.info("%d labeled and %d unlabeled training images; %d val images.", len(labeled_idx),
               len(unlabeled_idx), len(run.sources.val))

  with_unlabeled = config.rml.mode != "supervised"
  stage_steps = config.total_steps  # each stage runs total_steps (the paper: 90k x 2 stages)
  final_step = stage_steps * config.rml.stages

  def make_iterator(stage: int):
    stored = soft_labels.stage_dir(workdir, stage) if stage > 0 else None
    return input_pipeline.train_iterator(config, run.sources.train, labeled_idx,
                                         unlabeled_idx, with_unlabeled, stored)

  latest = run.checkpointer.latest_step()
  # The checkpoint of step t holds the iterator of the stage that ran step t.
  iterator_stage = _stage_of(latest, stage_steps) if latest else 0
  data_iter = make_iterator(iterator_stage)
  if latest is not None:
    train_state = run.checkpointer.restore(latest, run.abstract_state, run.meta, data_iter)
    logging.info("Resumed from step %d.", latest)
  else:
    train_state = run.initial_state()
  start_step = int(jax.device_get(train_state.step))
  train_fn = run.stage_train_fn(iterator_stage)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config).items()})
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=final_step, writer=writer, every_steps=config.log_every)
  schedule = state.learning_rate_schedule(config)
  summary_images = _summary_inputs(run, unlabeled_idx)

  history: list[dict[str, Any]] = []
  input_wait = 0.0
  interval_start = time.perf_counter()
  results: dict[str, Any] = {}
  stopped_by = None
  diverged = None
  skips_in_a_row = 0
  with _StopSignal() as stop:
    for current in range(start_step + 1, final_step + 1):
      if _stage_of(current, stage_steps) != iterator_stage:  # a new stage begins
        iterator_stage = _stage_of(current, stage_steps)
        if hasattr(data_iter, "close"):
          data_iter.close()
        train_state = _begin_stage(run, iterator_stage, train_state, unlabeled_idx,
                                   should_stop=lambda: stop.received is not None)
        if train_state is None:  # stopped while labelling; the stage-end checkpoint stays
          stopped_by, data_iter = stop.received, None
          current -= 1
          break
        data_iter = make_iterator(iterator_stage)
        train_fn = run.stage_train_fn(iterator_stage)
        interval_start, history, input_wait = time.perf_counter(), [], 0.0
      fetch_start = time.perf_counter()
      batch = next(data_iter)
      input_wait += time.perf_counter() - fetch_start
      train_state, metrics = train_fn(train_state, sharding.to_global(batch, run.mesh))
      history.append(metrics)
      report_progress(current)

      end_of_stage = current % stage_steps == 0
      if current % config.log_every == 0 or end_of_stage:
        host_history = jax.device_get(history)
        scalars = summarize_train_metrics(host_history)
        skips_in_a_row = trailing_skips(host_history, skips_in_a_row)
        if skips_in_a_row >= config.max_skipped_steps > 0:
          diverged = (f"training diverged: {skips_in_a_row} steps in a row had a non-finite "
                      f"loss or gradient (up to step {current})")
          break
        elapsed = time.perf_counter() - interval_start
        scalars.update(learning_rate=float(schedule((current - 1) % stage_steps)),
                       stage=float(iterator_stage + 1),
                       input_wait_fraction=input_wait / max(elapsed, 1e-9))
        writer.write_scalars(current, scalars)
        logging.info("step %d/%d: %s", current, final_step,
                     ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))
        history, input_wait, interval_start = [], 0.0, time.perf_counter()

      if current % config.eval_every == 0 or end_of_stage:
        with report_progress.timed("eval"):
          results = _evaluate_and_log(run, train_state, current, writer, summary_images)
        interval_start = time.perf_counter()

      stopped_by = stop.received
      if config.max_steps_per_run and current - start_step >= config.max_steps_per_run:
        stopped_by = stopped_by or "max_steps_per_run"
      if current % config.checkpoint_every == 0 or end_of_stage or stopped_by is not None:
        run.checkpointer.save(current, train_state, data_iter, run.meta, force=True)
      if stopped_by is not None:
        break

  run.checkpointer.wait()
  run.checkpointer.close()
  if data_iter is not None and hasattr(data_iter, "close"):
    data_iter.close()  # stops grain worker processes and frees their shared memory
  writer.flush()
  if diverged is not None:  # raised only now: pending checkpoint writes have finished
    raise UserError(f"{diverged}; {_kept_checkpoint(run)}. Lower "
                    "config.optimizer.learning_rate or check the data.")
  if stopped_by is not None:
    logging.warning("Stopped (%s) at step %d; checkpoint saved. Rerun the same command to "
                    "resume.", stopped_by, current)
    reason = stopped_by if isinstance(stopped_by, str) else signal.Signals(stopped_by).name
    print(f"Stopped by {reason} at step {current}; checkpoint saved in "
          f"{run.checkpointer.directory}. Rerun the same command to resume.", flush=True)
  elif not results and start_step >= final_step:
    # Resumed a finished run: report its final evaluation again.
    results = _evaluate_and_log(run, train_state, start_step, writer, None)
  return results


def _stage_of(step_number: int, stage_steps: int) -> int:
  """The stage (0-based) that runs global step `step_number` (1-based)."""
  return (step_number - 1) // stage_steps


def _begin_stage(run: Run, stage: int, train_state, unlabeled_idx: np.ndarray, should_stop):
  """Starts stage `stage` (>= 1): the finished stage's teachers label every unlabeled image
  (stored in the workdir, resumable), then the students restart (config.rml.stage_restart).

  Returns the new state, or None when should_stop() turned true while labelling.
  """
  config = run.config
  if jax.process_count() > 1:
    raise UserError("config.rml.stages > 1 is not supported with several processes yet")
  directory = soft_labels.stage_dir(run.workdir, stage)
  # At the resolution the train pipeline reads them; images of several sizes are padded to
  # config.eval.pad_to (each view takes its image's part).
  resize = config.data.get("resize")
  pad_to = None if resize else eval_sizes(config)["pad_to"]

  def batches(start: int):
    return input_pipeline.eval_batches(config, run.sources.train, unlabeled_idx[start:],
                                       resize=resize, pad_to=pad_to)

  image_shape = next(batches(len(unlabeled_idx) - 1))["image"].shape[1:3]

  def predict(images):
    return jax.device_get(run.predict_fn(train_state, sharding.to_global(images, run.mesh)))

  complete = soft_labels.generate(directory, batches, predict, len(unlabeled_idx), image_shape,
                                  config.rml.soft_label_top_k, should_stop=should_stop)
  if not complete:
    return None
  print(f"Stage {stage + 1}/{config.rml.stages}: {len(unlabeled_idx)} unlabeled images labelled "
        f"by the stage-{stage} teachers ({directory}); students restart "
        f"({config.rml.stage_restart}).", flush=True)
  return _restart_students(run, train_state, config.rml.stage_restart)


def _restart_students(run: Run, train_state, restart: str):
  """'init': students, teachers and prototypes back to the initial weights; 'continue': keep
  the weights and prototypes, fresh optimizer state (the schedule restarts). The step and the
  run's rng carry on."""
  if restart == "init":
    fresh = run.initial_state()
    return fresh.replace(step=train_state.step, rng=train_state.rng)

  def reset_optimizer(current):
    return current.replace(**{name: getattr(current, name).replace(
        opt_state=current.tx.init(getattr(current, name).params))
        for name in ("learner_a", "learner_b")})

  return jax.jit(reset_optimizer, out_shardings=run.state_shardings,
                 donate_argnums=0)(train_state)


def _kept_checkpoint(run: Run) -> str:
  latest = run.checkpointer.latest_step()
  if latest is None:
    return "no checkpoint had been written yet"
  return f"the last good checkpoint (step {latest}) is kept in {run.checkpointer.directory}"


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return out


def _summary_inputs(run: Run, unlabeled_idx: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  """One fixed eval-sized batch of val images and one of unlabeled train images."""
  val = next(input_pipeline.eval_batches(run.config, run.sources.val, **eval_sizes(run.config)))
  unlabeled = next(input_pipeline.eval_batches(run.config, run.sources.train,
                                                unlabeled_idx[:run.config.eval_batch_size],
                                                resize=run.config.data.get("resize")))
  return {"val": val, "unlabeled": unlabeled}


def _evaluate_and_log(run: Run, train_state, current: int, writer, summary_images) -> dict:
  results = run.evaluate(train_state)
  table = evaluate.format_table(results, run.class_names)
  print(f"Evaluation at step {current}:\n{table}", flush=True)
  writer.write_scalars(current, {f"miou/{name}": r["miou"] for name, r in results.items()})
  writer.write_scalars(current, {f"iou/{name}/{c}": v for name, r in results.items()
                                 for c, v in r["iou"].items() if v is not None})
  evaluate.write_results(run.workdir, current, results)
  if summary_images is not None and run.config.num_image_summaries > 0:
    count = run.config.num_image_summaries
    k = run.num_classes
    val = summary_images["val"]
    probs = jax.device_get(run.predict_fn(train_state, sharding.to_global(val["image"], run.mesh)))
    writer.write_images(current, {"val/input|gt|teacher_a|teacher_b|student_a|student_b":
                                  evaluate.image_summary(
                                      val["image"], [val["label"]] + [
                                          probs[n].argmax(-1) for n in step.MODEL_NAMES],
                                      k, count)})
    unl = summary_images["unlabeled"]
    probs = jax.device_get(run.predict_fn(train_state, sharding.to_global(unl["image"], run.mesh)))
    pseudo = [np.where(probs[n].max(-1) >= run.config.rml.threshold, probs[n].argmax(-1),
                       evaluate.IGNORE) for n in ("teacher_a", "teacher_b")]
    writer.write_images(current, {"unlabeled/input|gt|pseudo_a|pseudo_b (black = below tau)":
                                  evaluate.image_summary(unl["image"], [unl["label"]] + pseudo,
                                                         k, count)})
  return results

