"""Making the triplets stage's data: loaded inputs -> labelled blocks and shards, their statistics, the report.

No Beam here: the stage (pipelines/triplets_pipeline.py) calls `make_shard` once per shard on its workers and
`report` once over the shards' statistics. Which rows a shard holds is the plan (`triplet_plan`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from alignet_data.dataset import clustering, labelling, sampling, shards, triplet_plan
from alignet_data.teacher import embeddings, image_sources
from alignet_data.teacher.transform import Transform

ODD_CHANGED_SAMPLE = 1 << 16  # Rows per set, evenly spaced, on which the raw teacher's odd one out is compared.


@dataclasses.dataclass
class TripletInputs:
  """Everything a worker needs to make blocks: loaded once per process from the config's URLs."""
  emb: embeddings.Embeddings     # Ids, labels and file names (vectors dropped: see `vectors`).
  vectors: np.ndarray            # (n, d) teacher vectors the labels come from (transformed or raw).
  raw_odd: dict[str, tuple[int, np.ndarray]] | None  # Per set: (row stride, the raw teacher's odd item per sample).
  clusters: np.ndarray | None    # (n,) cluster per row.
  k: int | None
  samplers: dict[str, sampling.TripletSampler]

  @classmethod
  def load(cls, config: dict[str, Any]) -> TripletInputs:
    emb = embeddings.load(config["embeddings"], config["split"])
    if len(emb) < 3:
      raise ValueError(f"Embeddings {config['embeddings']} split {config['split']!r} has {len(emb)} rows; "
                       "triplets need at least 3.")
    clusters = k = None
    if config.get("clusters"):
      cl = clustering.load(config["clusters"])
      clusters, k = cl.for_ids(emb.ids), cl.k
    samplers = {}
    for name in triplet_plan.plan_strategies(config):
      group = sampling.GROUPED.get(name)
      groups = None
      if group == "clusters":
        if clusters is None:
          raise ValueError(f"Strategy {name!r} needs clusters: pass --clusters (a cluster artifact URL).")
        groups = clusters
      elif group == "labels":
        if (emb.labels < 0).all():
          raise ValueError(f"Strategy {name!r} needs class labels, but embeddings {config['embeddings']} "
                           f"split {config['split']!r} has none; use cluster_boundary or random (and no "
                           "class-based --valid-strategies).")
        groups = emb.labels
      samplers[name] = sampling.TripletSampler(name, len(emb), groups, seed=config["seed"])
    vectors, raw_odd = emb.vectors, None  # NaN/inf refused by the readers (embeddings, transform), transform_rows.
    if config.get("transform"):
      raw_odd = _raw_odd_sample(config, k, samplers, vectors)
      what = f"Embeddings {config['embeddings']} split {config['split']!r} after transform {config['transform']}"
      vectors = clustering.transform_rows(Transform.load(config["transform"]), vectors, what=what, in_place=True)
    # An empty array, not a slice of the raw matrix: a slice would keep a raw matrix the transform did not reuse.
    return cls(dataclasses.replace(emb, vectors=np.empty((0, emb.dim), np.float32)), vectors, raw_odd, clusters, k,
               samplers)


def _raw_odd_sample(config: dict[str, Any], k: int | None, samplers: dict[str, sampling.TripletSampler],
                    raw: np.ndarray) -> dict[str, tuple[int, np.ndarray]]:
  """How often the transform changes the odd one out (the paper's AligNet vs UnAligNet) is estimated on up to
  `ODD_CHANGED_SAMPLE` evenly spaced rows of each set, computed here from the raw vectors before the transform
  overwrites them: keeping the raw matrix for every triplet doubled the stage's memory (11.9 GB at ImageNet
  scale) and its labelling work. Every row is compared when a set has no more rows than the sample."""
  out = {}
  for key, split in triplet_plan.splits(config, k).items():
    stride = -(-split.num // ODD_CHANGED_SAMPLE)
    rows = np.arange(0, split.num, stride, dtype=np.int64)
    positions = np.zeros((len(rows), 3), np.int64)
    for name, lo, hi in triplet_plan.strategy_ranges(split):
      sel = (rows >= lo) & (rows < hi)
      positions[sel] = samplers[name].sample(rows[sel] + split.id_base)
    out[key] = (stride, labelling.odd_items(raw, positions))
  return out


def warm_up() -> None:
  """Load the compiled kernels once per process (~1-2 s), outside the timed labelling and off the workers' race."""
  labelling.rowwise_similarities(np.zeros((3, 1), np.float32), np.array([[0, 1, 2]]))
  shards.tfrecord_bytes(shards.empty())


def make_block(inputs: TripletInputs, split: triplet_plan.SplitPlan, strategy: str, start: int, stop: int,
               timer: dict[str, float] | None = None, threads: int = 1) -> shards.Columns:
  """Rows [start, stop) of a set as schema columns, plus per-row diagnostics under '_' keys.

  `timer["label_seconds"]` accumulates the wall time of the labelling kernel (the benchmark's floor fraction),
  `timer["label_cpu_seconds"]` its CPU time over its `threads`.
  """
  ids = np.arange(start, stop, dtype=np.int64) + split.id_base
  positions = inputs.samplers[strategy].sample(ids)
  tic, cpu = time.perf_counter(), []
  sims = labelling.rowwise_similarities(inputs.vectors, positions, threads=threads, cpu_seconds=cpu)
  if timer is not None:
    timer["label_seconds"] = timer.get("label_seconds", 0.0) + time.perf_counter() - tic
    timer["label_cpu_seconds"] = timer.get("label_cpu_seconds", 0.0) + cpu[0]
  labelled = labelling.label_block(inputs.vectors, positions, similarities=sims, threads=threads)
  labelling.check_labels(labelled["similarities"], labelled["soft_label"], labelled["entropy"])
  columns = labelling.to_records(labelled, ids, strategy, inputs.emb.ids, inputs.emb.file_names,
                                 inputs.emb.labels, inputs.clusters)
  columns["_sampled_odd_kept"] = labelled["sampled_odd_kept"]
  columns["_positions"] = labelled["positions"]  # Rows of the matrix (the released npz's names and ids, later).
  if inputs.raw_odd is not None:  # 1: the transform changed the odd one out, 0: it did not, -1: not in the sample.
    stride, raw_odd = inputs.raw_odd[split.key]
    rows = np.arange(start, stop, dtype=np.int64)
    sampled = rows % stride == 0
    changed = np.full(len(rows), -1, np.int8)
    changed[sampled] = raw_odd[rows[sampled] // stride] != labelled["positions"][sampled, 2]
    columns["_odd_changed"] = changed
  return columns


def make_shard(inputs: TripletInputs, config: dict[str, Any], split: triplet_plan.SplitPlan, start: int, stop: int,
               timer: dict[str, float] | None = None) -> shards.Columns:
  """Rows [start, stop) of a set (one shard), made in blocks of block_size rows (the bytes do not depend on it)."""
  threads = triplet_plan.label_threads(config)
  pieces = [make_block(inputs, split, name, lo, hi, timer, threads)
            for name, lo, hi in triplet_plan.sub_blocks(split, int(config["block_size"]), start, stop)]
  if not pieces:
    out = shards.empty()
    out["file_names"] = out["file_names"].astype(inputs.emb.file_names.dtype)
    out["_sampled_odd_kept"] = np.zeros(0, bool)
    out["_positions"] = np.zeros((0, 3), np.int64)
    if inputs.raw_odd is not None:
      out["_odd_changed"] = np.zeros(0, np.int8)
    return out
  return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def indices_provenance(embeddings_url: str, split: str) -> dict[str, Any]:
  """What the triplets' `indices` index, from the embed artifact's record of the split's image source.

  The released trainer reads every index into ``tfds.data_source("imagenet2012", split="train")``; only
  embeddings of that source (any pinned version) give indices it can use as they are.
  """
  source = str((embeddings.info(embeddings_url)["splits"].get(split) or {}).get("source") or "")
  kind = source.partition(":")[0]
  tfds_train = False
  if not source:
    note = "The embeddings record no image source for this split: what the indices index is unknown."
  elif kind == "tfds":
    src = image_sources.parse(source)
    tfds_train = src.name == "imagenet2012" and src.split == "train"
    pinned = f" version {src.version}" if src.version else ""
    note = (f"Record indices of tfds.data_source({src.name!r}{pinned}, split={src.split!r})"
            + (", the order the released trainer reads." if tfds_train else
               ", not imagenet2012 train: the released trainer would load other images."))
  else:
    what = {"demo": "the demo world's images", "files": "the sorted list of image files",
            "things": "THINGS concepts / images"}.get(kind, "the records")
    note = (f"Indices into {what} of source `{source}`, not tfds.data_source('imagenet2012', split='train'): the "
            "released trainer would load other images (this repository's trainer reads the source).")
  return {"source": source or None, "tfds_imagenet2012_train_order": tfds_train, "note": note}


def shard_stats(columns: shards.Columns, bins: int) -> dict[str, Any]:
  """Additive statistics of a shard (summed over shards in a fixed order for the report)."""
  hist, _ = labelling.entropy_histogram(columns["entropy"], bins)
  strategies, counts = np.unique(columns["strategy"], return_counts=True)
  boundary = np.isin(columns["strategy"], ["class_boundary", "cluster_boundary"])
  return {
      "rows": len(columns["triplet_id"]),
      "strategies": {str(s): int(c) for s, c in zip(strategies, counts, strict=True)},
      "entropy_sum": float(columns["entropy"].astype(np.float64).sum()),
      "entropy_hist": hist.tolist(),
      "odd_changed": int((columns["_odd_changed"] == 1).sum()) if "_odd_changed" in columns else None,
      "odd_compared": int((columns["_odd_changed"] >= 0).sum()) if "_odd_changed" in columns else None,
      "boundary_rows": int(boundary.sum()),
      "boundary_odd_kept": int(columns["_sampled_odd_kept"][boundary].sum()),
  }


def read_bandwidth(x: np.ndarray, threads: int = 1, repeats: int = 3) -> tuple[float, float]:
  """Sequential read bandwidth (bytes/s) over `x` with `threads` threads, each summing a contiguous slice (the
  labelling kernel's thread count: its floor is what all of its threads can stream), the best of a few runs;
  in wall time and in CPU time summed over the threads.

  The labelling floor is the time to read 3 rows per triplet at this rate (bench/imagenet_scale.py). A matrix
  that fits in cache measures the cache, not memory: the fraction is only meaningful for large matrices.
  """
  flat = x.reshape(-1)
  bounds = np.linspace(0, flat.size, max(int(threads), 1) + 1).astype(np.int64)

  def part(i: int) -> float:
    cpu = time.thread_time()
    flat[bounds[i]:bounds[i + 1]].sum(dtype=np.float32)
    return time.thread_time() - cpu

  best, best_cpu = np.inf, np.inf
  for _ in range(repeats):
    tic = time.perf_counter()
    cpu = sum(labelling.pool(len(bounds) - 1).map(part, range(len(bounds) - 1))) if len(bounds) > 2 else part(0)
    best, best_cpu = min(best, time.perf_counter() - tic), min(best_cpu, cpu)
  return x.nbytes / max(best, 1e-9), x.nbytes / max(best_cpu, 1e-9)


def report(config: dict[str, Any], stats: dict[str, list[dict[str, Any]]], inputs: TripletInputs,
           npz: dict[str, str] | None) -> dict[str, Any]:
  """The stage's report from every shard's `shard_stats` (per split, in shard order) and the npz files written."""
  all_stats = [s for split in sorted(stats) for s in stats[split]]
  rows = sum(s["rows"] for s in all_stats)
  by_split = {split: {} for split in stats}
  for split, items in stats.items():
    for s in items:
      for name, c in s["strategies"].items():
        by_split[split][name] = by_split[split].get(name, 0) + c
  strategies: dict[str, int] = {}
  for d in by_split.values():
    for name, c in d.items():
      strategies[name] = strategies.get(name, 0) + c
  hist = np.sum([s["entropy_hist"] for s in all_stats], axis=0).astype(int)
  _, edges = labelling.entropy_histogram(np.zeros(0), int(config["entropy_bins"]))
  boundary = sum(s["boundary_rows"] for s in all_stats)
  compared = None if inputs.raw_odd is None else sum(s["odd_compared"] for s in all_stats)
  changed = None if inputs.raw_odd is None else sum(s["odd_changed"] for s in all_stats) / max(compared, 1)
  return {
      "triplets": sum(s["rows"] for split, items in stats.items() if split.startswith("train_") for s in items),
      "triplets_total": rows,
      "splits": {split: sum(s["rows"] for s in items) for split, items in stats.items()},
      "strategies": strategies,
      "strategies_by_split": by_split,
      "entropy": {
          "mean": sum(s["entropy_sum"] for s in all_stats) / max(rows, 1),
          "mean_by_split": {split: sum(s["entropy_sum"] for s in items) / max(sum(s["rows"] for s in items), 1)
                            for split, items in stats.items()},
          "max": labelling.MAX_ENTROPY,
          "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": hist.tolist()},
      },
      "odd_one_out_changed": changed,  # Over `odd_one_out_compared` evenly spaced rows (every row of a small set).
      "odd_one_out_compared": compared,
      "boundary_odd_kept": (sum(s["boundary_odd_kept"] for s in all_stats) / boundary) if boundary else None,
      "shards": {split: len(items) for split, items in stats.items()},
      "formats": list(config["formats"]),
      "npz": npz,
      "transformed": inputs.raw_odd is not None,
      "k": inputs.k,
      "groups": {name: s.describe() for name, s in sorted(inputs.samplers.items())},
      "images": len(inputs.emb),
  }
