"""Trainer throughput: train steps/s, model FLOP utilisation and the input pipeline's own images/s, for the tiny
demo student on CPU by default, or any ViT config on an accelerator.

  .venv/bin/python bench/train_throughput.py                       # demo student, 64 triplets/step, CPU
  python bench/train_throughput.py --student siglip-b/16 --batch 512 --compute-dtype bfloat16
      # the released student (MAP head) at 224 px, 512 triplets (1,536 images) per step, random weights (speed only)

MFU = the step's FLOPs (the compiled step's cost analysis) per second over the devices' dense peak for the compute
dtype, looked up from the device kind (bench/device_peaks.py; `--peak-tflops` overrides; none on a CPU).

The train step is the trainer's own (`train.compiled_steps`: KL loss, clip -> Adam -> decay to init -> lr,
data-parallel over all devices); inputs are fixed random batches already on device, so this measures the model.
The input figures time the trainer's real Grain pipeline (`input_pipeline.train_dataset`: shuffled rows -> id
lookup -> the student's preprocess) with no model: wall-clock images/s over --input-batches batches drawn from
the iterator, once per thread count in --input-threads (0 = in the consumer's thread), on uint8 images of
--source-size (default: the model's size; the demo world's images are 32 px). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # device_peaks


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", "--student", default="demo-student",
                      help="demo-student, a model spec, or a config name "
                      "(e.g. b/16: random init)")
  parser.add_argument("--batch", type=int, default=64, help="triplets per step (3x images)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up steps)")
  parser.add_argument("--compute-dtype", default="auto")
  parser.add_argument("--head-dim", type=int, default=-1)
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="the device's peak TFLOP/s for model FLOP utilisation (default: from the device kind and "
                           "the compute dtype, bench/device_peaks.py)")
  parser.add_argument("--source-size", type=int, default=0, help="stored image size (default: the model's)")
  parser.add_argument("--input-batches", type=int, default=20, help="batches timed per input configuration")
  parser.add_argument("--input-threads", default="0,2", help="comma-separated Grain thread counts to time")
  args = parser.parse_args(argv)

  import device_peaks
  import jax
  import jax.numpy as jnp

  from alignet_data import models
  from trainer import input_pipeline, train

  if args.model.startswith("demo-") or ":" in args.model:
    model = models.load_model(args.model)
  else:
    model = models.build(models.get_config(args.model))
  cfg = {**train.DEFAULTS, "steps": 1000, "warmup_steps": 10}
  mesh = train.make_mesh()
  dtype = train.resolve_dtype(args.compute_dtype)
  opt_key = tuple((k, cfg[k]) for k in train._OPTIMIZER_KEYS)
  tx, step_fn, _ = train.compiled_steps(model.embed_fn, opt_key, "kl", 100.0, dtype.name, mesh)
  head = train.head_size(args.head_dim, model.config)
  state = train.replicate(mesh, train.create_train_state(
      train.init_params(model.params, model.dim, head, jax.random.PRNGKey(0)), tx))
  rng = np.random.default_rng(0)
  size = model.image_size
  x = rng.uniform(0, 1, (args.batch, 3, size, size, 3)).astype(np.float32)
  sims = rng.normal(0, 2, (args.batch, 3)).astype(np.float32)
  xs, ss = train.shard_batch(mesh, x, sims)

  t = time.perf_counter()
  compiled = step_fn.lower(state, xs, ss).compile()
  compile_s = time.perf_counter() - t
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # Not every backend reports costs.
    pass
  for _ in range(2):
    state, metrics = compiled(state, xs, ss)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, xs, ss)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t) / args.steps

  # The input pipeline alone, as the trainer builds it: Grain rows -> images -> the student's preprocess.
  src_size = args.source_size or size
  pool = rng.integers(0, 256, (4096, src_size, src_size, 3), dtype=np.uint8)
  images = input_pipeline.ArrayImages(pool)
  n_rows = args.batch * 50
  data = input_pipeline.Triplets(rng.integers(0, len(pool), (n_rows, 3)),
                                 rng.normal(size=(n_rows, 3)).astype(np.float32))
  input_pipeline.triplet_images(data.indices[:args.batch], images, model.preprocess)  # warm-up (resize weights)
  input_rates = {}
  for threads in (int(t) for t in args.input_threads.split(",")):
    ds = input_pipeline.train_dataset(data, images, model.preprocess, batch_size=args.batch, seed=0,
                                      stop_step=args.input_batches, threads=threads, prefetch=max(2 * threads, 2))
    t = time.perf_counter()  # From an empty buffer to the last batch: nothing is made before the clock starts.
    it = iter(ds)
    made = sum(len(batch["images"]) * 3 for batch in it)
    input_rates[f"input_images_per_second_{threads}_threads"] = round(made / (time.perf_counter() - t), 1)
    it.close()

  result = {
      "model": model.config.get("name", args.model), "image_size": size, "batch_triplets": args.batch,
      "batch_images": 3 * args.batch, "devices": int(mesh.devices.size), "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "compute_dtype": dtype.name, "head_dim": head,
      "compile_seconds": round(compile_s, 2), "train_steps_per_second": round(1 / step_s, 3),
      "train_images_per_second": round(3 * args.batch / step_s, 1),
      **input_rates, "input_source_size": src_size, "load_average": os.getloadavg()[0],
      "cpu_count": os.cpu_count(),
      "loss": float(jnp.asarray(metrics["loss"])),
  }
  if flops:
    result["step_tflops"] = round(flops / 1e12, 4)
    result["achieved_tflops_per_s"] = round(flops / step_s / 1e12, 3)
    peak = args.peak_tflops or device_peaks.peak_tflops(result["device_kind"], dtype.name)
    result["peak_tflops"] = peak
    if peak:
      result["mfu"] = round(flops / step_s / 1e12 / (peak * mesh.devices.size), 4)
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
