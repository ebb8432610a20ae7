"""Cluster + triplets at ImageNet scale on synthetic embeddings: the README's two commands, with their defaults,
each timed against its own floor measured in the same run on the same machine.

  python bench/imagenet_scale.py --out B.json                      # 1,281,167 x 1152, c = 500, 10^7 triplets
  python bench/imagenet_scale.py --n 100000 --d 64 --k 50 --num 100000 --out small.json   # the tests' size

Steps, each a child process whose wall time, CPU time and peak resident memory (``wait4``) are measured:
  setup     synthetic embeddings with planted cluster structure (n x d, `--classes` Gaussian classes, stored as
            an embed artifact) and an affine transform (.npz, as an align artifact stores it); not a stage
  cluster   `alignet cluster --embeddings E --transform T --k K --out C`   (the README's command, no other flag)
  triplets  `alignet triplets --embeddings E --transform T --clusters C --strategy cluster_boundary --num NUM
             --valid-strategies class_boundary,within_class,between_class --num-valid V --num-shards S
             --format tfrecord,parquet,npz --out X`                       (the README's command)

Floors (`floors` in the JSON), from rates measured in a child process before the cluster step and again after
the triplets step (steps `rates` and `rates_after`; `rates.measured` holds both); each rate is the faster of the
two, since this VM's rates drift within minutes:
  cluster   the FLOPs of the k-means iterations (niter x 2 x sample x k x d; sample = 256 k points, the stage's
            default) and of the full assignment (2 x n x k x d), at the sgemm rate of numpy's BLAS on the same
            shapes (65,536-row blocks x d @ d x k) with every core
  triplets  reading the embed artifact (its bytes at the sequential read rate of those very files), labelling
            (3 rows x d x 4 bytes per triplet at the memory bandwidth of all the cores the kernel uses, measured
            with that thread count) and writing the output bytes (at a measured sequential write rate)
``floor_fraction`` = floor / wall time, also under ``floor_fraction_<T>threads`` (T: the cores the floors
assume). The triplets floor leaves out transforming every row (2 n d^2 FLOPs: 3.4 TFLOP at ImageNet scale, 17 s
at 200 GFLOP/s), which labelling needs: ``floors.triplets.not_in_floor`` gives it at the same sgemm rate, and
``floor_fraction_with_transform`` counts it in. ``total_seconds`` is cluster + triplets wall time, the README
commands' own time.

Targets (2 cores): total < 90 s, peak RSS < 8 GiB, every stage >= 50% of its floor.

Disk: about 13 GiB free under the working folder at full size (`disk_needed`), checked before the first step.
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
TARGETS = {"total_seconds": 90.0, "peak_rss_gb": 8.0, "floor_fraction": 0.5}
SAMPLE_PER_CENTROID = 256  # The cluster stage's default --max-points-per-centroid.
NITER = 20                 # Its default --niter.
VALID_STRATEGIES = "class_boundary,within_class,between_class"


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
  """Run a child process; its command, wall seconds, CPU seconds (user + system) and peak RSS (GiB)."""
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
  result["command"] = [os.path.basename(a) if i == 0 else a for i, a in enumerate(argv)]
  return result


def sgemm_rate(rows: int, d: int, cols: int, repeats: int = 3) -> float:
  """FLOP/s of numpy's BLAS on (rows x d) @ (d x cols) float32, every core (the best of a few)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((rows, d), dtype=np.float32)
  b = rng.standard_normal((d, cols), dtype=np.float32)
  a @ b  # Warm-up: threads started, pages touched.
  best = np.inf
  for _ in range(repeats):
    tic = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - tic)
  return 2.0 * rows * d * cols / best


def read_rate(paths: Sequence[str]) -> float:
  """Bytes/s reading these files sequentially in 64 MiB chunks (the second pass: as warm as the stages find them)."""
  total, best = sum(os.path.getsize(p) for p in paths), np.inf
  buf = bytearray(64 << 20)
  for _ in range(2):
    tic = time.perf_counter()
    for p in paths:
      with open(p, "rb", buffering=0) as f:
        while f.readinto(buf):
          pass
    best = min(best, time.perf_counter() - tic)
  return total / best


def write_rate(folder: str, nbytes: int) -> float:
  """Bytes/s writing `nbytes` (whole 16 MiB chunks, at least one) to a new file in `folder`, then closed, not
  fsynced (as the stages write). The file is removed even when the write fails. On our VM the probe right after
  the setup's 5.9 GB wrote at 0.28-0.32 GB/s and the one after the stages at 0.82-1.09 GB/s, with or without an
  `os.sync()` first: the floor takes the faster."""
  chunk = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes()
  chunks = max(nbytes // len(chunk), 1)
  fd, path = tempfile.mkstemp(prefix=".write-rate-", suffix=".bin", dir=folder)  # A new name: never a user's file.
  try:
    tic = time.perf_counter()
    with os.fdopen(fd, "wb") as f:
      for _ in range(chunks):
        f.write(chunk)
    seconds = time.perf_counter() - tic
  finally:
    os.remove(path)
  return chunks * len(chunk) / seconds


def write_probe_bytes(n: int, d: int) -> int:
  """How much the write-rate probe writes: the embedding matrix's size, clamped to 64 MiB-1 GiB (1 GiB at full
  size; small runs, like the tests', write little)."""
  return int(min(max(n * d * 4, 64 << 20), 1 << 30))


def disk_needed(n: int, d: int, num: int, num_valid: int) -> int:
  """Bytes the run writes under its working folder, with margin: the embed artifact (float32), the cluster
  artifact, the triplets' three formats (445 B a triplet, rounded up from the full-size run's 443: 4.14 GiB
  for 10^7 + 3 x 10^4) with the stage's npz parts (36 B a triplet) beside them, and the write-rate probe."""
  triplets = num + 3 * num_valid
  return int(1.2 * (n * d * 4 + n * 16 + triplets * (445 + 36)) + write_probe_bytes(n, d))


def check_disk(folder: str, needed: int) -> None:
  """Fail before the first step, saying how much is missing, rather than with ENOSPC in the middle of a stage."""
  free = shutil.disk_usage(folder).free
  if free < needed:
    raise SystemExit(f"bench needs about {needed / 2**30:.2f} GiB free under {folder}; {free / 2**30:.2f} GiB is "
                     "free. Free some space or pass --work on a larger disk.")


def memory_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
  """Bytes/s streaming a matrix larger than any cache with `threads` threads (the labelling kernel's count)."""
  sys.path.insert(0, ROOT)
  from alignet_data.dataset import triplet_blocks
  x = np.ones(nbytes // 4, np.float32)
  return triplet_blocks.read_bandwidth(x, threads)[0]


def measure_rates(work: str, n: int, d: int, k: int) -> dict[str, float]:
  """The rates the floors assume, measured on this machine now (the `rates` and `rates_after` steps)."""
  return {"sgemm_flops": sgemm_rate(min(n, 1 << 16), d, k),
          "read_bytes_per_s": read_rate(files_under(os.path.join(work, "embed"))),
          "write_bytes_per_s": write_rate(work, write_probe_bytes(n, d)),
          "memory_bytes_per_s": memory_bandwidth(len(os.sched_getaffinity(0)))}


def measure_rates_in_child(name: str, work: str, args: argparse.Namespace, stages: dict[str, dict[str, Any]],
                           log) -> dict[str, float]:
  """`measure_rates` in a child process (a fork of this one would count its memory in the stages' peak RSS),
  timed as step `name`."""
  path = os.path.join(work, f"{name}.json")
  stages[name] = timed(name, [sys.executable, os.path.abspath(__file__), "--rates-only", work, str(args.n),
                              str(args.d), str(args.k), path], log)
  with open(path) as f:
    rates = json.load(f)
  log(f"[bench] {name}: {rates}")
  return rates


def files_under(folder: str) -> list[str]:
  return sorted(os.path.join(dp, fn) for dp, _, fns in os.walk(folder) for fn in fns)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="Where to write the JSON figures.")
  parser.add_argument("--n", type=int, default=1_281_167, help="Images (ImageNet train: 1,281,167).")
  parser.add_argument("--d", type=int, default=1152, help="Embedding dimension (SigLIP so400m: 1152).")
  parser.add_argument("--classes", type=int, default=1000, help="Planted Gaussian classes (the class labels).")
  parser.add_argument("--k", type=int, default=500, help="k-means clusters (the paper's c = 500).")
  parser.add_argument("--num", type=int, default=10_000_000, help="Cluster-boundary training triplets.")
  parser.add_argument("--num-valid", type=int, default=10_000, help="Triplets per validation set (3 sets).")
  parser.add_argument("--num-shards", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic inputs (the stages keep theirs).")
  parser.add_argument("--work", help="Working directory (default: a temporary one, removed at the end).")
  parser.add_argument("--keep", action="store_true", help="Keep the working directory.")
  args = parser.parse_args(argv)
  log = lambda s: print(s, file=sys.stderr, flush=True)

  work = args.work or tempfile.mkdtemp(prefix="alignet-bench-")
  os.makedirs(work, exist_ok=True)
  try:
    check_disk(work, disk_needed(args.n, args.d, args.num, args.num_valid))
  except SystemExit:
    if not args.work:
      shutil.rmtree(work, ignore_errors=True)
    raise
  load_before = os.getloadavg()
  start = time.perf_counter()
  stages: dict[str, dict[str, Any]] = {}
  py = sys.executable
  threads = len(os.sched_getaffinity(0))  # The cores the floors assume (the rates step measures with all of them).
  emb, transform = os.path.join(work, "embed"), os.path.join(work, "transform.npz")
  cluster_dir, triplets_dir = os.path.join(work, "cluster"), os.path.join(work, "triplets")
  try:
    stages["setup"] = timed("setup", [py, os.path.abspath(__file__), "--setup-only", work, str(args.n), str(args.d),
                                      str(args.classes), str(args.seed)], log)
    measured = {"before": measure_rates_in_child("rates", work, args, stages, log)}
    cli = [py, "-m", "pipelines.cli"]
    stages["cluster"] = timed("cluster", cli + [
        "cluster", "--embeddings", emb, "--transform", transform, "--k", str(args.k), "--out", cluster_dir], log)
    stages["triplets"] = timed("triplets", cli + [
        "triplets", "--embeddings", emb, "--transform", transform, "--clusters", cluster_dir,
        "--strategy", "cluster_boundary", "--num", str(args.num), "--valid-strategies", VALID_STRATEGIES,
        "--num-valid", str(args.num_valid), "--num-shards", str(args.num_shards),
        "--format", "tfrecord,parquet,npz", "--out", triplets_dir], log)
    measured["after"] = measure_rates_in_child("rates_after", work, args, stages, log)
    # This VM's rates drift within minutes (sgemm 97-205 GFLOP/s in one session): each floor uses the faster of the
    # two measurements around the stages, so a slow moment at measuring time cannot make a floor look easy.
    rates = {r: max(m[r] for m in measured.values()) for r in measured["before"]}
    log(f"[bench] rates used: {rates}")
    with open(os.path.join(cluster_dir, "report.json")) as f:
      cluster_report = json.load(f)
    with open(os.path.join(triplets_dir, "report.json")) as f:
      report = json.load(f)
    emb_bytes = sum(os.path.getsize(p) for p in files_under(emb))
    out_bytes = sum(os.path.getsize(p) for p in files_under(triplets_dir))
  finally:
    if not (args.keep or args.work):
      shutil.rmtree(work, ignore_errors=True)

  n, d, k = args.n, args.d, cluster_report["k"]
  sample = min(n, SAMPLE_PER_CENTROID * k)
  flops = {"kmeans_iterations": NITER * 2.0 * sample * k * d, "assignment": 2.0 * n * k * d}
  floors = {"cluster": {"seconds": sum(flops.values()) / rates["sgemm_flops"], "flops": flops}}
  triplets_total = report["triplets_total"]
  parts = {"read_embeddings": emb_bytes / rates["read_bytes_per_s"],
           "labelling": triplets_total * 3 * d * 4 / rates["memory_bytes_per_s"],
           "write_output": out_bytes / rates["write_bytes_per_s"]}
  # Labelling needs every row transformed (x W + b, d x d): work the stage must do that the floor above leaves
  # out, reported beside it (not in `floor_fraction`) at the same sgemm rate.
  transform_flops = 2.0 * n * d * d
  floors["triplets"] = {"seconds": sum(parts.values()), "parts_seconds": {p: round(v, 3) for p, v in parts.items()},
                        "bytes": {"read": emb_bytes, "labelling": triplets_total * 3 * d * 4, "write": out_bytes},
                        "not_in_floor": {"transform_flops": transform_flops,
                                         "transform_seconds": round(transform_flops / rates["sgemm_flops"], 3)}}
  for name in ("cluster", "triplets"):
    floor = floors[name]["seconds"]
    fraction = round(floor / stages[name]["seconds"], 4)
    stages[name].update({"floor_seconds": round(floor, 3), "floor_fraction": fraction,
                         f"floor_fraction_{threads}threads": fraction})
  stages["triplets"]["floor_fraction_with_transform"] = round(
      (floors["triplets"]["seconds"] + transform_flops / rates["sgemm_flops"]) / stages["triplets"]["seconds"], 4)
  timing = report["timing"]
  stages["cluster"].update({"k": k, "inertia": cluster_report["inertia"], "train_points": sample,
                            "cluster_size_min": cluster_report["cluster_size_min"],
                            "cluster_size_max": cluster_report["cluster_size_max"]})
  stages["triplets"].update({
      "triplets": triplets_total, "output_gb": round(out_bytes / 2**30, 3), "timing": timing,
      "entropy_mean": report["entropy"]["mean"], "odd_one_out_changed": report["odd_one_out_changed"],
      "boundary_odd_kept": report["boundary_odd_kept"]})
  total = stages["cluster"]["seconds"] + stages["triplets"]["seconds"]
  peak = max(stages[s]["peak_rss_gb"] for s in ("cluster", "triplets"))
  result = {
      "config": vars(args) | {"transform": "synthetic near-identity affine", "storage_dtype": "float32",
                              "runner": "DirectRunner", "cluster_flags": "--k only (README defaults)"},
      "machine": {"cpus": os.cpu_count(), "threads": threads,
                  "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
      "rates": {"sgemm_gflops": round(rates["sgemm_flops"] / 1e9, 1),
                "read_gbps": round(rates["read_bytes_per_s"] / 1e9, 3),
                "write_gbps": round(rates["write_bytes_per_s"] / 1e9, 3),
                f"memory_gbps_{threads}threads": round(rates["memory_bytes_per_s"] / 1e9, 3),
                "seconds": stages["rates"]["seconds"] + stages["rates_after"]["seconds"],
                "measured": measured},
      "floors": floors,
      "stages": stages,
      "total_seconds": round(total, 1),
      "run_seconds": round(time.perf_counter() - start, 1),
      "peak_rss_gb": peak,
      "targets": TARGETS,
      "targets_met": {"total_seconds": total < TARGETS["total_seconds"], "peak_rss_gb": peak < TARGETS["peak_rss_gb"],
                      **{f"{s}_floor_fraction": stages[s]["floor_fraction"] >= TARGETS["floor_fraction"]
                         for s in ("cluster", "triplets")}},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  log(json.dumps({"total_seconds": result["total_seconds"], "peak_rss_gb": peak,
                  **{s: {k: stages[s][k] for k in ("seconds", "floor_seconds", "floor_fraction")}
                     for s in ("cluster", "triplets")}, "targets_met": result["targets_met"]}))
  print(f"wrote {args.out}", flush=True)
  return result


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--setup-only":
    out_dir, n, d, classes, seed = sys.argv[2:7]
    make_inputs(out_dir, int(n), int(d), int(classes), int(seed), ids_per_shard=1 << 17)
  elif len(sys.argv) > 1 and sys.argv[1] == "--rates-only":
    work_dir, n, d, k, path = sys.argv[2:7]
    with open(path, "w") as f:
      json.dump(measure_rates(work_dir, int(n), int(d), int(k)), f)
  else:
    main()
