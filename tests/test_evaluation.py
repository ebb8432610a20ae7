"""Levels/THINGS metrics on hand-made 5-response toys; bootstrap intervals."""
import os

import numpy as np
import pytest
from scipy import stats

from alignet_data import evaluation

# Similarities that make a model choose a given odd one out: [s01, s02, s12].
ODD = {0: [0.0, 0.0, 1.0], 1: [0.0, 1.0, 0.0], 2: [1.0, 0.0, 0.0], "tie": [1.0, 1.0, 0.0]}


def test_majority_vote_marks_ties_and_ignores_missing():
  choices = np.array([[0, 0, 0, 1, 2], [1, 1, 2, 2, 0], [2, 2, 2, 2, 2], [0, 1, -1, -1, -1], [1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(evaluation.majority_vote(choices), [0, -1, 2, -1, 1])
  with pytest.raises(ValueError, match="positions 0..2"):
    evaluation.vote_counts(np.array([[0, 3]]))


def test_leave_one_out_noise_ceiling_by_hand():
  choices = np.array([
      [0, 0, 0, 1, 2],    # each 0 matches the others' majority 0 (3/5); 1 and 2 do not
      [1, 1, 2, 2, 0],    # every held-out response disagrees with the rest: 0
      [2, 2, 2, 2, 2],    # 1
      [0, 0, 1, 1, 0],    # a held-out 0 faces a 2-2 tie {0, 1}: 1/2 each (x3), a held-out 1 faces 0: 1.5/5
      [0, 0, -1, -1, -1],  # two valid responses that agree: 1
      [0, -1, -1, -1, -1],  # one valid response: no ceiling
  ])
  agree = evaluation.loo_agreement(choices)
  np.testing.assert_allclose(agree[:5], [0.6, 0.0, 1.0, 0.3, 1.0])
  assert np.isnan(agree[5])
  human = evaluation.levels_human(choices, np.array(["coarse"] * 3 + ["fine"] * 3), n_resamples=50)
  assert human["coarse"]["noise_ceiling"]["value"] == pytest.approx((0.6 + 0 + 1) / 3)
  assert human["fine"]["noise_ceiling"]["n"] == 2  # the one-response triplet has no ceiling
  assert human["coarse"]["n_no_majority"] == 1 and human["all"]["n_no_majority"] == 1


def test_levels_accuracy_excludes_no_majority_and_counts_model_ties_wrong():
  choices = np.array([[2] * 5, [0, 0, 0, 1, 1], [1, 1, 2, 2, 0], [1, 1, 1, 0, 2], [2, 2, 2, 0, 0], [0] * 5])
  levels = np.array(["coarse", "coarse", "coarse", "fine", "fine", "fine"])
  sims = np.array([ODD[2], ODD[0], ODD[0], ODD["tie"], ODD[2], ODD[1]])
  out = evaluation.levels_model(sims, choices, levels, n_resamples=20)
  assert out["coarse"]["accuracy"] == 1.0 and out["coarse"]["n"] == 2 and out["coarse"]["n_no_majority"] == 1
  assert out["fine"]["accuracy"] == pytest.approx(1 / 3) and out["fine"]["n"] == 3
  assert out["all"]["accuracy"] == pytest.approx(3 / 5)
  assert evaluation.flat_accuracies(out) == {"coarse": 1.0, "fine": pytest.approx(1 / 3)}


def test_entropy_rt_spearman_matches_scipy_and_drops_slow_responses():
  rng = np.random.default_rng(0)
  n = 200
  sims = rng.normal(0, 1, (n, 3))
  entropy = evaluation.model_entropy(sims)
  rt = np.exp(0.5 + entropy[:, None] + rng.normal(0, 0.3, (n, 5)))
  rt[0, :] = 12.0  # every response over 10 s: the triplet drops out
  out = evaluation.levels_model(sims, np.zeros((n, 5), int), np.array(["boundary"] * n), rt, n_resamples=30)
  log_rt = np.log(rt[1:]).mean(1)
  expected = stats.spearmanr(entropy[1:], log_rt).statistic
  row = out["boundary"]["entropy_rt_spearman"]
  assert row["value"] == pytest.approx(expected) and row["n"] == n - 1 and row["value"] > 0.5
  assert row["ci"][0] <= row["value"] <= row["ci"][1]
  np.testing.assert_allclose(evaluation.mean_log_rt(np.array([[2.0, 11.0, np.nan, 4.0]])), [np.log(8.0) / 2])


def test_bootstrap_ci_contains_estimate_narrows_with_n_and_is_seeded():
  rng = np.random.default_rng(1)
  small = (rng.random(100) < 0.7).astype(float)
  large = (rng.random(1000) < 0.7).astype(float)
  a, b = evaluation.mean_with_ci(small, seed=3), evaluation.mean_with_ci(large, seed=3)
  for r in (a, b):
    assert r["ci"][0] <= r["value"] <= r["ci"][1]
  assert (b["ci"][1] - b["ci"][0]) < (a["ci"][1] - a["ci"][0])
  assert evaluation.mean_with_ci(small, seed=3) == a and evaluation.mean_with_ci(small, seed=4) != a
  assert evaluation.bootstrap_indices(5000, 100, 1000).shape == (100, 1000)  # the paper's 100 x 1,000
  lo, hi = evaluation.bootstrap_ci(np.mean, [large], seed=3)
  assert lo == pytest.approx(b["ci"][0]) and hi == pytest.approx(b["ci"][1])


def test_things_accuracy_reads_item_two_as_the_odd_one_out():
  sims = np.array([ODD[2], ODD[2], ODD[0], ODD["tie"]])
  out = evaluation.things_accuracy(sims, n_resamples=10)
  assert out["accuracy"] == 0.5 and out["n"] == 4


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
  from alignet_data import artifacts, demo_world
  cfg = demo_world.WorldConfig(n_super=3, n_basic_per_super=2, n_sub_per_basic=2, images_per_class=12,
                               things_train=100, things_test=60, levels_per_level=40)

  def fn(writer):
    demo_world.save(demo_world.make_world(cfg), writer)
    return {}
  return artifacts.run_stage("world", str(tmp_path_factory.mktemp("w") / "world"), {"t": 1}, {}, fn,
                             log=lambda _: None).url


def test_evaluate_stage_reports_each_model_per_level_with_cis(small_world, tmp_path):
  import jax

  from alignet_data import artifacts, models
  from pipelines import evaluate_stage
  from trainer import train

  # A "fine-tuned" student: the demo student with perturbed weights, exported the way the train stage does.
  base = models.load_model("demo-student")
  moved = jax.tree.map(lambda p: p * 1.5, base.params)
  os.makedirs(tmp_path / "train")
  train.export_student(str(tmp_path / "train"), {"encoder": moved}, base)

  config = {**evaluate_stage.default_config(), "world": small_world, "train": str(tmp_path / "train"),
            "bootstrap": 20}
  urls = evaluate_stage.input_urls(config)
  assert urls == {"world": small_world, "model_student_after": str(tmp_path / "train")}
  art = artifacts.run_stage("evaluate", str(tmp_path / "eval"), config, urls,
                            lambda w: evaluate_stage.run(config, w), log=lambda _: None)
  report = art.report
  assert set(report["levels"]) == {"student_before", "student_after"}
  for name in ("student_before", "student_after"):
    for lv in ("coarse", "fine", "boundary"):
      row = report["levels"][name][lv]
      assert row["n"] + row["n_no_majority"] == 40
      assert row["ci"][0] <= row["accuracy"] <= row["ci"][1]
      assert -1 <= row["entropy_rt_spearman"]["value"] <= 1
    assert report["things"][name]["n"] == 60
  # Scaling the weights changes the similarities but not every choice; the two models are evaluated separately.
  assert report["accuracy"]["student_before"] != report["accuracy"]["student_after"] or \
      report["entropy_rt_spearman"]["student_before"] != report["entropy_rt_spearman"]["student_after"]
  assert 0 < report["noise_ceiling"]["coarse"] <= 1 and report["bootstrap"]["resamples"] == 20
  with art.open(evaluate_stage.PLOT) as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with art.open("report.md") as f:
    assert "| student_after |" in f.read().decode()

  # Without a train artifact the fine-tuned model is left out rather than failing.
  assert set(evaluate_stage.model_specs({**config, "train": ""})) == {"student_before"}
