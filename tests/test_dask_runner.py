"""Beam's DaskRunner on a dask.distributed cluster (a scheduler and two worker processes on 127.0.0.1, free ports):
`embed` (with dead-lettered images) and `triplets` write the bytes DirectRunner writes, and a worker process, which
outlives a pipeline, reads an input again when it is rewritten at the same URL."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_world
from PIL import Image

from alignet_data import artifacts
from pipelines import cli, cluster_stage, embed_pipeline, runners
from pipelines import triplets_pipeline as tp

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed: pip install -e '.[dask]'")

_START_TIMEOUT = 120  # Seconds for the scheduler to write its address and both workers to register.


def _quiet(_):
  pass


def _start(args, log):
  """A process of our own, in its own process group (so that what it spawns is stopped with it)."""
  with open(log, "wb") as out:
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(procs):
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait(timeout=30)
    try:  # A worker's nanny started the worker process: stop whatever is left of this process's group.
      os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """The scheduler's address; the scheduler binds a free port (0) and writes it to its scheduler file."""
  root = tmp_path_factory.mktemp("dask")
  dask = os.path.join(os.path.dirname(sys.executable), "dask")
  scheduler_file = root / "scheduler.json"
  procs = []
  try:
    procs.append(_start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                         "127.0.0.1:0", "--scheduler-file", str(scheduler_file)], root / "scheduler.log"))
    deadline = time.monotonic() + _START_TIMEOUT
    while not scheduler_file.exists() and time.monotonic() < deadline and procs[0].poll() is None:
      time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    # Started as the README starts them: the nanny pins BLAS to one thread, unlike this (the driver's) process.
    for i in range(2):
      procs.append(_start([dask, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                           "--no-dashboard", "--death-timeout", "60", "--local-directory", str(root / f"worker{i}")],
                          root / f"worker{i}.log"))
    with distributed.Client(address, timeout=30) as client:
      client.wait_for_workers(2, timeout=max(1, deadline - time.monotonic()))
    yield address
  finally:
    _stop(procs)


def _png(seed, size):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _hashes(art):
  return {name: f["sha256"] for name, f in art.files.items() if name != "report.json"}


def _embed(config, out, beam_args=(), force=False):
  return artifacts.run_stage("embed", str(out), config, embed_pipeline.input_urls(config),
                             lambda w: embed_pipeline.run(config, w, beam_args), force=force, log=_quiet)


def _triplets(config, out, beam_args=()):
  return artifacts.run_stage("triplets", str(out), config, tp.input_urls(config),
                             lambda w: tp.run(config, w, beam_args), log=_quiet)


def test_runner_shorthand_names_beams_dask_runner_and_its_options_pass():
  for flags in (["--runner=dask"], ["--runner=DaskRunner"], ["--runner", "dask"]):
    args = runners.beam_args([*flags, "--dask_client_address=tcp://127.0.0.1:1"])
    assert runners.runner(args) == runners.DASK_RUNNER == "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert "--dask_partition_size=1" in args  # One Create element (a read task, a shard) per Dask partition.
    cli.check_beam_flags([*flags, "--dask_client_address=tcp://127.0.0.1:1", "--dask_connection_timeout=5"])
  assert "--dask_partition_size=1" not in runners.beam_args(["--runner=dask", "--dask_npartitions=4"])
  assert runners.beam_args(["--direct_num_workers=2"]) == ["--direct_num_workers=2"]
  with pytest.raises(ValueError, match="--dask_clientaddress"):
    cli.check_beam_flags(["--runner=dask", "--dask_clientaddress=tcp://127.0.0.1:1"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_embed_and_triplets_on_a_dask_cluster_write_the_bytes_of_direct_runner(cluster, tmp_path):
  on_dask = ["--runner=dask", f"--dask_client_address={cluster}", "--dask_connection_timeout=60"]
  world = tiny_world(tmp_path, 250)  # 3000 pool images: a transform of them is large enough for threaded BLAS.
  folder = tmp_path / "imgs"
  files = {f"c{i % 3}/{i:02d}.png": _png(i, (10 + i % 4, 12)) for i in range(12)}
  bad = {f"a/{i:02d}.png": [b"", b"text\n", _png(i, (16, 16))[:40]][i % 3] for i in range(64)}
  files |= bad  # Dead letters, the first 64 ids: train shard 0 gets no image (written empty by the last step).
  for name, data in files.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
  config = {**embed_pipeline.default_config(), "model": "demo-teacher", "batch_size": 32, "rows_per_shard": 64,
            "images_per_range": 256, "sources": {"pool": f"demo:{world}:pool", "train": f"files:{folder}/**/*.png"}}
  direct = _embed(config, tmp_path / "embed")
  dask = _embed(config, tmp_path / "embed_dask", on_dask)
  assert (dask.report["images"], dask.report["failed"]) == (direct.report["images"], len(bad))
  assert _hashes(dask) == _hashes(direct) and "embeddings/train-00000-of-00002.parquet" in _hashes(dask)
  with dask.open("dead_letter.jsonl") as f:
    assert [json.loads(line)["file_name"] for line in f] == sorted(bad)

  d = direct.report["dim"]
  weights = np.random.default_rng(0).normal(size=(d, d)).astype(np.float32) / np.sqrt(d)  # Dense: rounding shows.
  np.savez(tmp_path / "transform.npz", weights=weights, bias=np.zeros(d, np.float32), mean=np.float32(0),
           std=np.float32(1))
  cconf = cluster_stage.default_config() | {"embeddings": direct.url, "k": 4, "plot": False}
  clusters = artifacts.run_stage("cluster", str(tmp_path / "cluster"), cconf, cluster_stage.input_urls(cconf),
                                 lambda w: cluster_stage.run(cconf, w), log=_quiet)
  tconfig = tp.default_config() | {
      "embeddings": direct.url, "transform": str(tmp_path / "transform.npz"), "clusters": clusters.url,
      "strategy": "cluster_boundary:1,random:1", "valid_strategies": ["class_boundary"], "num": 900,
      "num_valid": 90, "num_shards": 3, "block_size": 128, "formats": ["parquet", "tfrecord", "npz"]}
  first = _triplets(tconfig, tmp_path / "triplets_dask", on_dask)
  assert _hashes(first) == _hashes(_triplets(tconfig, tmp_path / "triplets"))

  # The workers still hold the inputs they loaded; the embeddings are rewritten at the same URL (other bytes).
  _embed({**config, "dtype": "float16"}, direct.url, force=True)
  again = _triplets(tconfig, tmp_path / "triplets_dask_again", on_dask)
  assert _hashes(again) == _hashes(_triplets(tconfig, tmp_path / "triplets_again"))
  assert _hashes(again) != _hashes(first)
