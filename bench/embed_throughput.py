"""Images/s of the embed pipeline (Beam, DirectRunner) vs the same model in a plain Python loop: the Beam overhead.

    .venv/bin/python bench/embed_throughput.py --model demo-teacher --images 4096 --batch-size 64
    .venv/bin/python bench/embed_throughput.py --files   # also: PNG files on disk through the files: source
    .venv/bin/python bench/embed_throughput.py --model so400m/14-384 --random-weights --images 2048 --batch-size 64

Both paths embed the same images in the same fixed-size batches with the same jitted `embed_fn`:
- loop: preprocess + `embed_fn` per batch, in-process; timed after one warm-up call (steady state), and also
  including model load + compile (what a one-shot job pays).
- beam: `EmbedImages` (read tasks -> RunInference -> Parquet shards + dead letter) on DirectRunner, wall time of
  the whole pipeline run including the per-worker model load and compile.
Overhead ratio = loop images/s / beam images/s (1.0 = Beam costs nothing). The `array` source makes seeded
random uint8 images at the model's resolution in the read step (no decode, no file I/O), so the ratio measures
Beam's overhead, not JPEG decoding; `--files` adds a run over PNG files (decode + resize on the worker).
Model FLOP utilisation: FLOPs per image from the jitted computation's cost analysis, over the device's dense peak
for the parameters' dtype, looked up from its `device_kind` (bench/device_peaks.py; `--peak-tflops` overrides it;
none on a CPU). One JSON line per result.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # device_peaks

from alignet_data import artifacts, models  # noqa: E402
from alignet_data.models import batching  # noqa: E402
from alignet_data.teacher import image_sources  # noqa: E402
from pipelines import embed_pipeline  # noqa: E402


class ArraySource(image_sources.ImageSource):
  """`n` seeded random uint8 images of one size, made in the read step (each range from its own seed)."""
  split = "bench"

  def __init__(self, n: int, size: int):
    self.n, self.size, self.spec = n, size, f"array:{n}x{size}"

  def __len__(self) -> int:
    return self.n

  def images(self, start: int, stop: int) -> np.ndarray:
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, (stop - start, self.size, self.size, 3), dtype=np.uint8)

  def read(self, task: image_sources.ReadTask) -> tuple[image_sources.ImageBlock, list]:
    ids = np.arange(task.start, task.stop, dtype=np.int64)
    return image_sources.ImageBlock(task.split, ids, np.zeros(len(ids), np.int64), np.array([str(i) for i in ids]),
                                    self.images(task.start, task.stop)), []


_RANDOM: dict[str, Any] = {}


def _random_model(spec: str) -> models.LoadedModel:
  """A model of config `spec` with random weights (for big configs without a checkpoint at hand); cached."""
  if spec not in _RANDOM:
    _RANDOM[spec] = models.build(models.get_config(spec))
  return _RANDOM[spec]


def _flops_per_image(model: models.LoadedModel) -> float:
  import jax
  x = np.zeros((1, model.image_size, model.image_size, 3), np.float32)
  cost = jax.jit(model.embed_fn).lower(model.params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0))


def bench_loop(load, spec: str, source: ArraySource, batch_size: int, images_per_range: int) -> dict[str, Any]:
  import jax
  t0 = time.perf_counter()
  model = load(spec)
  fn = jax.jit(model.embed_fn)
  # The same batches as the pipeline: each read range cut into batch_size blocks, the last padded.
  blocks = [source.images(s, min(s + images_per_range, len(source))) for s in range(0, len(source), images_per_range)]
  batching.embed_padded(functools.partial(fn, model.params), model.preprocess(blocks[0][:batch_size]), batch_size)
  t1 = time.perf_counter()
  for block in blocks:
    for start in range(0, len(block), batch_size):
      x = model.preprocess(block[start:start + batch_size])
      batching.embed_padded(functools.partial(fn, model.params), x, batch_size).sum()
  t2 = time.perf_counter()
  n = len(source)
  return {"path": "loop", "images": n, "seconds": round(t2 - t1, 3), "images_per_s": round(n / (t2 - t1), 1),
          "seconds_with_load_compile": round(t2 - t0, 3), "images_per_s_with_load_compile": round(n / (t2 - t0), 1),
          "model": model}


def bench_beam(load_fn, spec: str, sources: dict[str, Any], batch_size: int, images_per_range: int, out: str,
               beam_args: list[str]) -> dict[str, Any]:
  config = {**embed_pipeline.default_config(), "model": spec, "sources": {k: "bench" for k in sources},
            "batch_size": batch_size, "images_per_range": images_per_range, "rows_per_shard": 1 << 20}

  def fn(writer: artifacts.ArtifactWriter) -> dict[str, Any]:
    handler = embed_pipeline.JaxEmbedHandler(spec, batch_size, load_fn)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    _ = p | embed_pipeline.EmbedImages(
        sources, handler, batch_size=batch_size, rows_per_shard=config["rows_per_shard"],
        images_per_range=images_per_range, dtype="float32", shard_dir=writer.makedirs("embeddings"),
        dead_letter_url=writer.path(embed_pipeline.DEAD_LETTER))
    p.run().wait_until_finish()
    return embed_pipeline._finish(config, sources, writer, {})

  t0 = time.perf_counter()
  art = artifacts.run_stage("embed", out, config, {}, fn, force=True, log=lambda s: None)
  seconds = time.perf_counter() - t0
  n = art.report["images"]
  return {"path": "beam", "images": n, "failed": art.report["failed"], "seconds": round(seconds, 3),
          "images_per_s": round(n / seconds, 1), "beam_args": beam_args}


def _write_pngs(folder: str, source: ArraySource, n: int) -> None:
  from PIL import Image
  for start in range(0, n, 256):
    for i, im in enumerate(source.images(start, min(start + 256, n))):
      sub = os.path.join(folder, f"c{(start + i) % 10}")
      os.makedirs(sub, exist_ok=True)
      # Bigger than the model's input, as real photos are: the worker decodes and resizes.
      Image.fromarray(np.kron(im, np.ones((2, 2, 1), np.uint8))).save(os.path.join(sub, f"{start + i:06d}.png"))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="demo-teacher", help="Model spec, or a config name with --random-weights.")
  parser.add_argument("--random-weights", action="store_true", help="Build --model (a config name) randomly.")
  parser.add_argument("--images", type=int, default=4096)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--images-per-range", type=int, default=1024)
  parser.add_argument("--files", action="store_true", help="Also run the pipeline over PNG files (decode+resize).")
  parser.add_argument("--multi-processing", action="store_true", help="Also run with 2 DirectRunner processes.")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="Device peak TFLOP/s for MFU (default: from the device kind, bench/device_peaks.py).")
  args = parser.parse_args(argv)

  load = _random_model if args.random_weights else models.load_model
  load_fn = _random_model if args.random_weights else None
  probe = load(args.model)
  source = ArraySource(args.images, probe.image_size)
  results = []
  loop = bench_loop(load, args.model, source, args.batch_size, args.images_per_range)
  model = loop.pop("model")
  results.append(loop)
  with tempfile.TemporaryDirectory() as tmp:
    runs = [("array", {"bench": source}, [])]
    if args.multi_processing:
      runs.append(("array", {"bench": source}, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]))
    if args.files:
      _write_pngs(os.path.join(tmp, "pngs"), source, args.images)
      runs.append(("files", {"bench": image_sources.parse(f"files:{tmp}/pngs/**/*.png")}, []))
    for i, (kind, sources, beam_args) in enumerate(runs):
      r = bench_beam(load_fn, args.model, sources, args.batch_size, args.images_per_range, f"{tmp}/out{i}", beam_args)
      r["source"] = kind
      r["overhead_ratio"] = round(loop["images_per_s"] / r["images_per_s"], 2)
      results.append(r)
  import device_peaks
  import jax
  flops = _flops_per_image(model)
  kind = jax.devices()[0].device_kind
  dtype = str(jax.tree_util.tree_leaves(model.params)[0].dtype)
  peak = args.peak_tflops or device_peaks.peak_tflops(kind, dtype)
  for r in results:
    r.update(model=args.model, batch_size=args.batch_size, backend=jax.default_backend(), device_kind=kind,
             dtype=dtype, gflops_per_image=round(flops / 1e9, 3), peak_tflops=peak,
             load_avg_1m=round(os.getloadavg()[0], 2))
    if peak:
      r["mfu"] = round(r["images_per_s"] * flops / (peak * 1e12), 4)
    print(json.dumps(r))


if __name__ == "__main__":
  main()
