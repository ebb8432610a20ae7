"""`alignet train`: fine-tune a student on triplet shards, in a persistent work directory or as a chain stage.

Command line (resumes in place; one JSON config format, as every stage's config is JSON data):
  alignet train --shards X --student demo-student --steps 200 --workdir W [--config c.json] [--set key=value]
      [--coordinator HOST:PORT --num-processes N --process-id I]
X is a triplets artifact, a published version, or a folder of released npz files (`<transform>/{train,val}_
<sampling>.npz`, chosen with --transform/--sampling; every `val_*` file is its own validation set, reported as
`val_triplet_accuracy/<sampling>` and their mean `val_triplet_accuracy`; or `alignet_{train,valid}.npz`). The
config is `train.DEFAULTS`, then the `--config` file, then `--set` pairs, then the flags; it is printed and kept
in `W/config.json`. `W` is any fsspec URL (a local path, gs://..., memory:// in tests). It gets `checkpoints/`
(orbax, or `--checkpoint-dir`; a rerun with more `--steps` resumes from the latest), `tensorboard/` (event
files), `metrics.jsonl`, `metrics_before.json` (validation before training, kept for resumed runs),
`metrics.json` (final `loss`, `val_triplet_accuracy`, `steps_per_second`, ...), and the fine-tuned encoder
`student.npz` + `student.json`. Option ranges are checked first (`train.validate_config`), before anything is
written, read or compiled.

Several processes (hosts) train one model when launched with `--coordinator HOST:PORT --num-processes N
--process-id I` each, `--coordinator auto`, or under `srun`/on a TPU pod (`trainer.distributed` says exactly
when): every process runs the same command with the same workdir, loads only its slice of each global batch,
and process 0 alone writes the workdir (checkpoints are written collectively, so `--checkpoint-dir` must be a
directory every host sees, e.g. gs://). These are launch settings, not training config: they are not kept in
config.json, so a run resumed with another number of processes (the same global batch) sees no config change.

As a chain stage (`alignet run`, `run()` below), the train artifact holds the same files, so
`models.load_model("<config-name>:<artifact>/student.npz")` loads the result (or, in the evaluate stage's
config, the spec "train:<artifact URL>").
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from alignet_data import artifacts
from alignet_data.checks import InputError
from trainer import distributed, train

STAGE = "train"

_FLAGS = {  # config key -> (type, help)
    "shards": (str, "triplets artifact, published version, or a folder of released <transform>/{train,val}_"
                    "<sampling>.npz or alignet_{train,valid}.npz files (any fsspec URL)"),
    "format": (str, "shard format: auto | parquet | tfrecord | npz"),
    "transform": (str, "released layout: the <transform> folder to read (default: uncertainty_distillation when "
                       "there is a choice)"),
    "sampling": (str, "the training file's sampling, e.g. cluster_border_500 (default: cluster_border_500 when "
                      "present, else the only one); every val_<sampling> file of the transform is validated"),
    "images": (str, "images the indices point into: demo:<world>:pool, files:<glob>, tfds:imagenet2012:train "
                    "(default: from the shards' provenance)"),
    "tfds_data_dir": (str, "data_dir of a tfds: image source"),
    "world": (str, "demo world artifact URL: the images the shards' indices point into"),
    "image_split": (str, "which image set of the world the indices index (default: pool)"),
    "student": (str, "model spec: demo-student or <config-name>:<checkpoint.npz>"),
    "head_dim": (int, "linear triplet head size (0 = none; -1 = auto: none for demo students, else 1024)"),
    "compute_dtype": (str, "float32 | bfloat16 | auto (bfloat16 on GPU/TPU)"),
    "steps": (int, "optimiser steps"),
    "batch_size": (int, "triplets per step"),
    "learning_rate": (float, "peak learning rate of the warm-up + cosine schedule"),
    "warmup_steps": (int, "linear warm-up steps"),
    "decay_to_init": (float, "weight decay towards the initial weights (decoupled; 0 = off)"),
    "grad_clip": (float, "global-norm gradient clipping (0 = off)"),
    "tau": (float, "student temperature of the triplet loss"),
    "loss": (str, "kl | js | contrastive"),
    "seed": (int, "seed of the data order and head init"),
    "eval_every": (int, "steps between validation passes (0 = before and after only)"),
    "checkpoint_every": (int, "steps between orbax checkpoints (0 = at the end only)"),
    "checkpoint_dir": (str, "orbax checkpoint directory, local or gs:// (default: <workdir>/checkpoints)"),
    "log_every": (int, "steps between metrics.jsonl rows and TensorBoard points"),
}


def default_config() -> dict[str, Any]:
  return dict(train.DEFAULTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True,
                      help="run directory (local path or fsspec URL such as gs://...), in place of --out: "
                      "checkpoints, TensorBoard events, metrics; a rerun resumes there")
  parser.add_argument("--config", dest="config_file", default=None, help="JSON config file (keys of the config)")
  parser.add_argument("--no-verify", dest="verify", action="store_false",
                      help="skip checking the world, image and checkpoint inputs against their artifacts' manifests "
                      "(triplet shards are always checked as they are read)")
  parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                      help="override any config key (VALUE parsed as JSON, else a string); repeatable")
  parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  for key, (kind, help_text) in _FLAGS.items():
    parser.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=help_text)
  launch = parser.add_argument_group("multi-process launch (not training config: not kept in config.json)")
  launch.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="process 0's address, the same on every process; 'auto': jax.distributed.initialize() "
                      "detects the cluster (SLURM, Cloud TPU, GKE, Open MPI). Without these flags, a multi-task srun "
                      "step or a TPU pod environment is detected; otherwise one process")
  launch.add_argument("--num-processes", type=int, default=None, help="how many processes train together "
                      "(1: one process, no detection)")
  launch.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1 (0 writes the "
                      "workdir)")
  launch.add_argument("--coordinator-timeout", type=int, default=None, metavar="SECONDS",
                      help=f"how long to wait for every process to join (default {distributed.DEFAULT_TIMEOUT_S})")


def _merge(config: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
  """Refuse unknown keys: a typo must not silently leave the default in place."""
  unknown = set(overrides) - set(config)
  if unknown:
    raise InputError(f"{where} sets unknown train config keys {sorted(unknown)}; known keys: {sorted(config)}.")
  config.update(overrides)


def _parse_set(item: str) -> tuple[str, Any]:
  key, sep, value = item.partition("=")
  if not sep or not key:
    raise InputError(f"--set expects KEY=VALUE, got {item!r}.")
  try:
    return key.replace("-", "_"), json.loads(value)
  except json.JSONDecodeError:
    return key.replace("-", "_"), value


def read_config_file(url: str) -> dict[str, Any]:
  fs, path = artifacts.url_to_fs(url)
  with fs.open(path, "rb") as f:
    try:
      data = json.loads(f.read())
    except json.JSONDecodeError as e:
      raise ValueError(f"{url} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{url} must hold a JSON object of train config keys, got {type(data).__name__}.")
  return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" and the like are notes


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  """default_config(), then the --config file, then --set KEY=VALUE, then the dedicated flags."""
  config = default_config()
  if getattr(args, "config_file", None):
    _merge(config, read_config_file(args.config_file), args.config_file)
  if getattr(args, "overrides", None):
    _merge(config, dict(map(_parse_set, args.overrides)), "--set")
  for key in _FLAGS:
    value = getattr(args, key, None)
    if value is not None:
      config[key] = value
  return config


def _print_config(config: dict[str, Any]) -> None:
  print("[train] config:\n" + json.dumps(config, indent=2, sort_keys=True), flush=True)


def command(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
  """`alignet train ... --workdir W`: train (or resume) in W, printing the config and where everything went.

  With several processes, each runs this; only process 0 prints the config and summary (and writes W)."""
  del beam_args  # Not a Beam stage (the CLI refuses extra flags for it).
  config = config_from_args(args)
  launch = distributed.resolve_launch(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                      getattr(args, "process_id", None), getattr(args, "coordinator_timeout", None))
  # Before anything is written, read or compiled (devices, and auto-detected process counts, are checked later).
  train.validate_config(config, processes=launch.num_processes)
  if args.verify:
    artifacts.verify_inputs(input_urls(config))  # Shards, world, images, checkpoint: each against its manifest.
  else:
    print("[train] WARNING: inputs not verified against their manifests (--no-verify)", flush=True)
  workdir = args.workdir.rstrip("/")
  ckpt_dir = train.checkpoint_directory(workdir, config["checkpoint_dir"])  # Refuses what orbax cannot write.
  if args.print_config:
    _print_config(config)
    return 0
  if launch.multi_process:
    how = launch.detected or f"coordinator {launch.coordinator}, process {launch.process_id}"
    print(f"[train] joining {launch.num_processes or 'the other'} processes ({how}; timeout {launch.timeout_s} s)",
          flush=True)
  distributed.initialize(launch)  # Before any JAX computation; nothing for one process.
  if jax.process_index() != 0:  # Trains its share and takes part in every collective; writes nothing.
    print(f"[train] process {jax.process_index()} of {jax.process_count()} ({jax.local_device_count()} of "
          f"{jax.device_count()} devices): training; process 0 writes {workdir}", flush=True)
    train.train_and_evaluate(config, workdir)
    return 0
  _print_config(config)
  saved = artifacts.join(workdir, "config.json")
  fs, path = artifacts.url_to_fs(saved)
  if fs.isfile(path):
    previous = artifacts.read_json(saved)
    changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
    if changed:
      print(f"[train] config differs from the last run in {workdir} in {changed} (resuming anyway; a new `steps` "
            "stretches the learning-rate schedule)", flush=True)
  print(f"[train] checkpoints: {ckpt_dir}; TensorBoard: {artifacts.join(workdir, 'tensorboard')}; metrics: "
        f"{artifacts.join(workdir, 'metrics.jsonl')}, {artifacts.join(workdir, 'metrics.json')}; "
        f"{jax.process_count()} process(es), {jax.device_count()} device(s)", flush=True)
  result = train.train_and_evaluate(config, workdir, save_config=config)  # Writes config.json once inputs check.
  acc = result.get("val_triplet_accuracy")
  print(f"train: loss {result['loss']:.4f}, val_triplet_accuracy {'-' if acc is None else f'{acc:.4f}'}, "
        f"{result['steps_per_second']:.2f} steps/s, input {result['input_images_per_second']} images/s per "
        f"worker; workdir {workdir} (tensorboard/, metrics.json, student.npz)")
  return 0


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  urls = {"shards": config["shards"], "world": config["world"]}
  if config.get("images"):
    from alignet_data.teacher import image_sources
    urls["images"] = image_sources.input_url(config["images"]) or ""
  student = config["student"]
  if ":" in student:  # "<config-name>:<checkpoint>": the checkpoint file is an input too.
    urls["student"] = student.split(":", 1)[1]
  return {k: v for k, v in urls.items() if v}


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  del beam_args  # Not a Beam stage.
  if artifacts.is_local(writer.fs):
    # The workdir is the writer's staging folder itself (the folder of its top-level files; the writer refuses
    # "." as a file name).
    return train.train_and_evaluate(config, os.path.dirname(writer.local_path("metrics.json")))
  # The artifact must hold its checkpoints, and orbax writes only local paths and gs:// (not memory://, s3://):
  # train in a local directory, then copy everything into the artifact, which commits it.
  with tempfile.TemporaryDirectory() as workdir:
    report = train.train_and_evaluate(config, workdir)
    for root, _, files in os.walk(workdir):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), workdir)
        with open(os.path.join(root, name), "rb") as src, writer.open(rel, "wb") as dst:
          dst.write(src.read())
  return report
