"""Human-alignment metrics with bootstrap confidence intervals (paper: "Levels", "Human-to-human alignment").

Pure numpy/scipy. Conventions:
* A model's odd one out, and what counts as wrong (ties, NaN/inf), is `triplet_math`'s (the convention lives
  there).
* Levels target = the MAJORITY VOTE of a triplet's responses (choices are positions 0..2; negative = missing).
  With 5 responses over 3 options only a 2-2-1 split has no unique winner: such triplets have no target and
  are EXCLUDED from model accuracy and counted (`n_no_majority`), instead of being broken at random.
* Noise ceiling: leave-one-out (Methods): each response is compared with the majority of the OTHER responses
  of its triplet; when those others tie (e.g. 2-2), the match counts as 1/k if the held-out response is one of
  the k tied options (the expected match under a random tie-break). Per-triplet agreement is the mean over its
  responses; the ceiling is the mean over triplets (all triplets with >= 2 valid responses).
* Uncertainty: model entropy of softmax(similarities / tau) vs the triplet's mean log response time over
  responses with 0 < RT <= max_rt (10 s in the paper), Spearman's rho.
* ML accuracies (few-shot probes) get binomial Wald intervals, acc +- z * sqrt(acc (1 - acc) / n) (paper, Fig. 1c).
* Two models on the same items: the difference of their per-item means with a PAIRED bootstrap interval (the
  same resampled items for both) and, for 0/1 correctness, McNemar's exact test on the discordant items.
* Intervals say what they are: every one carries its method (`METHODS`; "ci_method" beside a "ci", or the key
  of an "intervals" entry). Default: percentile 95% bootstrap over ALL n items (`bootstrap_items_n`: the
  precision of an estimate on these n items). The paper's protocol, 100 resamples of 1,000 items
  (`bootstrap_subsample_1000`), is the spread of 1,000-item means, wider than that precision when n > 1,000:
  available with size=1000, and labelled so (with n <= size it IS the whole-n bootstrap, and says so). THINGS
  triplets also sample objects: `bootstrap_objects` resamples the objects (`object_weights`). A given seed
  draws the same resamples for every model evaluated on the same items, so the intervals of two models are
  paired.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def response_entropy(choices: np.ndarray) -> np.ndarray:
  """(L,) Shannon entropy (nats) of each triplet's distribution of responses: human disagreement."""
  counts = vote_counts(choices).astype(np.float64)
  total = counts.sum(-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total[:, 0] > 0, triplet_math.entropy(counts / np.maximum(total, 1)), np.nan)


def mean_log_rt(rt: np.ndarray, max_rt: float = 10.0) -> np.ndarray:
  """(L,) mean log response time over responses with 0 < RT <= max_rt (NaN where none is left)."""
  rt = np.asarray(rt, dtype=np.float64)
  ok = np.isfinite(rt) & (rt > 0) & (rt <= max_rt)
  logs = np.where(ok, np.log(np.where(ok, rt, 1.0)), 0.0)
  n = ok.sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, logs.sum(axis=-1) / n, np.nan)


# ------------------------------------------------------------------------------------------- statistics


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson's r of two finite vectors; NaN for a constant side. Plain numpy sums: scipy's per-call checks, and
  BLAS dot products on a busy machine, would dominate a 1,000-resample bootstrap."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x * x).sum() * (y * y).sum())
  return float(np.clip((x * y).sum() / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rho of two finite vectors (Pearson of average ranks, as scipy); NaN for a constant side."""
  from scipy import stats
  return pearson(stats.rankdata(x), stats.rankdata(y))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rho over the pairs where both are finite; NaN if fewer than 3 pairs or a constant side."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
    return float("nan")
  return rank_correlation(x[ok], y[ok])


# -------------------------------------------------------------------------------------------- intervals

# Every interval in a report carries its method ("ci_method", or the key of an "intervals" entry); report.json
# lists the descriptions of those it used (`describe_methods`).
ITEMS_N = "bootstrap_items_n"
OBJECTS = "bootstrap_objects"
STIMULI = "bootstrap_stimuli"
IMAGES = "bootstrap_images"
WALD = "wald"
PAPER_SIZE = 1000  # the paper's protocol: 100 resamples of 1,000 items
METHODS: dict[str, str] = {
    ITEMS_N: "percentile bootstrap resampling all n items with replacement: the precision of the estimate on "
             "these n items",
    f"bootstrap_subsample_{PAPER_SIZE}": "the paper's protocol: percentile interval of resamples of 1,000 items with "
                                         "replacement: the spread of 1,000-item means, wider than the precision "
                                         "of an estimate on n > 1,000 items",
    OBJECTS: "percentile bootstrap resampling THINGS objects with replacement: a triplet counts once per draw of "
             "its three objects (the product of their multiplicities), so triplets with an undrawn object drop "
             "out; covers the variation from which objects were sampled (conservative for the per-triplet noise)",
    STIMULI: "RSA: percentile bootstrap resampling stimuli with replacement (pairs of a stimulus with its own "
             "copy dropped)",
    IMAGES: "representation analysis: percentile bootstrap resampling images with replacement (pairs of an "
            "image with its own copy dropped)",
    WALD: "binomial normal approximation, accuracy +- z sqrt(accuracy (1 - accuracy) / n)",
}
_CHUNK = 2_000_000  # item indices drawn at once (bounds the memory of a whole-n bootstrap of 50k items)


def item_method(n: int, size: int | None = None) -> str:
  """Label of an item bootstrap of n items in resamples of `size` items (None: all n)."""
  return ITEMS_N if size is None or size >= n else f"bootstrap_subsample_{size}"


def describe_methods(names: Iterable[str]) -> dict[str, str]:
  """{method: what it resamples} for the given labels (report.json's legend)."""
  out = {}
  for name in sorted(set(names)):
    size = name.removeprefix("bootstrap_subsample_")
    out[name] = METHODS.get(name) or (f"resamples of {size} items with replacement (the paper's protocol at "
                                      f"another size)" if size.isdigit() else "")
  return out


def _index_chunks(n: int, n_resamples: int, size: int | None, seed: int) -> Iterator[np.ndarray]:
  """Item resamples as (rows, m) index arrays, m = min(size, n); the same stream for every model given a seed."""
  m = n if size is None else min(size, n)
  rng = np.random.default_rng([seed, n])
  rows = max(1, _CHUNK // max(m, 1))
  for start in range(0, n_resamples, rows):
    yield rng.integers(0, n, (min(rows, n_resamples - start), m))


def bootstrap_indices(n: int, n_resamples: int = 1000, size: int | None = None, seed: int = 0) -> np.ndarray:
  """(n_resamples, min(size, n)) item indices drawn with replacement; the same for every model given a seed."""
  if n == 0:
    return np.zeros((n_resamples, 0), np.int64)
  return np.concatenate(list(_index_chunks(n, n_resamples, size, seed)))


def object_weights(objects: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> Iterator[np.ndarray]:
  """Object resamples as (rows, n) triplet weights: the product of each triplet's three objects' multiplicities.

  The objects are those the triplets name ((n, 3) ids); each resample draws as many of them with replacement.
  The draws depend only on (seed, the objects, n), so models scored on the same triplets are paired.
  """
  objects = np.asarray(objects)
  ids, local = np.unique(objects, return_inverse=True)
  local = local.reshape(objects.shape)
  k = len(ids)
  rng = np.random.default_rng([seed, k, len(objects), 3])
  rows = max(1, _CHUNK // max(3 * len(objects), k, 1))
  for start in range(0, n_resamples, rows):
    r = min(rows, n_resamples - start)
    draws = rng.integers(0, k, (r, k)) + k * np.arange(r)[:, None]
    m = np.bincount(draws.ravel(), minlength=r * k).reshape(r, k).astype(np.float64)  # exact small integers
    yield m[:, local].prod(axis=-1)


def _percentile(values: np.ndarray, level: float = 0.95) -> list[float]:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return [float("nan"), float("nan")]
  lo, hi = np.percentile(values, [50 * (1 - level), 100 - 50 * (1 - level)])
  return [float(lo), float(hi)]


def bootstrap_ci(statistic: Callable[..., float], arrays: Sequence[np.ndarray], n_resamples: int = 1000,
                 size: int | None = None, seed: int = 0, level: float = 0.95,
                 objects: np.ndarray | None = None) -> tuple[float, float]:
  """Percentile bootstrap interval of statistic(*arrays) over items (the arrays' first axis): items resampled
  (`item_method(n, size)`), or, given `objects` ((n, 3) ids), THINGS objects (`bootstrap_objects`)."""
  n = len(arrays[0])
  if n == 0:
    return float("nan"), float("nan")
  arrays = [np.asarray(a) for a in arrays]
  if objects is None:
    draws: Iterable[np.ndarray] = (idx for chunk in _index_chunks(n, n_resamples, size, seed) for idx in chunk)
  else:
    draws = (np.repeat(np.arange(n), w.astype(np.int64)) for chunk in object_weights(objects, n_resamples, seed)
             for w in chunk)
  values = [statistic(*(a[idx] for a in arrays)) if len(idx) else np.nan for idx in draws]
  lo, hi = _percentile(np.array(values, np.float64), level)
  return lo, hi


def statistic_with_ci(statistic: Callable[..., float], arrays: Sequence[np.ndarray], n_resamples: int = 1000,
                      size: int | None = None, seed: int = 0, objects: np.ndarray | None = None) -> dict[str, Any]:
  """{"value", "ci", "ci_method", "n"} of statistic(*arrays); with `objects`, "intervals" adds the object
  bootstrap to the item one ({method: [lo, hi]})."""
  n = len(arrays[0])
  out: dict[str, Any] = {"value": float(statistic(*arrays)) if n else float("nan"),
                         "ci": list(bootstrap_ci(statistic, arrays, n_resamples, size, seed)),
                         "ci_method": item_method(n, size), "n": int(n)}
  if objects is not None:
    out["intervals"] = {out["ci_method"]: out["ci"],
                        OBJECTS: list(bootstrap_ci(statistic, arrays, n_resamples, size, seed, objects=objects))}
  return out


def mean_with_ci(values: np.ndarray, n_resamples: int = 1000, size: int | None = None, seed: int = 0,
                 objects: np.ndarray | None = None) -> dict[str, Any]:
  """{"value", "ci", "ci_method", "n"} for the mean of per-item values (NaNs dropped first, with their rows of
  `objects`); with `objects` ((n, 3) THINGS ids), "intervals" holds the item and the object bootstrap."""
  values = np.asarray(values, np.float64)
  ok = np.isfinite(values)
  values = values[ok]
  n = len(values)
  out: dict[str, Any] = {"value": float(values.mean()) if n else float("nan"),
                         "ci": [float("nan"), float("nan")], "ci_method": item_method(n, size), "n": int(n)}
  if not n:
    if objects is not None:
      out["intervals"] = {out["ci_method"]: out["ci"], OBJECTS: out["ci"]}
    return out
  means = np.concatenate([values[idx].mean(axis=1) for idx in _index_chunks(n, n_resamples, size, seed)])
  out["ci"] = _percentile(means)
  if objects is not None:
    objects = np.asarray(objects)[ok]
    weighted = []
    for w in object_weights(objects, n_resamples, seed):
      total = w.sum(axis=1)
      with np.errstate(invalid="ignore", divide="ignore"):
        weighted.append(np.where(total > 0, (w @ values) / np.maximum(total, 1), np.nan))
    out["intervals"] = {out["ci_method"]: out["ci"], OBJECTS: _percentile(np.concatenate(weighted))}
  return out


def wald_ci(accuracy: float, n: int, level: float = 0.95) -> list[float]:
  """Binomial proportion interval by the normal approximation (the paper's CI for ML accuracies), clipped to [0, 1]."""
  from statistics import NormalDist
  if n <= 0 or not np.isfinite(accuracy):
    return [float("nan"), float("nan")]
  half = NormalDist().inv_cdf(0.5 + level / 2) * np.sqrt(accuracy * (1 - accuracy) / n)
  return [float(max(0.0, accuracy - half)), float(min(1.0, accuracy + half))]


def paired_comparison(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, size: int | None = None,
                      seed: int = 0, objects: np.ndarray | None = None) -> dict[str, Any]:
  """Model A vs model B on the same items: mean(a) - mean(b) with a paired bootstrap CI (+ McNemar if 0/1).

  Items where either value is NaN are dropped from both. The CI resamples items (the same draws for both
  models), so it reflects which items were drawn, not only how many; with `objects` ((n, 3) THINGS ids),
  "intervals" adds the paired object bootstrap. "p_value" (exact McNemar, two-sided) is present when both
  are 0/1 vectors.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"Paired comparison needs the same items for both models; got shapes {a.shape} and {b.shape}.")
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  diff = a - b
  stats_ = mean_with_ci(diff, n_resamples, size, seed, objects=None if objects is None else np.asarray(objects)[ok])
  out: dict[str, Any] = {"difference": stats_["value"], **{k: v for k, v in stats_.items() if k != "value"}}
  if len(diff) and np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all():
    from scipy import stats
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    out.update({"a_only": a_only, "b_only": b_only, "p_value": float(p)})
  return out


# ---------------------------------------------------------------------------------------------- metrics


def model_entropy(similarities: np.ndarray, tau: float = 1.0) -> np.ndarray:
  """(n,) Shannon entropy (nats) of softmax(similarities / tau) over the three pairs: the model's uncertainty."""
  return triplet_math.entropy(triplet_math.pair_probabilities(similarities, tau))


def levels_human(choices: np.ndarray, levels: np.ndarray, rt: np.ndarray | None = None, *,
                 n_resamples: int = 1000, size: int | None = None, seed: int = 0, max_rt: float = 10.0
                 ) -> dict[str, Any]:
  """Per level: the LOO noise ceiling (with CI), how many triplets have no majority, mean log RT, and the
  Spearman of the responses' own entropy (disagreement) with mean log RT (the released analysis reports
  0.325 / 0.443 / 0.364 for coarse / boundary / fine)."""
  levels = np.asarray(levels)
  agree = loo_agreement(choices)
  majority = majority_vote(choices)
  disagreement = response_entropy(choices)
  log_rt = mean_log_rt(rt, max_rt) if rt is not None else None
  out: dict[str, Any] = {}
  for level in _levels_present(levels):
    sel = levels == level
    row = {"noise_ceiling": mean_with_ci(agree[sel], n_resamples, size, seed),
           "n_triplets": int(sel.sum()), "n_no_majority": int((majority[sel] < 0).sum())}
    if log_rt is not None:
      r = log_rt[sel]
      ok = np.isfinite(r)
      row["mean_log_rt"] = float(r[ok].mean()) if ok.any() else float("nan")
      h = disagreement[sel][ok]
      row["entropy_rt_spearman"] = statistic_with_ci(spearman, [h, r[ok]], n_resamples, size, seed)
    out[level] = row
  out["all"] = {"noise_ceiling": mean_with_ci(agree, n_resamples, size, seed),
                "n_triplets": int(len(levels)), "n_no_majority": int((majority < 0).sum())}
  return out


def levels_model(similarities: np.ndarray, choices: np.ndarray, levels: np.ndarray, rt: np.ndarray | None = None,
                 *, entropy_tau: float = 1.0, n_resamples: int = 1000, size: int | None = None, seed: int = 0,
                 max_rt: float = 10.0) -> dict[str, Any]:
  """Per level: odd-one-out accuracy against the majority vote (CI, n, excluded ties) and entropy-RT Spearman."""
  similarities = np.asarray(similarities)
  levels = np.asarray(levels)
  majority = majority_vote(choices)
  correct = triplet_math.odd_one_out_correct(similarities, majority)
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
      row["entropy_rt_spearman"] = statistic_with_ci(spearman, [e[ok], r[ok]], n_resamples, size, seed)
    out[level] = row
  has_target = majority >= 0
  out["all"] = {**_accuracy(correct[has_target], n_resamples, size, seed),
                "n_no_majority": int((~has_target).sum())}
  return out


def things_accuracy(similarities: np.ndarray, *, n_resamples: int = 1000, size: int | None = None, seed: int = 0,
                    objects: np.ndarray | None = None) -> dict[str, Any]:
  """THINGS-style accuracy against the human odd one out of stored triplets (`triplet_math.HUMAN_ODD`).

  "ci" is the item bootstrap; "intervals" holds it, the Wald interval and, given the triplets' object ids
  `objects` (n, 3), the object bootstrap: a THINGS test set samples objects as well as triplets.
  """
  correct = triplet_math.odd_one_out_correct(similarities, triplet_math.HUMAN_ODD)
  row = _accuracy(correct, n_resamples, size, seed, objects)
  row["intervals"] = {**row.get("intervals", {row["ci_method"]: row["ci"]}), WALD: wald_ci(row["accuracy"], row["n"])}
  return row


def things_soft(similarities: np.ndarray, human_probs: np.ndarray, *, tau: float = 1.0, n_resamples: int = 1000,
                size: int | None = None, seed: int = 0, objects: np.ndarray | None = None) -> dict[str, Any]:
  """Model vs human pair probabilities on the same triplets (pair order [p01, p02, p12] for both).

  The model's probabilities are softmax(similarities / tau). Returns KL(human || model) per triplet (mean with
  CI; from log q directly so that a confident model cannot underflow q to 0) and the Pearson and Spearman
  correlations of the two sets of probabilities over all n x 3 entries, with bootstrap CIs over triplets (and,
  given `objects`, over objects too).
  """
  p = np.asarray(human_probs, np.float64)
  s = np.asarray(similarities, np.float64)
  if p.shape != s.shape or p.ndim != 2 or p.shape[1] != 3:
    raise ValueError(f"Soft labels must be (n, 3) like the similarities {s.shape}; got {p.shape}.")
  if (p < 0).any() or not np.allclose(p.sum(-1), 1.0, atol=1e-3):
    raise ValueError("Soft labels must be probabilities over the three pairs (non-negative, rows summing to 1).")
  logq = triplet_math.log_softmax(s / tau)
  kl = triplet_math.kl_divergence_log(p, logq)
  q = np.exp(logq)

  def corr(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray], float]:
    def stat(pp: np.ndarray, qq: np.ndarray) -> float:
      x, y = pp.reshape(-1), qq.reshape(-1)
      return float("nan") if np.ptp(x) == 0 or np.ptp(y) == 0 else fn(x, y)
    return stat

  out: dict[str, Any] = {"kl": mean_with_ci(kl, n_resamples, size, seed, objects), "tau": float(tau)}
  for name, fn in (("pearson", pearson), ("spearman", rank_correlation)):
    out[name] = statistic_with_ci(corr(fn), [p, q], n_resamples, size, seed, objects)
  return out


def _accuracy(correct: np.ndarray, n_resamples: int, size: int | None, seed: int,
              objects: np.ndarray | None = None) -> dict[str, Any]:
  """mean_with_ci with the mean named "accuracy"."""
  stats = mean_with_ci(correct, n_resamples, size, seed, objects)
  return {"accuracy": stats.pop("value"), **stats}


def _levels_present(levels: np.ndarray) -> list[str]:
  present = set(np.unique(levels).tolist())
  return [lv for lv in LEVELS if lv in present] + sorted(present - set(LEVELS))


def flat_accuracies(report: Mapping[str, Any]) -> dict[str, float]:
  """{level: accuracy} from a `levels_model` result (the summary table's shape)."""
  return {k: v["accuracy"] for k, v in report.items() if k != "all"}
