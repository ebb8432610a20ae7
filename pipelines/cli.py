"""`alignet`: one command per stage, and `run` for the whole chain.

Beam pipeline options (``--runner=DataflowRunner --project=... --region=... --temp_location=gs://...``,
``--direct_num_workers=2``) are passed through untouched to the Beam stages (`embed`, `triplets`, `run`).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipelines import stages

_DESCRIPTION = (
    "AligNet data pipeline: human data -> teacher alignment -> embeddings -> clusters -> triplets -> "
    "published shards -> student fine-tuning -> evaluation. `alignet run --preset demo --out DIR` runs every "
    "stage on the embedded demo world."
)


# Errors that mean "your input or request is wrong" (missing artifact, bad file, checksum, refused publish): a
# one-line message and exit status 1. ALIGNET_DEBUG=1 shows the traceback.
_USER_ERRORS = (ValueError, OSError, KeyError)


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True, help="Output artifact directory (local path or fsspec URL).")
  parser.add_argument("--force", action="store_true", help="Rerun even if an up-to-date artifact exists.")


def _add_run(parser: argparse.ArgumentParser) -> None:
  from pipelines import presets
  parser.add_argument("--preset", default="demo", choices=presets.names(), help="Which chain configuration.")
  parser.add_argument("--out", required=True, help="Run directory: one artifact per stage, and summary.json.")
  parser.add_argument("--force", action="store_true", help="Rerun every stage.")
  parser.add_argument("--until", choices=list(stages.STAGES), help="Stop after this stage.")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; only the chosen command's module is imported to add its flags."""
  parser = argparse.ArgumentParser(prog="alignet", description=_DESCRIPTION)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  run_parser = sub.add_parser("run", help="Run the whole chain for a preset (resumes; skips finished stages).",
                              description="Run every stage in order; stages whose artifacts are up to date "
                              "are skipped. Extra --flags go to the Beam stages as pipeline options.")
  if command == "run":
    _add_run(run_parser)
  for name, (_, help_text, is_beam) in stages.STAGES.items():
    description = help_text + (" Extra --flags are Beam pipeline options." if is_beam else "")
    p = sub.add_parser(name, help=help_text, description=description)
    if name == command:
      mod = stages.module(name)
      if not hasattr(mod, "command"):  # A module with its own `command` declares its own output flags.
        _add_common(p)
      mod.add_arguments(p)
  return parser


def _command(argv: Sequence[str]) -> str | None:
  return next((a for a in argv if not a.startswith("-")), None)


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
  if args.command == "run":
    from pipelines import chain
    chain.run_chain(args.preset, args.out, force=args.force, beam_args=extra, until=args.until)
    return 0
  mod = stages.module(args.command)
  if hasattr(mod, "command"):
    # Stages whose command line differs from "one config -> one artifact" (e.g. `train --workdir`, which
    # resumes in place) run their own flow; they still print where their outputs went.
    return mod.command(args, extra)
  config = mod.config_from_args(args)
  art = stages.run(args.command, config, args.out, beam_args=extra, force=args.force)
  print(f"{args.command}: outputs in {art.url} (report: {art.path('report.json')})")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser(_command(argv))
  args, extra = parser.parse_known_args(argv)
  is_beam = args.command == "run" or stages.STAGES[args.command][2]
  if extra and not (is_beam and all(a.startswith("--") or not a.startswith("-") for a in extra)):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  try:
    return _dispatch(args, extra)
  except _USER_ERRORS as e:
    # Bad input or a refused action: a clear one-line message, not a traceback (ALIGNET_DEBUG=1 shows it).
    if os.environ.get("ALIGNET_DEBUG"):
      raise
    print(f"alignet {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
