"""`alignet`: one command per stage, and `run` for the whole chain.

Beam pipeline options (``--runner=DataflowRunner --project=... --region=... --temp_location=gs://...``,
``--direct_num_workers=2``) are passed through untouched to the Beam stages (`embed`, `triplets`, `run`);
``--runner=dask`` is Beam's DaskRunner (`pipelines.runners`).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Sequence

from pipelines import stages

_DESCRIPTION = (
    "AligNet data pipeline: human data -> teacher alignment -> embeddings -> clusters -> triplets -> "
    "published shards -> student fine-tuning -> evaluation. `alignet run --preset demo --out DIR` runs every "
    "stage on the embedded demo world."
)


# Errors caused by input, environment (disk full, read-only, permissions) or a refused action: one line
# `alignet <stage>: error: <what> (<which file>)` and exit status 1. Anything else is a bug of ours: its traceback
# and exit status 2. ALIGNET_DEBUG=1 shows the traceback of every error.
_USER_ERRORS = (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile)
_USER_ERROR_NAMES = r"\w*(?:Error|Exception)"  # A worker's exception, as Beam's multi-process runners relay it.
# The last exception line of a relayed text (the multi-threaded DirectRunner relays the worker's whole traceback,
# whose last line is "RuntimeError: OSError: ... [while running 'X']"): the error that ended the worker.
_RELAYED = re.compile(
    rf"^(?:RuntimeError: )?(?:[\w.]+\.)?({_USER_ERROR_NAMES}): (.+?)(?: \[while running '[^\n]*'\])?$", re.M)


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True,
                      help="Output artifact directory (local path or fsspec URL); must be absent, empty or an "
                      "artifact of this stage, and apart from every input.")
  parser.add_argument("--force", action="store_true", help="Rerun even if an up-to-date artifact exists.")
  stages.add_safety_flags(parser)


def _add_run(parser: argparse.ArgumentParser) -> None:
  from pipelines import presets
  parser.add_argument("--preset", default="demo", choices=presets.names(), help="Which chain configuration.")
  parser.add_argument("--out", required=True, help="Run directory: one artifact per stage, and summary.json.")
  parser.add_argument("--force", action="store_true", help="Rerun every stage.")
  parser.add_argument("--until", choices=list(stages.STAGES), help="Stop after this stage.")
  stages.add_safety_flags(parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; only the chosen command's module is imported to add its flags."""
  parser = argparse.ArgumentParser(prog="alignet", description=_DESCRIPTION)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  run_parser = sub.add_parser("run", help="Run the whole chain for a preset (resumes; skips finished stages).",
                              description="Run every stage in order; stages whose artifacts are up to date "
                              "are skipped. Extra --flags go to the Beam stages as pipeline options.")
  if command == "run":
    _add_run(run_parser)
  for name, (module_name, help_text) in TOOLS.items():
    mod = importlib.import_module(module_name) if name == command else None
    p = sub.add_parser(name, help=help_text, description=mod.__doc__ if mod else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if mod is not None:
      mod.add_arguments(p)
  for name, (_, help_text, is_beam) in stages.STAGES.items():
    description = help_text + (" Extra --flags are Beam pipeline options." if is_beam else "")
    p = sub.add_parser(name, help=help_text, description=description)
    if name == command:
      mod = stages.module(name)
      if not hasattr(mod, "command"):  # A module with its own `command` declares its own output flags.
        _add_common(p)
      mod.add_arguments(p)
      if is_beam:
        p.add_argument("--dry-run", action="store_true",
                       help="build the job graph with the given Beam options and print its size (vs Dataflow's "
                       "10 MB limit), its work items and any local path it carries; run and write nothing")
  return parser


# Commands that check rather than make a stage's artifact: name -> (module, one-line help).
TOOLS = {"check-release": ("pipelines.check_release",
                           "Check released-layout npz files (ours or the official bucket's); exit 1 on a failure.")}


def _command(argv: Sequence[str]) -> str | None:
  return next((a for a in argv if not a.startswith("-")), None)


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
  if args.command == "run":
    from pipelines import chain
    chain.run_chain(args.preset, args.out, force=args.force, beam_args=extra, until=args.until,
                    verify=args.verify, reuse_stale=args.reuse_stale)
    return 0
  if args.command in TOOLS:
    return importlib.import_module(TOOLS[args.command][0]).command(args, extra)
  mod = stages.module(args.command)
  if hasattr(mod, "command"):
    # Stages whose command line differs from "one config -> one artifact" (e.g. `train --workdir`, which
    # resumes in place) run their own flow; they still print where their outputs went.
    return mod.command(args, extra)
  config = mod.config_from_args(args)
  if getattr(args, "dry_run", False):
    from pipelines import job_graph
    mod.input_urls(config)  # The stage's own config checks.
    job_graph.dry_run(args.command, config, args.out, extra)
    return 0
  art = stages.run(args.command, config, args.out, beam_args=extra, force=args.force, verify=args.verify,
                   reuse_stale=args.reuse_stale)
  print(f"{args.command}: outputs in {art.url} (report: {art.path('report.json')})")
  return 0


def _user_error(e: BaseException) -> str | None:
  """The one-line message of an input/environment error, looking through Beam's wrapping; None for a bug.

  Causes (`raise ... from`) are followed always; the exception being handled (`__context__`) only out of Beam's
  RuntimeError wrapper, so that a bug raised while handling a user error still counts as a bug.
  """
  seen: BaseException | None = e
  while seen is not None:
    if isinstance(seen, _USER_ERRORS):
      if isinstance(seen, KeyError) and seen.args:
        return str(seen.args[0])
      return str(seen) or type(seen).__name__
    seen = seen.__cause__ or (seen.__context__ if isinstance(seen, RuntimeError) else None)
  if isinstance(e, RuntimeError):  # Beam relays a worker's exception as text: "OSError: ... [while running 'X']".
    lines = list(_RELAYED.finditer(str(e).strip()))
    match = lines[-1] if lines else None
    if match and match.group(1) in _relayable_names():
      return match.group(2)
  return None


def _relayable_names() -> set[str]:
  """Names of the user-error classes (and their subclasses); ours are listed too, for a worker process whose
  modules this process never imported."""
  names = {"InputError", "OwnershipError", "LockedError", "ChecksumError", "IncompleteArtifactError", "PublishError"}
  stack = list(_USER_ERRORS)
  while stack:
    cls = stack.pop()
    names.add(cls.__name__)
    stack.extend(cls.__subclasses__())
  return names


def check_beam_flags(extra: Sequence[str]) -> None:
  """Refuse a flag that no Beam pipeline option knows (Beam itself only logs "Discarding unparseable args", so a
  typo in a real flag would silently fall back to its default)."""
  if not extra:
    return
  from pipelines import runners
  extra = runners.beam_args(extra)  # Shorthands (--runner=dask) spelt out, as the stages spell them.
  runner = runners.runner(extra)
  if runner and "." in runner:  # A runner by module path registers its own options (e.g. DaskRunner's --dask_*).
    import importlib
    try:
      importlib.import_module(runner.rsplit(".", 1)[0])
    except ImportError as e:
      raise ValueError(f"--runner={runner}: cannot import its module ({e}).") from e
  from apache_beam.options import pipeline_options
  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # What PipelineOptions parses with.
  stack = list(pipeline_options.PipelineOptions.__subclasses__())
  seen: set[type] = set()
  while stack:
    cls = stack.pop()
    if cls in seen:
      continue
    seen.add(cls)
    cls._add_argparse_args(parser)
    stack.extend(cls.__subclasses__())
  _, unknown = parser.parse_known_args(list(extra))
  flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
  if flags:
    raise ValueError(f"unknown flag(s) {', '.join(flags)}: neither this stage nor Beam's pipeline options know "
                     "them (see `--help`; Beam options are spelt like --direct_num_workers=2).")


def keep_freed_memory() -> None:
  """Have glibc keep freed memory for reuse instead of returning it to the OS (elsewhere: nothing).

  The stages allocate and free buffers of tens of MB per block and per shard; memory handed back is faulted in
  afresh on the next one, which on our 2-core VMs cost 1-4 s of kernel time per GB. Measured on the triplets
  stage at ImageNet scale (bench/imagenet_scale.py inputs): 58 s -> 35 s of system time, 107 s -> 96 s wall.
  Blocks above 32 MB (a whole matrix) are still mapped and unmapped on their own.
  """
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return
  m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
  mallopt(m_mmap_threshold, 32 << 20)  # A fixed threshold: glibc's own grows with freed blocks, up to this.
  mallopt(m_trim_threshold, (1 << 31) - 1)
  mallopt(m_top_pad, 64 << 20)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  keep_freed_memory()
  parser = build_parser(_command(argv))
  args, extra = parser.parse_known_args(argv)
  is_beam = args.command == "run" or (args.command in stages.STAGES and stages.STAGES[args.command][2])
  if extra and not (is_beam and all(a.startswith("--") or not a.startswith("-") for a in extra)):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  debug = bool(os.environ.get("ALIGNET_DEBUG"))
  if is_beam and not debug:  # We print the worker's error ourselves, once, as one line.
    for name in ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
                 "apache_beam.runners.portability.fn_api_runner.fn_runner"):
      logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    if is_beam:
      check_beam_flags(extra)
    return _dispatch(args, extra)
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as e:  # noqa: BLE001 (every failure ends in one of two documented ways)
    message = _user_error(e)
    if debug or message is None:
      traceback.print_exc()
      if message is None:
        print(f"alignet {args.command}: internal error ({type(e).__name__}); please report it with the traceback "
              "above.", file=sys.stderr)
        return 2
    print(f"alignet {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
