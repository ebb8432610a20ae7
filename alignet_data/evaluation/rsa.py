"""Representational similarity analysis (RSA) against human similarity matrices (paper, Methods "RSA").

A model's RSM uses the Pearson-correlation kernel (each representation centred on its own mean, then cosine:
the "row-centred correlation"), or the plain cosine kernel. It is compared with a human RSM (Likert ratings,
higher = more similar) or RDM (multi-arrangement distances, higher = less similar; negated here so that every
reported correlation is positive when model and humans agree) over the upper triangle without the diagonal,
by Spearman's rho (the paper's measure: scale-free) and Pearson's r.

Human data come as a square matrix (.npy, or text/CSV) plus a stimulus list (one name per line, in the
matrix's row order); a model's rows are matched to stimuli by name (file base name, extension ignored) or id.
The interval resamples STIMULI (with replacement; pairs of a stimulus with its own copy are dropped), since
pairs that share a stimulus are not independent.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from alignet_data import artifacts, numeric_files
from alignet_data.evaluation import metrics

KERNELS = ("pearson", "cosine")


@dataclasses.dataclass(frozen=True)
class HumanMatrix:
  """A human similarity (kind "rsm") or dissimilarity (kind "rdm") matrix over named stimuli."""
  matrix: np.ndarray     # (n, n) float64, symmetric
  stimuli: np.ndarray    # (n,) str
  kind: str = "rsm"

  def similarity(self) -> np.ndarray:
    """As similarities: an RDM is negated (a monotone flip: Spearman and Pearson only change sign)."""
    return -self.matrix if self.kind == "rdm" else self.matrix


def rsm(x: np.ndarray, kernel: str = "pearson") -> np.ndarray:
  """(n, p) representations -> (n, n) similarity matrix under the Pearson-correlation or cosine kernel."""
  if kernel not in KERNELS:
    raise ValueError(f"Unknown RSA kernel {kernel!r}; choose one of {KERNELS}.")
  x = np.asarray(x, np.float64)
  if kernel == "pearson":
    x = x - x.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError(f"{int((norm == 0).sum())} representations are constant (zero norm after centring): their "
                     f"{kernel} similarity is undefined.")
  x = x / norm
  return np.clip(x @ x.T, -1.0, 1.0)


def upper(m: np.ndarray) -> np.ndarray:
  """The strict upper triangle of a square matrix, row-major."""
  m = np.asarray(m)
  return m[np.triu_indices(len(m), k=1)]


def correlate(a: np.ndarray, b: np.ndarray, method: str = "spearman") -> float:
  """Spearman's rho or Pearson's r between two same-size matrices' upper triangles."""
  from scipy import stats
  x, y = upper(a).astype(np.float64), upper(b).astype(np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
    return float("nan")
  fn = {"spearman": stats.spearmanr, "pearson": stats.pearsonr}[method]
  return float(fn(x[ok], y[ok]).statistic)


def _resampled(a: np.ndarray, b: np.ndarray, idx: np.ndarray, method: str) -> float:
  i, j = np.triu_indices(len(idx), k=1)
  keep = idx[i] != idx[j]
  x, y = a[idx[i[keep]], idx[j[keep]]], b[idx[i[keep]], idx[j[keep]]]
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return {"spearman": metrics.rank_correlation, "pearson": metrics.pearson}[method](x, y)


def rsa(x: np.ndarray, human: HumanMatrix, *, kernels: tuple[str, ...] = KERNELS, n_resamples: int = 100,
        seed: int = 0) -> dict[str, Any]:
  """Model representations (rows in the order of human.stimuli) vs a human matrix.

  Returns {kernel: {"spearman": {value, ci, ci_method, n}, "pearson": {...}}}, n = number of stimuli; CIs by
  the stimulus bootstrap (module doc; `metrics.STIMULI`).
  """
  x = np.asarray(x)
  if len(x) != len(human.stimuli):
    raise ValueError(f"RSA needs one representation per stimulus: got {len(x)} for {len(human.stimuli)} stimuli.")
  target = human.similarity()
  n = len(x)
  rng = np.random.default_rng([seed, n])
  boots = rng.integers(0, n, (n_resamples, n))
  out: dict[str, Any] = {}
  for kernel in kernels:
    model = rsm(x, kernel)
    row: dict[str, Any] = {}
    for method in ("spearman", "pearson"):
      values = np.array([_resampled(model, target, idx, method) for idx in boots])
      values = values[np.isfinite(values)]
      ci = [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else [float("nan")] * 2
      row[method] = {"value": correlate(model, target, method), "ci": ci, "ci_method": metrics.STIMULI, "n": n}
    out[kernel] = row
  return out


# ------------------------------------------------------------------------------------------------ loading


def stimulus_key(name: str) -> str:
  """How stimuli are matched to images: the base name without extension ("a/b/dog_01.jpg" -> "dog_01")."""
  return os.path.splitext(os.path.basename(str(name).strip()))[0]


def _read(url: str) -> bytes:
  fs, path = artifacts.url_to_fs(url)
  if not fs.isfile(path):
    raise FileNotFoundError(f"RSA input not found: {url}")
  with fs.open(path, "rb") as f:
    return f.read()


def load_matrix(url: str) -> np.ndarray:
  """A human matrix by `numeric_files`' rule (.npy/.npz/text); its diagonal may be missing (checked later)."""
  return np.asarray(numeric_files.read_matrix(url, what="square matrix", finite=False), np.float64)


def load_human(matrix_url: str, stimuli_url: str, kind: str = "rsm") -> HumanMatrix:
  """A human RSM/RDM and its stimulus list, checked: square, symmetric, finite, one stimulus per row."""
  if kind not in ("rsm", "rdm"):
    raise ValueError(f"Human matrix kind must be 'rsm' (similarities, e.g. Likert) or 'rdm' (dissimilarities, "
                     f"e.g. multi-arrangement), got {kind!r}.")
  m = load_matrix(matrix_url)
  stimuli = np.array([s.strip() for s in _read(stimuli_url).decode().splitlines() if s.strip()])
  return check_human(m, stimuli, kind, name=matrix_url)


def check_human(m: np.ndarray, stimuli: np.ndarray, kind: str = "rsm", name: str = "matrix") -> HumanMatrix:
  m = np.asarray(m, np.float64)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"{name}: a human RSM/RDM must be square, got shape {m.shape}.")
  if len(stimuli) != len(m):
    raise ValueError(f"{name}: {len(m)} rows but {len(stimuli)} stimuli; the stimulus list gives one name per row.")
  if not np.isfinite(upper(m)).all():
    raise ValueError(f"{name}: the upper triangle has missing or infinite values.")
  if not np.allclose(m, m.T, equal_nan=True):
    raise ValueError(f"{name}: the matrix is not symmetric; average it with its transpose if that is intended.")
  keys = [stimulus_key(s) for s in stimuli]
  if len(set(keys)) != len(keys):
    raise ValueError(f"{name}: stimulus names repeat (after dropping folders and extensions).")
  return HumanMatrix(m, np.asarray(stimuli), kind)


def match_rows(stimuli: np.ndarray, names: np.ndarray) -> np.ndarray:
  """Row in `names` of each stimulus, matching by `stimulus_key`; KeyError naming the stimuli not found."""
  index = {stimulus_key(n): i for i, n in enumerate(names)}
  rows = [index.get(stimulus_key(s), -1) for s in stimuli]
  missing = [str(s) for s, r in zip(stimuli, rows, strict=True) if r < 0]
  if missing:
    raise KeyError(f"{len(missing)} stimuli have no representation (matched by file base name): {missing[:5]}")
  return np.asarray(rows, np.int64)
