"""The Beam stages' job graphs without running them: `alignet embed|triplets ... --dry-run`, and Dataflow readiness.

A Dataflow job is submitted as the pipeline's runner API proto, and the service refuses requests over 10 MB; a
graph that carries per-image data (a path list, a big side input) or a local path (a staging folder on the
launcher, a file the workers cannot see) fails only at submission, after the launcher has done its work. Here the
graph is built exactly as the stage builds it, serialised, measured, and searched for local paths, inside the
pickled transforms too.
"""
from __future__ import annotations

import base64
import binascii
import bz2
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

DATAFLOW_REQUEST_LIMIT = 10 * 1024 * 1024  # Bytes: the Dataflow service's limit on a job creation request.


def _pipeline(beam_args: Sequence[str]) -> Any:
  """A Pipeline with the user's options whose runner only holds the graph: Beam validates a service runner's
  options against GCS (temp bucket, soft-delete policy) as the Pipeline is made, which hangs offline and is not
  part of the graph; the pickler is the one the named runner would use."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from apache_beam.runners.runner import PipelineRunner, create_runner

  from pipelines import runners

  options = PipelineOptions(runners.beam_args(beam_args))  # As the stages read them: --runner=dask spelt out.
  name = options.view_as(StandardOptions).runner or "DirectRunner"
  pickler = "cloudpickle" if name.rsplit(".", 1)[-1] in ("DataflowRunner", "TestDataflowRunner") else \
      create_runner(name).default_pickle_library_override()

  class GraphOnly(PipelineRunner):
    def default_pickle_library_override(self) -> str | None:
      return pickler

    def run_pipeline(self, pipeline: Any, options: Any) -> Any:
      raise RuntimeError("a dry-run graph is never run")

  return beam.Pipeline(runner=GraphOnly(), options=options)


def embed_graph(config: dict[str, Any], out_url: str, beam_args: Sequence[str] = (),
                sources: dict[str, Any] | None = None) -> tuple[Any, int]:
  """(pipeline, read tasks) of the embed stage for `config`, writing under `out_url`; not run. `sources` (split ->
  ImageSource) replaces parsing config["sources"] (tests)."""
  from alignet_data import artifacts
  from alignet_data.teacher import embeddings, image_sources
  from pipelines import embed_pipeline
  if sources is None:
    sources = {split: image_sources.parse(spec, tfds_data_dir=config["tfds_data_dir"])
               for split, spec in sorted(config["sources"].items())}
  handler = embed_pipeline.JaxEmbedHandler(config["model"], config["batch_size"], None, config["compute_dtype"])
  p = _pipeline(beam_args)
  _ = p | "EmbedImages" >> embed_pipeline.EmbedImages(
      sources, handler, batch_size=config["batch_size"], rows_per_shard=config["rows_per_shard"],
      images_per_range=config["images_per_range"], dtype=config["dtype"],
      shard_dir=artifacts.join(out_url, embeddings.SHARD_DIR),
      dead_letter_url=artifacts.join(out_url, embed_pipeline.DEAD_LETTER))
  tasks = sum(-(-len(src) // config["images_per_range"]) for src in sources.values())
  return p, tasks


def triplets_graph(config: dict[str, Any], out_url: str, beam_args: Sequence[str] = (),
                   k: int | None = None) -> tuple[Any, int]:
  """(pipeline, shards) of the triplets stage for `config`, writing under `out_url`; not run. `k` is the number
  of clusters (read from config["clusters"] when not given)."""
  from alignet_data.dataset import triplet_plan
  from pipelines import triplets_pipeline
  if k is None and config.get("clusters"):
    from alignet_data.dataset import clustering
    k = int(clustering.load(config["clusters"]).k)
  plan = triplet_plan.splits(config, k)
  p = _pipeline(beam_args)
  _ = p | "Triplets" >> triplets_pipeline.SampleTriplets(config, out_url, plan)
  return p, len(triplet_plan.shard_specs(plan))


def serialized(pipeline: Any) -> bytes:
  """The pipeline's runner API proto, as the runner submits it."""
  return pipeline.to_runner_api().SerializeToString()


def payloads(proto_bytes: bytes) -> Iterable[bytes]:
  """The proto, each transform's payload and each pickled DoFn decoded (base64, then bz2 or zlib as Beam's
  pickler compresses it): what a search for strings must look through."""
  from apache_beam.portability import common_urns
  from apache_beam.portability.api import beam_runner_api_pb2
  yield proto_bytes
  proto = beam_runner_api_pb2.Pipeline.FromString(proto_bytes)
  for t in proto.components.transforms.values():
    blobs = [t.spec.payload]
    if t.spec.urn == common_urns.primitives.PAR_DO.urn:
      blobs.append(beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).do_fn.payload)
    for blob in blobs:
      yield blob
      yield _decoded(blob)


def _decoded(blob: bytes) -> bytes:
  try:
    raw = base64.b64decode(blob, validate=True)
  except (binascii.Error, ValueError):
    return b""
  for decompress in (bz2.decompress, zlib.decompress):
    try:
      return decompress(raw)
    except (OSError, ValueError, zlib.error):
      continue
  return raw


def local_roots() -> list[str]:
  """Where this launcher's own files live: paths that mean nothing on a remote worker."""
  roots = {os.getcwd(), tempfile.gettempdir(), os.path.expanduser("~"),
           os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  return sorted(r for r in roots if r and r != "/")


def local_paths(proto_bytes: bytes, roots: Sequence[str] | None = None) -> list[str]:
  """Local paths (under `roots`, default `local_roots()`) that the graph carries, in its proto or its pickles.

  Source file names of code pickled by value (`co_filename`, kept for tracebacks; workers import their own copy)
  are not data a worker reads, so `.py` paths are left out.
  """
  found = set()
  for blob in payloads(proto_bytes):
    for root in roots if roots is not None else local_roots():
      for m in re.finditer(re.escape(root.encode()) + rb"[A-Za-z0-9_./+@=,-]*", blob):
        path = m.group().decode("utf-8", "replace")
        if not path.endswith(".py"):
          found.add(path)
  return sorted(found)


def describe(stage: str, pipeline: Any, work_items: int) -> dict[str, Any]:
  """Size of the graph, its share of Dataflow's request limit, work items and local paths."""
  from apache_beam.portability.api import beam_runner_api_pb2
  data = serialized(pipeline)
  transforms = len(beam_runner_api_pb2.Pipeline.FromString(data).components.transforms)
  return {"stage": stage, "graph_bytes": len(data),
          "dataflow_limit_fraction": round(len(data) / DATAFLOW_REQUEST_LIMIT, 5), "transforms": transforms,
          "work_items": work_items, "local_paths": local_paths(data)}


def dry_run(stage: str, config: dict[str, Any], out_url: str, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """`--dry-run`: build the stage's graph with the given Beam options, print its size and work items; nothing is
  read beyond the inputs' headers, nothing is written."""
  if stage == "embed":
    pipeline, items = embed_graph(config, out_url, beam_args)
    what = "read tasks"
  elif stage == "triplets":
    pipeline, items = triplets_graph(config, out_url, beam_args)
    what = "shards"
  else:
    raise ValueError(f"--dry-run applies to the Beam stages (embed, triplets), not {stage!r}.")
  info = describe(stage, pipeline, items)
  info["local_urls"] = local_urls(stage, config, out_url)
  print(f"{stage}: job graph {info['graph_bytes']:,} bytes ({100 * info['dataflow_limit_fraction']:.3f}% of "
        f"Dataflow's 10 MB request limit), {info['transforms']} transforms, {items:,} {what}; nothing was run or "
        "written")
  if info["local_paths"]:
    print(f"{stage}: the graph names local paths a remote worker cannot read: {info['local_paths'][:5]}")
  if info["local_urls"]:
    print(f"{stage}: inputs/outputs on this machine's disk (fine locally; a remote runner such as Dataflow needs "
          f"gs:// URLs): {info['local_urls']}")
  return info


def local_urls(stage: str, config: dict[str, Any], out_url: str) -> list[str]:
  """The stage's input and output locations that are paths on this machine rather than remote URLs."""
  from alignet_data.teacher import image_sources
  if stage == "embed":
    urls = [out_url, config.get("tfds_data_dir") or ""] + [
        image_sources.input_url(spec) or "" for spec in (config.get("sources") or {}).values()]
    model = str(config.get("model") or "")
    urls.append(model.split(":", 1)[1] if ":" in model else "")
  else:
    urls = [out_url] + [str(config.get(k) or "") for k in ("embeddings", "transform", "clusters")]
  return sorted({u for u in urls if u and ("://" not in u or u.startswith("file://"))})
