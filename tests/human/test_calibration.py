import io

import numpy as np

from alignet_data import triplet_math
from alignet_data.human import calibration


def _simulated(n=40000, seed=0, sharpen=1.0):
  """Forecasts q and human choices drawn from q itself; returns stored triplets (human pair first) and the
  forecast (optionally sharpened: overconfident) in the stored pair order."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, 3)) * 1.5
  q = triplet_math.pair_probabilities(logits)
  pair = (rng.random(n)[:, None] > np.cumsum(q, 1)).sum(1).clip(0, 2)
  trip = np.stack([rng.choice(50, 3, replace=False) for _ in range(n)])
  a, b = triplet_math.PAIRS[pair].T
  rows = np.arange(n)
  stored = np.stack([trip[rows, a], trip[rows, b], trip[rows, triplet_math.ODD_OF_PAIR[pair]]], 1)
  # The forecast in the stored pair order: stored pair k keeps the logit of the same two original columns.
  perm_logits = np.empty_like(logits)
  orig = np.stack([a, b, triplet_math.ODD_OF_PAIR[pair]], 1)  # stored column -> original column
  for k, (c1, c2) in enumerate(triplet_math.PAIRS):
    x, y = np.minimum(orig[:, c1], orig[:, c2]), np.maximum(orig[:, c1], orig[:, c2])
    idx = np.select([(x == 0) & (y == 1), (x == 0) & (y == 2)], [0, 1], 2)
    perm_logits[:, k] = logits[rows, idx]
  return stored, triplet_math.pair_probabilities(sharpen * perm_logits)


def test_calibrated_forecasts_have_small_ece_and_sharpened_ones_large():
  stored, p = _simulated()
  r = calibration.calibration_report(stored, p)
  assert r["ece"] < 0.02 and r["ece_all_pairs"] < 0.02, r["ece"]
  over = calibration.calibration_report(stored, _simulated(sharpen=3.0)[1])
  assert over["ece"] > 0.1 and over["nll"] > r["nll"]
  assert sum(b["count"] for b in r["reliability"]) == len(stored)
  assert sum(b["count"] for b in r["reliability_all_pairs"]) == 3 * len(stored)
  buf = io.BytesIO()
  calibration.plot_reliability(r, buf)
  assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ece_by_hand():
  # Two bins: forecasts 0.9 (2 of 2 right -> gap 0.1) and 0.35 (0 of 2 right -> gap 0.35); ECE = (0.2 + 0.7) / 4.
  r = calibration.reliability(np.array([0.9, 0.9, 0.35, 0.35]), np.array([1, 1, 0, 0]), bins=10)
  assert abs(r["ece"] - 0.225) < 1e-12 and len(r["bins"]) == 2


def test_repeated_triplets_kl_undoes_the_stored_order():
  # Objects {1, 2, 3} answered 4 times: pairs kept together (1,2) x3 and (2,3) x1, stored in different orders.
  stored = np.array([[1, 2, 3], [2, 1, 3], [2, 1, 3], [3, 2, 1], [7, 8, 9]])
  # p* of the sorted set's pairs [(1,2), (1,3), (2,3)] = [0.6, 0.1, 0.3], written in each row's stored order.
  set_p = {(1, 2): 0.6, (1, 3): 0.1, (2, 3): 0.3}
  probs = np.array([[set_p[tuple(sorted((r[a], r[b])))] for a, b in triplet_math.PAIRS] for r in stored[:4]]
                   + [[0.5, 0.3, 0.2]])
  out = calibration.repeated_triplets_kl(stored, probs)
  human = np.array([0.75, 0.0, 0.25])
  expected = float(triplet_math.kl_divergence(human[None], np.array([[0.6, 0.1, 0.3]]))[0])
  assert out["triplets"] == 1 and out["answers"] == 4
  assert abs(out["kl"] - expected) < 1e-12
  assert abs(out["kl_uniform"] - float(triplet_math.kl_divergence(human[None], np.full((1, 3), 1 / 3))[0])) < 1e-12
  assert calibration.repeated_triplets_kl(stored[4:], probs[4:])["triplets"] == 0
