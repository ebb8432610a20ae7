"""Stage `embed`: image sources -> teacher embeddings (a Beam pipeline around RunInference with a JAX model).

    alignet embed --source 'files:DIR/**/*' --model demo-teacher --out OUT [--direct_num_workers=2 ...]

The Beam graph (elements are numpy blocks of up to `batch_size` images, never single images):

  Create(ReadTask per id range) -> Reshuffle -> ReadBlocks: (kind, ImageBlock | DecodeFailure)
      Blocks ([ImageBlock]: pre-batched) -> RunInference(JaxEmbedHandler: preprocess, pad, jitted embed_fn)
             -> ByShard ((split, shard) -> piece) -> GroupByKey -> WriteShard (sorted by id) -> (split, shard, ...)
      Failures -> DecodeFailure
  (written shards, failures, one start marker) -> one key -> GroupByKey -> Finish: dead_letter.jsonl (sorted) and
      the shards no image went to (empty)

Only single-output ParDos, no side inputs, and one last step that depends on everything: runners differ there
(Beam's DaskRunner hands a multi-output ParDo's every output to every consumer, recomputes a side input's
producers inside each consuming task, drops what a DoFn emits in finish_bundle, and computes only the graph's last
transform and what it depends on).

Output bytes do not depend on the runner or worker count: blocks are cut from fixed id ranges, every batch
has the same compiled shape, shard i holds exactly the ids of its id range (sorted) and is written once, and
the dead-letter file is sorted. Extra command-line flags are Beam `PipelineOptions` (`pipelines.runners` spells out
a runner shorthand: --runner=dask).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference import base as inference
from apache_beam.options.pipeline_options import PipelineOptions

from alignet_data import artifacts
from alignet_data.checks import InputError, check_name
from alignet_data.teacher import embed_blocks, embeddings, image_sources
from pipelines import runners

__all__ = ["STAGE", "EmbedImages", "JaxEmbedHandler", "add_arguments", "config_from_args", "default_config",
           "input_urls", "parse_source_flags", "run"]

STAGE = "embed"
DEAD_LETTER = "dead_letter.jsonl"
_STAGING = "_staging"
NAMESPACE = "embed"
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
_NAMED_SOURCE = re.compile(r"^(?P<name>[^:=]*)=(?P<spec>.+)$")  # NAME=SPEC: no ':' before the '=' (specs have one).


def default_config() -> dict[str, Any]:
  return {
      "model": "demo-teacher",   # models.load_model spec: "demo-teacher" or "<config-name>:<checkpoint URL>".
      "sources": {},             # split name -> source spec (teacher.image_sources), e.g. {"train": "tfds:..."}.
      "batch_size": 64,          # Images per model call; the last block of a range is padded to it (one shape).
      "dtype": "float32",        # Storage dtype of the vectors: float32 | float16.
      "rows_per_shard": 4096,    # Ids per Parquet shard: shard i holds ids [i * n, (i + 1) * n).
      "images_per_range": 1024,  # Ids per read task (the unit of Beam read parallelism); no effect on bytes.
      "tfds_data_dir": None,     # data_dir for tfds: sources (None: TFDS's default, ~/tensorflow_datasets).
      "compute_dtype": "auto",   # Model compute: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16.
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", help="Model spec: demo-teacher, demo-student or '<config-name>:<checkpoint>'.")
  parser.add_argument(
      "--source", action="append", metavar="[NAME=]SPEC",
      help="Image source, repeatable: 'demo:<world>:things|pool', 'files:<glob>' (ImageNet synset folders -> "
           "class ids), 'things:<folder>[:one|all]', 'tfds:<name>[:<ver>]:<split>'. NAME= names the output split "
           "(default: the source's split; 'train' for files, 'things' for THINGS).")
  parser.add_argument("--batch-size", type=int, help="Images per model call (fixed; the last one is padded).")
  parser.add_argument("--dtype", choices=sorted(embeddings.STORAGE_DTYPES), help="Storage dtype of the vectors.")
  parser.add_argument("--rows-per-shard", type=int, help="Ids per Parquet shard.")
  parser.add_argument("--images-per-range", type=int, help="Ids per Beam read task.")
  parser.add_argument("--tfds-data-dir", help="TFDS data_dir (local or gs://) for tfds: sources.")
  parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                      help="Model compute dtype (auto: bfloat16 where an accelerator is present, else float32).")


def parse_source_flags(flags: Sequence[str]) -> dict[str, str]:
  """`--source` values -> {split name: spec}; a bare SPEC is named by its source's split."""
  sources: dict[str, str] = {}
  for flag in flags:
    m = _NAMED_SOURCE.match(flag)
    if m and not flag.startswith(("demo:", "files:", "things:", "tfds:")):
      name, spec = check_split(m["name"]), m["spec"]
    else:
      name, spec = _default_split_name(flag), flag
    if name in sources:
      raise ValueError(f"Two --source flags give split {name!r} ({sources[name]!r}, {spec!r}); "
                       f"name them: --source NAME=SPEC.")
    sources[name] = spec
  return sources


def check_split(name: str) -> str:
  """A split name is a file-name component (`embeddings/<split>-00000-of-00001.parquet`): the shared rule of
  `checks.check_name` (no '/', no '..'), and the store's own (letters, digits, '_': '-' separates the shard)."""
  check_name(name, "split name (--source NAME=SPEC)")
  try:
    return embeddings.check_split_name(name)
  except ValueError as e:
    raise InputError(str(e)) from None


def _default_split_name(spec: str) -> str:
  kind, _, rest = spec.partition(":")
  if kind == "demo":
    return rest.rpartition(":")[2]
  if kind == "tfds":
    split = rest.rpartition(":")[2]
    name = re.sub(r"\W+", "_", split).strip("_")
    if name != split:
      raise ValueError(f"TFDS split {split!r} cannot name an output split; name it: --source NAME={spec}")
    return name
  if kind == "files":
    return image_sources.FilesSource.split
  if kind == "things":
    return "things"
  raise ValueError(f"Bad image source {spec!r}. {image_sources.SPEC_HELP}")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = default_config()
  for key in ("model", "batch_size", "dtype", "rows_per_shard", "images_per_range", "tfds_data_dir", "compute_dtype"):
    value = getattr(args, key, None)
    if value is not None:
      config[key] = value
  if getattr(args, "source", None):
    config["sources"] = parse_source_flags(args.source)
  return config


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  """The world artifact(s) of demo sources, the folders of file sources, a model checkpoint. The config is checked
  first (split names, sizes), so a bad one fails before any input is read or anything is written."""
  _check_config(config)
  urls: dict[str, str] = {}
  demo = {split: image_sources.input_url(spec) for split, spec in config["sources"].items()
          if spec.startswith("demo:")}
  if len(set(demo.values())) == 1:
    urls["world"] = next(iter(demo.values()))
  else:
    urls.update({f"world_{split}": url for split, url in demo.items()})
  for split, spec in config["sources"].items():
    if spec.startswith(("files:", "things:")) and image_sources.input_url(spec):
      urls[f"files_{split}"] = image_sources.input_url(spec)
  if ":" in config["model"]:
    urls["model_checkpoint"] = config["model"].split(":", 1)[1]
  return urls


def _check_config(config: dict[str, Any]) -> None:
  unknown = set(config) - set(default_config())
  if unknown:
    raise ValueError(f"Unknown embed config keys {sorted(unknown)}; known: {sorted(default_config())}.")
  if not config["sources"]:
    raise ValueError("No image sources: pass --source SPEC (e.g. --source 'files:DIR/**/*'). "
                     + image_sources.SPEC_HELP)
  for split in config["sources"]:
    check_split(split)
  embeddings.check_dtype(config["dtype"])
  if config["compute_dtype"] not in COMPUTE_DTYPES:
    raise ValueError(f"embed config compute_dtype must be one of {COMPUTE_DTYPES}, got {config['compute_dtype']!r}.")
  for key in ("batch_size", "rows_per_shard", "images_per_range"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"embed config {key} must be a positive integer, got {config[key]!r}.")


# ---------------------------------------------------------------------------------------------------------------
# Beam shell around the pure parts (alignet_data.teacher.embed_blocks).


class JaxEmbedHandler(inference.ModelHandler):
  """RunInference strategy for a JAX/Flax model from `alignet_data.models` (or any object with the same
  `preprocess`, `embed_fn`, `params`): loaded once per worker process, `embed_fn` jitted, one input shape.

  Elements come pre-batched: a list of one `ImageBlock` of at most batch_size images (`should_skip_batching`).
  """

  def __init__(self, model_spec: str, batch_size: int, load_fn: Callable[[str], Any] | None = None,
               compute_dtype: str = "auto"):
    super().__init__()
    self.model_spec = model_spec
    self.batch_size = batch_size
    self.load_fn = load_fn
    self.compute_dtype = compute_dtype

  def load_model(self) -> embed_blocks.CompiledModel:
    if self.load_fn is not None:
      model = self.load_fn(self.model_spec)
    else:
      from alignet_data import models
      model = models.load_model(self.model_spec)
    return embed_blocks.CompiledModel.compile(model, self.compute_dtype)

  def run_inference(self, batch: Sequence[image_sources.ImageBlock], model: embed_blocks.CompiledModel,
                    inference_args: dict[str, Any] | None = None) -> list[embed_blocks.EmbeddedBlock]:
    out = []
    for block in batch:
      out.append(embed_blocks.embed_block(model, block, self.batch_size))
      beam.metrics.Metrics.counter(NAMESPACE, "images").inc(len(block))
      beam.metrics.Metrics.counter(NAMESPACE, "batches").inc(-(-len(block) // self.batch_size))
    return out

  def should_skip_batching(self) -> bool:
    # Blocks are batches already, and BatchElements emits its last batch in finish_bundle, whose outputs Beam's
    # DaskRunner drops: with BatchElements, every block of a Dask partition's end was lost.
    return True

  def get_num_bytes(self, batch: Sequence[image_sources.ImageBlock]) -> int:
    return sum(sum(np.asarray(im).nbytes for im in b.images) for b in batch)

  def get_metrics_namespace(self) -> str:
    return NAMESPACE


def _read_blocks(task: image_sources.ReadTask, sources: dict[str, image_sources.ImageSource],
                 batch_size: int) -> Iterator[tuple[str, Any]]:
  """A read task -> (FAILED, DecodeFailure) per undecodable record, (BLOCK, ImageBlock of <= batch_size images)."""
  block, failures = sources[task.split].read(task)
  for failure in failures:
    beam.metrics.Metrics.counter(NAMESPACE, "failed").inc()
    yield embed_blocks.FAILED, failure
  for start in range(0, len(block), batch_size):
    yield embed_blocks.BLOCK, block.take(start, start + batch_size)


def _select(item: tuple[str, Any], kind: str, batch: bool = False) -> Iterator[Any]:
  if item[0] == kind:
    yield [item[1]] if batch else item[1]


def _for_finish(value: Any, kind: str) -> tuple[int, tuple[str, Any]]:
  return 0, (kind, value)  # One key: the Finish step sees everything.


class EmbedImages(beam.PTransform):
  """PBegin -> {"shards": (split, shard, rows, dim), "done": (failures, empty shards)}: the whole embed graph
  (module docstring).

  Files are side effects: shards under `shard_dir`, failures in `dead_letter_url`.
  """

  def __init__(self, sources: dict[str, image_sources.ImageSource], handler: JaxEmbedHandler, *, batch_size: int,
               rows_per_shard: int, images_per_range: int, dtype: str, shard_dir: str, dead_letter_url: str,
               staging_dir: str | None = None):
    super().__init__()
    self.sources, self.handler = sources, handler
    self.batch_size, self.rows_per_shard, self.images_per_range = batch_size, rows_per_shard, images_per_range
    self.dtype, self.shard_dir, self.dead_letter_url = dtype, shard_dir, dead_letter_url
    self.staging_dir = staging_dir  # Where file sources stage their path listings (not in the pipeline graph).

  def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
    tasks = [t for split, src in sorted(self.sources.items())
             for t in src.tasks(split, self.images_per_range, self.staging_dir)]
    num_shards = {split: embeddings.num_shards(len(src), self.rows_per_shard) for split, src in self.sources.items()}
    read = (pbegin
            | "Tasks" >> beam.Create(tasks)  # ReadTask
            | "Spread" >> beam.Reshuffle()
            | "ReadBlocks" >> beam.FlatMap(_read_blocks, self.sources, self.batch_size))  # (kind, block | failure)
    shards = (read
              | "Blocks" >> beam.FlatMap(_select, embed_blocks.BLOCK, True)  # [ImageBlock of <= batch_size images]
              | "Embed" >> inference.RunInference(self.handler)  # EmbeddedBlock
              | "ByShard" >> beam.FlatMap(embed_blocks.split_by_shard, self.rows_per_shard)  # ((split, shard), piece)
              | "GroupShards" >> beam.GroupByKey()
              | "WriteShards" >> beam.Map(embed_blocks.write_shard, self.shard_dir, num_shards, self.dtype))
    failed = read | "Failures" >> beam.FlatMap(_select, embed_blocks.FAILED)  # DecodeFailure
    done = ((shards | "ShardsDone" >> beam.Map(_for_finish, embed_blocks.SHARD),
             failed | "FailuresDone" >> beam.Map(_for_finish, embed_blocks.FAILED),
             pbegin | "Start" >> beam.Create([_for_finish(None, embed_blocks.START)]))
            | "Gather" >> beam.Flatten()
            | "GatherOnce" >> beam.GroupByKey()
            | "Finish" >> beam.Map(embed_blocks.finish, self.shard_dir, self.dead_letter_url, num_shards,
                                   self.dtype))  # (failures, empty shards written)
    return {"shards": shards, "done": done}


def _counters(result: Any) -> dict[str, int]:
  """Beam counters of the embed namespace (empty where the runner does not report metrics)."""
  from apache_beam.metrics.metric import MetricsFilter
  try:
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
  except Exception as e:  # Metrics support varies by runner; the report's numbers come from the files anyway.
    logging.warning("Beam metrics unavailable: %s", e)
    return {}
  totals: dict[str, int] = {}
  for c in query["counters"]:
    totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
  return totals


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = (), *,
        load_fn: Callable[[str], Any] | None = None) -> dict[str, Any]:
  """Embed every source into `writer`'s artifact; `load_fn` replaces `models.load_model` (tests)."""
  _check_config(config)
  sources = {split: image_sources.parse(spec, tfds_data_dir=config["tfds_data_dir"])
             for split, spec in sorted(config["sources"].items())}
  for split, src in sources.items():
    if len(src) == 0:
      raise ValueError(f"Source {src.spec!r} (split {split!r}) has no records.")
  handler = JaxEmbedHandler(config["model"], config["batch_size"], load_fn, config["compute_dtype"])
  shard_dir = writer.makedirs(embeddings.SHARD_DIR)
  dead_letter_url = writer.path(DEAD_LETTER)
  staging_dir = writer.makedirs(_STAGING)
  p = beam.Pipeline(options=PipelineOptions(runners.beam_args(beam_args)))
  _ = p | "EmbedImages" >> EmbedImages(
      sources, handler, batch_size=config["batch_size"], rows_per_shard=config["rows_per_shard"],
      images_per_range=config["images_per_range"], dtype=config["dtype"], shard_dir=shard_dir,
      dead_letter_url=dead_letter_url, staging_dir=staging_dir)
  result = p.run()
  try:
    state = result.wait_until_finish()
    if str(state).rsplit(".", 1)[-1] not in ("DONE", "UNKNOWN"):
      raise RuntimeError(f"Embed pipeline ended in state {state}.")
    counters = _counters(result)
  finally:
    runners.release(result)
  if writer.fs.exists(writer.local_path(_STAGING)):  # Staged path listings are not part of the artifact.
    writer.fs.rm(writer.local_path(_STAGING), recursive=True)
  return _finish(config, sources, writer, counters)


def _finish(config: dict[str, Any], sources: dict[str, image_sources.ImageSource], writer: artifacts.ArtifactWriter,
            counters: dict[str, int]) -> dict[str, Any]:
  """Index and report from what was written (authoritative on any runner, metrics or not)."""
  with writer.open(DEAD_LETTER, "rb") as f:
    failures = [json.loads(line) for line in f.read().decode().splitlines()]
  entries, per_split = {}, {}
  for split, src in sorted(sources.items()):
    n = embeddings.num_shards(len(src), config["rows_per_shard"])
    rows, dim = embed_blocks.written_rows(writer, split, n)
    dead = [f for f in failures if f["split"] == split]
    if rows == 0:
      examples = "; ".join(f"{f['file_name']}: {f['reason']}" for f in dead[:3])
      raise InputError(f"No image of split {split!r} ({src.spec}) could be decoded: {len(dead)} of {len(src)} "
                       f"records failed, e.g. {examples or 'none recorded'}.")
    failed = len(dead)
    entries[split] = {**embeddings.index_entry(len(src), config["rows_per_shard"], dim, config["dtype"], rows,
                                               src.spec), **src.metadata()}
    writer.set_rows(f"{embeddings.SHARD_DIR}/{split}", rows)
    per_split[split] = {"images": rows, "failed": failed, "records": len(src), "shards": n}
  embeddings.write_index(writer, entries, model=config["model"])
  writer.set_rows(DEAD_LETTER, len(failures))
  dims = {e["dim"] for e in entries.values() if e["rows"]}
  report = {
      "model": config["model"],
      "dim": max(dims) if dims else 0,
      "images": sum(s["images"] for s in per_split.values()),
      "failed": len(failures),
      "dead_letter": DEAD_LETTER,
      "splits": per_split,
      "counters": counters,
  }
  if failures:
    logging.warning("embed: %d images failed to decode; see %s", len(failures), DEAD_LETTER)
  return report
