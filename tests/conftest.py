"""Shared fixtures: where the real public data of ../shared/data lives (read, never copied)."""
import os
import pathlib

import pytest

_DEFAULT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (or $ALIGNET_SHARED_DATA); tests that need it skip, saying why, where it is absent."""
  root = pathlib.Path(os.environ.get("ALIGNET_SHARED_DATA", _DEFAULT))
  if not (root / "things").is_dir():
    pytest.skip(f"real THINGS data not found at {root} (it ships beside the repo as ../shared/data, "
                "not in a user's clone); set ALIGNET_SHARED_DATA to run this test")
  return root


def tiny_world(path: pathlib.Path, images_per_class: int) -> str:
  """A small demo-world artifact under `path` (3 superordinates x 2 basic x 2 subordinate); returns its URL."""
  from alignet_data import artifacts, demo_world
  cfg = demo_world.WorldConfig(n_super=3, n_basic_per_super=2, n_sub_per_basic=2, images_per_class=images_per_class,
                               things_train=100, things_test=80, levels_per_level=40)

  def fn(writer):
    demo_world.save(demo_world.make_world(cfg), writer)
    return {}
  return artifacts.run_stage("world", str(path / "world"), {"t": 1}, {}, fn, log=lambda _: None).url
