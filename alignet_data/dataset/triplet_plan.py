"""The plan of the triplets stage: which sets, rows, triplet ids and strategies each shard holds.

A dataset is one training set and zero or more validation sets, each named by its split key ``train_<tag>`` /
``val_<tag>`` (`shards.split_key`; the tag is the released trainer's sampling name, e.g. ``cluster_border_500``),
which names its shards and its npz file. Row r of a set is triplet id ``id_base + r``, drawn by strategy s from an
RNG keyed by (seed, s, id). Id bases keep every set's ids disjoint and fixed by the set alone: train 0; a
validation set of one strategy s ``(2 + STRATEGIES.index(s)) * 2^40``, so ``val_<tag>`` holds the same triplets
whatever `num` or the other validation sets are, and whether it was asked for by name or as the training
strategy; the validation set of a strategy mix 2^40. Strategies of a mix take consecutive row ranges (in name
order). Shard i of a set holds its rows [b_i, b_{i+1}) in row order, so every file's bytes are fixed by the config
and the inputs (the clusters' k names cluster-boundary sets): any runner, worker count or block size writes the
same bytes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from alignet_data.dataset import labelling, sampling, shards

ID_STRIDE = 1 << 40  # At most this many triplets per set.
VALID_ID_BASE = ID_STRIDE  # The validation set of a strategy mix.


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """One set of triplets: its name, role, strategy mix, size, shard count and first triplet id."""
  key: str        # train_<tag> | val_<tag>: shard and npz file names
  role: str       # "train" | "val"
  strategy: str   # canonical spec: a name, or a mix "name:weight,..." in name order
  sampling: str   # the tag
  num: int
  shards: int
  id_base: int

  @property
  def weights(self) -> dict[str, float]:
    return sampling.parse_strategy(self.strategy)


def canonical_strategy(spec: str | dict[str, float]) -> str:
  """'random:1, cluster_boundary:3' -> 'cluster_boundary:3,random:1'; a single strategy is its name."""
  weights = sampling.parse_strategy(spec)
  if len(weights) == 1:
    return next(iter(weights))
  return ",".join(f"{name}:{weights[name]:g}" for name in sorted(weights))


def valid_strategies(config: dict[str, Any]) -> list[str] | None:
  """The config's validation strategies (a list or 'a,b,c'), checked; None: one set with the training strategy."""
  value = config.get("valid_strategies")
  names = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s).strip() for s in value or []]
  names = [n for n in names if n]
  if not names:
    return None
  bad = [n for n in names if n not in sampling.STRATEGIES]
  if bad:
    raise ValueError(f"Unknown validation strategy {bad[0]!r} (--valid-strategies takes names, comma-separated, "
                     f"from {', '.join(sampling.STRATEGIES)}).")
  if len(set(names)) != len(names):
    raise ValueError(f"--valid-strategies names a strategy twice: {names}.")
  return names


def plan_strategies(config: dict[str, Any]) -> list[str]:
  """Every strategy any set of the config draws from (a sampler is built for each)."""
  names = set(sampling.parse_strategy(config["strategy"])) | set(valid_strategies(config) or [])
  return sorted(names)


def val_id_base(strategy: str) -> int:
  weights = sampling.parse_strategy(strategy)
  if len(weights) > 1:
    return VALID_ID_BASE
  return (2 + sampling.STRATEGIES.index(next(iter(weights)))) * ID_STRIDE


def splits(config: dict[str, Any], k: int | None) -> dict[str, SplitPlan]:
  """The sets of a config, train first then the validation sets in the order asked for; `k` is the clusters'
  count (it names cluster-boundary sets). Sets of 0 triplets are left out."""
  train = canonical_strategy(config["strategy"])
  train_tag = config.get("npz_sampling") or shards.sampling_name(sampling.parse_strategy(train), k)
  sets = [("train", train, train_tag, int(config["num"]), int(config["num_shards"]), 0)]
  names = valid_strategies(config)
  vals = [(train, train_tag)] if names is None else [(s, shards.sampling_name([s], k)) for s in names]
  sets += [("val", s, tag, int(config["num_valid"]), int(config["num_valid_shards"]), val_id_base(s))
           for s, tag in vals]
  out: dict[str, SplitPlan] = {}
  for role, strategy, tag, num, count, base in sets:
    key = shards.split_key(role, tag)
    if key in out:
      raise ValueError(f"Two sets would both be named {key!r}; drop one of --valid-strategies.")
    if num:
      out[key] = SplitPlan(key, role, strategy, tag, num, count, base)
  return out


def strategy_ranges(split: SplitPlan) -> list[tuple[str, int, int]]:
  """(strategy, first row, end row) of a set, consecutive, in strategy-name order."""
  start, ranges = 0, []
  for name, count in sampling.allocate(split.num, split.weights).items():
    if count:
      ranges.append((name, start, start + count))
    start += count
  return ranges


def strategy_totals(plan: dict[str, SplitPlan]) -> dict[str, int]:
  """Triplets each strategy draws, over all sets (a sampler checks it can draw that many)."""
  totals: dict[str, int] = {}
  for split in plan.values():
    for name, lo, hi in strategy_ranges(split):
      totals[name] = totals.get(name, 0) + hi - lo
  return totals


def shard_specs(plan: dict[str, SplitPlan]) -> list[tuple[str, int, int, int]]:
  """The pipeline's input elements: (split key, shard, first row, end row), one block of triplet ids per shard."""
  out = []
  for key, split in plan.items():
    b = shards.shard_bounds(split.num, split.shards)
    out += [(key, i, int(b[i]), int(b[i + 1])) for i in range(len(b) - 1)]
  return out


def sub_blocks(split: SplitPlan, block_size: int, start: int, stop: int) -> list[tuple[str, int, int]]:
  """(strategy, lo, hi) pieces of at most block_size rows covering rows [start, stop) of a set, in order."""
  out = []
  for name, lo, hi in strategy_ranges(split):
    lo, hi = max(lo, start), min(hi, stop)
    out += [(name, s, min(s + block_size, hi)) for s in range(lo, hi, block_size)]
  return out


def label_threads(config: dict[str, Any]) -> int:
  """Labelling kernel threads per worker: the config's, or this machine's CPUs for 0 (no output byte moves)."""
  threads = int(config.get("label_threads") or 0)
  return threads if threads > 0 else labelling.default_threads()
