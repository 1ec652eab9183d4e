"""The paper's Figure 2: does indirect mutual learning keep two learners apart for longer?

  python -m rml_jax.experiments.coupling --out=runs/coupling

Two 3-layer MLPs learn the real handwritten digits that scikit-learn ships (8x8 scans) from 1/60
of the training labels plus the unlabeled rest. Three variants:
  direct          each learner taught by the other learner's current predictions (eq. 3);
  indirect        each learner taught by the other learner's mean teacher (eq. 4);
  indirect_noise  indirect + model noise (dropout 0.5 on both hidden layers).
Every `--eval_every` steps the two pseudo-label sources (the students for `direct`, the mean
teachers otherwise) are compared on the test images: total variation distance of their softmax
outputs (the paper's measure), argmax disagreement rate, and each one's accuracy. Total variation
also shrinks when models simply grow confident, so the disagreement rate and the accuracies are
the numbers to read it against. Writes coupling.md, coupling.csv and coupling.png into --out.
"""

from __future__ import annotations

import csv
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from rml_jax.step import ema_decay_at, ema_update

VARIANTS = ("direct", "indirect", "indirect_noise")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing stays free)."""
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("steps", 3000, "Training steps per variant.")
  flags.DEFINE_integer("eval_every", 100, "Measure coupling every this many steps.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (label subset and initialisation).")
  flags.DEFINE_float("threshold", 0.7, "Pseudo-label confidence threshold tau.")
  flags.DEFINE_float("unsup_weight", 1.0, "Weight of the pseudo-label loss.")
  flags.DEFINE_float("ema_decay", 0.99, "Mean-teacher decay.")
  flags.DEFINE_float("input_noise", 0.15, "Std of the Gaussian noise on the students' unlabeled "
                     "inputs (the strong view).")
  flags.mark_flags_as_required(["out"])


def load_digits(seed: int, label_fraction: float = 1 / 60):
  """(x_labeled, y_labeled, x_unlabeled, x_test, y_test): [N, 64] float32 in [0, 1], int labels.

  Every fifth image is a test image; 1/60 of the rest is labeled (at least one per class).
  """
  from sklearn.datasets import load_digits as sklearn_digits

  digits = sklearn_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  test = np.arange(len(x)) % 5 == 0
  x_train, y_train = x[~test], y[~test]
  rng = np.random.default_rng(seed)
  count = max(10, int(round(len(x_train) * label_fraction)))
  per_class = [rng.permutation(np.flatnonzero(y_train == c))[0] for c in range(10)]
  rest = rng.permutation(np.setdiff1d(np.arange(len(x_train)), per_class))[:count - 10]
  labeled = np.concatenate([per_class, rest])
  unlabeled = np.setdiff1d(np.arange(len(x_train)), labeled)
  return x_train[labeled], y_train[labeled], x_train[unlabeled], x[test], y[test]


def init_mlp(rng: jax.Array, sizes=(64, 256, 256, 10)) -> list[dict]:
  layers = []
  for key, (fan_in, fan_out) in zip(jax.random.split(rng, len(sizes) - 1),
                                    zip(sizes[:-1], sizes[1:])):
    layers.append({"w": jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in),
                   "b": jnp.zeros((fan_out,))})
  return layers


def mlp(params: list[dict], x: jax.Array, dropout_rng: jax.Array | None = None,
        dropout: float = 0.0) -> jax.Array:
  """[N, 64] -> logits [N, 10]; dropout on the hidden activations when dropout_rng is given."""
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
      if dropout_rng is not None and dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), 1 - dropout, x.shape)
        x = jnp.where(keep, x / (1 - dropout), 0.0)
  return x


def _ce(logits, labels, mask=None):
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
  return jnp.mean(nll if mask is None else nll * mask)


@functools.partial(jax.jit, static_argnames=("variant", "tx", "threshold", "unsup_weight",
                                             "ema_decay", "input_noise"))
def train_step(learners, step, x_l, y_l, x_u, rng, *, variant, tx, threshold, unsup_weight,
               ema_decay, input_noise):
  """learners: ((params, opt_state, ema), (params, opt_state, ema)) -> updated learners."""
  dropout = 0.5 if variant == "indirect_noise" else 0.0
  (params_a, _, ema_a), (params_b, _, ema_b) = learners
  source_a, source_b = (params_a, params_b) if variant == "direct" else (ema_a, ema_b)
  peer_probs = [jax.nn.softmax(mlp(p, x_u)) for p in (source_b, source_a)]  # b teaches a
  new = []
  decay = ema_decay_at(jnp.asarray(step), ema_decay)
  for i, ((params, opt_state, ema), probs) in enumerate(zip(learners, peer_probs)):
    key = jax.random.fold_in(rng, i)
    noisy = x_u + input_noise * jax.random.normal(jax.random.fold_in(key, 7), x_u.shape)
    pseudo, mask = jnp.argmax(probs, -1), (jnp.max(probs, -1) >= threshold).astype(jnp.float32)

    def loss_fn(p, key=key, noisy=noisy, pseudo=pseudo, mask=mask):
      sup = _ce(mlp(p, x_l, jax.random.fold_in(key, 1), dropout), y_l)
      unsup = _ce(mlp(p, noisy, jax.random.fold_in(key, 2), dropout), pseudo, mask)
      return sup + unsup_weight * unsup

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = ema_update(ema, params, decay)
    new.append((params, opt_state, ema))
  return tuple(new)


@jax.jit
def coupling_metrics(params_a, params_b, x, y):
  """TV distance, argmax disagreement and the two accuracies of two models on x [N, 64]."""
  probs_a, probs_b = jax.nn.softmax(mlp(params_a, x)), jax.nn.softmax(mlp(params_b, x))
  pred_a, pred_b = probs_a.argmax(-1), probs_b.argmax(-1)
  return {"total_variation": jnp.mean(0.5 * jnp.abs(probs_a - probs_b).sum(-1)),
          "disagreement": jnp.mean(pred_a != pred_b),
          "accuracy_a": jnp.mean(pred_a == y), "accuracy_b": jnp.mean(pred_b == y)}


def run_variant(variant: str, seed: int, steps: int, eval_every: int, **hparams) -> list[dict]:
  """Trains one variant; returns a row of coupling metrics every eval_every steps."""
  x_l, y_l, x_u, x_test, y_test = load_digits(seed)
  tx = optax.adam(1e-3)
  rng = jax.random.key(seed)
  learners = []
  for i in range(2):  # differently initialised learners
    params = init_mlp(jax.random.fold_in(rng, 100 + i))
    learners.append((params, tx.init(params), jax.tree.map(jnp.copy, params)))
  learners = tuple(learners)
  data_rng = np.random.default_rng(seed)
  rows = []
  for step in range(1, steps + 1):
    batch_u = x_u[data_rng.integers(0, len(x_u), 256)]
    learners = train_step(learners, jnp.float32(step - 1), x_l, y_l, batch_u,
                          jax.random.fold_in(rng, step), variant=variant, tx=tx, **hparams)
    if step % eval_every == 0 or step == 1:
      (params_a, _, ema_a), (params_b, _, ema_b) = learners
      pair = (params_a, params_b) if variant == "direct" else (ema_a, ema_b)
      metrics = jax.device_get(coupling_metrics(*pair, x_test, y_test))
      rows.append({"variant": variant, "seed": seed, "step": step,
                   **{k: float(v) for k, v in metrics.items()}})
  return rows


def summarize(rows: list[dict], checkpoints: list[int]) -> str:
  lines = ["| variant | step | total variation | disagreement | accuracy (mean of the two) |",
           "|---|---|---|---|---|"]
  for variant in dict.fromkeys(r["variant"] for r in rows):
    for step in checkpoints:
      mine = [r for r in rows if r["variant"] == variant and r["step"] == step]
      if not mine:
        continue
      mean = lambda key, mine=mine: np.mean([r[key] for r in mine])  # noqa: E731
      accuracy = np.mean([(r["accuracy_a"] + r["accuracy_b"]) / 2 for r in mine])
      lines.append(f"| {variant} | {step} | {mean('total_variation'):.4f} | "
                   f"{mean('disagreement'):.4f} | {accuracy:.4f} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for variant in dict.fromkeys(r["variant"] for r in rows):
    steps = sorted({r["step"] for r in rows if r["variant"] == variant})
    for ax, key in zip(axes, ("total_variation", "disagreement", "accuracy_a")):
      values = [np.mean([r[key] for r in rows if r["variant"] == variant and r["step"] == s])
                for s in steps]
      ax.plot(steps, values, label=variant)
      ax.set_title(key.replace("_a", " (learner a)").replace("_", " "))
      ax.set_xlabel("step")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  hparams = dict(threshold=FLAGS.threshold, unsup_weight=FLAGS.unsup_weight,
                 ema_decay=FLAGS.ema_decay, input_noise=FLAGS.input_noise)
  rows = []
  for variant in VARIANTS:
    for seed in (int(s) for s in FLAGS.seeds):
      rows += run_variant(variant, seed, FLAGS.steps, FLAGS.eval_every, **hparams)
      print(f"{variant} seed {seed}: final {rows[-1]}", flush=True)
  with open(os.path.join(FLAGS.out, "coupling.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  checkpoints = sorted({1, FLAGS.eval_every, 5 * FLAGS.eval_every, FLAGS.steps // 2,
                        FLAGS.steps} & {r["step"] for r in rows})
  text = ("# Teacher coupling on handwritten digits (Figure 2 analogue)\n\n"
          f"Means over seeds {FLAGS.seeds}, 1/60 labels, tau={FLAGS.threshold}; measured "
          "between the two pseudo-label sources on the test images.\n\n"
          + summarize(rows, checkpoints))
  with open(os.path.join(FLAGS.out, "coupling.md"), "w") as f:
    f.write(text)
  plot(rows, os.path.join(FLAGS.out, "coupling.png"))
  print(text, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
