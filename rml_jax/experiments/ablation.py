"""The paper's ablation ladder (Table 4 analogue) on one config, several seeds, one command:

  python -m rml_jax.experiments.ablation --config=configs/digits.py --out=runs/ablation

Every rung trains with the same labeled subset (config.data.split_seed) and schedule; only the
mode, the noise switches and the number of stages change. Each run lives in
`<out>/runs/<rung>_seed<s>` and is resumable, so rerunning the command continues where it
stopped and reuses finished runs. Writes `<out>/ablation.md`, `ablation.csv` and `ablation.png`.
"""

from __future__ import annotations

import csv
import glob
import json
import os

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from rml_jax import compilation_cache, state
from rml_jax.config_args import apply_overrides
from rml_jax.constants import MODEL_NAMES
from rml_jax.errors import UserError, run_program

# The paper's model noise: dropout 0.5 and stochastic depth with survival 0.8, the survival
# either the same for every block or falling linearly with depth to 0.8 (model.survival_schedule).
UNIFORM_NOISE = "model.dropout_rate=0.5,model.survival_prob=0.8,model.survival_schedule=uniform"
LINEAR_NOISE = "model.dropout_rate=0.5,model.survival_prob=0.8,model.survival_schedule=linear"
NO_INPUT_NOISE = "augment.num_ops=0,augment.cutmix_prob=0.0"  # strong view = weak view
SHARED_VIEW = "augment.strong_views=shared"  # both students see one strong view and CutMix box

# rung -> (label, config overrides). Input noise (RandAugment + CutMix, one strong view per
# student) is the config's default.
RUNGS = {
    "supervised": ("Supervised baseline", "mode=supervised"),
    "mean_teacher": ("Mean teacher (no exchange)", "mode=mean_teacher"),
    "direct": ("Direct mutual learning (eq. 3)", "mode=direct"),
    "iml": ("IML, no noise", f"mode=iml,{NO_INPUT_NOISE}"),
    "iml_model_noise": ("IML + model noise (uniform)",
                        f"mode=iml,{NO_INPUT_NOISE},{UNIFORM_NOISE}"),
    "iml_model_noise_linear": ("IML + model noise (linear)",
                               f"mode=iml,{NO_INPUT_NOISE},{LINEAR_NOISE}"),
    "iml_input_noise": ("IML + input noise", "mode=iml"),
    "iml_shared_view": ("IML + input noise, one shared view", f"mode=iml,{SHARED_VIEW}"),
    "iml_full_noise": ("IML + full noise (uniform)", f"mode=iml,{UNIFORM_NOISE}"),
    "iml_full_noise_linear": ("IML + full noise (linear)", f"mode=iml,{LINEAR_NOISE}"),
    "rml_input_noise": ("RML + input noise", "mode=rml"),
    "rml": ("RML, full noise (uniform)", f"mode=rml,{UNIFORM_NOISE}"),
    "rml_linear": ("RML, full noise (linear)", f"mode=rml,{LINEAR_NOISE}"),
    "rml_two_stages": ("RML, full noise (uniform), two stages",
                       f"mode=rml,{UNIFORM_NOISE},rml.stages=2"),
    "rml_two_stages_linear": ("RML, full noise (linear), two stages",
                              f"mode=rml,{LINEAR_NOISE},rml.stages=2"),
}
# Coupling of the two mean teachers on the unlabeled batches (the paper's Figure 2), read from
# the run's train scalars: total variation at the first log interval and at the end, and the
# share of pixels whose argmax differs at the end.
COUPLING_TAGS = ("teacher_tv", "teacher_disagreement")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing stays free)."""
  config_flags.DEFINE_config_file("config", None, "Base configuration file.", lock_config=False)
  flags.DEFINE_string("out", None, "Output folder (runs, table, CSV, plot).")
  flags.DEFINE_list("seeds", ["0", "1"], "Training seeds (the labeled subset stays fixed).")
  flags.DEFINE_list("rungs", list(RUNGS), f"Rungs to run, from {list(RUNGS)}.")
  flags.DEFINE_string("compilation_cache", compilation_cache.DEFAULT_DIR, compilation_cache.HELP)
  flags.DEFINE_string("set", "", "Extra overrides for every rung, e.g. "
                      "'total_steps=500,rml.rectify_start_step=125'.")
  flags.mark_flags_as_required(["config", "out"])


def rung_config(base: ml_collections.ConfigDict, rung: str, seed: int,
                extra: str = "") -> ml_collections.ConfigDict:
  """The base config with the rung's overrides, the extra overrides and the seed."""
  config = base.copy_and_resolve_references()
  config = apply_overrides(config, ",".join(filter(None, [RUNGS[rung][1], extra])))
  config.seed = seed
  return config


def final_results(workdir: str, final_step: int) -> dict | None:
  """The eval results of the run's last step, or None when it has not finished."""
  path = os.path.join(workdir, "eval", f"step_{final_step}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["results"]


def train_scalars(workdir: str, tags: tuple[str, ...]) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of the run's train scalars, read from its TensorBoard event files
  (the last value written wins, so a resumed run's repeated steps count once)."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util

  found = {tag: {} for tag in tags}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        if value.tag in found:
          number = (float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor")
                    else float(value.simple_value))
          found[value.tag][int(event.step)] = number
  return found


def coupling_summary(scalars: dict[str, dict[int, float]]) -> dict[str, float]:
  """The teachers' total variation at the first and last logged step and their disagreement at
  the last; NaN where the run logs none (the supervised rung)."""
  tv, disagreement = (scalars.get(tag, {}) for tag in COUPLING_TAGS)
  first = tv[min(tv)] if tv else float("nan")
  last = tv[max(tv)] if tv else float("nan")
  return {"tv_first": first, "tv_last": last,
          "disagreement_last": disagreement[max(disagreement)] if disagreement else float("nan")}


def summarize(rows: list[dict]) -> list[dict]:
  """Per rung: mean and spread (sample std over seeds) of the teachers' and students' mIoU, and
  the seed mean of the coupling measures when the rows carry them.

  rows: {'rung', 'seed', 'teacher_a', ...} with mIoU in percent; optionally 'tv_first',
  'tv_last', 'disagreement_last' as fractions.
  """
  table = []
  for rung in dict.fromkeys(r["rung"] for r in rows):
    mine = [r for r in rows if r["rung"] == rung]
    teachers = np.array([(r["teacher_a"] + r["teacher_b"]) / 2 for r in mine])
    students = np.array([(r["student_a"] + r["student_b"]) / 2 for r in mine])
    spread = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0  # noqa: E731
    coupling = {key: float(np.mean([r.get(key, np.nan) for r in mine]))
                for key in ("tv_first", "tv_last", "disagreement_last")}
    table.append({"rung": rung, "label": RUNGS[rung][0], "seeds": len(mine),
                  "teacher_mean": float(teachers.mean()), "teacher_std": spread(teachers),
                  "student_mean": float(students.mean()), "student_std": spread(students),
                  **coupling})
  return table


def markdown(table: list[dict], base_name: str, note: str) -> str:
  lines = [f"# Ablation on {base_name}", "", note, "",
           "| rung | seeds | teachers mIoU (mean ± std) | students mIoU | vs supervised "
           "| teacher TV first / last | disagreement last |",
           "|---|---|---|---|---|---|---|"]
  baseline = next((t["teacher_mean"] for t in table if t["rung"] == "supervised"), None)
  number = lambda x: "" if np.isnan(x) else f"{x:.3f}"  # noqa: E731
  for t in table:
    delta = "" if baseline is None else f"{t['teacher_mean'] - baseline:+.2f}"
    tv = "" if np.isnan(t.get("tv_first", np.nan)) else (
        f"{number(t['tv_first'])} / {number(t['tv_last'])}")
    lines.append(f"| {t['label']} | {t['seeds']} | {t['teacher_mean']:.2f} ± "
                 f"{t['teacher_std']:.2f} | {t['student_mean']:.2f} ± {t['student_std']:.2f} | "
                 f"{delta} | {tv} | {number(t.get('disagreement_last', np.nan))} |")
  return "\n".join(lines) + "\n"


def plot(table: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(1.3 * len(table) + 2, 4))
  x = np.arange(len(table))
  ax.bar(x, [t["teacher_mean"] for t in table], yerr=[t["teacher_std"] for t in table],
         capsize=4, color="#4c72b0")
  ax.set_xticks(x, [t["label"] for t in table], rotation=30, ha="right")
  ax.set_ylabel("teacher mIoU (%)")
  low = min(t["teacher_mean"] - t["teacher_std"] for t in table)
  ax.set_ylim(max(0, low - 5), None)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from rml_jax import train  # after flag parsing

  compilation_cache.enable(FLAGS.compilation_cache)
  base = FLAGS.config
  unknown = [r for r in FLAGS.rungs if r not in RUNGS]
  if unknown:
    raise UserError(f"--rungs: unknown {unknown}; expected some of {list(RUNGS)}")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise UserError(f"--seeds: expected integers, got {FLAGS.seeds}") from None
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for rung in FLAGS.rungs:
    for seed in seeds:
      config = rung_config(base, rung, seed, FLAGS.set)
      workdir = os.path.join(FLAGS.out, "runs", f"{rung}_seed{seed}")
      final_step = state.stage_length(config) * config.rml.stages
      results = final_results(workdir, final_step)
      if results is None:
        print(f"== {rung}, seed {seed} -> {workdir}", flush=True)
        train.train_and_evaluate(config, workdir)
        results = final_results(workdir, final_step)
        if results is None:  # stopped by a signal: everything so far is saved
          print("Stopped; rerun the same command to continue.", flush=True)
          return
      rows.append({"rung": rung, "seed": seed,
                   **{m: 100 * results[m]["miou"] for m in MODEL_NAMES},
                   **coupling_summary(train_scalars(workdir, COUPLING_TAGS))})
  with open(os.path.join(FLAGS.out, "ablation.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  table = summarize(rows)
  note = (f"Final val mIoU (%) after {base.total_steps} steps per stage, labeled subset "
          f"split_seed={base.data.split_seed}, seeds {seeds}; teachers = mean of the two "
          f"teachers of a run. Teacher TV / disagreement: the mean teachers' total variation and "
          f"argmax disagreement on the unlabeled batches, at the first and last log interval, "
          f"seed means. Extra overrides: {FLAGS.set or 'none'}.")
  text = markdown(table, os.path.basename(str(FLAGS["config"].config_filename)), note)
  with open(os.path.join(FLAGS.out, "ablation.md"), "w") as f:
    f.write(text)
  plot(table, os.path.join(FLAGS.out, "ablation.png"))
  print(text, flush=True)


def run():
  define_flags()
  run_program(main)


if __name__ == "__main__":
  run()
