"""Counter-based triplet samplers: triplet t depends only on (seed, strategy, t).

Every random number is a hash of a counter, ``bits(t, d) = mix64(mix64(4 t + d + k1) ^ k2)`` (SplitMix64's
finaliser; ``(k1, k2)`` from sha256 of the seed and strategy name), so any block of triplet ids can be drawn on
any worker, in any order, with identical results. Four draws per triplet, no rejection loops: distinct items
come from shifting draws past the items already taken, which is exactly uniform without replacement.

Strategies (paper, Methods "Triplet sampling"; items are row positions into an embedding matrix):
- ``random``: 3 distinct items, uniform.
- ``class_boundary`` / ``cluster_boundary``: a group (class / k-means cluster) uniform among groups with at
  least 2 items, 2 distinct items from it, then 1 item uniform among all items outside it. Columns are
  (pair, pair, odd) as sampled; the labeller reorders by the teacher's similarities.
- ``within_class``: a class uniform among classes with at least 3 items, 3 distinct items from it.
- ``between_class``: 3 distinct classes uniform among all classes, then 1 item uniform within each (the released
  ``val_between_class`` set: three images from three different classes). Its item draws come from a second
  counter stream (key of ``between_class/items``), so every strategy keeps four words per triplet.

Groups too small to draw from are skipped (reported by `TripletSampler.describe`); a strategy with no usable
group raises. Triplets are drawn independently, so duplicates are possible (as in the released data); asking
for more triplets than distinct ones exist raises (`check_count`).

Changing the hash, the draw layout or the group tables changes every triplet: bump `SAMPLER_VERSION`.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

SAMPLER_VERSION = 1
# Append only: a validation set's triplet ids are placed by its strategy's position here (`triplet_plan`).
STRATEGIES = ("random", "class_boundary", "cluster_boundary", "within_class", "between_class")
GROUPED = {"class_boundary": "labels", "cluster_boundary": "clusters", "within_class": "labels",
           "between_class": "labels"}
_NEED = {"class_boundary": 2, "cluster_boundary": 2, "within_class": 3, "between_class": 1}  # Items per group.
_MIN_GROUPS = {"class_boundary": 2, "cluster_boundary": 2, "within_class": 1, "between_class": 3}
_DRAWS = 4  # Random words per triplet (the most any strategy uses).


def strategy_key(seed: int, strategy: str) -> tuple[int, int]:
  """Two 64-bit keys for (seed, strategy): stable across Python processes (unlike `hash`)."""
  h = hashlib.sha256(f"alignet-triplets/v{SAMPLER_VERSION}/{int(seed)}/{strategy}".encode()).digest()
  return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:16], "little")


def _mix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a bijection on uint64 with full avalanche (wrapping arithmetic)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def random_bits(key: tuple[int, int], triplet_ids: np.ndarray, draws: int = _DRAWS) -> np.ndarray:
  """(n, draws) uint64 words; word (t, d) depends only on key, t and d."""
  if draws > _DRAWS:
    raise ValueError(f"At most {_DRAWS} draws per triplet, asked for {draws}.")
  ids = np.asarray(triplet_ids, dtype=np.int64)
  if ids.size and ids.min() < 0:
    raise ValueError(f"Triplet ids must be non-negative, got {ids.min()}.")
  counter = ids.astype(np.uint64)[:, None] * np.uint64(_DRAWS) + np.arange(draws, dtype=np.uint64)
  return _mix64(_mix64(counter + np.uint64(key[0])) ^ np.uint64(key[1]))


def _below(bits: np.ndarray, n: np.ndarray | int) -> np.ndarray:
  """Integers uniform in [0, n) (modulo bias <= n / 2^64, negligible)."""
  return (bits % np.asarray(n, dtype=np.uint64)).astype(np.int64)


def distinct_two(u0: np.ndarray, u1: np.ndarray, size: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
  """Two distinct integers uniform in [0, size), without replacement."""
  a = _below(u0, size)
  b = _below(u1, np.asarray(size) - 1)
  return a, b + (b >= a)


def distinct_three(u0, u1, u2, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Three distinct integers uniform in [0, size): each draw skips the values already taken."""
  a, b = distinct_two(u0, u1, size)
  c = _below(u2, np.asarray(size) - 2)
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  c = c + (c >= lo)
  return a, b, c + (c >= hi)


class TripletSampler:
  """Draws blocks of triplets (row positions into an (n, d) embedding matrix) for one strategy.

  Args:
    strategy: one of `STRATEGIES`.
    num_items: number of items (rows) to draw from.
    groups: (num_items,) int group of each item (class labels or cluster ids); needed by every strategy but
      `random`.
    seed: the dataset seed.
  """

  def __init__(self, strategy: str, num_items: int, groups: np.ndarray | None = None, seed: int = 0):
    if strategy not in STRATEGIES:
      raise ValueError(f"Unknown sampling strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    self.strategy = strategy
    self.num_items = int(num_items)
    self.seed = int(seed)
    self.key = strategy_key(seed, strategy)
    self.item_key = strategy_key(seed, f"{strategy}/items")
    if strategy == "random":
      if self.num_items < 3:
        raise ValueError(f"Random sampling needs at least 3 items, got {self.num_items}.")
      return
    if groups is None:
      raise ValueError(f"Strategy {strategy!r} needs a group per item ({GROUPED[strategy]}), got none.")
    groups = np.asarray(groups)
    if groups.shape != (self.num_items,):
      raise ValueError(f"groups has shape {groups.shape}, expected ({self.num_items},).")
    # Items sorted by group: group g occupies order[starts[g] : starts[g] + sizes[g]].
    self.order = np.argsort(groups, kind="stable").astype(np.int64)
    self.group_values, self.starts, self.sizes = np.unique(groups[self.order], return_index=True,
                                                           return_counts=True)
    self.starts = self.starts.astype(np.int64)
    self.sizes = self.sizes.astype(np.int64)
    need, what = _NEED[strategy], GROUPED[strategy]
    self.eligible = np.flatnonzero(self.sizes >= need)
    if self.eligible.size == 0:
      raise ValueError(
          f"Strategy {strategy!r} needs a group ({what}) with at least {need} items; the largest has "
          f"{self.sizes.max()}. Use fewer clusters (--k) or another strategy.")
    if self.group_values.size < _MIN_GROUPS[strategy]:
      raise ValueError(f"Strategy {strategy!r} needs at least {_MIN_GROUPS[strategy]} distinct {what}, got only "
                       f"{self.group_values.tolist()}. Use more clusters or `random`.")

  def describe(self) -> dict:
    """Group statistics for the report (how many groups are too small to draw from)."""
    if self.strategy == "random":
      return {"items": self.num_items}
    return {"items": self.num_items, "groups": int(self.sizes.size), "eligible_groups": int(self.eligible.size),
            "skipped_small_groups": int(self.sizes.size - self.eligible.size)}

  def max_distinct(self) -> int:
    """How many distinct (unordered) triplets this strategy can produce."""
    if self.strategy == "random":
      return math.comb(self.num_items, 3)
    sizes = [int(s) for s in self.sizes[self.eligible]]
    if self.strategy == "within_class":
      return sum(math.comb(s, 3) for s in sizes)
    if self.strategy == "between_class":  # e3(sizes): one item from each of 3 distinct groups.
      e1 = e2 = e3 = 0
      for s in sizes:
        e1, e2, e3 = e1 + s, e2 + e1 * s, e3 + e2 * s
      return e3
    return sum(math.comb(s, 2) * (self.num_items - s) for s in sizes)

  def check_count(self, count: int) -> None:
    """Refuse to draw more triplets than distinct ones exist (they could only be repeats)."""
    if count > self.max_distinct():
      raise ValueError(f"Asked for {count} {self.strategy} triplets but only {self.max_distinct()} distinct ones "
                       f"exist for {self.num_items} items; ask for fewer (--num) or use more data.")

  def sample(self, triplet_ids: np.ndarray) -> np.ndarray:
    """(m, 3) int64 row positions for the given triplet ids; row r depends only on (seed, strategy, ids[r])."""
    bits = random_bits(self.key, triplet_ids)
    u = [bits[:, d] for d in range(_DRAWS)]
    if self.strategy == "random":
      return np.stack(distinct_three(u[0], u[1], u[2], self.num_items), axis=-1)
    if self.strategy == "between_class":
      groups = np.stack(distinct_three(u[0], u[1], u[2], self.eligible.size), axis=-1)
      g = self.eligible[groups]
      items = random_bits(self.item_key, triplet_ids, 3)
      return self.order[self.starts[g] + _below(items, self.sizes[g])]
    g = self.eligible[_below(u[0], self.eligible.size)]
    start, size = self.starts[g], self.sizes[g]
    if self.strategy == "within_class":
      a, b, c = distinct_three(u[1], u[2], u[3], size)
      return self.order[np.stack([start + a, start + b, start + c], axis=-1)]
    a, b = distinct_two(u[1], u[2], size)
    # The odd item: uniform over the items outside group g (skip g's contiguous range in `order`).
    r = _below(u[3], self.num_items - size)
    r = r + np.where(r >= start, size, 0)
    return self.order[np.stack([start + a, start + b, r], axis=-1)]


def allocate(num: int, weights: dict[str, float]) -> dict[str, int]:
  """Split `num` triplets over strategies by weight (largest remainder; ties to the earlier name, sorted)."""
  names = sorted(weights)
  bad = [n for n in names if n not in STRATEGIES]
  if bad:
    raise ValueError(f"Unknown sampling strategy {bad[0]!r}; choose from {', '.join(STRATEGIES)}.")
  w = np.array([float(weights[n]) for n in names])
  if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"Strategy weights must be non-negative with a positive sum, got {weights}.")
  exact = num * w / w.sum()
  counts = np.floor(exact).astype(np.int64)
  rest = num - int(counts.sum())
  order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
  for i in order[:rest]:
    counts[i] += 1
  return {n: int(c) for n, c in zip(names, counts, strict=True)}


def parse_strategy(spec: str | dict[str, float]) -> dict[str, float]:
  """'cluster_boundary' | 'random:1,cluster_boundary:3' | {'random': 1} -> {name: weight}."""
  if isinstance(spec, dict):
    return {str(k): float(v) for k, v in spec.items()}
  out: dict[str, float] = {}
  for part in str(spec).split(","):
    name, _, weight = part.strip().partition(":")
    if not name:
      continue
    try:
      out[name] = float(weight) if weight else 1.0
    except ValueError as e:
      raise ValueError(f"Bad strategy weight in {spec!r}: {part!r} (use name:weight, e.g. random:0.5)") from e
  if not out:
    raise ValueError(f"No sampling strategy given in {spec!r}; choose from {', '.join(STRATEGIES)}.")
  return out
