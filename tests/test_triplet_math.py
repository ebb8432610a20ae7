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


def _cases(seed=0, n=64, d=5):
  """Triplet embeddings with ties (repeated vectors) and non-finite values among them."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3, d)).astype(np.float32)
  x[1] = 0.0
  x[1, 0, :2], x[1, 1, 0], x[1, 2, 1] = 1.0, 1.0, 1.0  # s01 == s02 == 1 > s12 == 0: a tie at the top.
  x[2] = 0.0         # All three similarities tied at 0.
  x[3, 0, 0] = np.nan
  x[4, 2, 1] = np.inf
  return x


def test_jax_twins_match_their_numpy_functions():
  """Each *_jax function is the numpy one on the same inputs (one convention, two array libraries)."""
  import jax
  import jax.numpy as jnp
  x = _cases()
  s = tm.pair_similarities(x.astype(np.float64))
  s_jax = np.asarray(jax.jit(tm.pair_similarities_jax)(jnp.asarray(x)))
  np.testing.assert_allclose(s_jax[np.isfinite(s)], s[np.isfinite(s)], rtol=1e-5, atol=1e-5)
  emb = np.random.default_rng(1).normal(size=(20, 4))
  trip = np.array([[0, 1, 2], [5, 3, 19], [7, 7, 1]])
  np.testing.assert_allclose(np.asarray(tm.triplet_similarities_jax(jnp.asarray(emb), jnp.asarray(trip))),
                             tm.triplet_similarities(emb, trip), rtol=1e-5)
  gram = emb @ emb.T
  np.testing.assert_allclose(tm.matrix_similarities(gram, trip), tm.triplet_similarities(emb, trip), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(tm.matrix_similarities_jax(jnp.asarray(gram), jnp.asarray(trip))),
                             tm.matrix_similarities(gram, trip), rtol=1e-5)
  exact = s.astype(np.float32)  # The same float32 values on both sides, so ties stay ties.
  np.testing.assert_array_equal(np.asarray(tm.odd_one_out_jax(jnp.asarray(exact))), tm.odd_one_out(exact))
  targets = np.random.default_rng(2).integers(-1, 3, len(exact))
  np.testing.assert_array_equal(np.asarray(tm.odd_one_out_correct_jax(jnp.asarray(exact), jnp.asarray(targets))),
                                tm.odd_one_out_correct(exact, targets))
  assert tm.odd_one_out(exact)[1:5].tolist() == [-1, -1, -1, -1]  # Tie, tie, NaN, inf: no choice...
  assert tm.odd_one_out_correct(exact[1:5], -1).sum() == 0  # ...which never matches, not even "no majority".
  logits = np.random.default_rng(3).normal(size=(30, 3))
  p = tm.pair_probabilities(np.random.default_rng(4).normal(size=(30, 3)))
  p[0] = [1.0, 0.0, 0.0]  # p = 0 terms contribute 0.
  log_q = tm.log_softmax(logits)
  np.testing.assert_allclose(np.asarray(tm.kl_divergence_jax(jnp.log(jnp.asarray(p)), jnp.asarray(log_q))),
                             tm.kl_divergence(p, np.exp(log_q)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(tm.kl_divergence_log(p, log_q), tm.kl_divergence(p, np.exp(log_q)), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(tm.human_pair_nll_jax(jnp.asarray(logits))).mean(),
                             tm.human_pair_nll(np.exp(log_q)), rtol=1e-5)


def test_the_human_pair_is_pair_zero_and_its_odd_one_out_is_item_two():
  assert tm.ODD_OF_PAIR[tm.HUMAN_PAIR] == tm.HUMAN_ODD == 2
  s = np.array([[3.0, 1.0, 0.0], [0.0, 3.0, 1.0]])  # Pair 01 on top (human pair), then pair 02 on top.
  assert tm.odd_one_out_correct(s).tolist() == [1.0, 0.0] and tm.odd_one_out_accuracy(s) == 0.5
  assert tm.human_pair_nll(np.array([[1.0, 0.0, 0.0]])) == 0.0
