"""The `train` stage: fine-tune the student on a triplets artifact's shards; the artifact holds the result.

Artifact files: `student.npz` (fine-tuned encoder, big_vision flat npz) + `student.json` (its model config name),
so `models.load_model("<config-name>:<artifact>/student.npz")` loads it (or, in the evaluate stage's config,
the spec "train:<artifact URL>"); `checkpoints/` (orbax, the full train state at the end); `metrics.json`
(the final figures, = report.json) and `metrics.jsonl` (a row every `log_every` steps).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from alignet_data import artifacts
from trainer import train

STAGE = "train"

_FLAGS = {  # config key -> (type, help)
    "shards": (str, "triplets (or publish) artifact URL with shards/{train,valid}-*.parquet"),
    "world": (str, "demo world artifact URL: the images the shards' indices point into"),
    "image_split": (str, "which image set of the world the indices index (default: pool)"),
    "student": (str, "model spec: demo-student or <config-name>:<checkpoint.npz>"),
    "head_dim": (int, "linear triplet head size on the representation (0 = none; released trainer: 1024)"),
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
    "log_every": (int, "steps between metrics.jsonl rows"),
}


def default_config() -> dict[str, Any]:
  return dict(train.DEFAULTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  for key, (kind, help_text) in _FLAGS.items():
    parser.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = default_config()
  for key in _FLAGS:
    value = getattr(args, key, None)
    if value is not None:
      config[key] = value
  return config


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  urls = {"shards": config["shards"], "world": config["world"]}
  student = config["student"]
  if ":" in student:  # "<config-name>:<checkpoint>": the checkpoint file is an input too.
    urls["student"] = student.split(":", 1)[1]
  return {k: v for k, v in urls.items() if v}


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  del beam_args  # Not a Beam stage.
  if artifacts.is_local(writer.fs):
    return train.train_and_evaluate(config, writer.local_path("."))
  # Orbax and the npz export write to a local directory; copy the results into a remote artifact.
  with tempfile.TemporaryDirectory() as workdir:
    report = train.train_and_evaluate(config, workdir)
    for root, _, files in os.walk(workdir):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), workdir)
        with open(os.path.join(root, name), "rb") as src, writer.open(rel, "wb") as dst:
          dst.write(src.read())
  return report
