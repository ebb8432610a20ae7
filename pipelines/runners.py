"""Beam runner shorthands and per-runner defaults, in one place: the CLI's flag check and the Beam stages'
`PipelineOptions` both read the stages' extra flags through `beam_args`.

``--runner=dask`` (or ``DaskRunner``, any case) names Beam's DaskRunner, which Beam only accepts by module path.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["DASK_RUNNER", "beam_args", "in_process_threads", "release", "runner", "worker_tracebacks_hidden"]

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


def in_process_threads(args: Sequence[str], threads: int) -> list[str]:
  """`args` plus `threads` DirectRunner worker threads in this process, unless a runner or a DirectRunner worker
  option is given. For stages whose work units share one loaded input (the triplets' matrix) and mostly release
  the GIL (compiled kernels, Arrow, zlib, file writes): one worker left the other cores idle while a shard was
  encoded and written."""
  out = list(args)
  if threads > 1 and runner(out) is None and not any(a.startswith("--direct_") for a in out):
    out += [f"--direct_num_workers={threads}", "--direct_running_mode=multi_threading"]
  return out


def release(result: Any) -> None:
  """Close what a finished pipeline's result holds open. Beam's DaskRunner leaves its dask Client connected: one
  per stage in `alignet run`, each retrying (and logging) once the scheduler is gone."""
  client = getattr(result, "client", None)
  if client is not None and callable(getattr(client, "close", None)):
    client.close()


class _NoWorkerTracebacks:
  """sys.stderr, less the tracebacks that threads other than `main` print whole (see `worker_tracebacks_hidden`)."""

  def __init__(self, stream: Any, main: threading.Thread):
    self._stream, self._main, self._local = stream, main, threading.local()

  def write(self, text: str) -> int:
    if threading.current_thread() is not self._main:
      if text.startswith("Traceback (most recent call last):"):
        self._local.dropped = True  # print() writes the text, then its "\n" in a second call.
        return len(text)
      if text == "\n" and getattr(self._local, "dropped", False):
        self._local.dropped = False
        return len(text)
    return self._stream.write(text)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._stream, name)


@contextlib.contextmanager
def worker_tracebacks_hidden() -> Iterator[None]:
  """Beam's SDK worker prints a failed bundle's whole traceback to stderr from its own thread
  (`sdk_worker.SdkWorker._execute`) before the runner re-raises the error in this thread, where the CLI shows it
  in one line (a full disk: one line, not 139). With in-process worker threads (the multi-threaded DirectRunner),
  that print is dropped; the error itself still comes back through `wait_until_finish`."""
  real = sys.stderr
  sys.stderr = _NoWorkerTracebacks(real, threading.current_thread())
  try:
    yield
  finally:
    sys.stderr = real
