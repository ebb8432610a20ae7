"""`alignet check-release DIR --out R`: check a folder of released-layout npz files (ours or the official bucket).

  alignet check-release X/npz --out R [--tfds-data-dir D | --images 'files:/imagenet/train/*/*.JPEG']
      [--check-files 1000] [--num-images N] [--representations E.npy --transform-npz T.npz]

Prints a verdict table (`alignet_data.dataset.release_check` says what each check means), writes R/report.json
(an artifact: manifest and all), and exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, numeric_files
from alignet_data.dataset import release_check
from pipelines import stages

STAGE = "check-release"
HELP = "Check a folder of released-layout npz files: keys, order, ranges, overlap, file names, similarities."


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("root", metavar="DIR", help="folder of <transform>/{train,val}_<sampling>.npz files")
  parser.add_argument("--out", required=True, help="where report.json goes (an artifact folder)")
  parser.add_argument("--force", action="store_true", help="rerun even if an up-to-date report exists")
  parser.add_argument("--num-images", type=int, help=f"image count the indices index (default: the source's, else "
                      f"{release_check.IMAGENET_TRAIN:,} = imagenet2012 train)")
  parser.add_argument("--tfds-data-dir", help="check `filenames` against tfds imagenet2012:train records here")
  parser.add_argument("--images", help="or against an image source spec (files:<glob>, demo:<world>:pool, ...)")
  parser.add_argument("--check-files", type=int, default=1000, help="rows sampled for the file-name check")
  parser.add_argument("--representations", help="(n, p) teacher matrix (.npy/.npz/text) to recompute similarities")
  parser.add_argument("--transform-npz", help="transform.npz applied to --representations first")
  stages.add_safety_flags(parser)


def provenance(root: str) -> dict[str, Any] | None:
  """The "indices" record of the triplets artifact that holds `root` (ours: e.g. X/npz), else None."""
  path = root.rstrip("/")
  for _ in range(3):
    art = artifacts.try_load(path)
    if art is not None:
      return art.read_json("triplets.json").get("indices") if "triplets.json" in art.files else None
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if not parent or parent == path or parent.endswith(":"):
      return None
    path = parent
  return None


def _source(args: argparse.Namespace, indices: dict[str, Any] | None) -> Any:
  """The images the indices index: --images, --tfds-data-dir, else the source our artifact recorded."""
  from alignet_data.teacher import image_sources
  if args.images:
    return image_sources.parse(args.images, tfds_data_dir=args.tfds_data_dir)
  if args.tfds_data_dir:
    return image_sources.parse("tfds:imagenet2012:train", tfds_data_dir=args.tfds_data_dir)
  spec = (indices or {}).get("source")
  if spec and not spec.startswith("tfds:"):  # A TFDS source needs its data_dir: only with --tfds-data-dir.
    return image_sources.parse(spec)
  return None


def names_at(source: Any) -> Any:
  """ids -> the source's file names: a folder's paths, or each TFDS record's `file_name`."""
  from alignet_data.teacher import image_sources
  if isinstance(source, image_sources.FilesSource):
    return lambda ids: [source.paths[i] for i in ids]
  if isinstance(source, image_sources.DemoSource):
    return lambda ids: source._arrays()[2][np.asarray(ids)]
  if isinstance(source, image_sources.TfdsSource):
    ds = source._ds()
    return lambda ids: [_text(ds[int(i)].get("file_name", "")) for i in ids]
  raise ValueError(f"{source.spec}: file names can be checked against tfds:, files: or demo: sources.")


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  return {"root": args.root, "num_images": args.num_images, "tfds_data_dir": args.tfds_data_dir,
          "images": args.images, "check_files": args.check_files, "representations": args.representations,
          "transform_npz": args.transform_npz}


def command(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> int:
  del beam_args
  config = config_from_args(args)
  inputs = {k: config[k] for k in ("root", "representations", "transform_npz") if config[k]}

  def run(writer: artifacts.ArtifactWriter) -> dict[str, Any]:
    indices = provenance(args.root)
    source = _source(args, indices)
    num = args.num_images or (len(source) if source is not None else release_check.IMAGENET_TRAIN)
    vectors = None
    if args.representations:
      vectors = numeric_files.read_matrix(args.representations, npz_keys=("embeddings", "representations"),
                                          what="(n, p) teacher representation matrix").astype(np.float32)
      if args.transform_npz:
        from alignet_data.teacher.transform import Transform
        vectors = Transform.load(args.transform_npz).apply(vectors)
    report = release_check.check_release(args.root, num_images=num, sample=args.check_files, vectors=vectors,
                                         names_at=names_at(source) if source is not None else None, indices=indices,
                                         log=print)
    print(release_check.table(report))
    return report

  art = artifacts.run_stage(STAGE, args.out, config, inputs, run, force=args.force, verify=args.verify,
                            reuse_stale=args.reuse_stale)
  report = art.report
  if not report.get("passed", False):
    print(f"{STAGE}: {report.get('failed')} checks failed; report: {art.path('report.json')}")
    return 1
  print(f"{STAGE}: every check passed; report: {art.path('report.json')}")
  return 0
