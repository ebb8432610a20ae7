"""How alignment reorganises a representation along the concept hierarchy (paper, Fig. 3d; Extended Data Fig. 1).

Every pair of images is put in the closest relation it has: same subordinate concept, same basic category
(different subordinate), same superordinate (different basic), or different superordinate. Pairwise
Euclidean distances are z-scored across ALL pairs, separately for the base and the aligned model (relative
distances: scaling a representation changes nothing), and the change z_aligned - z_base is averaged per
relation. AligNet predicts: negative (closer) for related images, positive (apart) for different
superordinates. Intervals resample IMAGES (pairs that share an image are not independent).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from alignet_data.evaluation import metrics

RELATIONS = ("same_subordinate", "same_basic", "same_superordinate", "different_superordinate")


def relations(subordinate: np.ndarray, basic: np.ndarray, superordinate: np.ndarray) -> np.ndarray:
  """(n, n) relation code of each pair: 0..3 in RELATIONS order (the diagonal is 0 and never used)."""
  sub, bas, sup = (np.asarray(a) for a in (subordinate, basic, superordinate))
  code = np.full((len(sub), len(sub)), 3, np.int64)
  code[sup[:, None] == sup[None, :]] = 2
  code[bas[:, None] == bas[None, :]] = 1
  code[sub[:, None] == sub[None, :]] = 0
  return code


def zscored_distances(x: np.ndarray) -> np.ndarray:
  """(n, n) Euclidean distances, z-scored over the strict upper triangle (the diagonal is left at 0)."""
  x = np.asarray(x, np.float64)
  sq = (x ** 2).sum(1)
  d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
  iu = np.triu_indices(len(x), k=1)
  mu, sd = d[iu].mean(), d[iu].std()
  if sd == 0:
    raise ValueError("All pairwise distances are equal: the representation is degenerate.")
  z = (d - mu) / sd
  np.fill_diagonal(z, 0.0)
  return z


def distance_change(base: np.ndarray, aligned: np.ndarray, subordinate: np.ndarray, basic: np.ndarray,
                    superordinate: np.ndarray, *, n_resamples: int = 100, seed: int = 0) -> dict[str, Any]:
  """{relation: {value: mean z-scored change, ci (`metrics.IMAGES`), ci_method, n: pairs}} (module doc)."""
  if len(base) != len(aligned) or len(base) != len(subordinate):
    raise ValueError(f"Base ({len(base)}), aligned ({len(aligned)}) and labels ({len(subordinate)}) must list the "
                     "same images.")
  change = zscored_distances(aligned) - zscored_distances(base)
  code = relations(subordinate, basic, superordinate)
  n = len(base)
  iu = np.triu_indices(n, k=1)
  rng = np.random.default_rng([seed, n])
  k = len(RELATIONS)
  boot = np.full((n_resamples, k), np.nan)
  for t in range(n_resamples):
    idx = rng.integers(0, n, n)
    a, b = idx[iu[0]], idx[iu[1]]
    keep = a != b
    c, v = code[a[keep], b[keep]], change[a[keep], b[keep]]
    counts = np.bincount(c, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
      boot[t] = np.bincount(c, weights=v, minlength=k) / counts
  out: dict[str, Any] = {}
  for r, name in enumerate(RELATIONS):
    sel = code[iu] == r
    if not sel.any():
      continue
    values = boot[:, r][np.isfinite(boot[:, r])]
    ci = [float(x) for x in np.percentile(values, [2.5, 97.5])] if len(values) else [float("nan")] * 2
    out[name] = {"value": float(change[iu][sel].mean()), "ci": ci, "ci_method": metrics.IMAGES, "n": int(sel.sum())}
  return out


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(n, 2) projection on the first two principal components, and their explained-variance ratios."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(0)
  n, d = x.shape
  # Eigen-decomposition of the smaller of the covariance (d x d) and Gram (n x n) matrices: cheaper than an SVD
  # of x and steady under a busy BLAS.
  if d <= n:
    var, vecs = np.linalg.eigh(x.T @ x)
    order = np.argsort(var)[::-1]
    var, comps = np.maximum(var[order], 0), vecs[:, order[:2]].T
  else:
    var, vecs = np.linalg.eigh(x @ x.T)
    order = np.argsort(var)[::-1]
    var = np.maximum(var[order], 0)
    comps = (x.T @ vecs[:, order[:2]] / np.sqrt(np.maximum(var[:2], 1e-300))).T
  # Fix each component's sign (largest-magnitude loading positive) so plots do not flip between runs.
  signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
  comps = comps * signs[:, None]
  return x @ comps.T, var[:2] / var.sum()


def subsample(n: int, max_items: int, seed: int) -> np.ndarray:
  """Sorted, seeded choice of at most max_items of n items (all of them when n <= max_items)."""
  if n <= max_items:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, n, max_items]).choice(n, max_items, replace=False))
