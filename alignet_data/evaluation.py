"""Human-alignment metrics with bootstrap confidence intervals (paper: "Levels", "Human-to-human alignment").

Pure numpy/scipy. Conventions:
* A model's odd one out comes from its pair similarities [s01, s02, s12] (`triplet_math.odd_one_out`); a tie
  in the model's top similarity counts as wrong.
* Levels target = the MAJORITY VOTE of a triplet's responses (choices are positions 0..2; negative = missing).
  With 5 responses over 3 options only a 2-2-1 split has no unique winner: such triplets have no target and
  are EXCLUDED from model accuracy and counted (`n_no_majority`), instead of being broken at random.
* Noise ceiling: leave-one-out (Methods): each response is compared with the majority of the OTHER responses
  of its triplet; when those others tie (e.g. 2-2), the match counts as 1/k if the held-out response is one of
  the k tied options (the expected match under a random tie-break). Per-triplet agreement is the mean over its
  responses; the ceiling is the mean over triplets (all triplets with >= 2 valid responses).
* Uncertainty: model entropy of softmax(similarities / tau) vs the triplet's mean log response time over
  responses with 0 < RT <= max_rt (10 s in the paper), Spearman's rho.
* Bootstrap: `n_resamples` resamples of `size` items with replacement (paper: 100 x 1,000), percentile 95%
  interval; when fewer than `size` items exist, resamples have the items' own count (an ordinary bootstrap,
  so intervals narrow with n). A given seed draws the same item indices for every model evaluated on the same
  items, so the intervals of two models are paired.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from alignet_data import triplet_math

LEVELS = ("coarse", "fine", "boundary")


# ------------------------------------------------------------------------------------------------ votes


def vote_counts(choices: np.ndarray) -> np.ndarray:
  """(L, R) odd-one-out positions (negative = missing) -> (L, 3) votes per position."""
  choices = np.asarray(choices)
  if choices.size and choices.max() > 2:
    raise ValueError(f"Choices must be positions 0..2 (or negative for missing); got a {choices.max()}.")
  return np.stack([(choices == k).sum(axis=-1) for k in range(3)], axis=-1)


def majority_vote(choices: np.ndarray) -> np.ndarray:
  """(L,) the position with strictly the most votes, or -1 where the top count is tied (or nobody answered)."""
  counts = vote_counts(choices)
  top = counts.max(axis=-1)
  unique = (counts == top[:, None]).sum(axis=-1) == 1
  return np.where(unique & (top > 0), counts.argmax(axis=-1), -1)


def loo_agreement(choices: np.ndarray) -> np.ndarray:
  """(L,) leave-one-out agreement per triplet (NaN with fewer than 2 valid responses); see the module doc."""
  choices = np.asarray(choices)
  counts = vote_counts(choices)
  valid = (choices >= 0) & (choices <= 2)
  # For each response r: the other responses' counts = all counts - one vote for r's own choice.
  own = np.eye(3, dtype=np.int64)[np.clip(choices, 0, 2)] * valid[..., None]  # (L, R, 3)
  others = counts[:, None, :] - own                                       # (L, R, 3)
  top = others.max(axis=-1, keepdims=True)
  winners = (others == top) & (top > 0)                                   # tied winners share the match
  k = winners.sum(axis=-1)
  hit = np.take_along_axis(winners, np.clip(choices, 0, 2)[..., None], axis=-1)[..., 0]
  match = np.where(k > 0, hit / np.maximum(k, 1), 0.0)
  n_valid = valid.sum(axis=-1)
  total = np.where(valid, match, 0.0).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n_valid >= 2, total / n_valid, np.nan)


def mean_log_rt(rt: np.ndarray, max_rt: float = 10.0) -> np.ndarray:
  """(L,) mean log response time over responses with 0 < RT <= max_rt (NaN where none is left)."""
  rt = np.asarray(rt, dtype=np.float64)
  ok = np.isfinite(rt) & (rt > 0) & (rt <= max_rt)
  logs = np.where(ok, np.log(np.where(ok, rt, 1.0)), 0.0)
  n = ok.sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, logs.sum(axis=-1) / n, np.nan)


# ------------------------------------------------------------------------------------------- statistics


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rho over the pairs where both are finite; NaN if fewer than 3 pairs or a constant side."""
  from scipy import stats
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
    return float("nan")
  return float(stats.spearmanr(x[ok], y[ok]).statistic)


def bootstrap_indices(n: int, n_resamples: int = 100, size: int = 1000, seed: int = 0) -> np.ndarray:
  """(n_resamples, min(size, n)) item indices drawn with replacement; the same for every model given a seed."""
  if n == 0:
    return np.zeros((n_resamples, 0), np.int64)
  return np.random.default_rng([seed, n]).integers(0, n, (n_resamples, min(size, n)))


def bootstrap_ci(statistic: Callable[..., float], arrays: Sequence[np.ndarray], n_resamples: int = 100,
                 size: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of statistic(*arrays) over items (the arrays' first axis)."""
  n = len(arrays[0])
  if n == 0:
    return float("nan"), float("nan")
  values = np.array([statistic(*(np.asarray(a)[idx] for a in arrays))
                     for idx in bootstrap_indices(n, n_resamples, size, seed)], np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return float("nan"), float("nan")
  lo, hi = np.percentile(values, [50 * (1 - level), 100 - 50 * (1 - level)])
  return float(lo), float(hi)


def mean_with_ci(values: np.ndarray, n_resamples: int = 100, size: int = 1000, seed: int = 0) -> dict[str, Any]:
  """{"value", "ci": [lo, hi], "n"} for the mean of per-item values (NaNs dropped first)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return {"value": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
  idx = bootstrap_indices(len(values), n_resamples, size, seed)
  means = values[idx].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"value": float(values.mean()), "ci": [float(lo), float(hi)], "n": int(len(values))}


# ---------------------------------------------------------------------------------------------- metrics


def odd_one_out_correct(similarities: np.ndarray, target_odd: np.ndarray) -> np.ndarray:
  """(n,) 1.0 where the model's odd one out equals the target position (model ties are wrong)."""
  return (triplet_math.odd_one_out(similarities) == np.asarray(target_odd)).astype(np.float64)


def model_entropy(similarities: np.ndarray, tau: float = 1.0) -> np.ndarray:
  """(n,) Shannon entropy (nats) of softmax(similarities / tau) over the three pairs: the model's uncertainty."""
  return triplet_math.entropy(triplet_math.pair_probabilities(similarities, tau))


def levels_human(choices: np.ndarray, levels: np.ndarray, rt: np.ndarray | None = None, *,
                 n_resamples: int = 100, size: int = 1000, seed: int = 0, max_rt: float = 10.0) -> dict[str, Any]:
  """Per level: the LOO noise ceiling (with CI), how many triplets have no majority, mean log RT."""
  levels = np.asarray(levels)
  agree = loo_agreement(choices)
  majority = majority_vote(choices)
  out: dict[str, Any] = {}
  for level in _levels_present(levels):
    sel = levels == level
    row = {"noise_ceiling": mean_with_ci(agree[sel], n_resamples, size, seed),
           "n_triplets": int(sel.sum()), "n_no_majority": int((majority[sel] < 0).sum())}
    if rt is not None:
      row["mean_log_rt"] = float(np.nanmean(mean_log_rt(np.asarray(rt)[sel], max_rt)))
    out[level] = row
  out["all"] = {"noise_ceiling": mean_with_ci(agree, n_resamples, size, seed),
                "n_triplets": int(len(levels)), "n_no_majority": int((majority < 0).sum())}
  return out


def levels_model(similarities: np.ndarray, choices: np.ndarray, levels: np.ndarray, rt: np.ndarray | None = None,
                 *, entropy_tau: float = 1.0, n_resamples: int = 100, size: int = 1000, seed: int = 0,
                 max_rt: float = 10.0) -> dict[str, Any]:
  """Per level: odd-one-out accuracy against the majority vote (CI, n, excluded ties) and entropy-RT Spearman."""
  similarities = np.asarray(similarities)
  levels = np.asarray(levels)
  majority = majority_vote(choices)
  correct = odd_one_out_correct(similarities, majority)
  entropy = model_entropy(similarities, entropy_tau)
  log_rt = mean_log_rt(rt, max_rt) if rt is not None else None
  out: dict[str, Any] = {}
  for level in _levels_present(levels):
    sel = levels == level
    has_target = sel & (majority >= 0)
    row = {**_accuracy(correct[has_target], n_resamples, size, seed),
           "n_no_majority": int((sel & (majority < 0)).sum())}
    if log_rt is not None:
      e, r = entropy[sel], log_rt[sel]
      ok = np.isfinite(r)
      row["entropy_rt_spearman"] = {
          "value": spearman(e[ok], r[ok]),
          "ci": list(bootstrap_ci(spearman, [e[ok], r[ok]], n_resamples, size, seed)),
          "n": int(ok.sum()),
      }
    out[level] = row
  has_target = majority >= 0
  out["all"] = {**_accuracy(correct[has_target], n_resamples, size, seed),
                "n_no_majority": int((~has_target).sum())}
  return out


def things_accuracy(similarities: np.ndarray, *, n_resamples: int = 100, size: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
  """THINGS-style accuracy: triplets are stored (i, j, odd), so the human odd one out is item 2."""
  return _accuracy(odd_one_out_correct(similarities, 2), n_resamples, size, seed)


def _accuracy(correct: np.ndarray, n_resamples: int, size: int, seed: int) -> dict[str, Any]:
  stats = mean_with_ci(correct, n_resamples, size, seed)
  return {"accuracy": stats["value"], "ci": stats["ci"], "n": stats["n"]}


def _levels_present(levels: np.ndarray) -> list[str]:
  present = set(np.unique(levels).tolist())
  return [lv for lv in LEVELS if lv in present] + sorted(present - set(LEVELS))


def flat_accuracies(report: Mapping[str, Any]) -> dict[str, float]:
  """{level: accuracy} from a `levels_model` result (the summary table's shape)."""
  return {k: v["accuracy"] for k, v in report.items() if k != "all"}
