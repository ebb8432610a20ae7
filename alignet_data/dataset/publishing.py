"""Publish an artifact as an immutable, checksummed dataset version: ``<bucket>/<name>/<version>/``.

Any fsspec filesystem (a local folder, ``gs://`` through gcsfs, ``memory://`` in tests). The protocol:
1. refuse a destination inside the source or containing it, and refuse if ``<version>/manifest.json`` exists:
   a published version is never overwritten (bump the version);
2. take the version's lock ``<name>/.<version>.lock`` (an exclusive create: local files, ``memory://`` and GCS's
   ``ifGenerationMatch=0``): of two publishers racing on one version, one wins and the other is refused;
3. copy every file of the source artifact into a hidden staging folder ``<name>/.<version>.incomplete-<writer>``,
   hashing the bytes read (they must match the source manifest: a corrupt source is never published) and then
   re-reading the copy (it must match too); add the dataset card (README.md, entropy histogram);
4. move it into place: on local disks, everything fsynced, then one rename (fsynced too: a power cut leaves no
   version or the whole one); on object stores, the files then ``manifest.json`` LAST (the
   source manifest, so `artifacts.load` reads a published version like any artifact and `Artifact.verify`
   re-checks every sha256, with the card's files and a ``publication`` block).
Any failure removes the staging folder: a refused or failed publish leaves nothing visible.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

import numpy as np

from alignet_data import artifacts, checks

CARD = "README.md"
ENTROPY_PLOT = "entropy_histogram.png"
_CHUNK = 1 << 22


class PublishError(ValueError):
  """A publish was refused (the version exists) or failed verification."""


def version_url(bucket: str, name: str, version: str) -> str:
  return artifacts.join(bucket, checks.check_name(name, "dataset --name"),
                        checks.check_name(version, "dataset --version"))


def _copy_verified(src: artifacts.Artifact, name: str, fs, dst_path: str) -> int:
  """Copy one file, hashing what was read; raise ChecksumError if source or copy differ from the manifest."""
  expected = src.files[name]["sha256"]
  h = hashlib.sha256()
  size = 0
  fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
  with src.open(name) as fin, fs.open(dst_path, "wb") as fout:
    while chunk := fin.read(_CHUNK):
      h.update(chunk)
      fout.write(chunk)
      size += len(chunk)
  if h.hexdigest() != expected:
    raise artifacts.ChecksumError(f"Source file {src.path(name)} is corrupt: sha256 {h.hexdigest()} != manifest "
                                  f"{expected}. Nothing was published; regenerate the source artifact.")
  copied = artifacts.sha256_file(fs, dst_path)
  if copied != expected:
    raise artifacts.ChecksumError(f"Copy of {name} at {dst_path} has sha256 {copied}, expected {expected}.")
  return size


def data_digest(files: dict[str, dict[str, Any]]) -> str:
  """Digest of an artifact's data: every file's sha256 but report.json's (it holds the wall time)."""
  return artifacts.digest({n: f["sha256"] for n, f in files.items() if n != artifacts.REPORT})


def _write(fs, path: str, data: bytes) -> dict[str, Any]:
  fs.makedirs(posixpath.dirname(path), exist_ok=True)
  with fs.open(path, "wb") as f:
    f.write(data)
  return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def publish(source: str | artifacts.Artifact, bucket: str, name: str, version: str, *, card: bool = True,
            if_exists: str = "error", log: Callable[[str], None] = print) -> dict[str, Any]:
  """Publish `source` (a complete artifact) as `<bucket>/<name>/<version>/`.

  The version is assembled in a hidden staging folder beside it, under an exclusive lock
  (`<bucket>/<name>/.<version>.lock`), and moved into place when complete: a refused or failed publish leaves
  nothing visible, and of two publishers racing on one version one wins and the other is refused.

  Args:
    if_exists: "error" (default) refuses an existing version; "skip_identical" accepts it when it holds the
      same data (every file's sha256 but report.json's), for resumable chains; anything else is refused.

  Returns:
    {published_to, files, bytes, source, source_digest, already_published}.

  Raises:
    PublishError: the version exists (and is not an identical publish under "skip_identical"), or the
      destination and the source overlap.
    artifacts.LockedError: another publisher holds the version's lock.
    artifacts.ChecksumError: the source or the copy does not match the source manifest.
  """
  if if_exists not in ("error", "skip_identical"):
    raise ValueError(f"if_exists must be 'error' or 'skip_identical', got {if_exists!r}.")
  src = source if isinstance(source, artifacts.Artifact) else artifacts.load(source)
  dest = version_url(bucket, name, version)
  how = artifacts.overlap(dest, src.url)
  if how:
    raise PublishError(f"The destination {dest} {how} the source {src.url}: a published version must live "
                       "apart from what it was published from; choose another --to.")
  fs, root = artifacts.url_to_fs(dest)
  done = _already(fs, root, dest, src, if_exists, log)
  if done is not None:
    return done
  writer_id = artifacts.new_writer_id()
  parent = posixpath.dirname(root.rstrip("/"))
  created = artifacts.missing_ancestor(fs, parent)  # Removed again if the publish fails.
  lock = artifacts.WriteLock(dest, writer_id, log)
  lock.acquire()
  staging = posixpath.join(parent, f".{version}.incomplete-{writer_id}")
  try:
    done = _already(fs, root, dest, src, if_exists, log)  # Another publisher may have finished meanwhile.
    if done is None:
      _clear_debris(fs, parent, root, version, dest, log)
      manifest = _assemble(src, fs, staging, name, version, dest, card)
      lock.check()
      _move_into_place(fs, staging, root, manifest, created)
  except BaseException:
    if fs.exists(staging):
      fs.rm(staging, recursive=True)
    lock.release()
    artifacts.remove_if_empty(fs, created)
    raise
  lock.release()
  if done is not None:
    return done
  log(f"[publish] published {len(manifest['files'])} files to {dest}")
  return _result(dest, manifest, src, already=False)


def _already(fs, root: str, dest: str, src: artifacts.Artifact, if_exists: str,
             log: Callable[[str], None]) -> dict[str, Any] | None:
  """The result for a version that exists (identical, under skip_identical), None if absent; else PublishError."""
  manifest_path = posixpath.join(root, artifacts.MANIFEST)
  if not fs.exists(manifest_path):
    return None
  existing = artifacts.read_json(artifacts.join(dest, artifacts.MANIFEST))
  same = existing.get("publication", {}).get("data_digest") == data_digest(src.files)
  if if_exists == "skip_identical" and same:
    log(f"[publish] {dest} already holds this artifact; nothing to do.")
    return _result(dest, existing, src, already=True)
  raise PublishError(f"{dest} already exists (published {existing.get('publication', {}).get('published')}); "
                     f"a published version is never overwritten: publish under a new --version.")


def _clear_debris(fs, parent: str, root: str, version: str, dest: str, log: Callable[[str], None]) -> None:
  """Remove what crashed publishers of this version left (we hold its lock): their staging folders, and a
  version folder without a manifest that is empty or marked as an interrupted object-store commit."""
  for entry in fs.ls(parent, detail=False) if fs.exists(parent) else []:
    if posixpath.basename(entry.rstrip("/")).startswith(f".{version}.incomplete"):
      fs.rm(entry, recursive=True)
  if not fs.exists(root):
    return
  entries = [p for p in fs.find(root, withdirs=True) if p.rstrip("/") != root.rstrip("/")]
  if entries and not fs.exists(posixpath.join(root, artifacts.INCOMPLETE_MARKER)):
    raise PublishError(f"{dest} exists without a manifest and holds {len(entries)} entries that no publisher "
                       "marked as its own; refusing to touch it (move it away, or publish another --version).")
  log(f"[publish] clearing {dest}: left by an interrupted publish (it has no manifest).")
  fs.rm(root, recursive=True)


def _assemble(src: artifacts.Artifact, fs, staging: str, name: str, version: str, dest: str,
              card: bool) -> dict[str, Any]:
  """Copy and verify every source file into `staging`, add the card and the manifest; returns the manifest."""
  files = {}
  for fname in sorted(src.files):
    _copy_verified(src, fname, fs, posixpath.join(staging, fname))
    files[fname] = dict(src.files[fname])
  if card:
    for fname, data in dataset_card(src, name, version, dest).items():
      if fname in files:
        raise PublishError(f"The source artifact already has a {fname}; publish it with card=False.")
      files[fname] = _write(fs, posixpath.join(staging, fname), data)
  manifest = dict(src.manifest)
  manifest["files"] = dict(sorted(files.items()))
  manifest["publication"] = {
      "name": name, "version": version, "source": src.url, "source_digest": src.digest,
      "data_digest": data_digest(src.files),
      "published": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  return manifest


def _move_into_place(fs, staging: str, root: str, manifest: dict[str, Any], created: str | None) -> None:
  """Local: the manifest into the staging folder, everything fsynced, then one atomic rename, fsynced with the
  folders this publish created (`created`: the highest). Object stores (no rename): mark the version as an
  interrupted commit, copy the files, write the manifest (the commit point), unmark."""
  body = artifacts.json_bytes(manifest)
  if artifacts.is_local(fs):
    _write(fs, posixpath.join(staging, artifacts.MANIFEST), body)
    artifacts.fsync_tree(staging)  # On the disk before the rename names it: a power cut cannot half-publish.
    os.rename(staging, root)  # Fails rather than replace if a version appeared (it cannot: we hold the lock).
    folder = posixpath.dirname(root)
    top = posixpath.dirname(created) if created else folder
    while True:  # The rename's entry, and each new folder's entry in the folder above it.
      artifacts.fsync_path(folder)
      if folder == top or posixpath.dirname(folder) == folder:
        break
      folder = posixpath.dirname(folder)
    return
  marker = posixpath.join(root, artifacts.INCOMPLETE_MARKER)
  _write(fs, marker, artifacts.json_bytes({"stage": "publish", "version": manifest["publication"]["version"]}))
  try:
    for fname in manifest["files"]:
      dst = posixpath.join(root, fname)
      fs.makedirs(posixpath.dirname(dst), exist_ok=True)
      fs.copy(posixpath.join(staging, fname), dst)
    _write(fs, posixpath.join(root, artifacts.MANIFEST), body)
  except BaseException:
    fs.rm(root, recursive=True)  # Never committed: nothing of it may stay visible.
    raise
  fs.rm(marker)
  fs.rm(staging, recursive=True)


def _result(dest: str, manifest: dict[str, Any], src: artifacts.Artifact, already: bool) -> dict[str, Any]:
  return {"published_to": dest, "files": len(manifest["files"]),
          "bytes": sum(int(f["bytes"]) for f in manifest["files"].values()), "source": src.url,
          "source_digest": src.digest, "already_published": already}


def verify(url: str) -> artifacts.Artifact:
  """Open a published version and re-check every file's sha256 (ChecksumError names a corrupt file)."""
  art = artifacts.load(url)
  if "publication" not in art.manifest:
    raise PublishError(f"{url} is an artifact but not a published version (no `publication` in its manifest).")
  art.verify()
  return art


# ----------------------------------------------------------------------------------------------- The card


SAMPLES_PLOT = "sample_triplets.png"
SAMPLES_PER_STRATEGY = 4


def dataset_card(src: artifacts.Artifact, name: str, version: str, dest: str) -> dict[str, bytes]:
  """README.md and its pictures: what, how made, schema, counts, loading; a grid of sample triplets per strategy
  (the images when the source is available here, else a table of file names) and the entropy histogram."""
  report = src.report if src.exists(artifacts.REPORT) else {}
  out = {}
  hist = report.get("entropy", {}).get("histogram")
  if hist:
    out[ENTROPY_PLOT] = _entropy_plot(hist)
  samples = sample_triplets(src)
  images, why_not = _sample_images(src, samples)
  if images is not None:
    out[SAMPLES_PLOT] = _samples_plot(samples, images)
  out[CARD] = _card_text(src, report, name, version, dest, has_plot=bool(hist), samples=samples,
                         has_grid=images is not None, why_no_images=why_not).encode()
  return out


def sample_triplets(src: artifacts.Artifact, per_strategy: int = SAMPLES_PER_STRATEGY) -> dict[str, dict[str, Any]]:
  """The first `per_strategy` training triplets of each strategy (shard order): {strategy: columns}.

  Reads only the needed Parquet columns, shard by shard, and stops once every strategy has its samples.
  """
  import pyarrow as pa
  import pyarrow.parquet as pq
  names = src.glob("shards/train*-*.parquet")  # train_<sampling>-... (older artifacts: train-...)
  report = src.report if src.exists(artifacts.REPORT) else {}
  by_split = report.get("strategies_by_split") or {}
  train = [set(v) for k, v in by_split.items() if k.startswith("train")]  # Validation sets may use others.
  wanted = set.union(*train) if train else set(report.get("strategies") or {})
  cols = ["strategy", "indices", "file_names", "similarities", "soft_label"]
  found: dict[str, dict[str, list]] = {}
  for shard in names:
    try:
      with src.open(shard) as f:
        table = pq.read_table(f, columns=cols)
    except (pa.ArrowException, OSError, KeyError):  # Not triplet shards: the card goes without samples.
      return {}
    data = {c: table.column(c).to_pylist() for c in cols}
    for r, strategy in enumerate(data["strategy"]):
      got = found.setdefault(strategy, {c: [] for c in cols})
      if len(got["strategy"]) < per_strategy:
        for c in cols:
          got[c].append(data[c][r])
    if wanted and all(len(found.get(w, {"strategy": []})["strategy"]) >= per_strategy for w in wanted):
      break
  return {k: found[k] for k in sorted(found)}


def _sample_images(src: artifacts.Artifact, samples: dict[str, dict[str, Any]]) -> tuple[dict | None, str]:
  """{id: (h, w, 3) uint8} of every sampled item, or (None, why not): only the demo world's images are at hand."""
  if not samples:
    return None, "the artifact has no Parquet train shards to draw samples from"
  config = src.config
  try:
    from alignet_data.teacher import embeddings
    spec = embeddings.info(config["embeddings"])["splits"][config["split"]]["source"]
  except Exception as e:  # noqa: BLE001 (any failure to find the source means: no pictures, and say why)
    return None, f"the embeddings artifact {config.get('embeddings')!r} is not readable here ({type(e).__name__})"
  if not str(spec).startswith("demo:"):
    return None, (f"the images of source `{spec}` are not available to the publisher (only the demo world's "
                  "images are rendered); the table lists the file names instead")
  from alignet_data.teacher import image_sources
  source = image_sources.parse(spec)
  ids = sorted({int(i) for s in samples.values() for row in s["indices"] for i in row})
  try:
    images = {}
    for i in ids:
      block, failures = source.read(image_sources.ReadTask(source.split, i, i + 1))
      if failures or not len(block):
        raise ValueError(f"image {i} failed to decode")
      images[i] = np.asarray(block.images[0])
  except Exception as e:  # noqa: BLE001
    return None, f"the images of source `{spec}` could not be read ({e})"
  return images, ""


def _samples_plot(samples: dict[str, dict[str, Any]], images: dict[int, np.ndarray]) -> bytes:
  """One row per strategy; each triplet's three images left to right, the odd one out last, its soft label above."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  per = max(len(s["strategy"]) for s in samples.values())
  fig, axes = plt.subplots(len(samples), 3 * per, figsize=(1.0 * 3 * per, 1.45 * len(samples)), dpi=100,
                           squeeze=False)
  for row, (strategy, s) in enumerate(samples.items()):
    for t in range(per):
      for item in range(3):
        ax = axes[row, 3 * t + item]
        ax.set_xticks([])
        ax.set_yticks([])
        if t >= len(s["strategy"]):
          ax.axis("off")
          continue
        ax.imshow(images[int(s["indices"][t][item])], interpolation="nearest")
        for spine in ax.spines.values():
          spine.set_color("tab:red" if item == 2 else "0.8")
          spine.set_linewidth(2 if item == 2 else 0.5)
        if item == 1:
          p = s["soft_label"][t]
          ax.set_title(f"p=[{p[0]:.2f} {p[1]:.2f} {p[2]:.2f}]", fontsize=7)
    axes[row, 0].set_ylabel(strategy, fontsize=8, rotation=0, ha="right", va="center")
  fig.suptitle("Sample triplets per strategy (odd one out last, red; p = soft label of pairs 01, 02, 12)",
               fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  plt.close(fig)
  return buf.getvalue()


def _entropy_plot(hist: dict[str, list]) -> bytes:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  edges, counts = hist["edges"], hist["counts"]
  fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=100)
  ax.stairs(counts, edges, fill=True, color="tab:blue")
  ax.set_xlabel("teacher label entropy (nats; max log 3)")
  ax.set_ylabel("triplets")
  ax.set_title("How uncertain the teacher is")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  plt.close(fig)
  return buf.getvalue()


def _schema_rows(src: artifacts.Artifact) -> list[str]:
  names = src.glob("schema/*.json")
  if not names:
    return []
  spec = src.read_json(names[0])
  rows = [f"Schema `{spec['name']}` v{spec['version']} (`{names[0]}`), one row per triplet:", "",
          "| column | type | description |", "| --- | --- | --- |"]
  for f in spec["fields"]:
    kind = f"{f['dtype']}[{f['shape'][0]}]" if f["shape"] else f["dtype"]
    rows.append(f"| `{f['name']}` | {kind} | {f['description']} |")
  return rows


def _card_text(src: artifacts.Artifact, report: dict[str, Any], name: str, version: str, dest: str,
               has_plot: bool, samples: dict[str, dict[str, Any]] | None = None, has_grid: bool = False,
               why_no_images: str = "") -> str:
  config = src.config
  splits = report.get("splits", {})
  npz = report.get("npz") or {}
  train = next((k for k in splits if k.startswith("train")), "train")  # train_<sampling> (older: train)
  lines = [
      f"# {name} {version}",
      "",
      "Triplets of images with a teacher model's human-aligned odd-one-out judgements, made as in AligNet",
      "(Muttenthaler et al., Nature 2025): a vision model's embeddings, affinely transformed to match human",
      "similarity judgements (THINGS, uncertainty distillation), label triplets sampled from an image collection.",
      "Each triplet lists its items so that s01 >= s02 >= s12: items 0 and 1 are the teacher's most similar pair,",
      "item 2 its odd one out. The soft label is softmax([s01, s02, s12]) at temperature 1.",
      "",
      "## How it was made",
      "",
      f"- stage `{src.stage}`, code version `{src.manifest.get('code_version')}`, created "
      f"{src.manifest.get('created')}",
  ]
  for key in ("embeddings", "split", "transform", "clusters", "strategy", "num", "valid_strategies", "num_valid",
              "seed"):
    if key in config:
      lines.append(f"- `{key}`: `{json.dumps(config[key])}`")
  lines.append(f"- input digests: `{json.dumps(src.manifest.get('inputs', {}), sort_keys=True)}`")
  lines += ["", "## Counts", ""]
  for split, n in splits.items():
    lines.append(f"- {split}: {n} triplets")
  for strategy, n in report.get("strategies", {}).items():
    lines.append(f"- strategy `{strategy}`: {n}")
  if "entropy" in report:
    lines.append(f"- mean label entropy: {report['entropy']['mean']:.4f} nats (max {report['entropy']['max']:.4f})")
  if report.get("odd_one_out_changed") is not None:
    lines.append(f"- odd one out changed by the transform (vs the raw teacher): "
                 f"{100 * report['odd_one_out_changed']:.1f}%")
  if has_plot:
    lines += ["", f"![label entropy]({ENTROPY_PLOT})"]
  if samples:
    lines += ["", "## Sample triplets", ""]
    if has_grid:
      lines += [f"![sample triplets per strategy]({SAMPLES_PLOT})", ""]
    else:
      lines += [f"No picture: {why_no_images}.", ""]
    lines += ["| strategy | item 0 | item 1 | item 2 (odd one out) | soft label [p01, p02, p12] |",
              "| --- | --- | --- | --- | --- |"]
    for strategy, smp in samples.items():
      for names, p in zip(smp["file_names"], smp["soft_label"], strict=True):
        lines.append(f"| `{strategy}` | `{names[0]}` | `{names[1]}` | `{names[2]}` | "
                     f"[{p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f}] |")
  lines += ["", "## Schema", ""] + _schema_rows(src)
  lines += [
      "",
      "## Loading",
      "",
      "Every file's sha256 is in `manifest.json`; `alignet_data.dataset.publishing.verify(URL)` re-checks them all.",
      "",
      "pyarrow / pandas:",
      "```python",
      "import glob, pyarrow.parquet as pq",
      f"ROOT = '{dest}'  # wherever this version lives (gs://... works through fsspec)",
      f"train = pq.ParquetDataset(sorted(glob.glob(f'{{ROOT}}/shards/{train}-*.parquet'))).read()  # .to_pandas()",
      "```",
      "tf.data:",
      "```python",
      "import tensorflow as tf",
      "from alignet_data import shards  # or write the spec from the schema table above",
      f"files = sorted(tf.io.gfile.glob(f'{{ROOT}}/shards/{train}-*.tfrecord'))",
      "data = tf.data.TFRecordDataset(files).batch(512).map(",
      "    lambda x: tf.io.parse_example(x, shards.tf_feature_spec()))",
      "```",
      "Grain (random access):",
      "```python",
      "import grain",
      "data = grain.MapDataset.source(train.to_pylist()).shuffle(seed=0).batch(512)",
      "```",
  ]
  if npz:
    lines += _npz_hint(npz, report.get("indices"), dest)
  lines += [
      "",
      "## Licence notes",
      "",
      "The released AligNet dataset is CC-BY 4.0. The images the triplets point to keep their own licences",
      "(ImageNet: the ImageNet terms of access; the demo world: generated by this code). Teacher weights keep",
      "their original licences.",
      "",
  ]
  return "\n".join(lines)


def _npz_hint(npz: dict[str, str], indices: dict[str, Any] | None, dest: str) -> list[str]:
  """How the released trainer reads the npz files, and whether their `indices` are the images it loads."""
  paths = [posixpath.relpath(v, "npz") for v in npz.values()]
  lines = ["The released AligNet trainer (google-deepmind/alignet, `data.py`) reads "
           "`<data_dir>/<transform>/{train,val}_<sampling>.npz`: point its `data_dir` at "
           f"`{dest}/npz` (files: {', '.join(f'`{p}`' for p in paths)}).", ""]
  if indices and not indices.get("tfds_imagenet2012_train_order"):
    lines += [f"Caution: that trainer looks every index up in imagenet2012 train. {indices.get('note')}", ""]
  elif indices:
    lines += ["Their `indices` are record indices of `tfds.data_source('imagenet2012', split='train')`, the images "
              "that trainer loads.", ""]
  return lines
