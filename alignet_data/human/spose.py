"""A fixed human embedding (e.g. the published 49-d SPoSE of THINGS) as a model of odd-one-out choices.

Users who already have a human similarity embedding E (n_objects, d) need no VICE fit: the choice model is
softmax(beta * [s01, s02, s12]) over its dot products, with one softmax temperature 1 / beta fitted by maximum
likelihood on the training triplets. The argmax (test accuracy) does not depend on beta; the soft labels p* and
their NLL do, which is why beta is fitted rather than left at 1 (SPoSE's dot products are on the order of 1-10).

Training a SPoSE embedding from triplets is `vice.fit(..., ViceConfig(model="spose"))`: the same loop as VICE.
"""
from __future__ import annotations

import io

import numpy as np
from scipy import optimize, special

from alignet_data import artifacts, numeric_files, triplet_math

_LOG_BETA_BOUNDS = (-12.0, 8.0)


def load_embedding(url: str, n_objects: int | None = None) -> np.ndarray:
  """An (n_objects, d) float64 embedding from .npy or whitespace text; clear errors for a wrong shape or NaNs."""
  fs, path = artifacts.url_to_fs(url)
  if not fs.isfile(path):
    raise FileNotFoundError(f"Embedding file not found: {url}")
  with fs.open(path, "rb") as f:
    data = f.read()
  try:
    if path.endswith(".npy"):
      e = numeric_files.load_npy(io.BytesIO(data), url, what="numeric .npy (n_objects, d) embedding")
    else:
      e = np.loadtxt(io.StringIO(data.decode("utf-8")), dtype=np.float64, ndmin=2)
  except ValueError as err:
    raise ValueError(f"{url}: cannot read an (n_objects, d) embedding ({err}).") from err
  if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0 or not np.issubdtype(e.dtype, np.number):
    raise ValueError(f"{url}: expected a non-empty numeric (n_objects, d) matrix, got shape {e.shape}, "
                     f"dtype {e.dtype}.")
  if n_objects is not None and e.shape[0] != n_objects:
    raise ValueError(f"{url}: has {e.shape[0]} rows but the triplets index {n_objects} objects; give one row per "
                     "object in the triplets' order (for an upload-order THINGS embedding, convert with sortindex).")
  e = e.astype(np.float64)
  if not np.all(np.isfinite(e)):
    raise ValueError(f"{url}: contains NaN or infinite values.")
  return e


def _nll(beta: float, logits: np.ndarray) -> float:
  z = beta * logits
  return float(np.mean(special.logsumexp(z, axis=1) - z[:, 0]))


def fit_temperature(embedding: np.ndarray, triplets: np.ndarray) -> float:
  """beta maximising the likelihood of the human pair (column 0-1) of the triplets; the NLL is convex in beta."""
  logits = triplet_math.triplet_similarities(np.asarray(embedding, np.float64), np.asarray(triplets, np.int64))
  res = optimize.minimize_scalar(lambda lb: _nll(float(np.exp(lb)), logits), bounds=_LOG_BETA_BOUNDS,
                                 method="bounded", options={"xatol": 1e-6})
  return float(np.exp(res.x))


def predict(embedding: np.ndarray, triplets: np.ndarray, beta: float) -> np.ndarray:
  """(n, 3) float32 choice probabilities softmax(beta * [s01, s02, s12])."""
  logits = triplet_math.triplet_similarities(np.asarray(embedding, np.float64), np.asarray(triplets, np.int64))
  return special.softmax(beta * logits, axis=1).astype(np.float32)
