"""Stage `triplets` (Beam): sample triplets, soft-label them with the teacher, write shards.

  alignet triplets --embeddings E --transform T --clusters C --strategy cluster_boundary --num 100000 \
      --num-valid 10000 --seed 0 --format tfrecord,parquet,npz --out X [Beam options, e.g. --direct_num_workers=2]

Elements are blocks of triplet ids, never single triplets:

  BlockSpecs    (split, strategy, start, stop)       rows [start, stop) of a split, one strategy
  SampleLabel   (split, start, columns)              sampled (counter-based), labelled, as schema columns
  AssignShards  ((split, shard), (start, columns))   cut at the shard's fixed row range
  GroupShards   ((split, shard), [(start, columns)])
  WriteShards   shard stats                          pieces sorted by start -> Parquet / TFRecord files

Row r of a split is triplet id ``base(split) + r`` (train base 0, valid base 2^40: disjoint ids, and the valid
split does not change when --num does), drawn by strategy s from an RNG keyed by (seed, s, id). Strategies of
a mix take consecutive row ranges (in name order). Shard i of a split holds its rows [b_i, b_{i+1}) in row
order, so every file's bytes are fixed by the config alone: any runner, worker count or block size writes the
same bytes. Consumers shuffle (the trainer does). The released-layout npz is written on request
(``npz`` in formats) from the Parquet shards, after the pipeline.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, clustering, embeddings, labelling, sampling, shards
from alignet_data.transform import Transform

__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run", "SampleTriplets"]

STAGE = "triplets"
VALID_ID_BASE = 1 << 40
FORMATS = ("parquet", "tfrecord", "npz")
_STATS_DIR = "_shard_stats"
_EXT = {"parquet": "parquet", "tfrecord": "tfrecord"}


def default_config() -> dict[str, Any]:
  return {
      "embeddings": None,      # URL of an embed artifact: the ids, file names, labels and teacher vectors.
      "split": "pool",         # Which of its splits the triplets index into.
      "transform": None,       # URL of an align artifact (or .npz); None labels with the raw teacher (UnAligNet).
      "clusters": None,        # URL of a cluster artifact (needed by cluster_boundary; fills the clusters column).
      "strategy": "cluster_boundary",  # A strategy, or a mix "random:1,cluster_boundary:3" / {name: weight}.
      "num": 20000,            # Training triplets.
      "num_valid": 2000,       # Validation triplets (disjoint triplet ids).
      "seed": 0,
      "block_size": 4096,      # Triplets per Beam element (does not change any output byte).
      "num_shards": 4,         # Train shards.
      "num_valid_shards": 1,
      "formats": ["parquet", "tfrecord"],  # Any of parquet, tfrecord, npz (the released layout).
      "npz_sampling": None,    # Sampling tag of the npz file name; None derives it (e.g. cluster_border_500).
      "entropy_bins": 20,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--embeddings", help="Embed artifact URL.")
  parser.add_argument("--split", help="Embeddings split the triplets index into (default: pool).")
  parser.add_argument("--transform", help="Align artifact (or transform .npz) URL; omit for the raw teacher.")
  parser.add_argument("--clusters", help="Cluster artifact URL (needed for cluster_boundary).")
  parser.add_argument("--strategy", help=f"One of {', '.join(sampling.STRATEGIES)}, or a mix like "
                      "random:1,cluster_boundary:3.")
  parser.add_argument("--num", type=int, help="Number of training triplets.")
  parser.add_argument("--num-valid", type=int, help="Number of validation triplets.")
  parser.add_argument("--seed", type=int, help="Sampling seed.")
  parser.add_argument("--block-size", type=int, help="Triplets per Beam element.")
  parser.add_argument("--num-shards", type=int, help="Number of train shards.")
  parser.add_argument("--num-valid-shards", type=int, help="Number of valid shards.")
  parser.add_argument("--format", dest="formats", help="Comma-separated: parquet,tfrecord,npz.")
  parser.add_argument("--npz-sampling", help="Sampling tag in the npz name (default: derived).")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = default_config()
  for key in config:
    value = getattr(args, key, None)
    if value is not None:
      config[key] = value
  if isinstance(config["formats"], str):
    config["formats"] = [f.strip() for f in config["formats"].split(",") if f.strip()]
  return config


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  if not config.get("embeddings"):
    raise ValueError(f"The {STAGE} stage needs `embeddings` (--embeddings URL of an embed artifact).")
  urls = {"embeddings": config["embeddings"]}
  for key in ("transform", "clusters"):
    if config.get(key):
      urls[key] = config[key]
  return urls


# ------------------------------------------------------------------------------------------------- The plan


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


def block_specs(config: dict[str, Any]) -> list[tuple[str, str, int, int]]:
  """The pipeline's input elements: (split, strategy, start row, end row) blocks of at most block_size rows."""
  bs = int(config["block_size"])
  if bs < 1:
    raise ValueError(f"block_size must be >= 1, got {bs}.")
  return [(split, name, s, min(s + bs, hi))
          for split, ranges in strategy_ranges(config).items()
          for name, lo, hi in ranges for s in range(lo, hi, bs)]


def id_base(split: str) -> int:
  return 0 if split == "train" else VALID_ID_BASE


# --------------------------------------------------------------------------------------- Loaded inputs


@dataclasses.dataclass
class TripletInputs:
  """Everything a worker needs to make blocks: loaded once per process from the config's URLs."""
  emb: embeddings.Embeddings
  vectors: np.ndarray            # (n, d) teacher vectors the labels come from (transformed or raw).
  raw_vectors: np.ndarray | None  # (n, d0) raw vectors when a transform is applied, for the changed-odd count.
  clusters: np.ndarray | None    # (n,) cluster per row.
  k: int | None
  samplers: dict[str, sampling.TripletSampler]

  @classmethod
  def load(cls, config: dict[str, Any]) -> TripletInputs:
    emb = embeddings.load(config["embeddings"], config["split"])
    if len(emb) < 3:
      raise ValueError(f"Embeddings {config['embeddings']} split {config['split']!r} has {len(emb)} rows; "
                       "triplets need at least 3.")
    raw = emb.vectors
    vectors = Transform.load(config["transform"]).apply(raw) if config.get("transform") else raw
    clusters = k = None
    if config.get("clusters"):
      cl = clustering.load(config["clusters"])
      clusters, k = cl.for_ids(emb.ids), cl.k
    samplers = {}
    for name in sampling.parse_strategy(config["strategy"]):
      group = sampling.GROUPED.get(name)
      groups = None
      if group == "clusters":
        if clusters is None:
          raise ValueError(f"Strategy {name!r} needs clusters: pass --clusters (a cluster artifact URL).")
        groups = clusters
      elif group == "labels":
        if (emb.labels < 0).all():
          raise ValueError(f"Strategy {name!r} needs class labels, but embeddings {config['embeddings']} "
                           f"split {config['split']!r} has none; use cluster_boundary or random.")
        groups = emb.labels
      samplers[name] = sampling.TripletSampler(name, len(emb), groups, seed=config["seed"])
    return cls(emb, vectors, raw if config.get("transform") else None, clusters, k, samplers)


_LOADED: dict[str, TripletInputs] = {}
_LOCK = threading.Lock()


def _inputs(config: dict[str, Any]) -> TripletInputs:
  """Per-process cache: DoFn instances on one worker share one copy of the embeddings."""
  keys = ("embeddings", "split", "transform", "clusters", "strategy", "seed")
  key = artifacts.digest({k: config[k] for k in keys})
  with _LOCK:
    if key not in _LOADED:
      _LOADED.clear()
      _LOADED[key] = TripletInputs.load(config)
    return _LOADED[key]


def make_block(inputs: TripletInputs, split: str, strategy: str, start: int, stop: int) -> shards.Columns:
  """Rows [start, stop) of a split as schema columns, plus per-row diagnostics under '_' keys."""
  ids = np.arange(start, stop, dtype=np.int64) + id_base(split)
  positions = inputs.samplers[strategy].sample(ids)
  labelled = labelling.label_block(inputs.vectors, positions, inputs.raw_vectors)
  labelling.check_labels(labelled["similarities"], labelled["soft_label"], labelled["entropy"])
  columns = labelling.to_records(labelled, ids, strategy, inputs.emb.ids, inputs.emb.file_names,
                                 inputs.emb.labels, inputs.clusters)
  columns["_sampled_odd_kept"] = labelled["sampled_odd_kept"]
  if "odd_changed" in labelled:
    columns["_odd_changed"] = labelled["odd_changed"]
  return columns


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
      "odd_changed": int(columns["_odd_changed"].sum()) if "_odd_changed" in columns else None,
      "boundary_rows": int(boundary.sum()),
      "boundary_odd_kept": int(columns["_sampled_odd_kept"][boundary].sum()),
  }


# --------------------------------------------------------------------------------------------------- Beam


def _beam():
  import apache_beam as beam
  return beam


def _make_dofns():
  """The DoFn classes, defined on first use so that importing this module does not import Beam."""
  beam = _beam()

  class SampleLabel(beam.DoFn):
    def __init__(self, config: dict[str, Any]):
      self._config = config
      self._blocks = beam.metrics.Metrics.counter(STAGE, "blocks")
      self._triplets = beam.metrics.Metrics.counter(STAGE, "triplets")

    def setup(self):
      self._inputs = _inputs(self._config)

    def process(self, spec):
      split, strategy, start, stop = spec
      self._blocks.inc()
      self._triplets.inc(stop - start)
      yield split, start, make_block(self._inputs, split, strategy, start, stop)

  class WriteShard(beam.DoFn):
    def __init__(self, config: dict[str, Any], out_url: str):
      self._config = config
      self._out = out_url
      self._written = beam.metrics.Metrics.counter(STAGE, "written_shards")

    def process(self, element):
      (split, shard), pieces = element
      pieces = sorted((p for p in pieces if p is not None), key=lambda p: p[0])
      columns = _concat_pieces([c for _, c in pieces])
      count = split_shards(self._config)[split]
      record = {k: v for k, v in columns.items() if not k.startswith("_")}
      for fmt in self._config["formats"]:
        if fmt in _EXT:
          url = artifacts.join(self._out, shards.shard_name(split, shard, count, _EXT[fmt]))
          (shards.write_parquet if fmt == "parquet" else shards.write_tfrecord)(url, record)
      stats = shard_stats(columns, int(self._config["entropy_bins"]))
      fs, path = artifacts.url_to_fs(artifacts.join(self._out, _STATS_DIR, f"{split}-{shard:05d}.json"))
      fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
      with fs.open(path, "w") as f:
        json.dump(stats, f)
      self._written.inc()
      yield split, shard, stats["rows"]

  return SampleLabel, WriteShard


def _concat_pieces(pieces: list[shards.Columns]) -> shards.Columns:
  if not pieces:
    out = shards.empty()
    out["_sampled_odd_kept"] = np.zeros(0, bool)
    return out
  return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def _cut_at_shards(element, bounds: dict[str, np.ndarray]) -> Iterator[tuple[tuple[str, int], tuple[int, Any]]]:
  """(split, start, columns) -> ((split, shard), (start, piece)) for each shard the block overlaps."""
  split, start, columns = element
  b = bounds[split]
  stop = start + len(columns["triplet_id"])
  first = int(np.searchsorted(b, start, side="right")) - 1
  for shard in range(first, len(b) - 1):
    if b[shard] >= stop:
      break
    lo, hi = max(start, int(b[shard])), min(stop, int(b[shard + 1]))
    if lo < hi:
      yield (split, shard), (lo, {k: v[lo - start:hi - start] for k, v in columns.items()})


def SampleTriplets(config: dict[str, Any], out_url: str):  # noqa: N802 (a PTransform factory)
  """The composite transform: PBegin -> (split, shard, rows) per written shard."""
  beam = _beam()
  sample_label, write_shard = _make_dofns()
  bounds = {s: shards.shard_bounds(n, split_shards(config)[s]) for s, n in split_sizes(config).items()}
  every_shard = [((s, i), None) for s, n in split_shards(config).items() if split_sizes(config)[s] > 0
                 for i in range(n)]

  class _SampleTriplets(beam.PTransform):
    def expand(self, pbegin):
      blocks = (pbegin
                | "BlockSpecs" >> beam.Create(block_specs(config))
                # (split, strategy, start, stop)
                | "Reshuffle" >> beam.Reshuffle()
                | "SampleLabel" >> beam.ParDo(sample_label(config))
                # (split, start, columns)
                | "AssignShards" >> beam.FlatMap(_cut_at_shards, bounds))
      # ((split, shard), (start, columns))
      empty = pbegin | "EveryShard" >> beam.Create(every_shard)  # So that empty shards are written too.
      return ((blocks, empty)
              | "Flatten" >> beam.Flatten()
              | "GroupShards" >> beam.GroupByKey()
              # ((split, shard), [(start, columns) | None])
              | "WriteShards" >> beam.ParDo(write_shard(config, out_url)))
      # (split, shard, rows)

  return _SampleTriplets()


# ---------------------------------------------------------------------------------------------------- run


def _validate(config: dict[str, Any]) -> None:
  bad = [f for f in config["formats"] if f not in FORMATS]
  if bad or not config["formats"]:
    raise ValueError(f"Unknown output format(s) {bad or config['formats']}; choose from {', '.join(FORMATS)}.")
  if "npz" in config["formats"] and "parquet" not in config["formats"] and "tfrecord" not in config["formats"]:
    raise ValueError("The npz export is made from the shards: add parquet or tfrecord to --format.")
  for key in ("num", "num_valid"):
    if int(config[key]) < 0:
      raise ValueError(f"{key} must be >= 0, got {config[key]}.")
  if int(config["num"]) == 0:
    raise ValueError("num must be > 0: a dataset needs training triplets.")
  if int(config["num_valid"]) >= VALID_ID_BASE or int(config["num"]) >= VALID_ID_BASE:
    raise ValueError(f"At most {VALID_ID_BASE - 1} triplets per split (triplet ids of train and valid are "
                     "disjoint ranges).")
  for key in ("num_shards", "num_valid_shards"):
    if int(config[key]) < 1:
      raise ValueError(f"{key} must be >= 1, got {config[key]}.")


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  _validate(config)
  inputs = _inputs(config)  # Fail early (and clearly) on bad inputs, before Beam starts.
  totals: dict[str, int] = {}
  for ranges in strategy_ranges(config).values():
    for name, lo, hi in ranges:
      totals[name] = totals.get(name, 0) + hi - lo
  for name, count in totals.items():
    inputs.samplers[name].check_count(count)

  beam = _beam()
  from apache_beam.options.pipeline_options import PipelineOptions
  print(f"[{STAGE}] {sum(split_sizes(config).values())} triplets in {len(block_specs(config))} blocks "
        f"(Beam {' '.join(beam_args) or 'DirectRunner'})", flush=True)
  with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
    _ = p | "Triplets" >> SampleTriplets(config, writer.tmp_url)

  report = _finish(config, writer, inputs)
  return report


def _finish(config: dict[str, Any], writer: artifacts.ArtifactWriter, inputs: TripletInputs) -> dict[str, Any]:
  """Check every file against the schema, aggregate shard stats, export npz, write the index."""
  sizes, counts = split_sizes(config), split_shards(config)
  stats: dict[str, list[dict[str, Any]]] = {}
  index: dict[str, Any] = {}
  for split, n in sizes.items():
    if n == 0:
      continue
    bounds = shards.shard_bounds(n, counts[split])
    stats[split] = []
    for i in range(counts[split]):
      with writer.open(f"{_STATS_DIR}/{split}-{i:05d}.json", "rb") as f:
        stats[split].append(json.loads(f.read()))
      expected = int(bounds[i + 1] - bounds[i])
      for fmt in config["formats"]:
        if fmt in _EXT:
          name = shards.shard_name(split, i, counts[split], _EXT[fmt])
          url = writer.path(name)
          rows = shards.check_parquet(url) if fmt == "parquet" else shards.check_tfrecord(url, decode_limit=1000)
          if rows != expected:
            raise RuntimeError(f"{name}: {rows} rows written, expected {expected}.")
          writer.set_rows(name, rows)
    index[split] = {"num": n, "shards": counts[split], "shard_lengths": np.diff(bounds).tolist(),
                    "triplet_ids": [id_base(split), id_base(split) + n]}
  writer.fs.rm(writer.local_path(_STATS_DIR), recursive=True)

  strategies = sorted(sampling.parse_strategy(config["strategy"]))
  npz = None
  if "npz" in config["formats"]:
    sampling_tag = config["npz_sampling"] or shards.sampling_name(strategies, inputs.k)
    transform = "uncertainty_distillation" if config.get("transform") else "untransformed"
    fmt = "parquet" if "parquet" in config["formats"] else "tfrecord"
    npz = {}
    for split in stats:
      names = [shards.shard_name(split, i, counts[split], _EXT[fmt]) for i in range(counts[split])]
      read = shards.read_parquet if fmt == "parquet" else shards.read_tfrecord
      columns = shards.concat(read(writer.path(n)) for n in names)
      name = f"{shards.NPZ_DIR}/{shards.npz_name(transform, split, sampling_tag)}"
      with writer.open(name, "wb") as f:
        shards.write_npz(f, columns)
      writer.set_rows(name, len(columns["triplet_id"]))
      npz[split] = name
  writer.write_json("triplets.json", {
      "schema": shards.SCHEMA_NAME, "schema_version": shards.SCHEMA_VERSION, "splits": index,
      "formats": config["formats"], "npz": npz, "embeddings": config["embeddings"], "split": config["split"],
      "transform": config["transform"], "clusters": config["clusters"]})
  with writer.open(f"schema/{shards.SCHEMA_FILE}", "wb") as f:
    f.write(json.dumps(shards.schema_spec(), indent=2).encode() + b"\n")
  return _report(config, stats, inputs, npz)


def _report(config, stats, inputs: TripletInputs, npz) -> dict[str, Any]:
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
  changed = None if inputs.raw_vectors is None else sum(s["odd_changed"] for s in all_stats) / max(rows, 1)
  return {
      "triplets": sum(s["rows"] for s in stats.get("train", [])),
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
      "odd_one_out_changed": changed,
      "boundary_odd_kept": (sum(s["boundary_odd_kept"] for s in all_stats) / boundary) if boundary else None,
      "shards": {split: len(items) for split, items in stats.items()},
      "formats": list(config["formats"]),
      "npz": npz,
      "transformed": inputs.raw_vectors is not None,
      "k": inputs.k,
      "groups": {name: s.describe() for name, s in sorted(inputs.samplers.items())},
      "images": len(inputs.emb),
  }
