"""RSA: kernels against numpy, correlations against scipy, RDM handling, loading human matrices."""
import numpy as np
import pytest
from scipy import stats

from alignet_data.evaluation import rsa


def test_pearson_kernel_is_row_correlation_and_cosine_is_not_centred():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)) + 3.0
  np.testing.assert_allclose(rsa.rsm(x, "pearson"), np.corrcoef(x), atol=1e-12)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(rsa.rsm(x, "cosine"), unit @ unit.T, atol=1e-12)
  # Adding a constant to every feature of a row changes cosine but not the Pearson kernel.
  shifted = x + np.arange(6)[:, None]
  np.testing.assert_allclose(rsa.rsm(shifted, "pearson"), rsa.rsm(x, "pearson"), atol=1e-12)
  assert not np.allclose(rsa.rsm(shifted, "cosine"), rsa.rsm(x, "cosine"))
  with pytest.raises(ValueError, match="constant"):
    rsa.rsm(np.ones((3, 4)), "pearson")
  with pytest.raises(ValueError, match="kernel"):
    rsa.rsm(x, "dot")


def test_upper_triangle_correlations_match_scipy_and_an_rdm_flips_sign():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 8))
  human = rsa.rsm(x + rng.normal(0, 0.5, x.shape))
  model = rsa.rsm(x)
  iu = np.triu_indices(10, k=1)
  assert rsa.upper(model).shape == (45,)
  assert rsa.correlate(model, human, "spearman") == pytest.approx(stats.spearmanr(model[iu], human[iu]).statistic)
  assert rsa.correlate(model, human, "pearson") == pytest.approx(stats.pearsonr(model[iu], human[iu]).statistic)
  stimuli = np.array([f"s{i}.jpg" for i in range(10)])
  as_rsm = rsa.rsa(x, rsa.check_human(human, stimuli, "rsm"), n_resamples=50)
  as_rdm = rsa.rsa(x, rsa.check_human(1 - human, stimuli, "rdm"), n_resamples=50)
  for kernel in rsa.KERNELS:
    for method in ("spearman", "pearson"):
      assert as_rdm[kernel][method]["value"] == pytest.approx(as_rsm[kernel][method]["value"])
  row = as_rsm["pearson"]["spearman"]
  assert row["value"] > 0.5 and row["n"] == 10 and row["ci"][0] <= row["value"] <= row["ci"][1]
  # The diagonal never counts: a matrix that differs only there correlates perfectly.
  assert rsa.correlate(model, model + np.eye(10), "spearman") == pytest.approx(1.0)


def test_load_human_matrix_and_match_stimuli_by_base_name(tmp_path):
  m = np.array([[1.0, 0.2, 0.5], [0.2, 1.0, 0.1], [0.5, 0.1, 1.0]])
  np.savetxt(tmp_path / "m.csv", m, delimiter=",")
  (tmp_path / "stim.txt").write_text("imgs/a.jpg\nimgs/b.jpg\nimgs/c.jpg\n")
  human = rsa.load_human(str(tmp_path / "m.csv"), str(tmp_path / "stim.txt"))
  np.testing.assert_allclose(human.matrix, m)
  rows = rsa.match_rows(human.stimuli, np.array(["c.png", "x/a.JPEG", "b.jpg", "d.jpg"]))
  np.testing.assert_array_equal(rows, [1, 2, 0])
  with pytest.raises(KeyError, match="1 stimuli"):
    rsa.match_rows(human.stimuli, np.array(["a.jpg", "b.jpg"]))
  np.save(tmp_path / "bad.npy", m + np.triu(np.ones((3, 3)), 1))
  with pytest.raises(ValueError, match="not symmetric"):
    rsa.load_human(str(tmp_path / "bad.npy"), str(tmp_path / "stim.txt"))
  (tmp_path / "two.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="3 rows but 2 stimuli"):
    rsa.load_human(str(tmp_path / "m.csv"), str(tmp_path / "two.txt"))
  with pytest.raises(ValueError, match="'rsm'"):
    rsa.load_human(str(tmp_path / "m.csv"), str(tmp_path / "stim.txt"), kind="similarity")
