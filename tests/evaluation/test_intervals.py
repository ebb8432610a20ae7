"""Intervals mean what their labels say: coverage on simulated data whose true accuracy is known.

Seeded throughout, so each coverage figure is a fixed number (the bounds allow for its Monte-Carlo spread at
200 simulated data sets: +-3 percentage points is two standard errors around 95%).
"""
import numpy as np
import pytest

from alignet_data.evaluation import metrics

TRUE = 0.7
DATASETS = 200


def _covers(ci, value=TRUE):
  return ci[0] <= value <= ci[1]


def test_whole_n_item_bootstrap_covers_the_true_accuracy_95_percent():
  rng = np.random.default_rng(0)
  hits = []
  for d in range(DATASETS):
    row = metrics.mean_with_ci((rng.random(400) < TRUE).astype(float), n_resamples=1000, seed=d)
    assert row["ci_method"] == "bootstrap_items_n" and row["n"] == 400
    hits.append(_covers(row["ci"]))
  assert 0.92 <= np.mean(hits) <= 0.98


def test_the_papers_protocol_is_labelled_and_measures_1000_item_means_not_the_precision_on_n():
  """100 resamples of 1,000 items on n = 5,000: wider than the precision on 5,000 items by about sqrt(5)."""
  rng = np.random.default_rng(1)
  n, hits, widths = 5000, [], []
  for d in range(100):
    x = (rng.random(n) < TRUE).astype(float)
    paper = metrics.mean_with_ci(x, n_resamples=100, size=1000, seed=d)
    assert paper["ci_method"] == "bootstrap_subsample_1000"
    hits.append(_covers(paper["ci"]))
    widths.append(paper["ci"][1] - paper["ci"][0])
  exact = 2 * 1.959964 * np.sqrt(TRUE * (1 - TRUE) / n)
  assert np.mean(hits) > 0.99  # over-covers: it is not a 95% interval for the estimate on n items
  assert np.mean(widths) / exact == pytest.approx(np.sqrt(n / 1000), rel=0.15)
  # With no more items than the resample size, the protocol IS the whole-n bootstrap, and says so.
  assert metrics.mean_with_ci(x[:300], n_resamples=100, size=1000)["ci_method"] == "bootstrap_items_n"


def _object_world(rng, k=30, n=3000):
  """Triplets over k objects drawn from a population with mean easiness TRUE: object p ~ U(0.4, 1.0); a triplet
  is answered correctly with the mean p of its three objects. The data vary with the objects drawn."""
  p = rng.uniform(0.4, 1.0, k)
  triplets = np.argsort(rng.random((n, k)), axis=1)[:, :3]
  return (rng.random(n) < p[triplets].mean(1)).astype(float), triplets


def test_object_bootstrap_covers_when_objects_are_sampled_and_the_item_bootstrap_does_not():
  rng = np.random.default_rng(2)
  items, objects = [], []
  for d in range(DATASETS):
    correct, triplets = _object_world(rng)
    row = metrics.mean_with_ci(correct, n_resamples=400, seed=d, objects=triplets)
    assert set(row["intervals"]) == {"bootstrap_items_n", "bootstrap_objects"}
    items.append(_covers(row["ci"]))
    objects.append(_covers(row["intervals"]["bootstrap_objects"]))
  assert 0.92 <= np.mean(objects) <= 0.99
  assert np.mean(items) < 0.7  # right for these triplets, blind to which objects were drawn


def test_object_weights_count_each_triplet_once_per_draw_of_its_three_objects():
  triplets = np.array([[0, 1, 2], [0, 1, 3], [1, 2, 3]])
  w = np.concatenate(list(metrics.object_weights(triplets, 2, seed=5)))
  draws = np.random.default_rng([5, 4, 3, 3]).integers(0, 4, (2, 4))
  for row, d in zip(w, draws, strict=True):
    np.testing.assert_array_equal(row, np.bincount(d, minlength=4)[triplets].prod(1))
  # Paired: the same triplets give the same draws for every model.
  a = np.concatenate(list(metrics.object_weights(triplets, 3, seed=1)))
  np.testing.assert_array_equal(a, np.concatenate(list(metrics.object_weights(triplets, 3, seed=1))))


def test_every_interval_of_a_metric_names_its_method():
  rng = np.random.default_rng(3)
  sims = rng.normal(size=(300, 3))
  triplets = np.argsort(rng.random((300, 20)), axis=1)[:, :3]
  acc = metrics.things_accuracy(sims, n_resamples=50, objects=triplets)
  assert acc["ci_method"] == "bootstrap_items_n"
  assert set(acc["intervals"]) == {"bootstrap_items_n", "bootstrap_objects", "wald"}
  assert acc["intervals"]["wald"] == metrics.wald_ci(acc["accuracy"], 300)
  soft = metrics.things_soft(sims, np.full((300, 3), 1 / 3), n_resamples=20, objects=triplets)
  for key in ("kl", "pearson", "spearman"):
    assert soft[key]["ci_method"] == "bootstrap_items_n" and "bootstrap_objects" in soft[key]["intervals"]
  comp = metrics.paired_comparison(rng.integers(0, 2, 300), rng.integers(0, 2, 300), n_resamples=50,
                                   objects=triplets)
  assert comp["ci_method"] == "bootstrap_items_n" and "bootstrap_objects" in comp["intervals"]
  assert set(metrics.describe_methods(["wald", "bootstrap_subsample_1000"])) == {"wald", "bootstrap_subsample_1000"}
  assert all(metrics.describe_methods(metrics.METHODS).values())
