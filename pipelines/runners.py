"""Beam runner shorthands and per-runner defaults, in one place: the CLI's flag check and the Beam stages'
`PipelineOptions` both read the stages' extra flags through `beam_args`.

``--runner=dask`` (or ``DaskRunner``, any case) names Beam's DaskRunner, which Beam only accepts by module path.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DASK_RUNNER", "beam_args", "release", "runner"]

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
_SHORTHANDS = {"dask": DASK_RUNNER, "daskrunner": DASK_RUNNER}
# Beam's DaskRunner puts 128 elements of a `Create` in one Dask partition (one task). Our Creates list coarse work
# units (a read task of images, a whole triplet shard), so at that default a whole stage ran as one task on one
# worker; one element per partition spreads them. Either flag given by the user wins.
_DASK_PARTITIONING = ("--dask_npartitions", "--dask_partition_size")
_DASK_DEFAULTS = ("--dask_partition_size=1",)


def _runner_at(args: Sequence[str]) -> tuple[int, int] | None:
  """(index of the flag, index of its value) of the last --runner flag, or None."""
  found = None
  for i, a in enumerate(args):
    if a.startswith("--runner="):
      found = (i, i)
    elif a == "--runner" and i + 1 < len(args):
      found = (i, i + 1)
  return found


def runner(args: Sequence[str]) -> str | None:
  """The runner the flags name, shorthands spelt out (None: Beam's default)."""
  at = _runner_at(args)
  if at is None:
    return None
  value = args[at[1]].split("=", 1)[1] if at[0] == at[1] else args[at[1]]
  return _SHORTHANDS.get(value.lower(), value)


def beam_args(args: Sequence[str]) -> list[str]:
  """The flags as Beam should get them: a runner shorthand spelt out, and the runner's defaults added."""
  out = list(args)
  at = _runner_at(out)
  if at is None:
    return out
  name = runner(out)
  out[at[1]] = f"--runner={name}" if at[0] == at[1] else name
  if name == DASK_RUNNER and not any(a.split("=", 1)[0] in _DASK_PARTITIONING for a in out):
    out.extend(_DASK_DEFAULTS)
  return out


def release(result: Any) -> None:
  """Close what a finished pipeline's result holds open. Beam's DaskRunner leaves its dask Client connected: one
  per stage in `alignet run`, each retrying (and logging) once the scheduler is gone."""
  client = getattr(result, "client", None)
  if client is not None and callable(getattr(client, "close", None)):
    client.close()
