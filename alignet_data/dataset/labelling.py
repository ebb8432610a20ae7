"""Teacher soft labels for blocks of triplets (paper, Methods "Triplet-response generation").

Pair similarities are dot products of the (transformed) teacher embeddings, listed ``[s01, s02, s12]``; items
are reordered so that s01 >= s02 >= s12 (item 2 is the teacher's odd one out, s12 the smallest: both readings
of the released README); the soft label is softmax([s01, s02, s12]) at tau' = 1 and its Shannon entropy (nats)
measures the teacher's uncertainty. All numpy over whole blocks.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import time

import numpy as np

from alignet_data import triplet_math

TAU = 1.0  # tau' of the paper: teacher labels use the raw similarities.
MAX_ENTROPY = float(np.log(3.0))
_MIN_ROWS_PER_THREAD = 256  # Below this a thread hand-off costs more than it saves.


def default_threads() -> int:
  """The CPUs this process may run on: labelling's default thread count."""
  try:
    return max(len(os.sched_getaffinity(0)), 1)
  except AttributeError:  # Not on Linux.
    return max(os.cpu_count() or 1, 1)


@functools.cache
def pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """The process's labelling threads (one pool per count, kept: starting threads per block would cost more)."""
  return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="alignet-label")


def _dots(vectors: np.ndarray, positions: np.ndarray, out: np.ndarray) -> float:
  """The kernel on one chunk; returns this thread's CPU seconds (the benchmark's per-core figure)."""
  from alignet_data.dataset import kernels  # numba: imported on first use.
  cpu = time.thread_time()
  kernels.pair_dots(vectors, positions, out)
  return time.thread_time() - cpu


def rowwise_similarities(vectors: np.ndarray, positions: np.ndarray, out: np.ndarray | None = None,
                         threads: int = 1, cpu_seconds: list[float] | None = None) -> np.ndarray:
  """(m, 3) float32 ``[s01, s02, s12]`` for (m, 3) row positions into (n, d) float32 vectors.

  A compiled kernel (`kernels.pair_dots`) reads each triplet's three rows once from the matrix, with no gathered
  copy: memory bound at ImageNet scale, where one core reaches ~half the sequential read bandwidth. With
  `threads` > 1 the block is cut into that many contiguous chunks labelled in parallel (the kernel releases the
  GIL); two cores here roughly double the throughput (bench/imagenet_scale.py). Each row is computed
  independently (float64 accumulation, one rounding), so a triplet's similarities are bitwise the same wherever it
  sits in a block and whatever the thread count (tested). `out` may be a reused (m, 3) float32 buffer;
  `cpu_seconds`, if given, is appended the kernel's CPU seconds, summed over threads.
  """
  vectors = np.asarray(vectors)
  if vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
  positions = np.ascontiguousarray(positions, dtype=np.int64)
  if positions.ndim != 2 or positions.shape[1] != 3:
    raise ValueError(f"positions must have shape (m, 3), got {positions.shape}.")
  if positions.size and (positions.min() < 0 or positions.max() >= len(vectors)):
    raise ValueError(f"Row positions must lie in [0, {len(vectors)}), got [{positions.min()}, {positions.max()}].")
  if out is None:
    out = np.empty((len(positions), 3), np.float32)
  threads = max(1, min(int(threads), len(positions) // _MIN_ROWS_PER_THREAD))
  if threads == 1:
    spent = _dots(vectors, positions, out)
  else:
    bounds = np.linspace(0, len(positions), threads + 1).astype(int)
    futures = [pool(threads).submit(_dots, vectors, positions[lo:hi], out[lo:hi])
               for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    spent = sum(f.result() for f in futures)
  if cpu_seconds is not None:
    cpu_seconds.append(spent)
  return out


def label_block(vectors: np.ndarray, positions: np.ndarray, raw_vectors: np.ndarray | None = None,
                similarities: np.ndarray | None = None, threads: int = 1) -> dict:
  """Label a block of triplets.

  Args:
    vectors: (n, d) teacher embeddings the labels come from (transformed, or raw for "untransformed").
    positions: (m, 3) int row positions of each triplet's items, in sampled order.
    raw_vectors: optional (n, d') untransformed embeddings, to count where the transform changed the odd one
      out (the paper's AligNet vs UnAligNet difference).
    similarities: optional precomputed `rowwise_similarities(vectors, positions)` (callers that time the kernel).
    threads: kernel threads (`rowwise_similarities`); does not change any result.

  Returns:
    dict of arrays: ``positions`` (m, 3) reordered so s01 >= s02 >= s12, ``similarities`` (m, 3) float32,
    ``soft_label`` (m, 3) float32, ``entropy`` (m,) float32, ``sampled_odd_kept`` (m,) bool (the sampled odd
    item is the teacher's odd one out; meaningful for boundary strategies), and with `raw_vectors`
    ``odd_changed`` (m,) bool (the raw teacher's odd one out differs; a raw tie counts as changed).
  """
  positions = np.asarray(positions, dtype=np.int64)
  sims = rowwise_similarities(vectors, positions, threads=threads) if similarities is None else similarities
  ordered, ordered_sims = triplet_math.order_by_similarity(positions, sims)
  probs = triplet_math.pair_probabilities(ordered_sims, tau=TAU)
  out = {
      "positions": ordered,
      "similarities": ordered_sims.astype(np.float32),
      "soft_label": probs.astype(np.float32),
      "entropy": triplet_math.entropy(probs).astype(np.float32),
      "sampled_odd_kept": ordered[:, 2] == positions[:, 2],
  }
  if raw_vectors is not None:
    out["odd_changed"] = odd_items(raw_vectors, positions, threads) != ordered[:, 2]
  return out


def odd_items(vectors: np.ndarray, positions: np.ndarray, threads: int = 1) -> np.ndarray:
  """The row position of each triplet's odd one out under `vectors` (-1 for a tie, which never matches)."""
  positions = np.asarray(positions, dtype=np.int64)
  odd = triplet_math.odd_one_out(rowwise_similarities(vectors, positions, threads=threads))
  return np.where(odd >= 0, np.take_along_axis(positions, np.maximum(odd, 0)[:, None], 1)[:, 0], -1)


def check_labels(similarities: np.ndarray, soft_label: np.ndarray, entropy: np.ndarray, atol: float = 1e-5) -> None:
  """Raise if labelled triplets break the invariants every consumer relies on."""
  s = np.asarray(similarities)
  finite = np.isfinite(s).all(axis=-1)
  if not finite.all():  # Stages refuse NaN/inf inputs; this says so if one slips through (not an IndexError).
    bad = int(np.flatnonzero(~finite)[0])
    raise ValueError(f"Triplet row {bad} has non-finite similarities {s[bad].tolist()}: the teacher vectors hold "
                     "NaN or inf.")
  unordered = ~((s[:, 0] >= s[:, 1]) & (s[:, 1] >= s[:, 2]))
  if unordered.any():
    bad = int(np.flatnonzero(unordered)[0])
    raise ValueError(f"Triplet row {bad} is not ordered s01 >= s02 >= s12: {s[bad].tolist()}.")
  p = np.asarray(soft_label, dtype=np.float64)
  if not np.allclose(p.sum(-1), 1.0, atol=atol) or (p < 0).any():
    raise ValueError("Soft labels must be probabilities summing to 1 per triplet.")
  h = np.asarray(entropy, dtype=np.float64)
  if (h < -atol).any() or (h > MAX_ENTROPY + atol).any():
    raise ValueError(f"Entropies must lie in [0, log 3], got range [{h.min()}, {h.max()}].")


def entropy_histogram(entropy: np.ndarray, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """Counts over `bins` equal bins of [0, log 3] (edges fixed, so shard histograms add up)."""
  edges = np.linspace(0.0, MAX_ENTROPY, bins + 1)
  counts, _ = np.histogram(np.clip(np.asarray(entropy, np.float64), 0.0, MAX_ENTROPY), bins=edges)
  return counts.astype(np.int64), edges


def to_records(labelled: dict, triplet_ids: np.ndarray, strategy: str, ids: np.ndarray, file_names: np.ndarray,
               labels: np.ndarray, clusters: np.ndarray | None) -> dict[str, np.ndarray]:
  """A labelled block as triplet-schema columns (`shards.Columns`); row positions become source ids."""
  pos = labelled["positions"]
  m = len(pos)
  return {
      "triplet_id": np.asarray(triplet_ids, np.int64),
      "strategy": np.full(m, strategy),
      "indices": np.asarray(ids, np.int64)[pos],
      "file_names": _as_str(file_names)[pos],
      "labels": np.asarray(labels, np.int64)[pos],
      "clusters": np.asarray(clusters, np.int64)[pos] if clusters is not None else np.full((m, 3), -1, np.int64),
      "similarities": labelled["similarities"],
      "soft_label": labelled["soft_label"],
      "entropy": labelled["entropy"],
  }


def _as_str(values: np.ndarray) -> np.ndarray:
  """`values` as a numpy str array, without a copy when it is one already (a per-block copy of every file name
  of ImageNet was 113 MB a block)."""
  values = np.asarray(values)
  return values if values.dtype.kind == "U" else values.astype(str)
