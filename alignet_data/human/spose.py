"""A fixed human embedding (e.g. the published 49-d SPoSE of THINGS) as a model of odd-one-out choices.

Users who already have a human similarity embedding E (n_objects, d) need no VICE fit: the choice model is
softmax(beta * [s01, s02, s12]) over its dot products, with one softmax temperature 1 / beta fitted by maximum
likelihood on the training triplets. The argmax (test accuracy) does not depend on beta; the soft labels p* and
their NLL do, which is why beta is fitted rather than left at 1 (SPoSE's dot products are on the order of 1-10).

Training a SPoSE embedding from triplets is `vice.fit(..., ViceConfig(model="spose"))`: the same loop as VICE.
"""
from __future__ import annotations

import numpy as np
from scipy import optimize, special

from alignet_data import numeric_files, triplet_math

_LOG_BETA_BOUNDS = (-12.0, 8.0)


def load_embedding(url: str, n_objects: int | None = None) -> np.ndarray:
  """An (n_objects, d) float64 embedding (`numeric_files.read_matrix`: finite, numeric, 2-D), one row per object."""
  e = numeric_files.read_matrix(url, npz_keys=("embedding",), what="(n_objects, d) embedding")
  if n_objects is not None and e.shape[0] != n_objects:
    raise ValueError(f"{url}: has {e.shape[0]} rows but the triplets index {n_objects} objects; give one row per "
                     "object in the triplets' order (for an upload-order THINGS embedding, convert with sortindex).")
  return e.astype(np.float64)


def _nll(beta: float, logits: np.ndarray) -> float:
  z = beta * logits
  return float(np.mean(special.logsumexp(z, axis=1) - z[:, triplet_math.HUMAN_PAIR]))  # -log p(human pair)


def fit_temperature(embedding: np.ndarray, triplets: np.ndarray) -> float:
  """beta maximising the likelihood of the human pair of the triplets; the NLL is convex in beta."""
  logits = triplet_math.triplet_similarities(np.asarray(embedding, np.float64), np.asarray(triplets, np.int64))
  res = optimize.minimize_scalar(lambda lb: _nll(float(np.exp(lb)), logits), bounds=_LOG_BETA_BOUNDS,
                                 method="bounded", options={"xatol": 1e-6})
  return float(np.exp(res.x))


def predict(embedding: np.ndarray, triplets: np.ndarray, beta: float) -> np.ndarray:
  """(n, 3) float32 choice probabilities softmax(beta * [s01, s02, s12])."""
  logits = triplet_math.triplet_similarities(np.asarray(embedding, np.float64), np.asarray(triplets, np.int64))
  return special.softmax(beta * logits, axis=1).astype(np.float32)
