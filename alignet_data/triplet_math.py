"""Pure numpy math of the triplet odd-one-out task, shared by every stage.

Convention (THINGS, VICE, the released AligNet data): a triplet is (i, j, k) where (i, j) is the pair judged
most similar and k the odd one out. The three pair similarities of a triplet of items (a, b, c) are listed in
the fixed order ``[s(a,b), s(a,c), s(b,c)]`` = ``[s01, s02, s12]``; pair p leaves out item ``ODD_OF_PAIR[p]``.
Changing this order breaks compatibility with the released ``alignet_*.npz`` files.
"""
from __future__ import annotations

import numpy as np

# Pair p of a triplet (items 0, 1, 2): which items it joins and which item it leaves out.
PAIRS = np.array([[0, 1], [0, 2], [1, 2]])
ODD_OF_PAIR = np.array([2, 1, 0])  # pair (0,1) -> odd 2; (0,2) -> odd 1; (1,2) -> odd 0.
PAIR_OF_ODD = np.array([2, 1, 0])  # the inverse map (it is its own inverse).


def pair_similarities(x: np.ndarray) -> np.ndarray:
  """Dot-product pair similarities of triplet embeddings.

  Args:
    x: (n, 3, d) embeddings of the three items of n triplets.

  Returns:
    (n, 3) similarities ``[s01, s02, s12]``.
  """
  x = np.asarray(x)
  return np.stack([
      np.einsum("nd,nd->n", x[:, 0], x[:, 1]),
      np.einsum("nd,nd->n", x[:, 0], x[:, 2]),
      np.einsum("nd,nd->n", x[:, 1], x[:, 2]),
  ], axis=-1)


def triplet_similarities(embeddings: np.ndarray, triplets: np.ndarray) -> np.ndarray:
  """``[s01, s02, s12]`` for index triplets into an (m, d) embedding matrix."""
  triplets = np.asarray(triplets)
  return pair_similarities(np.asarray(embeddings)[triplets])


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
  logits = np.asarray(logits, dtype=np.float64)
  shifted = logits - logits.max(axis=axis, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def pair_probabilities(similarities: np.ndarray, tau: float = 1.0) -> np.ndarray:
  """Probability that each pair is judged most similar: softmax(similarities / tau) over the 3 pairs."""
  return np.exp(log_softmax(np.asarray(similarities, dtype=np.float64) / tau))


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
  """Shannon entropy in nats; 0 * log 0 counts as 0."""
  p = np.asarray(p, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log(p), 0.0)
  return -terms.sum(axis=axis)


def odd_one_out(similarities: np.ndarray) -> np.ndarray:
  """The model's odd one out (0, 1 or 2) per triplet, or -1 where the top similarity is tied or any similarity
  is NaN or infinite.

  Neither has a single choice, so it never matches a human choice (counts as wrong). Without the finite test
  argmax over NaN picks pair 01 and NaN == NaN never ties, so an all-NaN model scored 100%.
  """
  s = np.asarray(similarities)
  best = s.argmax(axis=-1)
  top = np.take_along_axis(s, best[:, None], axis=-1)
  tied = (s == top).sum(axis=-1) > 1
  undefined = tied | ~np.isfinite(s).all(axis=-1)
  return np.where(undefined, -1, ODD_OF_PAIR[best])


def odd_one_out_accuracy(similarities: np.ndarray, human_odd: np.ndarray | int = 2) -> float:
  """Fraction of triplets whose model odd one out equals the human one (ties and non-finite similarities wrong).

  ``human_odd`` defaults to 2: triplet files list the human-chosen pair first.
  """
  model = odd_one_out(similarities)
  human = np.broadcast_to(np.asarray(human_odd), model.shape)
  return float(np.mean(model == human)) if model.size else float("nan")


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
  """KL(p || q) in nats per row; terms with p = 0 contribute 0."""
  p = np.asarray(p, dtype=np.float64)
  q = np.asarray(q, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(axis=axis)


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
  """Jensen-Shannon divergence in nats per row (symmetric, bounded by log 2)."""
  m = 0.5 * (np.asarray(p, dtype=np.float64) + np.asarray(q, dtype=np.float64))
  return 0.5 * kl_divergence(p, m, axis) + 0.5 * kl_divergence(q, m, axis)


def order_by_similarity(triplets: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorder each triplet's items so that s01 >= s02 >= s12 (item 2 is the odd one out).

  The most similar pair becomes items (0, 1); of those, the item closer to the odd one out goes first, so
  that s02 >= s12. This satisfies both readings of the released README (DESIGN.md, "Triplet sampling").

  Returns:
    (reordered triplets, reordered similarities), both (n, 3).
  """
  triplets = np.asarray(triplets)
  s = np.asarray(similarities)
  n = len(s)
  rows = np.arange(n)
  best = s.argmax(axis=-1)
  a, b = PAIRS[best, 0], PAIRS[best, 1]
  odd = ODD_OF_PAIR[best]
  # Similarity of each member of the best pair to the odd item, from the pair index table.
  sim = np.empty((n, 3, 3), dtype=s.dtype)
  for p, (u, v) in enumerate(PAIRS):
    sim[:, u, v] = sim[:, v, u] = s[:, p]
  s_a_odd = sim[rows, a, odd]
  s_b_odd = sim[rows, b, odd]
  swap = s_b_odd > s_a_odd
  first = np.where(swap, b, a)
  second = np.where(swap, a, b)
  order = np.stack([first, second, odd], axis=-1)
  new_s = np.stack([sim[rows, first, second], sim[rows, first, odd], sim[rows, second, odd]], axis=-1)
  return np.take_along_axis(triplets, order, axis=-1), new_s
