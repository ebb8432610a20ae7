"""The math of the triplet odd-one-out task, written once: numpy functions with their JAX twins beside them.

The convention, stated here and nowhere else (THINGS, VICE, the released AligNet data follow it):
* A stored triplet is (i, j, odd): items 0 and 1 are the pair a person judged most similar, item 2 the odd one
  out. So the human pair is pair 0 (`HUMAN_PAIR`) and the human odd one out is item 2 (`HUMAN_ODD`).
* The three pair similarities of a triplet of items (0, 1, 2) are in the fixed order ``[s01, s02, s12]``; pair p
  leaves out item ``ODD_OF_PAIR[p]``. Changing this order breaks compatibility with the released
  ``alignet_*.npz`` files.
* A model's odd one out is the item its most similar pair leaves out. A tie for the top similarity, or any NaN
  or infinite similarity, gives no choice (-1), which never matches a target: ties count as wrong.
* Pair probabilities are softmax(similarities / tau) over the three pairs.

numpy functions take array-likes and compute in float64 where they reduce; each ``*_jax`` twin is pure, jit- and
grad-safe, keeps its input's dtype, and is tested against its numpy function (tests/test_triplet_math.py). JAX is
imported inside the twins only, so numpy users (Beam workers, the sampler) never load it. The one other
computation of [s01, s02, s12] is the compiled labelling kernel (`dataset.kernels.pair_dots`), whose test
compares it with `pair_similarities`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Pair p of a triplet (items 0, 1, 2): which items it joins and which item it leaves out.
PAIRS = np.array([[0, 1], [0, 2], [1, 2]])
ODD_OF_PAIR = np.array([2, 1, 0])  # pair (0,1) -> odd 2; (0,2) -> odd 1; (1,2) -> odd 0.
PAIR_OF_ODD = np.array([2, 1, 0])  # the inverse map (it is its own inverse).
HUMAN_PAIR = 0  # Stored triplets list the human pair first...
HUMAN_ODD = 2   # ...and the human odd one out last.


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


def matrix_similarities(similarity: np.ndarray, triplets: np.ndarray) -> np.ndarray:
  """``[s01, s02, s12]`` of index triplets read from an (m, m) similarity matrix (e.g. a Gram matrix)."""
  sim, t = np.asarray(similarity), np.asarray(triplets)
  return np.stack([sim[t[:, 0], t[:, 1]], sim[t[:, 0], t[:, 2]], sim[t[:, 1], t[:, 2]]], axis=-1)


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


def odd_one_out_correct(similarities: np.ndarray, target_odd: np.ndarray | int = HUMAN_ODD) -> np.ndarray:
  """(n,) 1.0 where the model's odd one out equals the target item, else 0.0. A model tie or a NaN/inf similarity
  is wrong, even against a target of -1 (no majority): an undefined answer is never a hit."""
  model = odd_one_out(similarities)
  return ((model == np.asarray(target_odd)) & (model >= 0)).astype(np.float64)


def odd_one_out_accuracy(similarities: np.ndarray, target_odd: np.ndarray | int = HUMAN_ODD) -> float:
  """Mean of `odd_one_out_correct`: the fraction of triplets whose model odd one out is the target's (by default
  the human one of stored triplets); nan for no triplets."""
  correct = odd_one_out_correct(similarities, target_odd)
  return float(correct.mean()) if correct.size else float("nan")


def human_pair_nll(probs: np.ndarray) -> float:
  """Mean -log p(human pair) of (n, 3) pair probabilities of stored triplets (p floored at 1e-12)."""
  return float(np.mean(-np.log(np.maximum(np.asarray(probs, np.float64)[:, HUMAN_PAIR], 1e-12))))


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
  """KL(p || q) in nats per row; terms with p = 0 contribute 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return kl_divergence_log(p, np.log(np.asarray(q, dtype=np.float64)), axis)


def kl_divergence_log(p: np.ndarray, log_q: np.ndarray, axis: int = -1) -> np.ndarray:
  """KL(p || q) from log q (a confident model's q can underflow to 0 where log q stays finite)."""
  p = np.asarray(p, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.asarray(log_q)), 0.0)
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


# ----------------------------------------------------------------------------------------------- JAX twins


def pair_similarities_jax(x: Any) -> Any:
  """`pair_similarities` of (n, 3, d) JAX triplet embeddings: (n, 3) ``[s01, s02, s12]`` in their dtype."""
  import jax.numpy as jnp
  return jnp.stack([jnp.sum(x[:, 0] * x[:, 1], -1), jnp.sum(x[:, 0] * x[:, 2], -1),
                    jnp.sum(x[:, 1] * x[:, 2], -1)], axis=-1)


def triplet_similarities_jax(embeddings: Any, triplets: Any) -> Any:
  """`triplet_similarities`: index triplets into an (m, d) JAX embedding."""
  return pair_similarities_jax(embeddings[triplets])


def matrix_similarities_jax(similarity: Any, triplets: Any) -> Any:
  """`matrix_similarities`: index triplets read from an (m, m) JAX similarity matrix."""
  import jax.numpy as jnp
  i, j, k = triplets[:, 0], triplets[:, 1], triplets[:, 2]
  return jnp.stack([similarity[i, j], similarity[i, k], similarity[j, k]], axis=-1)


def odd_one_out_jax(similarities: Any) -> Any:
  """`odd_one_out`: the item left out by the top pair, or -1 for a tie or a non-finite similarity."""
  import jax.numpy as jnp
  s = similarities
  best = jnp.argmax(s, axis=-1)
  tied = jnp.sum(s == jnp.max(s, axis=-1, keepdims=True), axis=-1) > 1
  undefined = tied | ~jnp.all(jnp.isfinite(s), axis=-1)
  return jnp.where(undefined, -1, jnp.asarray(ODD_OF_PAIR)[best])


def odd_one_out_correct_jax(similarities: Any, target_odd: Any = HUMAN_ODD) -> Any:
  """`odd_one_out_correct` as float32 (an undefined model answer never matches, not even a target of -1)."""
  import jax.numpy as jnp
  model = odd_one_out_jax(similarities)
  return ((model == target_odd) & (model >= 0)).astype(jnp.float32)


def human_pair_nll_jax(logits: Any) -> Any:
  """(n,) -log softmax(logits)[human pair]: the hard odd-one-out loss of stored triplets, per triplet."""
  import jax
  return -jax.nn.log_softmax(logits, axis=-1)[:, HUMAN_PAIR]


def kl_divergence_jax(log_p: Any, log_q: Any) -> Any:
  """`kl_divergence_log` from log p and log q: (n,) KL(p || q); rows where p = 0 contribute 0 (no 0 * -inf)."""
  import jax.numpy as jnp
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
