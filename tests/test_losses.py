"""Triplet losses of the trainer against hand-computed values and the numpy reference math."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignet_data import triplet_math
from trainer import losses


def test_student_pair_similarities_use_the_released_pair_order():
  z = jnp.array([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])  # s01 = 2, s02 = 0, s12 = 0
  z = z.at[0, 2].set(jnp.array([1.0, 1.0]))             # s02 = 1, s12 = 2
  np.testing.assert_allclose(triplet_math.pair_similarities_jax(z), [[2.0, 1.0, 2.0]])


def test_kl_matches_a_hand_computed_value():
  # Target softmax([0, 0, 0]) is uniform; student dots [100, 0, 0] / tau=100 -> softmax([1, 0, 0]).
  # KL = sum_i 1/3 (log 1/3 - log q_i) = -log 3 - 1/3 + log(e + 2).
  expected = -np.log(3) - 1 / 3 + np.log(np.e + 2)
  got = losses.kl_from_similarities(jnp.array([[100.0, 0.0, 0.0]]), jnp.array([[0.0, 0.0, 0.0]]), tau=100.0)
  np.testing.assert_allclose(got, [expected], rtol=1e-5)
  assert expected == pytest.approx(0.11950, abs=1e-5)


def test_target_has_no_temperature_and_prediction_has_tau():
  target = np.array([[3.0, 1.0, -2.0]])
  student = np.array([[50.0, -20.0, 10.0]])
  p = triplet_math.pair_probabilities(target, tau=1.0)
  q = triplet_math.pair_probabilities(student, tau=100.0)
  np.testing.assert_allclose(losses.kl_from_similarities(jnp.array(student), jnp.array(target)),
                             triplet_math.kl_divergence(p, q), rtol=1e-5)
  np.testing.assert_allclose(losses.js_from_similarities(jnp.array(student), jnp.array(target)),
                             triplet_math.js_divergence(p, q), rtol=1e-4)
  np.testing.assert_allclose(losses.contrastive_from_similarities(jnp.array(student), jnp.array(target)),
                             -np.log(q[:, 0]), rtol=1e-5)


def test_zero_at_equality_and_js_bounds():
  rng = np.random.default_rng(0)
  target = rng.normal(0, 2, (256, 3)).astype(np.float32)
  tau = 100.0
  same = jnp.array(target * tau)  # student / tau == target -> identical distributions
  np.testing.assert_allclose(losses.kl_from_similarities(same, jnp.array(target), tau), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.js_from_similarities(same, jnp.array(target), tau), 0.0, atol=1e-6)

  student = jnp.array(rng.normal(0, 300, (256, 3)).astype(np.float32))
  kl = np.asarray(losses.kl_from_similarities(student, jnp.array(target), tau))
  kl_reverse = triplet_math.kl_divergence(triplet_math.pair_probabilities(np.asarray(student), tau),
                                          triplet_math.pair_probabilities(target))
  js = np.asarray(losses.js_from_similarities(student, jnp.array(target), tau))
  assert (kl >= -1e-6).all() and (js >= -1e-6).all()
  assert (js <= np.log(2) + 1e-6).all()
  # Convexity of KL in its second argument: JS <= (KL(p||q) + KL(q||p)) / 4.
  assert (js <= 0.25 * (kl + kl_reverse) + 1e-5).all()


def test_gradients_stay_finite_when_probabilities_underflow():
  target = jnp.array([[500.0, 0.0, -500.0]])  # softmax underflows to exact zeros in float32
  student = jnp.array([[1e6, -1e6, 0.0]])
  for name in ("kl", "js", "contrastive"):
    g = jax.grad(lambda s, name=name: losses.get_loss(name)(s, target).sum())(student)
    assert np.isfinite(np.asarray(g)).all(), name


def test_gradient_pushes_the_teacher_pair_up():
  target = jnp.array([[4.0, 0.0, 0.0]])  # the teacher says pair (0, 1) is the most similar
  g = jax.grad(lambda s: losses.kl_from_similarities(s, target).sum())(jnp.zeros((1, 3)))
  assert g[0, 0] < 0 < g[0, 1]  # descending raises s01 and lowers s02, s12


def test_triplet_agreement_counts_student_ties_as_wrong():
  target = jnp.array([[3.0, 1.0, 0.0], [0.0, 5.0, 1.0], [0.0, 1.0, 2.0]])
  student = jnp.array([[9.0, 1.0, 1.0], [2.0, 2.0, 0.0], [0.0, 1.0, 7.0]])
  np.testing.assert_array_equal(losses.triplet_agreement(student, target), [1.0, 0.0, 1.0])


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown triplet loss 'mse'"):
    losses.get_loss("mse")


def test_a_non_finite_student_similarity_never_agrees():
  teacher = jnp.array([[3.0, 2.0, 1.0]] * 3)
  student = jnp.array([[jnp.nan, 1.0, 0.0], [jnp.inf, 1.0, 0.0], [2.0, 1.0, 0.0]])
  np.testing.assert_array_equal(losses.triplet_agreement(student, teacher), [0.0, 0.0, 1.0])
