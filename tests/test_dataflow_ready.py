"""Dataflow readiness: ImageNet-scale job graphs built with DataflowRunner options (never submitted) stay far
below the service's 10 MB request limit and carry no local path; the worker container matches the pins."""
import pathlib
import re

import pytest

from alignet_data.teacher import image_sources
from pipelines import embed_pipeline, job_graph
from pipelines import triplets_pipeline as tp

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATAFLOW = ["--runner=DataflowRunner", "--project=alignet-test", "--region=us-central1",
            "--temp_location=gs://alignet-test/tmp", "--sdk_container_image=us-docker.pkg.dev/p/r/alignet:1",
            "--sdk_location=container", "--experiments=use_runner_v2"]
IMAGENET_TRAIN = 1_281_167


def test_imagenet_scale_embed_graph_is_small_and_has_no_local_path():
  source = image_sources.TfdsSource("imagenet2012", "train", "5.1.0", "gs://alignet-test/tensorflow_datasets")
  source._cache_len = IMAGENET_TRAIN  # The record count TFDS would report; nothing is opened.
  config = embed_pipeline.default_config() | {
      "model": "so400m/14-384:gs://alignet-test/siglip/so400m14_384.npz", "batch_size": 128, "dtype": "float16",
      "rows_per_shard": 65536, "images_per_range": 2048, "tfds_data_dir": "gs://alignet-test/tensorflow_datasets",
      "sources": {"train": source.spec}}
  pipeline, tasks = job_graph.embed_graph(config, "gs://alignet-test/embed", DATAFLOW, sources={"train": source})
  info = job_graph.describe("embed", pipeline, tasks)
  assert tasks == -(-IMAGENET_TRAIN // 2048) == 626
  print(f"\nembed graph: {info['graph_bytes']:,} bytes, {tasks} read tasks")
  assert info["graph_bytes"] < job_graph.DATAFLOW_REQUEST_LIMIT / 100, info  # Well under: < 1% of 10 MB.
  assert info["local_paths"] == [], info


def test_ten_million_triplets_graph_is_small_and_has_no_local_path():
  config = tp.default_config() | {
      "embeddings": "gs://alignet-test/embed", "transform": "gs://alignet-test/align", "clusters": "gs://alignet-test/c",
      "strategy": "cluster_boundary", "valid_strategies": "class_boundary,within_class,between_class",
      "num": 10_000_000, "num_shards": 100, "num_valid": 10_000, "formats": ["tfrecord", "parquet", "npz"]}
  pipeline, shards = job_graph.triplets_graph(config, "gs://alignet-test/triplets", DATAFLOW, k=500)
  info = job_graph.describe("triplets", pipeline, shards)
  print(f"\ntriplets graph: {info['graph_bytes']:,} bytes, {shards} shards")
  assert shards == 100 + 3
  assert info["graph_bytes"] < job_graph.DATAFLOW_REQUEST_LIMIT / 100, info
  assert info["local_paths"] == [], info


def test_local_paths_are_found_inside_pickled_transforms(tmp_path):
  import apache_beam as beam
  p = beam.Pipeline()
  _ = p | beam.Create([1]) | beam.Map(lambda x, where=str(tmp_path / "staging"): (x, where))
  assert any(path.startswith(str(tmp_path)) for path in job_graph.local_paths(job_graph.serialized(p)))


def test_the_dataflow_container_installs_this_project_at_the_pinned_versions():
  dockerfile = (ROOT / "Dockerfile").read_text()
  pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
  base = re.search(r"^FROM apache/beam_python(\d+)\.(\d+)_sdk:(\S+)$", dockerfile, re.M)
  assert base and base.group(3) == pins["apache-beam"], "the SDK image must be the Beam version workers run"
  assert f">={base.group(1)}.{base.group(2)}" in (ROOT / "setup.py").read_text()  # python_requires agrees
  assert "-c constraints.txt" in dockerfile and 'jax[cuda12]==${JAX_VERSION}' in dockerfile
  readme = (ROOT / "README.md").read_text()
  assert "apache/beam_python3.11_sdk:" + pins["apache-beam"] in readme and "docker build" in readme


@pytest.mark.parametrize("stage", ["embed", "triplets"])
def test_dry_run_prints_the_graph_and_writes_nothing(stage, tmp_path, capsys):
  from pipelines import cli
  if stage == "embed":
    argv = ["embed", "--source", "files:" + str(ROOT / "alignet_data" / "checkpoints" / "*.json"), "--out",
            str(tmp_path / "E")]
  else:
    argv = ["triplets", "--embeddings", str(tmp_path / "no-embed"), "--strategy", "random", "--num", "1000",
            "--out", str(tmp_path / "T")]
  assert cli.main([*argv, "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "job graph" in out and "nothing was run or written" in out
  assert not (tmp_path / ("E" if stage == "embed" else "T")).exists()
