import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from alignet_data import triplet_math
from alignet_data.human import vice


def test_spike_and_slab_log_density_by_hand():
  x = np.array([-2.0, -0.3, 0.0, 0.1, 1.5])
  pdf = lambda v, s: math.exp(-0.5 * (v / s) ** 2) / (s * math.sqrt(2 * math.pi))
  expected = [math.log(0.5 * pdf(v, 0.25) + 0.5 * pdf(v, 1.0)) for v in x]
  np.testing.assert_allclose(vice.log_spike_and_slab(jnp.asarray(x), 0.5, 0.25, 1.0), expected, rtol=1e-5)
  # Far in the tail the spike underflows; the log-sum-exp form stays finite and follows the slab.
  np.testing.assert_allclose(vice.log_spike_and_slab(jnp.asarray([30.0])), [math.log(0.5) - 450 - 0.5 * math.log(
      2 * math.pi)], rtol=1e-5)
  np.testing.assert_allclose(vice.log_normal(jnp.asarray(x), 0.3, 0.7), stats.norm.logpdf(x, 0.3, 0.7), rtol=1e-5)


def test_bh_matches_scipy_and_hand_example():
  # By hand: m = 5, alpha 0.05: thresholds .01 .02 .03 .04 .05; sorted p .001 .012 .035 .041 .2 ->
  # the largest passing rank is 4 (.041 <= .04 fails; .035 > .03 fails; .012 <= .02 passes) -> reject 2.
  p = np.array([0.041, 0.2, 0.001, 0.035, 0.012])
  np.testing.assert_array_equal(vice.bh_reject(p, 0.05), [False, False, True, False, True])
  rng = np.random.default_rng(0)
  pvals = np.concatenate([rng.uniform(0, 0.01, (4, 30)), rng.uniform(0, 1, (4, 70))], axis=1)
  expected = np.stack([stats.false_discovery_control(row) <= 0.05 for row in pvals])
  np.testing.assert_array_equal(vice.bh_reject(pvals, 0.05), expected)
  assert not vice.bh_reject(np.ones(7)).any()


def test_pruning_keeps_planted_dimensions_sorted():
  m = 40
  loc = np.full((m, 6), -1.0)
  scale = np.full((m, 6), 0.1)
  loc[:20, 1] = 1.0   # 20 objects clearly positive.
  loc[:10, 4] = 3.0   # 10 objects, larger values: larger L1 norm.
  loc[:4, 2] = 1.0    # Only 4 objects: not more than k = 5.
  loc[:, 5] = 0.05    # Positive means but too uncertain (p = Phi(-0.5)).
  np.testing.assert_array_equal(vice.dimension_importance(loc, scale)[[1, 2, 4, 5]], [20, 4, 10, 0])
  np.testing.assert_array_equal(vice.kept_dimensions(loc, scale, 0.05, 5), [4, 1])


def test_convergence_rule():
  assert not vice.converged([5, 5, 5], ws=4)
  assert vice.converged([9, 5, 5, 5, 5], ws=4)
  assert not vice.converged([5, 5, 4, 5, 5], ws=4)
  assert not vice.converged([0, 0, 0, 0], ws=4)


def _planted(n_objects=30, n_triplets=4000, seed=0):
  """Three clusters of objects; simulated choices from softmax(beta * dots) of the hidden embedding."""
  rng = np.random.default_rng(seed)
  centres = 1.5 * np.eye(3, 6)
  emb = np.abs(centres[np.arange(n_objects) % 3] + 0.3 * rng.normal(size=(n_objects, 6)))
  trip = np.stack([rng.choice(n_objects, 3, replace=False) for _ in range(n_triplets)])
  p = triplet_math.pair_probabilities(3.0 * triplet_math.triplet_similarities(emb, trip))
  pair = (rng.random(n_triplets)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, 2)
  a, b = triplet_math.PAIRS[pair].T
  odd = triplet_math.ODD_OF_PAIR[pair]
  rows = np.arange(n_triplets)
  chosen = np.stack([trip[rows, a], trip[rows, b], trip[rows, odd]], 1)
  true_p = triplet_math.pair_probabilities(3.0 * triplet_math.triplet_similarities(emb, chosen))
  return chosen, true_p


def test_vice_fits_planted_embedding_above_chance_quickly():
  triplets, true_p = _planted()
  train, test = triplets[:3200], triplets[3200:]
  cfg = vice.ViceConfig(dims=10, epochs=10, lr=1e-2, seed=0)
  seen = []
  res = vice.fit(train, 30, cfg, on_epoch=seen.append)
  assert len(seen) == 10 and {"loss", "nll", "accuracy", "dims"} <= set(seen[-1])
  assert seen[-1]["nll"] < seen[0]["nll"]
  p = vice.posterior_predictive(res.loc, res.scale, test, 50, seed=0)
  ceiling = triplet_math.odd_one_out_accuracy(true_p[3200:])
  acc = triplet_math.odd_one_out_accuracy(p)
  assert acc > 0.5, acc  # Chance is 1/3.
  assert acc > ceiling - 0.05, (acc, ceiling)
  assert triplet_math.human_pair_nll(p) < math.log(3)
  assert res.loc.shape == res.scale.shape and res.loc.shape[0] == 30 and np.all(res.scale > 0)
  # Not converged (burn-in 500): every dimension is kept, sorted by the L1 norm of its means.
  assert not res.converged and res.loc.shape[1] == 10 and 0 < res.dims_significant <= 10
  l1 = np.abs(res.loc).sum(0)
  assert np.all(np.diff(l1) <= 1e-6)
  # Converged (stable dimensionality for ws epochs after burn-in): only the significant dimensions are kept.
  res = vice.fit(train, 30, vice.ViceConfig(dims=10, epochs=10, lr=1e-2, burnin=2, ws=2))
  assert res.converged and res.epochs < 10 and res.loc.shape[1] == res.dims_significant
  with pytest.raises(ValueError, match="prune"):
    vice.fit(train, 30, vice.ViceConfig(prune="yes"))


def test_posterior_predictive_is_a_reproducible_distribution():
  rng = np.random.default_rng(0)
  loc = rng.normal(size=(12, 4)).astype(np.float32)
  scale = np.full((12, 4), 0.5, np.float32)
  t = np.stack([rng.choice(12, 3, replace=False) for _ in range(50)])
  p = vice.posterior_predictive(loc, scale, t, samples=50, seed=7)
  assert p.shape == (50, 3) and p.dtype == np.float32
  assert np.all(p >= 0)
  np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(p, vice.posterior_predictive(loc, scale, t, samples=50, seed=7))
  assert not np.array_equal(p, vice.posterior_predictive(loc, scale, t, samples=50, seed=8))
  # A triplet's p* does not depend on chunking or on which other triplets are scored with it.
  np.testing.assert_allclose(vice.posterior_predictive(loc, scale, t, 50, 7, chunk=8), p, atol=1e-6)
  np.testing.assert_allclose(vice.posterior_predictive(loc, scale, t[10:13], 50, 7), p[10:13], atol=1e-6)
  # Mean of probabilities, not softmax of mean logits: by hand for one triplet.
  import jax
  key = jax.random.key(7)
  probs = []
  for r in range(50):
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key, r), loc.shape, jnp.float32))
    e = np.maximum(loc + scale * eps, 0)
    probs.append(triplet_math.pair_probabilities(triplet_math.triplet_similarities(e, t[:1]))[0])
  np.testing.assert_allclose(p[0], np.mean(probs, 0), atol=1e-5)
  with pytest.raises(ValueError, match="mc_samples"):
    vice.posterior_predictive(loc, scale, t, samples=0)


def test_accuracy_counts_ties_wrong():
  p = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3]])
  assert triplet_math.odd_one_out_accuracy(p) == 0.25


def test_spose_model_trained_by_the_same_loop():
  triplets, true_p = _planted()
  train, test = triplets[:3200], triplets[3200:]
  seen = []
  res = vice.fit(train, 30, vice.ViceConfig(model="spose", dims=10, epochs=15, lr=5e-3, lmbda=0.005),
                 on_epoch=seen.append)
  assert res.epochs == 15 and seen[-1]["nll"] < seen[0]["nll"]
  # A point embedding: non-negative, no posterior spread, so p* is the plain softmax of its dot products.
  assert np.all(res.loc >= 0) and np.all(res.scale == 0) and 1 <= res.loc.shape[1] <= 10
  p = vice.posterior_predictive(res.loc, res.scale, test, 5, seed=0)
  expected = triplet_math.pair_probabilities(triplet_math.triplet_similarities(res.loc, test))
  np.testing.assert_allclose(p, expected, atol=1e-5)
  acc = triplet_math.odd_one_out_accuracy(p)
  assert acc > 0.5 and acc > triplet_math.odd_one_out_accuracy(true_p[3200:]) - 0.08
  with pytest.raises(ValueError, match="model"):
    vice.fit(train, 30, vice.ViceConfig(model="nope"))
  with pytest.raises(ValueError, match="lower lmbda"):  # A penalty that zeroes every weight is an error, not p* = 1/3.
    vice.fit(train[:500], 30, vice.ViceConfig(model="spose", dims=4, epochs=3, lr=5e-2, lmbda=10.0))


def test_point_estimates_count_positive_entries():
  loc = np.zeros((20, 3))
  loc[:8, 0] = 0.5
  loc[:3, 1] = 0.2
  np.testing.assert_array_equal(vice.dimension_importance(loc, np.zeros_like(loc)), [8, 3, 0])


def test_patience_stops_and_keep_best_returns_the_best_epoch():
  triplets, _ = _planted(n_triplets=2000)
  train, val = triplets[:1600], triplets[1600:]
  # SPoSE with no penalty and a large step overfits 1,600 triplets quickly: the val NLL turns up and stops it.
  cfg = vice.ViceConfig(model="spose", dims=30, epochs=200, lr=5e-2, lmbda=0.0, keep_best=True, patience=3)
  seen = []
  res = vice.fit(train, 30, cfg, on_epoch=seen.append, val_triplets=val)
  assert res.epochs < 200 and res.epochs == res.best_epoch + 3
  val_nll = [r["val_nll"] for r in seen]
  assert res.best_epoch == 1 + int(np.argmin(val_nll))
  p = vice.posterior_predictive(res.loc, res.scale, val, 1)
  assert abs(triplet_math.human_pair_nll(p) - min(val_nll)) < 1e-4


def test_lr_is_annealed_over_the_first_window_after_burn_in():
  lr = vice.learning_rate(1e-2, 0.1, burnin=2, ws=2, steps_per_epoch=10)
  got = [float(lr(jnp.asarray(c))) for c in (0, 20, 30, 40, 90)]
  np.testing.assert_allclose(got, [1e-2, 1e-2, 1e-2 * 0.1 ** 0.5, 1e-3, 1e-3], rtol=1e-5)
  assert vice.learning_rate(1e-2, 1.0, 2, 2, 10) == 1e-2  # lr_final 1: VICE's constant step.
  with pytest.raises(ValueError, match="lr_final"):
    vice.fit(np.array([[0, 1, 2]]), 3, vice.ViceConfig(lr_final=0.0))


def test_refine_after_pruning_and_restarts_kept_by_validation_nll():
  triplets, _ = _planted()
  train, val = triplets[:3200], triplets[3200:]
  cfg = vice.ViceConfig(dims=10, epochs=30, lr=1e-2, burnin=2, ws=2, lr_final=0.3, refine=3, eval_every=5)
  seen = []
  best, runs = vice.fit_restarts(train, 30, cfg, 2, seen.append, val)
  assert [r.seed for r in runs] == [0, 1] and best.val_nll == min(r.val_nll for r in runs)
  for r in runs:
    refined = [h for h in r.history if h.get("refine")]
    assert r.converged and len(refined) == 3 and r.epochs == refined[-1]["epoch"] < 30 + 3
    assert r.loc.shape == (30, len(r.kept)) and len(r.kept) < 10  # Pruned to the BH-selected dimensions ...
    assert len(set(r.kept.tolist())) == len(r.kept) and r.dims_significant <= len(r.kept)
    assert refined[0]["dims"] <= len(r.kept)  # ... and only those are trained further.
  assert {h["restart"] for h in seen} == {0, 1}
  summary = best.summary()
  assert summary["dims_kept"] == best.loc.shape[1] and summary["converged"] and summary["seconds"] > 0
  with pytest.raises(ValueError, match="validation"):
    vice.fit_restarts(train, 30, cfg, 2)
