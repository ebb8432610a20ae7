"""Stage `triplets` (Beam): sample triplets, soft-label them with the teacher, write shards.

  alignet triplets --embeddings E --transform T --clusters C --strategy cluster_boundary --num 100000 \
      --valid-strategies class_boundary,within_class,between_class --num-valid 10000 --seed 0 \
      --format tfrecord,parquet,npz --out X [Beam options, e.g. --direct_num_workers=2]

One training set and one validation set per --valid-strategies entry (default: one, with the training strategy),
each named by its split key ``train_<sampling>`` / ``val_<sampling>`` as the released trainer names its files:
``shards/<key>-%05d-of-%05d.{parquet,tfrecord}`` and ``npz/<transform>/<key>.npz``. Elements are blocks of
triplet ids, never single triplets: one per output shard,

  ShardSpecs        (key, shard, start, stop)     rows [start, stop) of a set
  Reshuffle                                       (spread over workers)
  SampleLabelWrite  (key, shard, rows)            in blocks of block_size rows: sample (counter-based), label
                                                  (compiled kernel), then write the shard's Parquet / TFRecord
                                                  files, its npz parts and its stats

so no triplet data crosses a shuffle: at 10^7 triplets the pipeline moves 100 small specs, not 4 GB of rows.
Which triplet ids, strategies and rows each shard holds is fixed by the config alone (the plan,
`alignet_data.dataset.triplet_plan`), so any runner, worker count or block size writes the same bytes; making a
shard is `alignet_data.dataset.triplet_blocks` (each process transforms the matrix with thread-independent bits:
`clustering.transform_rows`).
Consumers shuffle (the trainer does). The released-layout npz (``npz`` in formats) is streamed from the shards'
parts after the pipeline, never held whole in memory.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts
from alignet_data.checks import check_name
from alignet_data.dataset import labelling, sampling, shards, triplet_blocks, triplet_plan
from pipelines import runners, stages

__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run", "SampleTriplets"]

STAGE = "triplets"
FORMATS = ("parquet", "tfrecord", "npz")
_STATS_DIR = "_shard_stats"
_NPZ_PARTS = "_npz_parts"
_PART_DTYPES = {"positions": np.dtype(np.int64), "similarities": np.dtype(np.float32)}
_PART_ROWS = 1 << 16  # Triplets per block read back from an npz part.
_EXT = {"parquet": "parquet", "tfrecord": "tfrecord"}


def default_config() -> dict[str, Any]:
  return {
      "embeddings": None,      # URL of an embed artifact: the ids, file names, labels and teacher vectors.
      "split": "pool",         # Which of its splits the triplets index into.
      "transform": None,       # URL of an align artifact (or .npz); None labels with the raw teacher (UnAligNet).
      "clusters": None,        # URL of a cluster artifact (needed by cluster_boundary; fills the clusters column).
      "strategy": "cluster_boundary",  # A strategy, or a mix "random:1,cluster_boundary:3" / {name: weight}.
      "num": 20000,            # Training triplets.
      "num_valid": 2000,       # Triplets per validation set (disjoint triplet ids).
      "valid_strategies": None,  # One validation set per strategy (list or "a,b"); None: one, the training mix.
      "seed": 0,
      "block_size": 4096,      # Triplets labelled at a time inside a shard (does not change any output byte).
      "label_threads": 0,      # Labelling kernel threads per worker; 0 = this machine's CPUs (no output byte moves).
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
  parser.add_argument("--num-valid", type=int, help="Number of triplets per validation set.")
  parser.add_argument("--valid-strategies", help="Comma-separated strategies, one validation set each (e.g. "
                      "class_boundary,within_class,between_class); default: one set with the training strategy.")
  parser.add_argument("--seed", type=int, help="Sampling seed.")
  parser.add_argument("--block-size", type=int, help="Triplets labelled at a time (memory vs overhead).")
  parser.add_argument("--label-threads", type=int, help="Labelling kernel threads per worker (0 = all CPUs).")
  parser.add_argument("--num-shards", type=int, help="Number of train shards.")
  parser.add_argument("--num-valid-shards", type=int, help="Number of shards per validation set.")
  parser.add_argument("--format", dest="formats", help="Comma-separated: parquet,tfrecord,npz.")
  parser.add_argument("--npz-sampling", help="Sampling tag in the npz name (default: derived).")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = stages.apply_flags(default_config(), args)
  if isinstance(config["formats"], str):
    config["formats"] = [f.strip() for f in config["formats"].split(",") if f.strip()]
  if isinstance(config["valid_strategies"], str):
    config["valid_strategies"] = [s.strip() for s in config["valid_strategies"].split(",") if s.strip()]
  return config


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  """The input URLs; the config is checked here first, so a bad flag fails before any input is read or written."""
  check_config(config)
  if not config.get("embeddings"):
    raise ValueError(f"The {STAGE} stage needs `embeddings` (--embeddings URL of an embed artifact).")
  urls = {"embeddings": config["embeddings"]}
  for key in ("transform", "clusters"):
    if config.get(key):
      urls[key] = config[key]
  return urls


_LOADED: dict[str, triplet_blocks.TripletInputs] = {}
_LOCK = threading.Lock()


def _inputs(config: dict[str, Any]) -> triplet_blocks.TripletInputs:
  """Per-process cache: DoFn instances in one process share one copy of the matrices, loaded by the first that
  needs them (never carried from the driver). Keyed by the input URLs and their contents' digests (manifests): a
  Dask worker process outlives a pipeline, and an input rewritten at the same URL must be read again."""
  keys = ("embeddings", "split", "transform", "clusters", "strategy", "valid_strategies", "seed")
  digests = {k: artifacts.input_digest(config[k]) for k in ("embeddings", "transform", "clusters") if config.get(k)}
  key = artifacts.digest({**{k: config[k] for k in keys}, "contents": digests})
  with _LOCK:
    if key not in _LOADED:
      _LOADED.clear()
      _LOADED[key] = triplet_blocks.TripletInputs.load(config)
      triplet_blocks.warm_up()
    return _LOADED[key]


def write_shard(inputs: triplet_blocks.TripletInputs, config: dict[str, Any], out_url: str,
                split: triplet_plan.SplitPlan, shard: int, start: int, stop: int) -> dict[str, Any]:
  """Make one shard of a set and write its files (each format, npz parts) and its stats; returns the stats."""
  timer: dict[str, float] = {}
  tic = time.perf_counter()
  columns = triplet_blocks.make_shard(inputs, config, split, start, stop, timer)
  made = time.perf_counter()
  record = {k: v for k, v in columns.items() if not k.startswith("_")}
  for fmt in config["formats"]:
    if fmt in _EXT:
      url = artifacts.join(out_url, shards.shard_name(split.key, shard, split.shards, _EXT[fmt]))
      (shards.write_parquet if fmt == "parquet" else shards.write_tfrecord)(url, record)
  if "npz" in config["formats"]:  # The matrix rows, not the names: 24 bytes a triplet instead of ~360.
    for name, array in (("positions", columns["_positions"]), ("similarities", record["similarities"])):
      artifacts.write_bytes(artifacts.join(out_url, _npz_part(split.key, shard, name)),
                            memoryview(np.ascontiguousarray(array, _PART_DTYPES[name])).cast("B"))
  stats = triplet_blocks.shard_stats(columns, int(config["entropy_bins"]))
  stats["seconds"] = {"make": made - tic, "label": timer.get("label_seconds", 0.0),
                      "label_cpu": timer.get("label_cpu_seconds", 0.0), "write": time.perf_counter() - made}
  artifacts.write_bytes(artifacts.join(out_url, _STATS_DIR, f"{split.key}-{shard:05d}.json"),
                        artifacts.json_bytes(stats))
  return stats


def _npz_part(split: str, shard: int, name: str) -> str:
  return f"{_NPZ_PARTS}/{split}-{shard:05d}.{name}.bin"


# --------------------------------------------------------------------------------------------------- Beam


def _beam():
  import apache_beam as beam
  return beam


def SampleTriplets(config: dict[str, Any], out_url: str,  # noqa: N802 (a PTransform factory)
                   plan: dict[str, triplet_plan.SplitPlan]):
  """The composite transform: PBegin -> (split key, shard, rows) per written shard of the plan's sets."""
  beam = _beam()

  class WriteShard(beam.DoFn):
    def __init__(self, config: dict[str, Any], out_url: str, plan: dict[str, triplet_plan.SplitPlan]):
      self._config = config
      self._out = out_url
      self._plan = plan
      self._shards = beam.metrics.Metrics.counter(STAGE, "shards")
      self._triplets = beam.metrics.Metrics.counter(STAGE, "triplets")

    def setup(self):
      self._inputs = _inputs(self._config)

    def process(self, spec):
      key, shard, start, stop = spec
      stats = write_shard(self._inputs, self._config, self._out, self._plan[key], shard, start, stop)
      self._shards.inc()
      self._triplets.inc(stats["rows"])
      yield key, shard, stats["rows"]

  class _SampleTriplets(beam.PTransform):
    def expand(self, pbegin):
      return (pbegin
              | "ShardSpecs" >> beam.Create(triplet_plan.shard_specs(plan))
              # (split key, shard, start row, end row): a block of triplet ids
              | "Reshuffle" >> beam.Reshuffle()
              | "SampleLabelWrite" >> beam.ParDo(WriteShard(config, out_url, plan)))
      # (split key, shard, rows)

  return _SampleTriplets()


# ---------------------------------------------------------------------------------------------------- run


def check_config(config: dict[str, Any]) -> None:
  """Refuse a bad config before any work: formats, counts, strategies and their weights, and every name that
  becomes part of a file name (`npz_sampling`, the embeddings split), by the one rule of `checks.check_name`."""
  if config.get("npz_sampling"):  # "" or None: derived from the strategy.
    check_name(config["npz_sampling"], "--npz-sampling tag")
  check_name(config["split"], "embeddings --split")
  bad = [f for f in config["formats"] if f not in FORMATS]
  if bad or not config["formats"]:
    raise ValueError(f"Unknown output format(s) {bad or config['formats']}; choose from {', '.join(FORMATS)}.")
  for key in ("num", "num_valid"):
    if int(config[key]) < 0:
      raise ValueError(f"{key} must be >= 0, got {config[key]}.")
  if int(config["num"]) == 0:
    raise ValueError("num must be > 0: a dataset needs training triplets.")
  if max(int(config["num_valid"]), int(config["num"])) >= triplet_plan.ID_STRIDE:
    raise ValueError(f"At most {triplet_plan.ID_STRIDE - 1} triplets per set (the sets' triplet ids are disjoint "
                     "ranges).")
  if int(config.get("label_threads") or 0) < 0:
    raise ValueError(f"label_threads must be >= 0 (0 = all CPUs), got {config['label_threads']}.")
  for key in ("num_shards", "num_valid_shards", "block_size"):
    if int(config[key]) < 1:
      raise ValueError(f"{key} must be >= 1, got {config[key]}.")
  sampling.allocate(1, sampling.parse_strategy(config["strategy"]))  # Known names, finite non-negative weights.
  triplet_plan.valid_strategies(config)  # Known names, each once.


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  check_config(config)
  tic = time.perf_counter()
  inputs = _inputs(config)  # Fail early (and clearly) on bad inputs, before Beam starts.
  loaded = time.perf_counter()
  plan = triplet_plan.splits(config, inputs.k)
  for name, count in triplet_plan.strategy_totals(plan).items():
    inputs.samplers[name].check_count(count)

  beam = _beam()
  from apache_beam.options.pipeline_options import PipelineOptions
  print(f"[{STAGE}] {sum(s.num for s in plan.values())} triplets in {len(triplet_plan.shard_specs(plan))} shards "
        f"of {', '.join(plan)} (Beam {' '.join(beam_args) or 'DirectRunner'})", flush=True)
  p = beam.Pipeline(options=PipelineOptions(runners.in_process_threads(runners.beam_args(beam_args),
                                                                       labelling.default_threads())))
  _ = p | "Triplets" >> SampleTriplets(config, writer.tmp_url, plan)
  with runners.worker_tracebacks_hidden():
    result = p.run()
    try:
      result.wait_until_finish()
    finally:
      runners.release(result)
  ran = time.perf_counter()
  report = _finish(config, writer, inputs, plan)
  timing = report.pop("_timing")
  bandwidth, bandwidth_cpu = triplet_blocks.read_bandwidth(inputs.vectors, triplet_plan.label_threads(config))
  floor, floor_cpu = timing["label_bytes"] / bandwidth, timing["label_bytes"] / bandwidth_cpu
  report["timing"] = {
      "load_seconds": round(loaded - tic, 3), "pipeline_seconds": round(ran - loaded, 3),
      "finish_seconds": round(time.perf_counter() - ran, 3), **timing,
      "label_threads": triplet_plan.label_threads(config),
      "read_bandwidth_gbps": round(bandwidth / 1e9, 3), "labelling_floor_seconds": round(floor, 3),
      "labelling_floor_fraction": round(floor / max(timing["label_seconds"], 1e-9), 4),
      # The same in CPU time (the kernel's and np.sum's, each summed over the same threads): robust to the
      # descheduling of a shared machine.
      "labelling_floor_fraction_cpu": round(floor_cpu / max(timing["label_cpu_seconds"], 1e-9), 4)}
  with _LOCK:
    _LOADED.clear()  # Free the matrices (12 GB at ImageNet scale) for the stages after this one in `alignet run`.
  return report


def _finish(config: dict[str, Any], writer: artifacts.ArtifactWriter, inputs: triplet_blocks.TripletInputs,
            plan: dict[str, triplet_plan.SplitPlan]) -> dict[str, Any]:
  """Check every file against the schema, aggregate shard stats, assemble the npz, write the index.

  The npz files are assembled on one thread while the others check the shard files (the zlib and the checks'
  compiled scan release the GIL): at ImageNet scale each took 10-20 s, one after the other."""
  stats: dict[str, list[dict[str, Any]]] = {}
  index: dict[str, Any] = {}
  checks: list[tuple[str, str, int]] = []  # (file name, format, expected rows)
  for key, split in plan.items():
    bounds = shards.shard_bounds(split.num, split.shards)
    stats[key] = []
    for i in range(split.shards):
      with writer.open(f"{_STATS_DIR}/{key}-{i:05d}.json", "rb") as f:
        stats[key].append(json.loads(f.read()))
      checks += [(shards.shard_name(key, i, split.shards, _EXT[fmt]), fmt, int(bounds[i + 1] - bounds[i]))
                 for fmt in config["formats"] if fmt in _EXT]
    index[key] = {"strategy": split.strategy, "sampling": split.sampling, "num": split.num, "shards": split.shards,
                  "shard_lengths": np.diff(bounds).tolist(), "triplet_ids": [split.id_base, split.id_base + split.num]}
  writer.fs.rm(writer.local_path(_STATS_DIR), recursive=True)

  def check(item: tuple[str, str, int]) -> int:
    name, fmt, _ = item
    url = writer.path(name)
    return shards.check_parquet(url) if fmt == "parquet" else shards.check_tfrecord(url, decode_limit=100)

  with concurrent.futures.ThreadPoolExecutor(max(labelling.default_threads(), 2)) as pool:
    assembled = pool.submit(_assemble_npz, config, writer, inputs, plan) if "npz" in config["formats"] else None
    for (name, _, expected), rows in zip(checks, pool.map(check, checks), strict=True):
      if rows != expected:
        raise RuntimeError(f"{name}: {rows} rows written, expected {expected}.")
      writer.set_rows(name, rows)
    npz, npz_seconds = assembled.result() if assembled is not None else (None, 0.0)
  for key, name in (npz or {}).items():
    writer.set_rows(name, plan[key].num)
  provenance = triplet_blocks.indices_provenance(config["embeddings"], config["split"])
  writer.write_json("triplets.json", {
      "schema": shards.SCHEMA_NAME, "schema_version": shards.SCHEMA_VERSION, "splits": index,
      "formats": config["formats"], "npz": npz, "indices": provenance, "embeddings": config["embeddings"],
      "split": config["split"], "transform": config["transform"], "clusters": config["clusters"]})
  with writer.open(f"schema/{shards.SCHEMA_FILE}", "wb") as f:
    f.write(json.dumps(shards.schema_spec(), indent=2).encode() + b"\n")
  report = triplet_blocks.report(config, stats, inputs, npz)
  report["indices"] = provenance
  all_stats = [s for split in sorted(stats) for s in stats[split]]
  report["_timing"] = {
      "npz_seconds": round(npz_seconds, 3),
      # Summed over shards (over workers: CPU-ish seconds, not wall time).
      "make_seconds": round(sum(s["seconds"]["make"] for s in all_stats), 3),
      "label_seconds": round(sum(s["seconds"]["label"] for s in all_stats), 3),
      "label_cpu_seconds": round(sum(s["seconds"]["label_cpu"] for s in all_stats), 3),
      "write_seconds": round(sum(s["seconds"]["write"] for s in all_stats), 3),
      "label_bytes": int(report["triplets_total"]) * 3 * int(inputs.vectors.shape[1]) * inputs.vectors.itemsize,
  }
  return report


def _assemble_npz(config: dict[str, Any], writer: artifacts.ArtifactWriter, inputs: triplet_blocks.TripletInputs,
                  plan: dict[str, triplet_plan.SplitPlan]) -> tuple[dict[str, str], float]:
  """The released npz file of each set, streamed from the shards' parts (then deleted); (set -> file, seconds).

  The workers write each triplet's matrix rows and similarities; the file names and ids are looked up here, part
  by part: at 10^7 triplets the UTF-32 names are 3.6 GB, which the workers once wrote and this step read back."""
  tic = time.perf_counter()
  transform = "uncertainty_distillation" if config.get("transform") else "untransformed"
  names, ids = inputs.emb.file_names, np.asarray(inputs.emb.ids, np.int64)
  name_rows = names.view(np.uint8).reshape(len(names), names.dtype.itemsize)  # Rows of bytes: a faster gather.
  members = {"filenames": (names.dtype, "positions", lambda pos: np.take(name_rows, pos.reshape(-1), axis=0)),
             "similarities": (np.dtype(np.float32), "similarities", None),
             "indices": (np.dtype(np.int64), "positions", lambda pos: ids[pos])}
  npz = {}
  for key, split in plan.items():
    arrays = {member: (dtype, (split.num, 3), _read_parts(writer, key, split.shards, part, lookup))
              for member, (dtype, part, lookup) in members.items()}
    name = f"{shards.NPZ_DIR}/{shards.npz_name(transform, split.role, split.sampling)}"
    with writer.open(name, "wb") as f:
      shards.write_npz_parts(f, arrays)
    npz[key] = name
  writer.fs.rm(writer.local_path(_NPZ_PARTS), recursive=True)
  return npz, time.perf_counter() - tic


def _read_parts(writer: artifacts.ArtifactWriter, split: str, count: int, name: str,
                lookup: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[np.ndarray]:
  """Each shard's part `name` of a set, in shard order, in blocks of `_PART_ROWS` (rows, 3) arrays (through `lookup`
  if given): memory stays bounded however large a shard is."""
  dtype = _PART_DTYPES[name]
  for i in range(count):
    with writer.open(_npz_part(split, i, name), "rb") as f:
      while chunk := f.read(_PART_ROWS * 3 * dtype.itemsize):
        part = np.frombuffer(chunk, dtype).reshape(-1, 3)
        yield part if lookup is None else np.ascontiguousarray(lookup(part))
