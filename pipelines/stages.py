"""The stage registry: stage name -> module implementing the stage contract.

Every stage module exposes ``STAGE``, ``default_config()``, ``add_arguments(parser)``, ``config_from_args(args)``,
``input_urls(config)`` and ``run(config, writer, beam_args)``. Modules are imported lazily so that `alignet --help`
and stages that need no TensorFlow or Beam stay fast.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from alignet_data import artifacts

# In chain order. (module, one-line help, runs Beam)
STAGES: dict[str, tuple[str, str, bool]] = {
    "world": ("pipelines.world_stage", "Generate the demo world (THINGS-, ImageNet- and Levels-like data).", False),
    "human": ("pipelines.human_stage", "Fit a VICE model of human triplet choices; write soft labels p*.", False),
    "embed": ("pipelines.embed_pipeline", "Embed an image source with the teacher (Beam, RunInference).", True),
    "align": ("pipelines.align_stage", "Fit the affine transform of the teacher to human soft labels.", False),
    "cluster": ("pipelines.cluster_stage", "Transform embeddings, k-means (faiss) with the elbow criterion.", False),
    "triplets": ("pipelines.triplets_pipeline", "Sample and soft-label triplets; write shards (Beam).", True),
    "publish": ("pipelines.publish_stage", "Publish an artifact as a versioned, checksummed dataset.", False),
    "train": ("trainer.main", "Fine-tune a student ViT on triplet shards (KL loss, decay to init).", False),
    "evaluate": ("pipelines.evaluate_stage", "Evaluate models on THINGS-like and Levels-like judgements.", False),
}


def module(stage: str) -> ModuleType:
  if stage not in STAGES:
    raise KeyError(f"Unknown stage {stage!r}; stages are: {', '.join(STAGES)}.")
  return importlib.import_module(STAGES[stage][0])


def run(stage: str, config: dict[str, Any], out: str, *, beam_args: Sequence[str] = (), force: bool = False,
        verify: bool = True, reuse_stale: bool = False) -> artifacts.Artifact:
  """Run one stage into `out` (skipped when an up-to-date artifact is there; see `artifacts.run_stage`)."""
  mod = module(stage)
  return artifacts.run_stage(stage, out, config, mod.input_urls(config),
                             lambda writer: mod.run(config, writer, beam_args), force=force, verify=verify,
                             reuse_stale=reuse_stale)


def add_safety_flags(parser: Any) -> None:
  """--no-verify and --reuse-stale, for every command that writes an artifact."""
  parser.add_argument("--no-verify", dest="verify", action="store_false",
                      help="Do not check the input artifacts' files against their manifests (a warning says so).")
  parser.add_argument("--reuse-stale", action="store_true",
                      help="Skip a stage whose up-to-date artifact was written by other code (a code change).")


def apply_flags(config: dict[str, Any], args: Any) -> dict[str, Any]:
  """`config` overridden by every flag the user gave (flags default to None, so the config's value wins)."""
  config = dict(config)
  for key in config:
    value = getattr(args, key, None)
    if value is not None:
      config[key] = value
  return config
