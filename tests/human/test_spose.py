import io
import math

import fsspec
import numpy as np
import pytest

from alignet_data import triplet_math
from alignet_data.human import spose, things


def _simulated(beta=2.5, n_objects=40, n=6000, seed=0):
  rng = np.random.default_rng(seed)
  emb = np.abs(rng.normal(size=(n_objects, 5)))
  trip = np.stack([rng.choice(n_objects, 3, replace=False) for _ in range(n)])
  p = triplet_math.pair_probabilities(beta * triplet_math.triplet_similarities(emb, trip))
  pair = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, 2)
  a, b = triplet_math.PAIRS[pair].T
  rows = np.arange(n)
  return emb, np.stack([trip[rows, a], trip[rows, b], trip[rows, triplet_math.ODD_OF_PAIR[pair]]], 1)


def test_fitted_temperature_recovers_the_simulated_one():
  emb, trip = _simulated(beta=2.5)
  beta = spose.fit_temperature(emb, trip)
  assert abs(beta - 2.5) < 0.25, beta
  p = spose.predict(emb, trip, beta)
  assert p.dtype == np.float32 and np.allclose(p.sum(1), 1.0, atol=1e-5)
  # The fitted beta is the likelihood's optimum: better than beta = 1 and than a 20% change either way.
  nll = lambda b: triplet_math.human_pair_nll(spose.predict(emb, trip, b))
  assert nll(beta) < min(nll(1.0), nll(0.8 * beta), nll(1.2 * beta))


def _npy(url, arr):
  buf = io.BytesIO()
  np.save(buf, arr)
  with fsspec.open(url, "wb") as f:
    f.write(buf.getvalue())
  return url


@pytest.mark.parametrize("arr, n, match", [
    (np.ones(5), None, "shape"),
    (np.ones((4, 2)), 5, "has 4 rows"),
    (np.array([[1.0, np.nan]]), None, "NaN"),
])
def test_bad_embeddings_fail_clearly(arr, n, match):
  with pytest.raises(ValueError, match=match):
    spose.load_embedding(_npy("memory://spose/e.npy", arr), n)
  with pytest.raises(FileNotFoundError):
    spose.load_embedding("memory://spose/none.npy")


def test_published_spose_on_real_triplets(shared_data):
  root = shared_data / "things"
  emb = spose.load_embedding(str(root / "spose49.npy"), things.N_THINGS)
  test = things.load_triplets(str(root / "triplets_50k.txt"), things.N_THINGS)
  train = things.load_triplets(str(root / "triplets_127k_subjects.txt"), things.N_THINGS)[:20000]
  beta = spose.fit_temperature(emb, train)
  p = spose.predict(emb, test, beta)
  assert abs(triplet_math.odd_one_out_accuracy(p) - 0.6405) < 0.001  # SOURCES.md: 64.05%.
  assert triplet_math.human_pair_nll(p) < math.log(3) - 0.2
