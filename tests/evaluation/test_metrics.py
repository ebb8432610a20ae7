"""Levels/THINGS metrics on hand-made 5-response toys; bootstrap intervals."""
import os

import numpy as np
import pytest
from scipy import stats

from alignet_data.evaluation import metrics

# Similarities that make a model choose a given odd one out: [s01, s02, s12].
ODD = {0: [0.0, 0.0, 1.0], 1: [0.0, 1.0, 0.0], 2: [1.0, 0.0, 0.0], "tie": [1.0, 1.0, 0.0]}


def test_majority_vote_marks_ties_and_ignores_missing():
  choices = np.array([[0, 0, 0, 1, 2], [1, 1, 2, 2, 0], [2, 2, 2, 2, 2], [0, 1, -1, -1, -1], [1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(metrics.majority_vote(choices), [0, -1, 2, -1, 1])
  with pytest.raises(ValueError, match="positions 0..2"):
    metrics.vote_counts(np.array([[0, 3]]))


def test_leave_one_out_noise_ceiling_by_hand():
  choices = np.array([
      [0, 0, 0, 1, 2],    # each 0 matches the others' majority 0 (3/5); 1 and 2 do not
      [1, 1, 2, 2, 0],    # every held-out response disagrees with the rest: 0
      [2, 2, 2, 2, 2],    # 1
      [0, 0, 1, 1, 0],    # a held-out 0 faces a 2-2 tie {0, 1}: 1/2 each (x3), a held-out 1 faces 0: 1.5/5
      [0, 0, -1, -1, -1],  # two valid responses that agree: 1
      [0, -1, -1, -1, -1],  # one valid response: no ceiling
  ])
  agree = metrics.loo_agreement(choices)
  np.testing.assert_allclose(agree[:5], [0.6, 0.0, 1.0, 0.3, 1.0])
  assert np.isnan(agree[5])
  human = metrics.levels_human(choices, np.array(["coarse"] * 3 + ["fine"] * 3), n_resamples=50)
  assert human["coarse"]["noise_ceiling"]["value"] == pytest.approx((0.6 + 0 + 1) / 3)
  assert human["fine"]["noise_ceiling"]["n"] == 2  # the one-response triplet has no ceiling
  assert human["coarse"]["n_no_majority"] == 1 and human["all"]["n_no_majority"] == 1


def test_levels_accuracy_excludes_no_majority_and_counts_model_ties_wrong():
  choices = np.array([[2] * 5, [0, 0, 0, 1, 1], [1, 1, 2, 2, 0], [1, 1, 1, 0, 2], [2, 2, 2, 0, 0], [0] * 5])
  levels = np.array(["coarse", "coarse", "coarse", "fine", "fine", "fine"])
  sims = np.array([ODD[2], ODD[0], ODD[0], ODD["tie"], ODD[2], ODD[1]])
  out = metrics.levels_model(sims, choices, levels, n_resamples=20)
  assert out["coarse"]["accuracy"] == 1.0 and out["coarse"]["n"] == 2 and out["coarse"]["n_no_majority"] == 1
  assert out["fine"]["accuracy"] == pytest.approx(1 / 3) and out["fine"]["n"] == 3
  assert out["all"]["accuracy"] == pytest.approx(3 / 5)
  assert metrics.flat_accuracies(out) == {"coarse": 1.0, "fine": pytest.approx(1 / 3)}


def test_entropy_rt_spearman_matches_scipy_and_drops_slow_responses():
  rng = np.random.default_rng(0)
  n = 200
  sims = rng.normal(0, 1, (n, 3))
  entropy = metrics.model_entropy(sims)
  rt = np.exp(0.5 + entropy[:, None] + rng.normal(0, 0.3, (n, 5)))
  rt[0, :] = 12.0  # every response over 10 s: the triplet drops out
  out = metrics.levels_model(sims, np.zeros((n, 5), int), np.array(["boundary"] * n), rt, n_resamples=30)
  log_rt = np.log(rt[1:]).mean(1)
  expected = stats.spearmanr(entropy[1:], log_rt).statistic
  row = out["boundary"]["entropy_rt_spearman"]
  assert row["value"] == pytest.approx(expected) and row["n"] == n - 1 and row["value"] > 0.5
  assert row["ci"][0] <= row["value"] <= row["ci"][1]
  np.testing.assert_allclose(metrics.mean_log_rt(np.array([[2.0, 11.0, np.nan, 4.0]])), [np.log(8.0) / 2])
  # Human disagreement: the entropy of the response distribution, by hand; slower where people disagree.
  h = metrics.response_entropy(np.array([[0, 0, 0, 0, 0], [0, 0, 1, 1, 2], [-1] * 5]))
  np.testing.assert_allclose(h[:2], [0.0, -(2 * 0.4 * np.log(0.4) + 0.2 * np.log(0.2))])
  assert np.isnan(h[2])
  choices = np.array([[0] * 5, [0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 2]] * 5)
  rts = np.exp(metrics.response_entropy(choices))[:, None] * np.ones((1, 5))
  human = metrics.levels_human(choices, np.array(["fine"] * 20), rts, n_resamples=10)
  assert human["fine"]["entropy_rt_spearman"]["value"] == pytest.approx(1.0)


def test_bootstrap_ci_contains_estimate_narrows_with_n_and_is_seeded():
  rng = np.random.default_rng(1)
  small = (rng.random(100) < 0.7).astype(float)
  large = (rng.random(1000) < 0.7).astype(float)
  a, b = metrics.mean_with_ci(small, seed=3), metrics.mean_with_ci(large, seed=3)
  for r in (a, b):
    assert r["ci"][0] <= r["value"] <= r["ci"][1]
  assert (b["ci"][1] - b["ci"][0]) < (a["ci"][1] - a["ci"][0])
  assert metrics.mean_with_ci(small, seed=3) == a and metrics.mean_with_ci(small, seed=4) != a
  assert metrics.bootstrap_indices(5000, 100, 1000).shape == (100, 1000)  # the paper's 100 x 1,000
  lo, hi = metrics.bootstrap_ci(np.mean, [large], seed=3)
  assert lo == pytest.approx(b["ci"][0]) and hi == pytest.approx(b["ci"][1])


def test_wald_interval_by_hand():
  lo, hi = metrics.wald_ci(0.8, 100)
  assert lo == pytest.approx(0.8 - 1.959964 * 0.04, abs=1e-6) and hi == pytest.approx(0.8 + 1.959964 * 0.04, abs=1e-6)
  assert metrics.wald_ci(1.0, 10) == [1.0, 1.0] and metrics.wald_ci(0.02, 10)[0] == 0.0  # clipped
  assert np.isnan(metrics.wald_ci(0.5, 0)[0])


def test_paired_comparison_difference_and_mcnemar_by_hand():
  a = np.array([1, 1, 1, 1, 1, 0, 1, 0, np.nan] + [1] * 20, float)
  b = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1] + [1] * 20, float)
  out = metrics.paired_comparison(a, b, n_resamples=200)
  assert out["n"] == 28 and out["a_only"] == 4 and out["b_only"] == 1  # the NaN item is dropped from both
  assert out["difference"] == pytest.approx(3 / 28)
  assert out["p_value"] == pytest.approx(stats.binomtest(4, 5, 0.5).pvalue)  # exact McNemar = 0.375
  assert out["ci"][0] <= out["difference"] <= out["ci"][1]
  same = metrics.paired_comparison(b, b)
  assert same["difference"] == 0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
  with pytest.raises(ValueError, match="same items"):
    metrics.paired_comparison(a, b[:5])


def test_things_soft_labels_kl_and_correlation_by_hand():
  sims = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))  # softmax at tau 1 gives these probabilities
  human = np.array([[0.5, 0.25, 0.25], [0.6, 0.2, 0.2]])
  out = metrics.things_soft(sims, human, n_resamples=20)
  q = np.exp(sims)
  kl = (human * np.log(human / q)).sum(1)
  assert out["kl"]["value"] == pytest.approx(kl.mean()) and kl[0] == pytest.approx(0)
  assert out["pearson"]["value"] == pytest.approx(stats.pearsonr(human.ravel(), q.ravel()).statistic)
  assert out["spearman"]["value"] == pytest.approx(stats.spearmanr(human.ravel(), q.ravel()).statistic)
  # A model that is certain of the wrong pair: log q underflows, KL stays finite (computed from log q).
  assert np.isfinite(metrics.things_soft(np.array([[0.0, 0.0, 2000.0]]), human[:1])["kl"]["value"])
  with pytest.raises(ValueError, match="probabilities"):
    metrics.things_soft(sims, human * 2)


def test_things_accuracy_reads_item_two_as_the_odd_one_out():
  sims = np.array([ODD[2], ODD[2], ODD[0], ODD["tie"]])
  out = metrics.things_accuracy(sims, n_resamples=10)
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


def _assert_every_interval_labelled(node, where="report"):
  """Every "ci" has a "ci_method" beside it and every "intervals" entry is keyed by a method; returns the methods."""
  used = set()
  if isinstance(node, dict):
    if "ci" in node:
      assert isinstance(node.get("ci_method"), str), f"{where} has an interval without its method"
      used.add(node["ci_method"])
    used.update(node.get("intervals", {}))
    assert not any(k.endswith("_ci") for k in node), f"{where} has an unlabelled *_ci key"
    for k, v in node.items():
      used |= _assert_every_interval_labelled(v, f"{where}.{k}")
  elif isinstance(node, list):
    for i, v in enumerate(node):
      used |= _assert_every_interval_labelled(v, f"{where}[{i}]")
  for m in used:
    assert m in metrics.METHODS or m.startswith("bootstrap_subsample_"), m
  return used


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
    assert report["things"]["per_model"][name]["n"] == 60
    assert report["things"]["per_model"][name]["soft"]["kl"]["n"] == 60  # the world's soft labels
    for shots in ("1shot", "10shot"):
      probe = report["probe"][name][shots]
      assert probe["ci"][0] <= probe["accuracy"] <= probe["ci"][1] and probe["n"] > 0
  assert report["things"]["model"] == report["primary"] == "student_before"
  # Scaling the weights changes the similarities but not every choice; the two models are evaluated separately.
  assert report["accuracy"]["student_before"] != report["accuracy"]["student_after"] or \
      report["entropy_rt_spearman"]["student_before"] != report["entropy_rt_spearman"]["student_after"]
  assert 0 < report["noise_ceiling"]["coarse"] <= 1 and report["bootstrap"]["resamples"] == 20
  assert set(report["hierarchy"]["distance_change"]) == {"same_subordinate", "same_basic", "same_superordinate",
                                                        "different_superordinate"}
  comp = report["comparisons"]["student_after_vs_student_before"]
  assert {"things", "levels/coarse", "probe/1shot"} <= set(comp)
  assert comp["things"]["difference"] == pytest.approx(
      report["things"]["per_model"]["student_after"]["accuracy"] - report["things"]["per_model"]["student_before"][
          "accuracy"])
  assert set(report["plots"]) == {evaluate_stage.PLOT, evaluate_stage.PLOT_RT, evaluate_stage.PLOT_PCA,
                                  evaluate_stage.PLOT_HIERARCHY}
  for plot in report["plots"]:
    with art.open(plot) as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with art.open("report.md") as f:
    md = f.read().decode()
  assert "| student_after |" in md and all(f"]({plot})" in md for plot in report["plots"])
  # Every interval names its method; THINGS has the item and the object bootstrap (and Wald); the legend lists
  # exactly the methods used, in report.json and report.md.
  used = _assert_every_interval_labelled(report)
  assert used == {"bootstrap_items_n", "bootstrap_objects", "wald", "bootstrap_images"}
  assert set(report["bootstrap"]["methods"]) == used and report["bootstrap"]["protocol"] == "items_n"
  assert set(report["things"]["intervals"]) == {"bootstrap_items_n", "bootstrap_objects", "wald"}
  assert "bootstrap_objects" in comp["things"]["intervals"] and comp["levels/coarse"]["ci_method"] == \
      "bootstrap_items_n"
  assert "## Interval methods" in md and all(f"`{m}`" in md for m in used)
  assert "95% CI, bootstrap_items_n" in md and "95% CI, bootstrap_objects" in md and "95% CI, wald" in md

  # Without a train artifact the fine-tuned model is left out rather than failing.
  assert set(evaluate_stage.model_specs({**config, "train": ""})) == {"student_before"}


def test_evaluate_cli_on_a_npy_matrix_and_triplet_file_needs_no_world(tmp_path, capsys):
  """The Acceptance command's shape on a toy: 4 concepts, a .npy embedding, a text triplet file."""
  import json

  from pipelines import cli

  x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
  np.save(tmp_path / "emb.npy", x)
  # (i, j, odd): the first two agree with x (pairs 0-1 and 2-3 are the similar ones), the third does not.
  np.savetxt(tmp_path / "t.txt", [[0, 1, 2], [2, 3, 0], [0, 2, 1]], fmt="%d")
  np.save(tmp_path / "soft.npy", np.array([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3]]))
  out = tmp_path / "R"
  rc = cli.main(["evaluate", "--embeddings", str(tmp_path / "emb.npy"), "--things-triplets", str(tmp_path / "t.txt"),
                 "--things-soft-labels", str(tmp_path / "soft.npy"), "--out", str(out)])
  assert rc == 0
  report = json.loads((out / "report.json").read_text())
  assert report["things"]["accuracy"] == pytest.approx(2 / 3) and report["things"]["n"] == 3
  assert report["things"]["ci"][0] <= 2 / 3 <= report["things"]["ci"][1]
  assert report["things"]["model"] == "emb" and report["models"]["emb"]["kind"] == "npy"
  assert "kl" in report["things"]["soft"] and "levels" not in report and report["skipped"] == []
  assert "| emb | 0.667" in (out / "report.md").read_text()
  # A user error is one clear line, not a traceback.
  assert cli.main(["evaluate", "--embeddings", str(tmp_path / "missing.npy"), "--things-triplets",
                   str(tmp_path / "t.txt"), "--out", str(tmp_path / "R2")]) == 1
  assert "missing.npy" in capsys.readouterr().err


@pytest.mark.parametrize("file_name, expected", [("spose49.npy", 0.6405), ("minilm384_concepts.npy", 0.4340)])
def test_real_things_embeddings_score_the_published_accuracy(shared_data, tmp_path, file_name, expected):
  """Acceptance: `alignet evaluate --embeddings spose49.npy --things-triplets triplets_50k.txt --out R`."""
  import json

  from pipelines import cli

  things = shared_data / "things"
  assert cli.main(["evaluate", "--embeddings", str(things / file_name), "--things-triplets",
                   str(things / "triplets_50k.txt"), "--out", str(tmp_path / "R")]) == 0
  report = json.loads((tmp_path / "R" / "report.json").read_text())
  acc = report["things"]["accuracy"]
  assert acc == pytest.approx(expected, abs=0.0005) and report["things"]["n"] == 50000
  assert report["things"]["ci"][0] < acc < report["things"]["ci"][1]
  assert (tmp_path / "R" / "report.md").exists()
  # 50,000 triplets over 1,854 objects: the whole-n item interval is the narrow one, the object interval wider.
  iv = report["things"]["intervals"]
  width = {m: hi - lo for m, (lo, hi) in iv.items()}
  assert report["things"]["ci_method"] == "bootstrap_items_n" and width["bootstrap_items_n"] < 0.012
  assert width["bootstrap_objects"] > width["bootstrap_items_n"]


def test_cli_flags_build_the_config():
  from pipelines import cli, evaluate_stage

  args = cli.build_parser("evaluate").parse_args([
      "evaluate", "--out", "R", "--embeddings", "data/spose49.npy", "--embeddings", "teacher=runs/demo/embed",
      "--transform", "teacher=runs/demo/align", "--things-triplets", "t.txt", "--levels", "levels/",
      "--rsa", "likert=m.npy,s.txt", "--rsa", "arr=d.npy,s.txt,rdm", "--shots", "1,10", "--probe-split", "train"])
  config = evaluate_stage.config_from_args(args)
  assert config["models"] == {"spose49": "embeddings:data/spose49.npy",
                              "teacher": {"model": "embeddings:runs/demo/embed", "transform": "runs/demo/align"}}
  assert config["things_triplets"] == "t.txt" and config["levels"] == "levels/"
  assert [r["kind"] for r in config["rsa"]] == ["rsm", "rdm"]
  assert config["probe"]["shots"] == [1, 10] and config["probe"]["split"] == "train"
  assert evaluate_stage._bootstrap(config) == {"protocol": "items_n", "resamples": 1000, "size": None}
  paper = evaluate_stage.config_from_args(cli.build_parser("evaluate").parse_args(
      ["evaluate", "--out", "R", "--embeddings", "e.npy", "--bootstrap-protocol", "paper"]))
  assert evaluate_stage._bootstrap(paper) == {"protocol": "paper", "resamples": 100, "size": 1000}
  sized = evaluate_stage.config_from_args(cli.build_parser("evaluate").parse_args(
      ["evaluate", "--out", "R", "--embeddings", "e.npy", "--bootstrap-size", "500", "--bootstrap-resamples", "50"]))
  assert evaluate_stage._bootstrap(sized) == {"protocol": "paper", "resamples": 50, "size": 500}
  assert evaluate_stage.input_urls(config) == {
      "model_spose49": "data/spose49.npy", "model_teacher": "runs/demo/embed", "transform_teacher": "runs/demo/align",
      "things_triplets": "t.txt", "levels_0": "levels/", "rsa_likert_matrix": "m.npy", "rsa_likert_stimuli": "s.txt",
      "rsa_arr_matrix": "d.npy", "rsa_arr_stimuli": "s.txt"}
  with pytest.raises(ValueError, match="no model named"):
    evaluate_stage.config_from_args(cli.build_parser("evaluate").parse_args(
        ["evaluate", "--out", "R", "--transform", "x=a"]))
  with pytest.raises(ValueError, match="MATRIX,STIMULI"):
    evaluate_stage.config_from_args(cli.build_parser("evaluate").parse_args(
        ["evaluate", "--out", "R", "--rsa", "x=a.npy"]))
