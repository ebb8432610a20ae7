"""Cluster + triplets at ImageNet scale on synthetic embeddings, through the real CLI on DirectRunner.

  python bench/imagenet_scale.py --out B.json                      # 1,281,167 x 1152, c = 500, 10^7 triplets
  python bench/imagenet_scale.py --n 100000 --d 64 --k 50 --num 100000 --out small.json   # the tests' size

Steps, each a child process whose wall time and peak resident memory (``wait4``'s ru_maxrss) are measured:
  setup     synthetic embeddings with planted cluster structure (n x d, `--classes` Gaussian classes, stored as
            an embed artifact) and an affine transform (.npz, as an align artifact stores it)
  verify_inputs  the embed artifact's sha256 against its manifest, as each stage does before use (its
            ``fraction_of_stage``: that time over the cluster and triplets stages' wall time; they include it)
  cluster   `alignet cluster --embeddings E --transform T --k K --max-points-per-centroid 256 --nredo 1`
  triplets  `alignet triplets ... --strategy cluster_boundary --num NUM --format tfrecord,parquet,npz`
The triplets report holds the labelling kernel's own time and the sequential read bandwidth of the same process
(`np.sum` over the embedding matrix); ``labelling_floor_fraction`` = (3 rows x d x 4 bytes per triplet at that
bandwidth) / labelling wall time: 1.0 would label as fast as one core streams the matrix, once per 3 rows. The
kernel runs on `--label-threads` threads (default all CPUs); ``labelling_floor_fraction_cpu`` divides by its CPU
seconds summed over threads instead: the per-core figure (`--label-threads 1` makes the two agree).

Targets (2 cores, 24 GiB): whole run < 15 min, peak < 20 GiB, labelling >= 40% of the floor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"total_seconds": 15 * 60, "peak_rss_gb": 20.0, "labelling_floor_fraction": 0.4}


def make_inputs(out: str, n: int, d: int, classes: int, seed: int, ids_per_shard: int) -> None:
  """The embed artifact (`out`/embed, float32 storage: float16 halves the disk but its Parquet path costs ~2x the
  CPU to write, measured) and the transform (`out`/transform.npz).

  Planted structure: each image is its class centre plus isotropic noise (centre norm ~1, noise norm ~0.5), so
  k-means has real clusters to find. Written shard by shard: memory stays at one shard, not the whole matrix.
  """
  sys.path.insert(0, ROOT)
  from alignet_data import artifacts
  from alignet_data.teacher import embeddings
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((classes, d), dtype=np.float32) / np.float32(np.sqrt(d))
  count = embeddings.num_shards(n, ids_per_shard)

  def write(writer):
    for i in range(count):
      ids = np.arange(i * ids_per_shard, min((i + 1) * ids_per_shard, n), dtype=np.int64)
      shard_rng = np.random.default_rng([seed, i])
      labels = shard_rng.integers(0, classes, len(ids))
      vectors = centers[labels]
      vectors += shard_rng.standard_normal((len(ids), d), dtype=np.float32) * np.float32(0.5 / np.sqrt(d))
      names = [f"n{label:08d}_{j}.JPEG" for label, j in zip(labels.tolist(), ids.tolist(), strict=True)]
      embeddings.write_shard(writer.path(embeddings.shard_name("pool", i, count)), ids, labels, names, vectors, d,
                             "float32")
    writer.set_rows(f"{embeddings.SHARD_DIR}/pool", n)
    entry = embeddings.index_entry(n, ids_per_shard, d, "float32", n, f"synthetic:{n}x{d}")
    embeddings.write_index(writer, {"pool": entry}, model="synthetic")
    return {"rows": n, "dim": d, "classes": classes}

  artifacts.run_stage("embed", os.path.join(out, "embed"), {"n": n, "d": d, "classes": classes, "seed": seed}, {},
                      write, log=lambda s: None)
  w = (np.eye(d) + rng.standard_normal((d, d)) * (0.3 / np.sqrt(d))).astype(np.float32)
  np.savez(os.path.join(out, "transform.npz"), weights=w, bias=np.zeros(d, np.float32), mean=np.float32(0.0),
           std=np.float32(1.0))


def timed(name: str, argv: Sequence[str], log) -> dict[str, Any]:
  """Run a child process; its wall seconds and peak RSS (GiB)."""
  log(f"[bench] {name}: {' '.join(argv)}")
  tic = time.perf_counter()
  proc = subprocess.Popen(list(argv), cwd=ROOT)
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - tic
  code = os.waitstatus_to_exitcode(status)
  if code != 0:
    raise RuntimeError(f"{name} failed with exit status {code}: {' '.join(argv)}")
  result = {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}
  log(f"[bench] {name}: {result}")
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="Where to write the JSON figures.")
  parser.add_argument("--n", type=int, default=1_281_167, help="Images (ImageNet train: 1,281,167).")
  parser.add_argument("--d", type=int, default=1152, help="Embedding dimension (SigLIP so400m: 1152).")
  parser.add_argument("--classes", type=int, default=1000, help="Planted Gaussian classes.")
  parser.add_argument("--k", type=int, default=500, help="k-means clusters (the paper's c = 500).")
  parser.add_argument("--num", type=int, default=10_000_000, help="Cluster-boundary training triplets.")
  parser.add_argument("--num-valid", type=int, default=10_000)
  parser.add_argument("--num-shards", type=int, default=100)
  parser.add_argument("--formats", default="tfrecord,parquet,npz")
  parser.add_argument("--workers", type=int, default=1,
                      help="DirectRunner threads (--direct_num_workers); 1 leaves the cores to the kernel's threads.")
  parser.add_argument("--label-threads", type=int, default=0,
                      help="Labelling kernel threads (0 = all CPUs; 1 = the single-core figure).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--work", help="Working directory (default: a temporary one, removed at the end).")
  parser.add_argument("--keep", action="store_true", help="Keep the working directory.")
  args = parser.parse_args(argv)
  log = lambda s: print(s, file=sys.stderr, flush=True)

  work = args.work or tempfile.mkdtemp(prefix="alignet-bench-")
  os.makedirs(work, exist_ok=True)
  load_before = os.getloadavg()
  start = time.perf_counter()
  stages: dict[str, dict[str, Any]] = {}
  py = sys.executable
  try:
    stages["setup"] = timed("setup", [py, os.path.abspath(__file__), "--setup-only", work, str(args.n), str(args.d),
                                      str(args.classes), str(args.seed)], log)
    emb, transform = os.path.join(work, "embed"), os.path.join(work, "transform.npz")
    # What every stage now pays before reading its inputs: the embed artifact's sha256 against its manifest.
    stages["verify_inputs"] = timed("verify_inputs", [py, "-c", "import sys; from alignet_data import artifacts; "
                                                      "artifacts.load(sys.argv[1]).verify()", emb], log)
    cli = [py, "-m", "pipelines.cli"]
    stages["cluster"] = timed("cluster", cli + [
        "cluster", "--embeddings", emb, "--transform", transform, "--k", str(args.k), "--max-points-per-centroid",
        "256", "--nredo", "1", "--seed", str(args.seed), "--out", os.path.join(work, "cluster")], log)
    beam = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_threading"] if args.workers > 1 \
        else []
    stages["triplets"] = timed("triplets", cli + [
        "triplets", "--embeddings", emb, "--transform", transform, "--clusters", os.path.join(work, "cluster"),
        "--strategy", "cluster_boundary", "--num", str(args.num), "--num-valid", str(args.num_valid),
        "--num-shards", str(args.num_shards), "--seed", str(args.seed), "--format", args.formats,
        "--label-threads", str(args.label_threads), "--out", os.path.join(work, "triplets"), *beam], log)
    with open(os.path.join(work, "cluster", "report.json")) as f:
      cluster_report = json.load(f)
    with open(os.path.join(work, "triplets", "report.json")) as f:
      report = json.load(f)
    out_bytes = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(os.path.join(work, "triplets"))
                    for fn in fns)
  finally:
    if not (args.keep or args.work):
      shutil.rmtree(work, ignore_errors=True)
  timing = report["timing"]
  stages["cluster"].update({"k": cluster_report["k"], "inertia": cluster_report["inertia"],
                            "cluster_size_min": cluster_report["cluster_size_min"],
                            "cluster_size_max": cluster_report["cluster_size_max"]})
  stages["triplets"].update({
      "triplets": report["triplets_total"], "labelling_floor_fraction": timing["labelling_floor_fraction"],
      "labelling_floor_fraction_cpu": timing["labelling_floor_fraction_cpu"], "label_threads": timing["label_threads"],
      "label_seconds": timing["label_seconds"], "labelling_floor_seconds": timing["labelling_floor_seconds"],
      "read_bandwidth_gbps": timing["read_bandwidth_gbps"],
      "triplets_per_second_labelling": round(report["triplets_total"] / max(timing["label_seconds"], 1e-9)),
      "timing": timing, "output_gb": round(out_bytes / 2**30, 3), "entropy_mean": report["entropy"]["mean"],
      "odd_one_out_changed": report["odd_one_out_changed"], "boundary_odd_kept": report["boundary_odd_kept"]})
  verify = stages["verify_inputs"]["seconds"]
  stages["verify_inputs"]["fraction_of_stage"] = {s: round(verify / stages[s]["seconds"], 4)
                                                  for s in ("cluster", "triplets")}
  total = time.perf_counter() - start
  peak = max(s["peak_rss_gb"] for s in stages.values())
  result = {
      "config": vars(args) | {"transform": "synthetic near-identity affine", "storage_dtype": "float32",
                              "runner": "DirectRunner"},
      "machine": {"cpus": os.cpu_count(), "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") *
                                                                 os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
      "stages": stages,
      "total_seconds": round(total, 1),
      "peak_rss_gb": peak,
      "labelling_floor_fraction": timing["labelling_floor_fraction"],
      "targets": TARGETS,
      "targets_met": {"total_seconds": total < TARGETS["total_seconds"], "peak_rss_gb": peak < TARGETS["peak_rss_gb"],
                      "labelling_floor_fraction":
                          timing["labelling_floor_fraction"] >= TARGETS["labelling_floor_fraction"]},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  log(json.dumps({k: result[k] for k in ("total_seconds", "peak_rss_gb", "labelling_floor_fraction",
                                         "targets_met")}))
  return result


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--setup-only":
    out_dir, n, d, classes, seed = sys.argv[2:7]
    make_inputs(out_dir, int(n), int(d), int(classes), int(seed), ids_per_shard=1 << 17)
  else:
    main()
