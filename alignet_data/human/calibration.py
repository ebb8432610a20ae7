"""How well soft labels p* track human uncertainty, beyond accuracy: NLL, calibration, and answer distributions.

Accuracy only scores the argmax of p*; the align stage distils the whole distribution, so the human stage also
reports whether its probabilities mean what they say:

* reliability (top label): bin triplets by the probability p* gives its own most likely pair and compare it with
  how often people chose that pair; the expected calibration error (ECE) is the triplet-weighted mean gap;
* reliability (all pairs): the same over all three pair probabilities of every triplet (each is a forecast of
  "people choose this pair"), which also scores the probabilities of the pairs p* ranks second and third;
* where one set of three objects was answered by several people, the KL divergence from their answer
  distribution to p*, next to that of a uniform prediction (a few answers are a noisy distribution, so the
  absolute value has a floor above 0; the comparison is the point).

Stored triplets list the human pair first (`triplet_math.HUMAN_PAIR`), so the outcome of pair k is k == 0.
"""
from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np

from alignet_data import triplet_math


def reliability(confidence: np.ndarray, outcome: np.ndarray, bins: int = 10) -> dict[str, Any]:
  """Equal-width bins of forecast probabilities: per bin count, mean forecast and observed frequency; and ECE."""
  conf = np.asarray(confidence, np.float64).ravel()
  hit = np.asarray(outcome, np.float64).ravel()
  if conf.size == 0:
    return {"ece": float("nan"), "bins": []}
  idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
  count = np.bincount(idx, minlength=bins)
  mean_conf = np.bincount(idx, conf, bins) / np.maximum(count, 1)
  freq = np.bincount(idx, hit, bins) / np.maximum(count, 1)
  ece = float(np.sum(count * np.abs(freq - mean_conf)) / conf.size)
  rows = [{"low": b / bins, "high": (b + 1) / bins, "count": int(count[b]), "mean_probability": float(mean_conf[b]),
           "frequency": float(freq[b])} for b in range(bins) if count[b]]
  return {"ece": ece, "bins": rows}


def top_label_reliability(probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
  """Reliability of p*'s chosen pair: its probability vs. whether people chose it (a tie counts as not chosen)."""
  p = np.asarray(probs, np.float64)
  return reliability(p.max(1), triplet_math.odd_one_out_correct(p), bins)


def all_pairs_reliability(probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
  """Reliability of all three pair probabilities of every stored triplet (outcome: pair k is the human pair)."""
  p = np.asarray(probs, np.float64)
  outcome = np.zeros_like(p)
  outcome[:, triplet_math.HUMAN_PAIR] = 1.0
  return reliability(p, outcome, bins)


def _canonical_pair(triplets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per stored triplet: its sorted object set (n, 3), and for each stored pair k (n, 3) the index of that pair
  among the sorted set's pairs [s01, s02, s12]."""
  t = np.asarray(triplets, np.int64)
  keys = np.sort(t, 1)
  order = np.argsort(t, 1, kind="stable")  # keys[:, a] = t[:, order[:, a]]
  pos = np.argsort(order, 1)               # position of stored item c in the sorted key
  perm = np.empty_like(t)  # Stored pair k -> index of the same pair among the sorted key's pairs.
  for k, (c1, c2) in enumerate(triplet_math.PAIRS):
    a, b = np.minimum(pos[:, c1], pos[:, c2]), np.maximum(pos[:, c1], pos[:, c2])
    perm[:, k] = np.select([(a == 0) & (b == 1), (a == 0) & (b == 2)], [0, 1], 2)
  return keys, perm


def repeated_triplets_kl(triplets: np.ndarray, probs: np.ndarray, min_answers: int = 2) -> dict[str, Any]:
  """KL(people's answer distribution || p*) over object sets answered at least `min_answers` times.

  p* of a set is taken from its first stored row (p* of a set does not depend on the stored order up to the
  permutation undone here); the people's distribution counts which pair each answer kept together.
  """
  t = np.asarray(triplets, np.int64)
  p = np.asarray(probs, np.float64)
  keys, perm = _canonical_pair(t)
  base = int(keys.max()) + 1 if len(keys) else 1
  code = (keys[:, 0] * base + keys[:, 1]) * base + keys[:, 2]
  _, first, group, counts = np.unique(code, return_index=True, return_inverse=True, return_counts=True)
  many = np.flatnonzero(counts >= min_answers)
  if len(many) == 0:
    return {"triplets": 0, "answers": 0, "kl": None, "kl_uniform": None}
  human = np.zeros((len(counts), 3))
  np.add.at(human, (group, perm[:, triplet_math.HUMAN_PAIR]), 1.0)
  human = human[many] / counts[many, None]
  model = np.zeros((len(many), 3))
  rows = first[many]
  np.put_along_axis(model, perm[rows], p[rows], axis=1)
  kl = triplet_math.kl_divergence(human, model)
  kl_uniform = triplet_math.kl_divergence(human, np.full_like(human, 1 / 3))
  agreement = human.max(1)
  return {"triplets": int(len(many)), "answers": int(counts[many].sum()), "min_answers": min_answers,
          "kl": float(kl.mean()), "kl_uniform": float(kl_uniform.mean()),
          "mean_human_agreement": float(agreement.mean()),
          "mean_model_top_probability": float(model.max(1).mean())}


def calibration_report(triplets: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
  """NLL, top-label and all-pairs reliability (with ECE), and the KL on repeatedly answered triplets."""
  top, every = top_label_reliability(probs, bins), all_pairs_reliability(probs, bins)
  return {"nll": triplet_math.human_pair_nll(probs), "ece": top["ece"], "ece_all_pairs": every["ece"],
          "mean_top_probability": float(np.asarray(probs).max(1).mean()),
          "accuracy": triplet_math.odd_one_out_accuracy(probs),
          "reliability": top["bins"], "reliability_all_pairs": every["bins"],
          "repeated": repeated_triplets_kl(triplets, probs)}


def plot_reliability(report: dict[str, Any], f: BinaryIO, title: str = "p* reliability (test triplets)") -> None:
  """Reliability diagram: mean forecast vs. observed frequency per bin, top label and all pairs, diagonal dashed."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=100)
  ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
  for key, label, style, ms in (("reliability_all_pairs", f"all pairs (ECE {report['ece_all_pairs']:.3f})", "s-", 7),
                                ("reliability", f"p*'s chosen pair (ECE {report['ece']:.3f})", "o-", 4)):
    rows = report[key]  # All pairs first, larger: the chosen pair's curve lies on it at high probabilities.
    ax.plot([r["mean_probability"] for r in rows], [r["frequency"] for r in rows], style, ms=ms, label=label,
            alpha=0.8)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("p* of the pair")
  ax.set_ylabel("share of people choosing it")
  ax.set_title(title, fontsize=10)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(f, format="png", metadata={"Software": None})
  plt.close(fig)

