"""Stage `world`: generate the demo world (the embedded default's stand-in for THINGS, ImageNet and Levels)."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from alignet_data import artifacts, checks, demo_world
from pipelines import stages

STAGE = "world"


def default_config() -> dict[str, Any]:
  return dataclasses.asdict(demo_world.WorldConfig())


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--seed", type=int, help="World seed.")
  parser.add_argument("--images-per-class", type=int, help="ImageNet-like pool images per class.")
  parser.add_argument("--things-train", type=int, help="THINGS-like training triplets.")
  parser.add_argument("--things-test", type=int, help="THINGS-like test triplets.")
  parser.add_argument("--levels-per-level", type=int, help="Levels-like triplets per level.")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  return stages.apply_flags(default_config(), args)


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  checks.require_min(config, STAGE, seed=0, n_super=2, n_basic_per_super=2, n_sub_per_basic=1, n_palettes=1,
                     images_per_class=1, image_size=8, human_dim=1, human_beta=0, things_train=1, things_test=1,
                     levels_per_level=1, levels_responses=1)
  return {}


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  world = demo_world.make_world(demo_world.WorldConfig(**config))
  demo_world.save(world, writer)
  return demo_world.summary(world)
