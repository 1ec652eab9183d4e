"""train_and_evaluate(config, workdir): the training loop of two students and two mean teachers,
stage by stage, with periodic logging, evaluation and checkpointing, resuming and preemption
handling."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from clu import periodic_actions

from rml_jax import (
  checkpoint,
  datasets,
  input_pipeline,
  schema,
  sharding,
  soft_labels,
  state,
  visualize,
)
from rml_jax import metrics as metrics_lib
from rml_jax.constants import IGNORE_LABEL, MODEL_NAMES, TEACHERS
from rml_jax.errors import UserError
from rml_jax.program import Program
from rml_jax.step import MODES
from rml_jax.workdir import Workdir

__all__ = ["train_and_evaluate"]


# ---------------------------------------------------------------------------------------------
# When the loop logs, evaluates and saves.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Due:
  """What the loop does after a step."""

  log: bool
  eval: bool
  save: bool


def due(config: ml_collections.ConfigDict, step: int) -> Due:
  """The actions due after global step `step` (1-based); the end of a stage does all three."""
  stage_end = step % state.stage_length(config) == 0
  return Due(log=stage_end or step % config.log_every == 0,
             eval=stage_end or step % config.eval_every == 0,
             save=stage_end or step % config.checkpoint_every == 0)


def stage_of(step: int, stage_steps: int) -> int:
  """The stage (0-based) that runs global step `step` (1-based)."""
  return (step - 1) // stage_steps


# ---------------------------------------------------------------------------------------------
# Logging helpers.
# ---------------------------------------------------------------------------------------------


def summarize_train_metrics(history: list[dict[str, np.ndarray]],
                            class_names: tuple[str, ...] | None = None) -> dict[str, float]:
  """Means of per-step scalars; pseudo-label accuracies from summed counts.

  Count pairs `pl_correct_X` / `pl_counted_X` (all in-image pixels) and `plc_...` (confident
  pixels only) become `pseudo_label_acc_X` and `confident_pseudo_label_acc_X`; the per-class
  sums `plk_<sum>_X` [K] become `pseudo_labels/X/<class>/share|truth_share|precision|recall`
  (metrics.pseudo_label_class_report; classes without pixels to divide by are left out), and
  the thresholds in force `class_threshold_X` [K] their means `pseudo_labels/X/<class>/threshold`.
  """
  stacked = {k: np.stack([h[k] for h in history]) for k in history[0]}
  counters = [k for k in stacked if k.startswith(("pl_correct_", "pl_counted_", "plc_correct_",
                                                   "plc_counted_", "plk_"))]
  per_class = [k for k in stacked if k.startswith("class_threshold_")]
  out = {k: float(v.mean()) for k, v in stacked.items() if k not in counters + per_class}
  for key in per_class:
    source = key[len("class_threshold_"):]
    means = stacked[key].mean(0)
    names = class_names or tuple(str(i) for i in range(len(means)))
    out.update({f"pseudo_labels/{source}/{names[c]}/threshold": float(means[c])
                for c in range(len(means))})
  for key in counters:
    if key.startswith("plk_confident_"):
      source = key[len("plk_confident_"):]
      report = metrics_lib.pseudo_label_class_report(
          {s: stacked[f"plk_{s}_{source}"].sum(0) for s in ("confident", "known", "correct",
                                                             "truth")})
      names = class_names or tuple(str(i) for i in range(len(report["share"])))
      out.update({f"pseudo_labels/{source}/{names[c]}/{stat}": float(values[c])
                  for stat, values in report.items() for c in range(len(values))
                  if np.isfinite(values[c])})
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


class _Interval:
  """The device metrics of the steps since the last log line, and the time spent waiting for
  input batches. Nothing is read back from the device until `flush`."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.history: list[dict[str, Any]] = []
    self.input_wait = 0.0
    self.start = time.perf_counter()

  def flush(self) -> tuple[list[dict[str, np.ndarray]], float]:
    """(host metrics of the interval's steps, share of its wall time spent waiting for input)."""
    history = jax.device_get(self.history)
    wait = self.input_wait / max(time.perf_counter() - self.start, 1e-9)
    self.restart()
    return history, wait


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


def check_unlabeled(config: ml_collections.ConfigDict, num_unlabeled: int) -> None:
  """Stops with one line when the mode learns from unlabeled images and the split left none."""
  if MODES[config.rml.mode].unlabeled and num_unlabeled == 0:
    raise UserError(f"config.rml.mode={config.rml.mode!r} learns from unlabeled images, but the "
                    "split leaves none; expected data.labeled_fraction < 1, a data.split with "
                    "unlabeled images, an image folder's data.unlabeled_dir, or "
                    "rml.mode='supervised'")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir's latest checkpoint), evaluates, returns the last eval."""
  sources = datasets.data_sources(config.data)  # a bad data folder stops before any write
  program = Program.create(config)
  if config.rml.stages > 1 and jax.process_count() > 1:
    raise UserError("config.rml.stages > 1 is not supported with several processes yet")
  if not Workdir.has_checkpoints(workdir):  # a new run: a bad params file stops before any write
    state.check_pretrained_files(config)
  run = Workdir(workdir, config.keep_checkpoints)
  labeled_idx, unlabeled_idx = datasets.split(config.data, sources, cache_dir=run.path)
  check_unlabeled(config, len(unlabeled_idx))
  run.write_start(config, labeled_idx)
  logging.info("%d labeled and %d unlabeled training images; %d val images.", len(labeled_idx),
               len(unlabeled_idx), len(sources.val))

  with_unlabeled = MODES[config.rml.mode].unlabeled
  rectify = MODES[config.rml.mode].rectify
  stage_steps = state.stage_length(config)
  final_step = stage_steps * config.rml.stages

  def make_iterator(stage: int):
    stored = run.soft_labels_dir(stage) if stage > 0 else None
    return input_pipeline.train_iterator(config, sources.train, labeled_idx, unlabeled_idx,
                                         with_unlabeled, stored)

  train_state, data_iter, resume_stage = _resume_or_start(program, run, make_iterator)
  start_step = last_step = int(jax.device_get(train_state.step))

  writer = run.metric_writer()
  if start_step == 0:
    writer.write_hparams(_hparams(config))
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=final_step, writer=writer, every_steps=config.log_every)
  summary_images = _summary_inputs(config, sources, unlabeled_idx)
  interval = _Interval()
  results: dict[str, Any] = {}
  stopped_by: int | str | None = None
  diverged: str | None = None
  skips_in_a_row = 0
  with _StopSignal() as stop:
    for stage in range(resume_stage, config.rml.stages):
      if stage > resume_stage:  # a new stage: its teachers' labels first, then the students
        _close(data_iter)
        data_iter = None
        if not _label_unlabeled(program, run, sources, unlabeled_idx, stage, train_state,
                                should_stop=lambda: stop.received is not None):
          stopped_by = stop.received  # the previous stage's last checkpoint stays
          break
        train_state = program.restart_students(train_state, config.rml.stage_restart)
        data_iter = make_iterator(stage)
        interval.restart()
      train_fn = program.stage_train_fn(stage)
      for current in range(max(last_step, stage * stage_steps) + 1,
                           (stage + 1) * stage_steps + 1):
        if rectify and current - 1 == stage * stage_steps + config.rml.rectify_start_step:
          train_state = _exact_prototypes(program, run, sources, labeled_idx, unlabeled_idx,
                                          train_state, current - 1,
                                          should_stop=lambda: stop.received is not None)
          if stop.received is not None:  # the partial sums resume with the next run
            stopped_by = stop.received
            run.checkpointer.save(last_step, train_state, data_iter, program.meta, force=True)
            break
          interval.start = time.perf_counter()  # the pass is not train time
        fetch_start = time.perf_counter()
        batch = next(data_iter)
        interval.input_wait += time.perf_counter() - fetch_start
        train_state, metrics = train_fn(train_state, sharding.to_global(batch, program.mesh))
        interval.history.append(metrics)
        last_step = current
        report_progress(current)
        todo = due(config, current)
        if todo.log:
          history, wait = interval.flush()
          skips_in_a_row = trailing_skips(history, skips_in_a_row)
          if skips_in_a_row >= config.max_skipped_steps > 0:
            diverged = (f"training diverged: {skips_in_a_row} steps in a row had a non-finite "
                        f"loss or gradient (up to step {current})")
            break
          _log_interval(config, writer, current, stage, history, wait, program.class_names)
        if todo.eval:
          with report_progress.timed("eval"):
            results = _evaluate_and_log(program, run, sources, train_state, current, writer,
                                        summary_images)
          interval.start = time.perf_counter()  # evaluation time is not train time
        stopped_by = stop.received
        if config.max_steps_per_run and current - start_step >= config.max_steps_per_run:
          stopped_by = stopped_by or "max_steps_per_run"
        if todo.save or stopped_by is not None:
          run.checkpointer.save(current, train_state, data_iter, program.meta, force=True)
        if stopped_by is not None:
          break
      if stopped_by is not None or diverged is not None:
        break

  run.close()
  _close(data_iter)  # stops grain worker processes and frees their shared memory
  writer.flush()
  if diverged is not None:  # raised only now: pending checkpoint writes have finished
    raise UserError(f"{diverged}; {run.kept_checkpoint_note()}. Lower "
                    "config.optimizer.learning_rate or check the data.")
  if stopped_by is not None:
    reason = stopped_by if isinstance(stopped_by, str) else signal.Signals(stopped_by).name
    logging.warning("Stopped (%s) at step %d; checkpoint saved. Rerun the same command to "
                    "resume.", reason, last_step)
    print(f"Stopped by {reason} at step {last_step}; checkpoint saved in "
          f"{run.checkpointer.directory}. Rerun the same command to resume.", flush=True)
  elif not results and start_step >= final_step:
    # Resumed a finished run: report its final evaluation again.
    results = _evaluate_and_log(program, run, sources, train_state, start_step, writer, None)
  writer.close()
  return results


def _resume_or_start(program: Program, run: Workdir, make_iterator: Callable[[int], Any]):
  """(state, train iterator, its stage) from the latest readable checkpoint, or the initial
  state when there is none.

  A step that cannot be read (a file removed or emptied after it was written) is named, kept
  as `<step>.unreadable`, and the previous step is tried; when no step is readable the run stops
  with one line and renames nothing.
  """
  checkpointer = run.checkpointer
  steps = checkpointer.all_steps()
  if not steps:
    return program.initial_state(), make_iterator(0), 0
  problems = []
  for latest in reversed(steps):
    # The checkpoint of step t holds the iterator of the stage that ran step t.
    stage = stage_of(latest, state.stage_length(program.config)) if latest else 0
    data_iter = make_iterator(stage)
    try:
      train_state = checkpointer.restore(latest, program.abstract_state, program.meta,
                                         data_iter)
    except checkpoint.UnreadableCheckpoint as e:
      _close(data_iter)
      reason = str(e)[:200]
      problems.append((latest, reason))
      logging.warning("Checkpoint step %d in %s is unreadable: %s", latest,
                      checkpointer.directory, reason)
      continue
    for step, reason in problems:
      kept = checkpointer.set_aside(step)
      print(f"Checkpoint step {step} is unreadable ({reason}); kept as {kept}. Resuming from "
            f"step {latest}.", flush=True)
    logging.info("Resumed from step %d.", latest)
    return train_state, data_iter, stage
  step, reason = problems[0]
  raise UserError(f"{checkpointer.directory}: no readable checkpoint (step {step}: {reason}); "
                  "expected at least one complete step. Nothing was changed; remove or repair "
                  "the damaged steps, or use another --workdir")


def _log_interval(config: ml_collections.ConfigDict, writer, step: int, stage: int,
                  history: list[dict[str, np.ndarray]], input_wait: float,
                  class_names: tuple[str, ...]) -> None:
  """Writes the interval's train scalars at global step `step` and flushes the writer (event
  files up to date, copied to a remote workdir); prints all but the per-class pseudo-label
  diagnostics."""
  scalars = summarize_train_metrics(history, class_names)
  schedule = state.learning_rate_schedule(config)
  scalars.update(learning_rate=float(schedule((step - 1) % state.stage_length(config))),
                 stage=float(stage + 1), input_wait_fraction=input_wait)
  writer.write_scalars(step, scalars)
  logging.info("step %d/%d: %s", step, state.stage_length(config) * config.rml.stages,
               ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())
                         if not k.startswith("pseudo_labels/")))
  writer.flush()


def _close(data_iter) -> None:
  if data_iter is not None and hasattr(data_iter, "close"):
    data_iter.close()


def _label_unlabeled(program: Program, run: Workdir, sources, unlabeled_idx: np.ndarray,
                     stage: int, train_state, should_stop: Callable[[], bool]) -> bool:
  """Stage `stage` (>= 1) begins: the finished stage's teachers label every unlabeled image
  (stored in the workdir, resumable). Returns False when should_stop() turned true first."""
  config = program.config
  directory = run.soft_labels_dir(stage)
  # At the resolution the train pipeline reads them; images of several sizes are padded to
  # config.eval.pad_to (each view takes its image's part).
  resize = config.data.resize
  pad_to = None if resize else config.eval.pad_to

  def batches(start: int):
    return input_pipeline.eval_batches(config, sources.train, unlabeled_idx[start:],
                                       resize=resize, pad_to=pad_to)

  image_shape = next(batches(len(unlabeled_idx) - 1))["image"].shape[1:3]
  complete = soft_labels.generate(directory, batches,
                                  lambda images: program.predict(train_state, images),
                                  len(unlabeled_idx), image_shape,
                                  config.rml.soft_label_top_k, should_stop=should_stop)
  if complete:
    print(f"Stage {stage + 1}/{config.rml.stages}: {len(unlabeled_idx)} unlabeled images "
          f"labelled by the stage-{stage} teachers ({directory}); students restart "
          f"({config.rml.stage_restart}).", flush=True)
  return complete


def _exact_prototypes(program: Program, run: Workdir, sources, labeled_idx: np.ndarray,
                      unlabeled_idx: np.ndarray, train_state, step: int,
                      should_stop: Callable[[], bool]):
  """Eq. 10 before step `step` + 1: both mean teachers' prototypes from every train image at the
  resolution the train pipeline reads them: the unlabeled images, and the labeled ones with
  rml.prototypes_from_labeled. The pixels are those eq. 11's online update takes: inside the
  image, and on a labeled image not void.

  Sums accumulate on device; every few batches they are stored in the workdir, so a stopped
  pass resumes where it was. Returns the state with the exact prototypes, or `train_state`
  unchanged when should_stop() turned true first.
  """
  config = program.config
  resize = config.data.resize
  pad_to = None if resize else config.eval.pad_to
  num_labeled = len(labeled_idx) if config.rml.prototypes_from_labeled else 0
  indices = np.concatenate([labeled_idx[:num_labeled], unlabeled_idx])
  stored = run.read_prototype_sums(step)
  done, sums, counts = stored if stored is not None else (0, 0.0, 0.0)
  if stored is not None and done < len(indices):
    logging.info("Prototype pass at step %d resumes at image %d.", step, done)
  start = time.perf_counter()
  batch_size = config.eval_batch_size
  for i, batch in enumerate(input_pipeline.eval_batches(config, sources.train, indices[done:],
                                                        resize=resize, pad_to=pad_to)):
    if should_stop():
      run.write_prototype_sums(step, done, *jax.device_get((sums, counts)))
      return train_state
    labeled = (done + np.arange(len(batch["image"])) < num_labeled)[:, None, None]
    pixels = batch["valid"] & ~(labeled & (batch["label"] == IGNORE_LABEL))
    batch_sums, batch_counts = program.prototype_sums_fn(
        train_state, sharding.to_global({"image": batch["image"], "valid": pixels},
                                        program.mesh))
    sums, counts = sums + batch_sums, counts + batch_counts
    done = min(done + batch_size, len(indices))
    if (i + 1) % 50 == 0:
      run.write_prototype_sums(step, done, *jax.device_get((sums, counts)))
  sums, counts = jax.device_get((sums, counts))
  run.write_prototype_sums(step, done, sums, counts)
  counts = np.asarray(counts)
  print(f"Prototypes (eq. 10) at step {step}: {len(indices)} train images through both mean "
        f"teachers in {time.perf_counter() - start:.1f} s; classes without a pixel: "
        f"teacher a {int((counts[0] == 0).sum())}, teacher b {int((counts[1] == 0).sum())}.",
        flush=True)
  return program.with_exact_prototypes(train_state, sums, counts)


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Dotted key -> value, as str for anything but int, float, str and bool."""
  return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
          for key, value in schema.flat_items(config).items()}


def _summary_inputs(config: ml_collections.ConfigDict, sources, unlabeled_idx: np.ndarray
                    ) -> dict[str, dict[str, np.ndarray]]:
  """One fixed eval-sized batch of val images and one of unlabeled train images (None without
  unlabeled images)."""
  val = next(input_pipeline.val_batches(config, sources.val))
  unlabeled = next(input_pipeline.eval_batches(config, sources.train,
                                                unlabeled_idx[:config.eval_batch_size],
                                                resize=config.data.resize), None)
  return {"val": val, "unlabeled": unlabeled}


def _evaluate_and_log(program: Program, run: Workdir, sources, train_state, current: int,
                      writer, summary_images) -> dict:
  """Evaluates on the val set; prints the table, writes scalars, JSON and image summaries."""
  config = program.config
  results = program.evaluate(train_state, input_pipeline.val_batches(config, sources.val))
  table = metrics_lib.format_table(results, program.class_names)
  print(f"Evaluation at step {current}:\n{table}", flush=True)
  writer.write_scalars(current, {f"miou/{name}": r["miou"] for name, r in results.items()})
  writer.write_scalars(current, {f"iou/{name}/{c}": v for name, r in results.items()
                                 for c, v in r["iou"].items() if v is not None})
  run.write_eval(current, results)
  if summary_images is not None and config.num_image_summaries > 0:
    k = program.num_classes
    val = summary_images["val"]
    probs = program.predict(train_state, val["image"])
    count = visualize.summary_count(config.num_image_summaries, val)
    writer.write_images(current, {"val/input|gt|teacher_a|teacher_b|student_a|student_b":
                                  visualize.image_summary(
                                      val["image"], [val["label"]] + [
                                          probs[n].argmax(-1) for n in MODEL_NAMES], k, count)})
    unl = summary_images["unlabeled"]
    if unl is not None:
      probs = program.predict(train_state, unl["image"])
      pseudo = [np.where(probs[n].max(-1) >= config.rml.threshold, probs[n].argmax(-1),
                         IGNORE_LABEL) for n in TEACHERS]
      count = visualize.summary_count(config.num_image_summaries, unl)
      writer.write_images(current, {"unlabeled/input|gt|pseudo_a|pseudo_b (black = below tau)":
                                    visualize.image_summary(unl["image"],
                                                            [unl["label"]] + pseudo, k, count)})
  return results
