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
