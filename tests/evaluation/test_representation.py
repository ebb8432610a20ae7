"""Representation change along the concept hierarchy; PCA."""
import numpy as np
import pytest

from alignet_data.evaluation import representation


def test_relation_codes_by_hand():
  sub = np.array([0, 0, 1, 2, 3])
  basic = np.array([0, 0, 0, 1, 2])
  sup = np.array([0, 0, 0, 0, 1])
  code = representation.relations(sub, basic, sup)
  assert code[0, 1] == 0  # same subordinate
  assert code[0, 2] == 1  # same basic, different subordinate
  assert code[0, 3] == 2  # same superordinate, different basic
  assert code[0, 4] == 3  # different superordinate
  assert (code == code.T).all()


def test_distance_change_is_zero_for_a_rescaled_model_and_signs_follow_the_move():
  rng = np.random.default_rng(0)
  n = 40
  sup = np.repeat([0, 1], 20)
  basic = np.repeat([0, 1, 2, 3], 10)
  sub = np.repeat(np.arange(8), 5)
  base = rng.normal(size=(n, 6))
  same = representation.distance_change(base, 3 * base + 1, sub, basic, sup, n_resamples=20)
  for row in same.values():
    assert row["value"] == pytest.approx(0, abs=1e-9)
  # Aligned: images of one basic category collapse together, the two superordinates move apart.
  aligned = base * 0.2 + np.eye(6)[basic] * 2 + np.eye(6)[sup + 4] * 4
  out = representation.distance_change(base, aligned, sub, basic, sup, n_resamples=50)
  assert out["same_basic"]["value"] < 0 and out["same_subordinate"]["value"] < 0
  assert out["different_superordinate"]["value"] > 0
  for row in out.values():
    assert row["ci"][0] <= row["value"] <= row["ci"][1]
  assert out["same_subordinate"]["n"] == 8 * 10  # 8 concepts x C(5, 2) pairs
  with pytest.raises(ValueError, match="same images"):
    representation.distance_change(base, aligned[:5], sub, basic, sup)


def test_pca_projects_on_the_largest_directions_with_a_fixed_sign():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 3)) * np.array([5.0, 2.0, 0.1])
  xy, ratio = representation.pca_2d(x)
  assert xy.shape == (200, 2) and ratio[0] > ratio[1] > 0 and ratio.sum() > 0.99
  np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 0], x[:, 0])[0, 1]), 1, atol=1e-3)
  perm = rng.permutation(200)
  xy2, _ = representation.pca_2d(x[perm])
  np.testing.assert_allclose(xy2, xy[perm], atol=1e-9)  # sign fixed by the loadings: the plot does not flip
  assert representation.subsample(10, 20, 0).tolist() == list(range(10))
  assert len(representation.subsample(1000, 50, 0)) == 50
