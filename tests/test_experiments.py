"""The experiment scripts' pieces: rung configs, the ablation summary, the coupling measures."""

import jax
import numpy as np
import pytest

from configs import digits
from rml_jax.errors import UserError
from rml_jax.experiments import ablation, coupling


def test_rungs_change_only_what_they_name():
  base = digits.get_config()
  sup = ablation.rung_config(base, "supervised", seed=3)
  assert sup.rml.mode == "supervised" and sup.seed == 3
  iml = ablation.rung_config(base, "iml", seed=0)
  assert iml.augment.num_ops == 0 and iml.augment.cutmix_prob == 0.0  # no input noise
  assert iml.model.dropout_rate == base.model.dropout_rate
  full = ablation.rung_config(base, "rml_two_stages", seed=1, extra="total_steps=7")
  assert (full.rml.mode, full.rml.stages, full.total_steps) == ("rml", 2, 7)
  assert (full.model.dropout_rate, full.model.survival_prob) == (0.5, 0.8)
  assert full.augment.num_ops == base.augment.num_ops
  rml = ablation.rung_config(base, "rml_input_noise", seed=0)  # rectification, no model noise
  assert rml.rml.mode == "rml" and rml.model.survival_prob == base.model.survival_prob
  assert rml.augment.cutmix_prob == base.augment.cutmix_prob
  # The labeled subset is the same for every rung and seed.
  assert {c.data.split_seed for c in (sup, iml, full)} == {base.data.split_seed}
  assert base.rml.mode == "iml"  # the base config is not modified
  with pytest.raises(UserError, match="unknown config key"):
    ablation.rung_config(base, "iml", 0, extra="no_such_key=1")


def test_ablation_summary_means_and_spreads():
  rows = [{"rung": "supervised", "seed": 0, "teacher_a": 40, "teacher_b": 38, "student_a": 39,
           "student_b": 37},
          {"rung": "supervised", "seed": 1, "teacher_a": 36, "teacher_b": 34, "student_a": 35,
           "student_b": 33},
          {"rung": "iml", "seed": 0, "teacher_a": 45, "teacher_b": 43, "student_a": 44,
           "student_b": 42}]
  table = ablation.summarize(rows)
  sup, iml = table
  assert sup["teacher_mean"] == pytest.approx(37.0)
  assert sup["teacher_std"] == pytest.approx(np.std([39.0, 35.0], ddof=1))
  assert sup["student_mean"] == pytest.approx(36.0) and iml["teacher_std"] == 0.0
  text = ablation.markdown(table, "digits.py", "note")
  assert "| IML, no noise | 1 | 44.00 ± 0.00 | 43.00 ± 0.00 | +7.00 |  |  |" in text


def test_ablation_reads_coupling_from_the_event_files(tmp_path):
  from clu import metric_writers

  writer = metric_writers.create_default_writer(str(tmp_path))
  for step, tv, disagreement in ((50, 0.3, 0.2), (100, 0.1, 0.05), (150, 0.08, 0.04)):
    writer.write_scalars(step, {"teacher_tv": tv, "teacher_disagreement": disagreement,
                                "loss_a": 1.0})
  writer.write_scalars(100, {"teacher_tv": 0.12})  # a resumed run repeats a step: last wins
  writer.close()
  scalars = ablation.train_scalars(str(tmp_path), ablation.COUPLING_TAGS)
  assert set(scalars) == set(ablation.COUPLING_TAGS)
  assert scalars["teacher_tv"] == pytest.approx({50: 0.3, 100: 0.12, 150: 0.08})
  summary = ablation.coupling_summary(scalars)
  assert summary == pytest.approx({"tv_first": 0.3, "tv_last": 0.08, "disagreement_last": 0.04})
  assert np.isnan(ablation.coupling_summary({})["tv_first"])  # the supervised rung logs none
  rows = [{"rung": "iml_input_noise", "seed": s, "teacher_a": 50, "teacher_b": 50,
           "student_a": 50, "student_b": 50, **summary} for s in (0, 1)]
  text = ablation.markdown(ablation.summarize(rows), "digits.py", "note")
  assert "| 0.300 / 0.080 | 0.040 |" in text


def test_model_noise_rungs_differ_only_in_the_survival_schedule():
  base = digits.get_config()
  uniform = ablation.rung_config(base, "rml", seed=0)
  linear = ablation.rung_config(base, "rml_linear", seed=0)
  assert (uniform.model.survival_schedule, linear.model.survival_schedule) == ("uniform",
                                                                                "linear")
  linear.model.survival_schedule = "uniform"
  assert linear.to_dict() == uniform.to_dict()
  assert base.augment.strong_views == "per_student"
  assert ablation.rung_config(base, "iml_shared_view", 0).augment.strong_views == "shared"


def test_coupling_measures_match_numpy():
  rng = jax.random.key(0)
  params_a, params_b = coupling.init_mlp(rng), coupling.init_mlp(jax.random.fold_in(rng, 1))
  x = np.random.default_rng(0).uniform(size=(50, 64)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 10, 50)
  got = jax.device_get(coupling.coupling_metrics(params_a, params_b, x, y))

  def forward(params):
    h = x
    for i, layer in enumerate(params):
      h = h @ np.asarray(layer["w"]) + np.asarray(layer["b"])
      h = np.maximum(h, 0) if i < len(params) - 1 else h
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  pa, pb = forward(params_a), forward(params_b)
  np.testing.assert_allclose(got["total_variation"], 0.5 * np.abs(pa - pb).sum(-1).mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(got["disagreement"], (pa.argmax(-1) != pb.argmax(-1)).mean())
  np.testing.assert_allclose(got["accuracy_a"], (pa.argmax(-1) == y).mean())


def test_coupling_split_has_one_sixtieth_labels_and_every_class():
  x_l, y_l, x_u, x_test, y_test = coupling.load_digits(seed=0)
  total_train = len(x_l) + len(x_u)
  assert len(x_l) == round(total_train / 60)
  assert set(y_l.tolist()) == set(range(10))
  assert len(x_test) == len(y_test) and len(x_test) + total_train == 1797
