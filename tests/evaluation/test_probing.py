"""Few-shot probes: the split, the closed-form ridge and optax logistic probes, Wald intervals."""
import numpy as np
import pytest

from alignet_data.evaluation import probing


def _clusters(n_classes=5, per_class=30, dim=16, noise=0.3, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(n_classes, dim))
  labels = np.repeat(np.arange(n_classes), per_class)
  return centres[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def test_shots_are_k_per_class_seeded_and_disjoint_from_the_test_set():
  labels = np.array([0] * 5 + [1] * 5 + [2] * 1 + [-1] * 3)  # class 2 has a single example; -1 = unlabelled
  train, test, skipped = probing.sample_shots(labels, 1, seed=0)
  assert skipped == 1 and len(train) == 2 and len(test) == 8
  assert set(labels[train]) == {0, 1} and not set(train) & set(test) and set(labels[test]) == {0, 1}
  again, _, _ = probing.sample_shots(labels, 1, seed=0)
  np.testing.assert_array_equal(train, again)
  assert any(not np.array_equal(train, probing.sample_shots(labels, 1, seed=s)[0]) for s in range(1, 6))
  with pytest.raises(ValueError, match="more than 5"):
    probing.sample_shots(labels, 5, seed=0)


def test_ridge_probe_by_hand():
  # Two orthogonal training points, l2 -> 0: the probe maps each onto its own +-1 target exactly.
  x = np.array([[1.0, 0.0], [0.0, 1.0]])
  pred = probing.ridge_predict(x, np.array([0, 1]), np.array([[2.0, 0.1], [0.2, 3.0], [-1.0, 0.0]]), 2, l2=1e-9)
  assert pred.tolist() == [0, 1, 1]  # (-1, 0) scores [-1, +1]: class 1
  # Primal and dual solutions agree.
  rng = np.random.default_rng(0)
  a, y, b = rng.normal(size=(8, 3)), rng.integers(0, 3, 8), rng.normal(size=(20, 3))
  wide = np.concatenate([a, np.zeros((8, 10))], 1)
  np.testing.assert_array_equal(probing.ridge_predict(a, y, b, 3), probing.ridge_predict(
      wide, y, np.concatenate([b, np.zeros((20, 10))], 1), 3))


@pytest.mark.parametrize("probe", ["ridge", "logistic"])
def test_few_shot_separates_clusters_and_reports_wald_intervals(probe):
  x, labels = _clusters()
  out = probing.few_shot(x, labels, (1, 10), repeats=2, seed=0, probe=probe)
  for k, n_test in ((1, 145), (10, 100)):
    row = out[f"{k}shot"]
    assert row["n"] == n_test and row["n_train"] == 5 * k and row["classes"] == 5
    assert row["accuracy"] > 0.9 and row["ci"][0] <= row["accuracy"] <= row["ci"][1]
  # Random features: near chance (1/5).
  noise = np.random.default_rng(3).normal(size=x.shape)
  assert probing.few_shot(noise, labels, (10,), repeats=3, probe=probe)["10shot"]["accuracy"] < 0.45
  assert probing.few_shot(x, labels, (1,), repeats=2, seed=0, probe=probe) == {"1shot": out["1shot"]}  # seeded


def test_probe_is_scale_invariant_and_checks_inputs():
  x, labels = _clusters(noise=1.0)
  a = probing.few_shot(x, labels, (1,), repeats=2)["1shot"]["accuracy"]
  assert probing.few_shot(100 * x + 5, labels, (1,), repeats=2)["1shot"]["accuracy"] == pytest.approx(a)
  with pytest.raises(ValueError, match="one label per"):
    probing.few_shot(x, labels[:-1])
  with pytest.raises(ValueError, match="Unknown probe"):
    probing.few_shot(x, labels, probe="svm")
  correct = probing.correct_vector(x, labels, 1, seed=0)
  assert np.isnan(correct).sum() == 5 and set(np.unique(correct[~np.isnan(correct)])) <= {0.0, 1.0}
