"""Stage `publish`: copy an artifact to ``<bucket>/<name>/<version>/`` as an immutable, verified dataset.

  alignet publish --from X --to file:///data/bucket --name alignet --version 0.1.0 [--out P]

The published version is the data. With --out (and in the chain, `alignet run`), this stage also writes its own
artifact P recording where it went (report ``published_to``) and the publication result. Publishing the same
version twice is refused (bump --version); `--if-exists skip_identical` accepts a version already published
from an identical source (for resumed chains).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from alignet_data import artifacts
from alignet_data.dataset import publishing
from pipelines import stages

__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run", "command"]

STAGE = "publish"


def default_config() -> dict[str, Any]:
  return {
      "source": None,       # URL of the artifact to publish (a triplets artifact).
      "bucket": None,       # Where versions live (fsspec URL: a folder, gs://bucket/path).
      "name": "alignet",
      "version": "0.1.0",
      "card": True,         # Write the dataset card (README.md, entropy histogram).
      "if_exists": "error",  # Or "skip_identical".
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--from", dest="source", help="Artifact URL to publish (e.g. a triplets artifact).")
  parser.add_argument("--to", dest="bucket", help="Bucket URL (local folder, file://, gs://...).")
  parser.add_argument("--name", help="Dataset name (default: alignet).")
  parser.add_argument("--version", dest="version", help="Dataset version, e.g. 0.1.0; never overwritten.")
  parser.add_argument("--no-card", dest="card", action="store_const", const=False, help="Skip the dataset card.")
  parser.add_argument("--if-exists", choices=["error", "skip_identical"], help="What to do if the version exists.")
  parser.add_argument("--out", help="Optional: also write a publish artifact here recording the publication.")
  parser.add_argument("--force", action="store_true", help="With --out: rerun even if that artifact is up to date.")
  stages.add_safety_flags(parser)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  return stages.apply_flags(default_config(), args)


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  for key, flag in (("source", "--from"), ("bucket", "--to")):
    if not config.get(key):
      raise ValueError(f"The {STAGE} stage needs `{key}` ({flag} URL).")
  return {"source": config["source"]}


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  input_urls(config)
  result = publishing.publish(config["source"], config["bucket"], config["name"], config["version"],
                              card=config["card"], if_exists=config["if_exists"])
  writer.write_json("publication.json", result)
  return {**result, "name": config["name"], "version": config["version"]}


def command(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> int:
  """`alignet publish`: publish straight to the bucket; an existing version is a clear error (exit status 1)."""
  config = config_from_args(args)
  input_urls(config)
  if args.out:
    art = stages.run(STAGE, config, args.out, beam_args=beam_args, force=args.force, verify=args.verify,
                     reuse_stale=args.reuse_stale)
    result = art.report
    print(f"{STAGE}: record in {art.url}")
  else:
    result = publishing.publish(config["source"], config["bucket"], config["name"], config["version"],
                                card=config["card"], if_exists=config["if_exists"])
  print(json.dumps({k: result[k] for k in ("published_to", "files", "bytes", "already_published")}))
  return 0
