import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignet_data import triplet_math
from alignet_data.human import things
from alignet_data.teacher import alignment


def test_hard_soft_and_kl_losses_by_hand():
  logits = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
  z0, z1 = math.e + 2, 1 + math.e ** 2 + math.e
  hard = (-math.log(math.e / z0) - math.log(1 / z1)) / 2
  np.testing.assert_allclose(alignment.hard_loss(logits), hard, rtol=1e-6)
  p = jnp.asarray([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])
  q0 = [math.e / z0, 1 / z0, 1 / z0]
  q1 = [1 / z1, math.e ** 2 / z1, math.e / z1]
  ce = -(0.5 * math.log(q0[0]) + 0.25 * math.log(q0[1]) + 0.25 * math.log(q0[2])
         + 0.2 * math.log(q1[0]) + 0.6 * math.log(q1[1]) + 0.2 * math.log(q1[2])) / 2
  np.testing.assert_allclose(alignment.soft_loss(logits, p), ce, rtol=1e-6)
  entropy = float(np.mean(triplet_math.entropy(np.asarray(p))))
  np.testing.assert_allclose(alignment.kl_loss(logits, p), ce - entropy, rtol=1e-5)
  # One-hot targets of the human pair make the soft loss the hard one.
  np.testing.assert_allclose(alignment.soft_loss(logits, alignment.hard_targets(2)), hard, rtol=1e-6)
  # Weights average only the real rows (padding rows carry weight 0).
  np.testing.assert_allclose(alignment.hard_loss(logits, jnp.asarray([1.0, 0.0])), -math.log(math.e / z0), rtol=1e-6)


def test_regulariser_by_hand():
  w = jnp.asarray([[1.0, 2.0], [3.0, 3.0]])
  # T = I: (0)^2 + 2^2 + 3^2 + 2^2 = 17.
  np.testing.assert_allclose(alignment.regulariser(w, 0.5, "identity"), 0.5 * 17, rtol=1e-6)
  # T = mean(diag W) I = 2 I: (-1)^2 + 2^2 + 3^2 + 1^2 = 15.
  np.testing.assert_allclose(alignment.regulariser(w, 0.5, "scaled_identity"), 0.5 * 15, rtol=1e-6)
  assert float(alignment.regulariser(3.0 * jnp.eye(4), 10.0, "scaled_identity")) == 0.0
  with pytest.raises(ValueError, match="target"):
    alignment.regulariser(w, 1.0, "eye")


def test_objective_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  t = jnp.asarray([[0, 1, 2], [3, 4, 5], [6, 0, 3], [2, 5, 1]])
  y = jnp.asarray(rng.dirichlet(np.ones(3), 4), jnp.float32)
  w = jnp.ones(4)
  params = {"weights": jnp.asarray(rng.normal(size=(3, 3)) * 0.5, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3) * 0.1, jnp.float32)}
  f = lambda p: alignment.objective(p, x, t, y, w, jnp.float32(0.3), "scaled_identity", True)
  grads = jax.grad(f)(params)
  h = 1e-2
  for name, idx in [("weights", (0, 1)), ("weights", (2, 2)), ("bias", (1,))]:
    up = {**params, name: params[name].at[idx].add(h)}
    down = {**params, name: params[name].at[idx].add(-h)}
    numeric = (float(f(up)) - float(f(down))) / (2 * h)
    np.testing.assert_allclose(float(grads[name][idx]), numeric, rtol=2e-2, atol=2e-3)


def test_triplet_logits_batch_and_gram_paths_agree():
  rng = np.random.default_rng(0)
  params = {"weights": jnp.asarray(rng.normal(size=(5, 5)), jnp.float32), "bias": jnp.ones(5)}
  x = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
  few = jnp.asarray([[0, 1, 2], [5, 39, 7]])  # 2 rows: transforms only the batch's rows.
  many = jnp.tile(few, (100, 1))              # 200 rows: all 40 objects' Gram matrix, then gathers.
  assert not alignment.uses_gram(40, 5, 2) and alignment.uses_gram(40, 5, 200)
  expected = triplet_math.triplet_similarities(np.asarray(x) @ np.asarray(params["weights"]) + 1.0, np.asarray(few))
  np.testing.assert_allclose(alignment.triplet_logits(params, x, few), expected, rtol=1e-4)
  np.testing.assert_allclose(alignment.triplet_logits(params, x, many)[:2], expected, rtol=1e-4)
  # Gradients agree too (the Gram path scatters scalars, the batch path rows).
  f = lambda p, t: jnp.sum(alignment.triplet_logits(p, x, t)[:2] * jnp.asarray([[1.0, -2.0, 0.5]]))
  np.testing.assert_allclose(jax.grad(f)(params, few)["weights"], jax.grad(f)(params, many)["weights"], rtol=1e-4,
                             atol=1e-4)


def test_used_objects_reindexes_triplets():
  x = np.arange(12.0).reshape(6, 2)
  t = np.array([[5, 1, 3], [3, 1, 5]])
  sub, t2 = alignment.used_objects(x, t)
  np.testing.assert_array_equal(sub, x[[1, 3, 5]])
  np.testing.assert_array_equal(sub[t2], x[t])


def test_zscore_is_one_scalar_over_the_matrix():
  x = np.array([[1.0, 100.0], [3.0, 300.0]])
  mean, std = alignment.zscore_stats(x)
  assert mean == pytest.approx(101.0) and std == pytest.approx(np.std(x))
  with pytest.raises(ValueError, match="std"):
    alignment.zscore_stats(np.ones((3, 2)))


def _planted(n_objects=60, n_triplets=6000, seed=0):
  """Features are a known linear map of a hidden embedding plus strong nuisance dimensions (an 'appearance'
  grouping unrelated to the human one), offset from the origin: raw dot products are misaligned."""
  rng = np.random.default_rng(seed)
  super_c = rng.normal(size=(4, 8))
  hidden = super_c[np.arange(n_objects) % 4] + 0.5 * rng.normal(size=(n_objects, 8))
  nuisance = 5.0 * rng.normal(size=(5, 8))[np.arange(n_objects) % 5]
  features = np.concatenate([hidden @ rng.normal(size=(8, 8)), nuisance], 1) + 1.0
  trip = np.stack([rng.choice(n_objects, 3, replace=False) for _ in range(n_triplets)])
  p = triplet_math.pair_probabilities(0.5 * triplet_math.triplet_similarities(hidden, trip))
  pair = (rng.random(n_triplets)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, 2)
  a, b = triplet_math.PAIRS[pair].T
  rows = np.arange(n_triplets)
  chosen = np.stack([trip[rows, a], trip[rows, b], trip[rows, triplet_math.ODD_OF_PAIR[pair]]], 1)
  true_p = triplet_math.pair_probabilities(0.5 * triplet_math.triplet_similarities(hidden, chosen))
  return features.astype(np.float32), hidden, chosen, true_p.astype(np.float32)


def test_planted_linear_map_is_recovered_near_the_hidden_embedding():
  features, hidden, triplets, true_p = _planted()
  train, test = triplets[:5000], triplets[5000:]
  hidden_acc = alignment.evaluate(hidden, test)["accuracy"]
  cfg = alignment.AlignConfig(loss="soft", lambdas=(1e-1, 1e-3), folds=2, max_epochs=40, lr=1e-2)
  seen = []
  t, info = alignment.align(features, train, true_p[:5000], cfg, on_fit=seen.append)
  before = alignment.evaluate(features, test, true_p[5000:])
  after = alignment.evaluate(t.apply(features), test, true_p[5000:])
  assert after["accuracy"] > before["accuracy"] + 0.1, (before, after)
  assert after["accuracy"] > hidden_acc - 0.04, (after, hidden_acc)
  assert after["kl"] < before["kl"] and after["nll"] < before["nll"]
  assert info["lambda"] in (1e-1, 1e-3) and len(info["cv"]) == 2 and len(seen) == 2 * 2 + 1
  for record in info["cv"]:
    assert [f["fold"] for f in record["folds"]] == [0, 1]
  # The stored transform z-scores with one scalar: the same map as alignment.transform on z-scored features.
  z = (features - t.mean) / t.std
  np.testing.assert_allclose(t.apply(features), z @ t.weights + t.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [0, 256])  # Full-batch steps (the default) and minibatch epochs.
def test_vectorised_lambdas_equal_separate_fits(batch_size):
  features, _, triplets, true_p = _planted(n_triplets=1500)
  z = ((features - features.mean()) / features.std()).astype(np.float32)
  lambdas = [10.0, 1e-3]
  cfg = alignment.AlignConfig(max_epochs=5 if batch_size else 40, patience=2 if batch_size else 5, min_epochs=1,
                              lr=1e-2, batch_size=batch_size)
  many = alignment.fit_many(z, triplets, true_p, lambdas, cfg, seed=1)
  if not batch_size:  # The strong pull to I saturates the softmax: it stops first (and leaves the vectorised run).
    assert many[0][1]["epochs"] < many[1][1]["epochs"], [info for _, info in many]
  for lam, (params, info) in zip(lambdas, many, strict=True):
    alone, alone_info = alignment.fit(z, triplets, true_p, lam, cfg, seed=1)
    np.testing.assert_allclose(params["weights"], alone["weights"], rtol=1e-3, atol=1e-5)
    assert info == pytest.approx(alone_info, rel=1e-4)


def test_early_stopping_returns_the_best_epoch():
  features, _, triplets, true_p = _planted(n_triplets=1500)
  z = ((features - features.mean()) / features.std()).astype(np.float32)
  cfg = alignment.AlignConfig(max_epochs=300, patience=5, min_epochs=1, lr=3e-2, val_fraction=0.2)
  params, info = alignment.fit(z, triplets, true_p, 1e-5, cfg, seed=0)
  assert info["epochs"] == info["best_epoch"] + cfg.patience < cfg.max_epochs, info
  _, val_idx = things.split_train_test(triplets, 0.2, 0)
  assert alignment.score(params, z, triplets[val_idx], true_p[val_idx])["loss"] == pytest.approx(info["val_loss"],
                                                                                                  rel=1e-4)


def test_select_lambda_and_config_errors():
  cv = [{"lambda": 1.0, "loss": 0.7, "accuracy": 0.6}, {"lambda": 0.1, "loss": 0.7, "accuracy": 0.61},
        {"lambda": 0.01, "loss": 0.75, "accuracy": 0.55}]
  assert alignment.select_lambda(cv, "loss") == 1.0  # Tie on loss: the stronger regularisation.
  assert alignment.select_lambda(cv, "accuracy") == 0.1
  with pytest.raises(ValueError, match="loss"):
    alignment.AlignConfig(loss="medium")
  with pytest.raises(ValueError, match="target"):
    alignment.AlignConfig(target="eye")
  features, _, triplets, _ = _planted(n_triplets=50)
  with pytest.raises(ValueError, match="soft labels"):
    alignment.align(features, triplets, None, alignment.AlignConfig(loss="soft", lambdas=(1.0,)))
  with pytest.raises(ValueError, match="too few triplets"):
    alignment.align(features, triplets[:5], None, alignment.AlignConfig(loss="hard", lambdas=(1.0, 0.1), folds=3))
