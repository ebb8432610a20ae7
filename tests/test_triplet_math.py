"""The shared triplet math against hand-computed values."""
import numpy as np
import pytest

from alignet_data import triplet_math as tm


def test_pair_similarities_order_is_s01_s02_s12():
  x = np.array([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]])
  np.testing.assert_allclose(tm.pair_similarities(x), [[2.0, 0.0, 3.0]])


def test_softmax_over_pairs_hand_computed():
  p = tm.pair_probabilities(np.array([[0.0, np.log(2.0), np.log(3.0)]]))
  np.testing.assert_allclose(p, [[1 / 6, 2 / 6, 3 / 6]])
  # Temperature divides the similarities: tau = 100 flattens towards uniform.
  np.testing.assert_allclose(tm.pair_probabilities(np.array([[0.0, 100.0, 0.0]]), tau=100.0),
                             [[1 / (2 + np.e), np.e / (2 + np.e), 1 / (2 + np.e)]])


def test_accuracy_counts_ties_as_wrong():
  sims = np.array([[3.0, 1.0, 0.0],   # pair (0,1) -> odd 2: right
                   [1.0, 3.0, 0.0],   # pair (0,2) -> odd 1: wrong
                   [3.0, 3.0, 0.0],   # tie: wrong
                   [0.0, 1.0, 2.0]])  # pair (1,2) -> odd 0: wrong
  assert tm.odd_one_out(sims).tolist() == [2, 1, -1, 0]
  assert tm.odd_one_out_accuracy(sims) == pytest.approx(0.25)
  assert tm.odd_one_out_accuracy(sims, np.array([2, 1, 2, 0])) == pytest.approx(0.75)


def test_kl_and_js_hand_computed():
  p = np.array([0.5, 0.5, 0.0])
  q = np.array([0.25, 0.25, 0.5])
  assert tm.kl_divergence(p, q) == pytest.approx(np.log(2.0))
  # m = (p + q) / 2 = [0.375, 0.375, 0.25]
  expected = 0.5 * (np.log(0.5 / 0.375)) + 0.5 * (0.5 * np.log(0.25 / 0.375) + 0.5 * np.log(0.5 / 0.25))
  assert tm.js_divergence(p, q) == pytest.approx(expected)
  assert tm.kl_divergence(q, q) == pytest.approx(0.0)
  assert tm.js_divergence(p, q) <= np.log(2.0)


def test_entropy_uniform_and_certain():
  assert tm.entropy(np.full(3, 1 / 3)) == pytest.approx(np.log(3.0))
  assert tm.entropy(np.array([1.0, 0.0, 0.0])) == 0.0


def test_order_by_similarity_puts_odd_last_and_sorts():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(50, 8))
  trip = np.stack([rng.choice(50, 3, replace=False) for _ in range(500)])
  s = tm.triplet_similarities(emb, trip)
  new_trip, new_s = tm.order_by_similarity(trip, s)
  assert np.all(new_s[:, 0] >= new_s[:, 1]) and np.all(new_s[:, 1] >= new_s[:, 2])
  np.testing.assert_allclose(new_s, tm.triplet_similarities(emb, new_trip), rtol=1e-12)
  np.testing.assert_array_equal(np.sort(new_trip, 1), np.sort(trip, 1))
  # The reordered triplet's odd one out (item 2) is the model's odd one out of the original triplet.
  odd_item = trip[np.arange(len(trip)), tm.odd_one_out(s)]
  np.testing.assert_array_equal(new_trip[:, 2], odd_item)
