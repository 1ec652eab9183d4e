"""docs/performance.md's TPU table: the configs compiled for Cloud TPU slices, one row at a time.

  python -m rml_jax.experiments.tpu_slices --out=runs/tpu_slices          # compile what is missing
  python -m rml_jax.experiments.tpu_slices --out=runs/tpu_slices --table  # the markdown table

Each row runs `python -m rml_jax.bench --topology=...` in its own process and leaves
`<out>/<row>.json` (the figures) or `<out>/<row>.error.txt` (its one error line, e.g. a program
that does not fit HBM); rerunning skips finished rows. Within a group of rows that differ only
in mesh.fsdp, the rows after the first that fits are skipped (the smallest fsdp that fits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from rml_jax.errors import run_program

FLAGS = flags.FLAGS

# Global batches the 8-chip slices split: 8 + 8, with the learning rate scaled from the config's
# reference batch (linear for SGD, sqrt for AdamW).
CITY_8 = "labeled_batch_size=8,unlabeled_batch_size=8,optimizer.lr_scaling=linear"
DINO_L = "large,optimizer.lr_scaling=sqrt"
# row -> (group, config, topology, number of slices, programs)
ROWS = {
    "city_f32_v5e-8": ("", f"configs/city.py:{CITY_8}", "v5e:2x4", 1, "train,eval,prototypes"),
    "city_dinov2_L_v5e-8_fsdp1": ("", f"configs/city_dinov2.py:{DINO_L},mesh.fsdp=1",
                                  "v5e:2x4", 1, "train"),
    # What the backward pass keeps, more than the state, decides whether the L pair fits: the
    # fsdp sweep with each block rematerialised.
    **{f"city_dinov2_L_v5e-8_fsdp{n}_remat": (
        "dinoL_remat", f"configs/city_dinov2.py:{DINO_L},mesh.fsdp={n},model.remat=True",
        "v5e:2x4", 1, "train") for n in (1, 2, 4, 8)},
    # The same sweep in bfloat16.
    **{f"city_dinov2_L_v5e-8_bf16_fsdp{n}_remat": (
        "dinoL_bf16_remat",
        f"configs/city_dinov2.py:{DINO_L},dtype=bfloat16,mesh.fsdp={n},model.remat=True",
        "v5e:2x4", 1, "train") for n in (1, 2, 4, 8)},
    "city_bf16_v5e-8": ("", f"configs/city.py:{CITY_8},dtype=bfloat16", "v5e:2x4", 1, "train"),
    "city_f32_v5e-4": ("", "configs/city.py", "v5e:2x2", 1, "train"),
    "city_bf16_v5e-4": ("", "configs/city.py:dtype=bfloat16", "v5e:2x2", 1, "train"),
    "city_dinov2_B_v5e-8_fsdp1": ("dinoB", "configs/city_dinov2.py:mesh.fsdp=1", "v5e:2x4", 1,
                                  "train"),
    "city_dinov2_B_v5e-8_fsdp2": ("dinoB", "configs/city_dinov2.py:mesh.fsdp=2", "v5e:2x4", 1,
                                  "train"),
    # v5p-8 is 4 chips, 2 + 2 images each; v6e-8 is 8 chips, 1 + 1 each.
    "city_dinov2_L_v5p-8": ("", f"configs/city_dinov2.py:{DINO_L}", "v5p:2x2x1", 1, "train"),
    "city_dinov2_L_v5p-8_remat": ("", f"configs/city_dinov2.py:{DINO_L},model.remat=True",
                                  "v5p:2x2x1", 1, "train"),
    "city_dinov2_L_v6e-8_fsdp2": ("", f"configs/city_dinov2.py:{DINO_L},mesh.fsdp=2", "v6e:2x4",
                                  1, "train"),
    "city_dinov2_L_v6e-8_fsdp1_remat": (
        "", f"configs/city_dinov2.py:{DINO_L},mesh.fsdp=1,model.remat=True", "v6e:2x4", 1,
        "train"),
    "city_setr_v5e-8": ("", f"configs/city_setr.py:{CITY_8}", "v5e:2x4", 1, "train"),
    "city_f32_2xv5e-4": ("", f"configs/city.py:{CITY_8}", "v5e:2x2", 2, "train"),
}


def define_flags() -> None:
  flags.DEFINE_string("out", "runs/tpu_slices", "Folder of the rows' JSON files.")
  flags.DEFINE_bool("table", False, "Print the markdown table of the finished rows and stop.")
  flags.DEFINE_list("rows", [], "Only these rows (default: all).")


def run_row(name: str, out: str) -> bool:
  """Compiles one row in its own process; True when it fit (its JSON was written)."""
  _, config, topology, slices, programs = ROWS[name]
  command = [sys.executable, "-m", "rml_jax.bench", f"--config={config}",
             f"--topology={topology}", f"--num_slices={slices}", f"--programs={programs}",
             f"--json={os.path.join(out, name + '.json')}"]
  print(f"[tpu_slices] {name}: {' '.join(command[1:])}", flush=True)
  result = subprocess.run(command, capture_output=True, text=True)
  print(result.stdout, flush=True)
  if result.returncode < 0:  # killed (the host's out-of-memory killer): no result, rerun it
    print(f"[tpu_slices] {name}: killed by signal {-result.returncode}; no result kept, a "
          "rerun compiles it again", flush=True)
    return False
  if result.returncode != 0:
    lines = result.stderr.strip().splitlines() or ["(no output)"]
    error = next((line for line in lines if line.startswith("error:")), lines[-1])
    with open(os.path.join(out, name + ".error.txt"), "w") as f:
      f.write(error + "\n")
    print(f"[tpu_slices] {name}: {error}", flush=True)
  return result.returncode == 0


def run_rows(out: str, names: list[str]) -> None:
  """Compiles the rows not done yet, in order; see the module docstring for fsdp groups."""
  os.makedirs(out, exist_ok=True)
  fitted = set()
  for name in names:
    group = ROWS[name][0]
    done = os.path.exists(os.path.join(out, name + ".json"))
    if done and group:
      fitted.add(group)
    if done or os.path.exists(os.path.join(out, name + ".error.txt")) or group in fitted:
      continue
    if run_row(name, out) and group:
      fitted.add(group)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def table_row(name: str, result: dict) -> str:
  """One markdown row of a finished compile: the train program's figures, and the compile time
  of each program."""
  s, c, p = result["slice"], result["config"], result["programs"]
  train = p["train"]
  m, b = train["memory_bytes"], train["lower_bounds"]
  collectives = "; ".join(f"{r['kind']} x{r['count']}"
                          + (f"/{r['group_size']}" if r["group_size"] else "")
                          + f" {r['bytes'] / 2**20:.0f} MiB" for r in train["collectives"][:4])
  mesh = f"{c['mesh']['data']}x{c['mesh']['fsdp']}"
  where = f"{s['num_slices']}x " if s["num_slices"] > 1 else ""
  compile_s = ", ".join(f"{k} {v['compile_s']:.0f}" for k, v in p.items())
  return (f"| {name} | {where}{s['topology']} | {mesh} | {c['dtype']} | "
          f"{c['labeled_batch_size']}+{c['unlabeled_batch_size']}, lr {c['learning_rate']:.2g} | "
          f"{_gib(m['argument'])} / {_gib(m['temp'])} / {_gib(m['total'])} of "
          f"{_gib(s['chip']['hbm_bytes'])} | {train['flops'] / 1e12:.2f} | "
          f"{train['bytes_accessed'] / 2**30:.1f} | {collectives} | {compile_s} | "
          f"{b['compute_s'] * 1e3:.0f} / {b['memory_s'] * 1e3:.0f} ({b['bound']}) |")


def memory_bound_notes(results: dict[str, dict]) -> list[str]:
  """One line per memory-bound train program: the instructions that move the most bytes."""
  notes = []
  for name, result in results.items():
    train = result["programs"]["train"]
    if train["lower_bounds"]["bound"] == "memory":
      top = "; ".join(f"`{r['name']}` {r['bytes'] / 2**20:.0f} MiB ({r['source'][-70:]})"
                      for r in train["largest_instructions"][:3])
      notes.append(f"- {name}: {top}")
  return notes


def table(out: str) -> str:
  """The markdown table of every row with a JSON or an error line in `out`, then the largest
  instructions of the memory-bound rows."""
  lines = ["| row | slice | mesh data x fsdp | dtype | batch, peak lr | train GiB/chip: "
           "arguments / temporaries / total of HBM | TFLOP/chip | GiB accessed/chip | "
           "collectives (kind x count/group, bytes per chip) | compile s | lower bounds ms: "
           "FLOPs/peak / bytes/bandwidth |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  results = {}
  for name, (_, config, topology, slices, _) in ROWS.items():
    path = os.path.join(out, name)
    if os.path.exists(path + ".json"):
      with open(path + ".json") as f:
        results[name] = json.load(f)
      lines.append(table_row(name, results[name]))
    elif os.path.exists(path + ".error.txt"):
      with open(path + ".error.txt") as f:
        error = f.read().strip().replace("|", "/")
      where = f"{slices}x " if slices > 1 else ""
      lines.append(f"| {name} | {where}{topology} | `{config.split(':', 1)[-1]}` | | | "
                   f"{error} | | | | | |")
  notes = memory_bound_notes(results)
  if notes:
    lines += ["", "Memory-bound rows, the instructions that move the most bytes per chip "
              "(outputs plus operands):", *notes]
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.table:
    print(table(FLAGS.out))
    return
  run_rows(FLAGS.out, FLAGS.rows or list(ROWS))


if __name__ == "__main__":
  define_flags()
  run_program(main)
