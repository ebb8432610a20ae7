"""The plan of the triplets stage: which rows, triplet ids and strategies each shard holds, from the config alone.

Row r of a split is triplet id ``id_base(split) + r`` (train base 0, valid base 2^40: disjoint ids, and the valid
split does not change when `num` does), drawn by strategy s from an RNG keyed by (seed, s, id). Strategies of a
mix take consecutive row ranges (in name order). Shard i of a split holds its rows [b_i, b_{i+1}) in row order,
so every file's bytes are fixed by the config alone: any runner, worker count or block size writes the same bytes.
"""
from __future__ import annotations

from typing import Any

from alignet_data.dataset import labelling, sampling, shards

VALID_ID_BASE = 1 << 40


def split_sizes(config: dict[str, Any]) -> dict[str, int]:
  return {"train": int(config["num"]), "valid": int(config["num_valid"])}


def split_shards(config: dict[str, Any]) -> dict[str, int]:
  return {"train": int(config["num_shards"]), "valid": int(config["num_valid_shards"])}


def strategy_ranges(config: dict[str, Any]) -> dict[str, list[tuple[str, int, int]]]:
  """Per split: (strategy, first row, end row), consecutive, in strategy-name order."""
  weights = sampling.parse_strategy(config["strategy"])
  out = {}
  for split, n in split_sizes(config).items():
    start, ranges = 0, []
    for name, count in sampling.allocate(n, weights).items():
      if count:
        ranges.append((name, start, start + count))
      start += count
    out[split] = ranges
  return out


def strategy_totals(config: dict[str, Any]) -> dict[str, int]:
  """Triplets each strategy draws, over all splits (a sampler checks it can draw that many)."""
  totals: dict[str, int] = {}
  for ranges in strategy_ranges(config).values():
    for name, lo, hi in ranges:
      totals[name] = totals.get(name, 0) + hi - lo
  return totals


def id_base(split: str) -> int:
  return 0 if split == "train" else VALID_ID_BASE


def shard_specs(config: dict[str, Any]) -> list[tuple[str, int, int, int]]:
  """The pipeline's input elements: (split, shard, first row, end row), one block of triplet ids per shard."""
  out = []
  for split, n in split_sizes(config).items():
    if n == 0:
      continue
    b = shards.shard_bounds(n, split_shards(config)[split])
    out += [(split, i, int(b[i]), int(b[i + 1])) for i in range(len(b) - 1)]
  return out


def sub_blocks(config: dict[str, Any], split: str, start: int, stop: int) -> list[tuple[str, int, int]]:
  """(strategy, lo, hi) pieces of at most block_size rows covering rows [start, stop) of a split, in order."""
  bs = int(config["block_size"])
  out = []
  for name, lo, hi in strategy_ranges(config)[split]:
    lo, hi = max(lo, start), min(hi, stop)
    out += [(name, s, min(s + bs, hi)) for s in range(lo, hi, bs)]
  return out


def label_threads(config: dict[str, Any]) -> int:
  """Labelling kernel threads per worker: the config's, or this machine's CPUs for 0 (no output byte moves)."""
  threads = int(config.get("label_threads") or 0)
  return threads if threads > 0 else labelling.default_threads()
