"""Stage artifacts: one directory per stage output, complete or invisible.

An artifact is a directory (any fsspec URL: a local folder, ``gs://...``, ``memory://...``) holding data files,
``report.json`` (the stage's headline numbers) and ``manifest.json`` (schema version, stage, config, code
version, input digests, row counts, per-file sha256, created time). The manifest is written LAST: an artifact
without one is incomplete and never read. A stage writes into ``<parent>/.<name>.incomplete`` and moves it into
place only when complete (a directory rename on local disks; on object stores, files first and the manifest
last). A rerun whose manifest matches the stage, config and input digests is skipped.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
_CHUNK = 1 << 22


def code_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("alignet-data")
  except metadata.PackageNotFoundError:
    return "unknown"


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """(filesystem, path within it) for a URL or a plain local path."""
  return fsspec.core.url_to_fs(url)


def join(url: str, *names: str) -> str:
  return posixpath.join(url.rstrip("/"), *names)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
  protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
  return protocol in ("file", "local")


def write_bytes(url: str, data: bytes | memoryview) -> None:
  """Write a whole file at `url` (any fsspec URL), making its parent folders."""
  fs, path = url_to_fs(url)
  fs.makedirs(posixpath.dirname(path), exist_ok=True)
  with fs.open(path, "wb") as f:
    f.write(data)


def json_bytes(obj: Any) -> bytes:
  """The project's JSON file layout: indented, keys sorted, numpy scalars/arrays as plain values."""
  return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def read_json(url: str) -> Any:
  """A JSON file at any fsspec URL (FileNotFoundError when it is missing)."""
  fs, path = url_to_fs(url)
  with fs.open(path, "rb") as f:
    return json.loads(f.read())


def canonical_json(obj: Any) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")


def digest(obj: Any) -> str:
  """sha256 of an object's canonical JSON."""
  return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
  h = hashlib.sha256()
  with fs.open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def input_digest(url: str) -> str:
  """Digest of an input: an artifact's manifest digest, else the sha256 of a file, else of a file listing."""
  fs, path = url_to_fs(url)
  manifest = posixpath.join(path, MANIFEST)
  if fs.isfile(manifest):
    with fs.open(manifest, "rb") as f:
      return "manifest:" + hashlib.sha256(f.read()).hexdigest()
  if fs.isfile(path):
    return "file:" + sha256_file(fs, path)
  if fs.isdir(path):
    listing = sorted((p, info["size"]) for p, info in fs.find(path, detail=True).items())  # One listing call.
    return "dir:" + digest(listing)
  raise FileNotFoundError(f"Input not found: {url}")


class IncompleteArtifactError(FileNotFoundError):
  """Raised when reading a directory that has no manifest (missing, or a stage that did not finish)."""


class ChecksumError(IOError):
  """Raised when a file's sha256 differs from the one in its artifact's manifest."""


class Artifact:
  """A complete artifact (read side)."""

  def __init__(self, url: str, manifest: Mapping[str, Any]):
    self.url = url.rstrip("/")
    self.manifest = dict(manifest)
    self.fs, self._root = url_to_fs(self.url)

  def __repr__(self) -> str:
    return f"Artifact({self.manifest.get('stage')!r}, {self.url!r})"

  @property
  def stage(self) -> str:
    return self.manifest["stage"]

  @property
  def config(self) -> dict[str, Any]:
    return self.manifest["config"]

  @property
  def files(self) -> dict[str, dict[str, Any]]:
    return self.manifest["files"]

  @property
  def digest(self) -> str:
    return digest(self.manifest)

  def path(self, name: str) -> str:
    """URL of a file inside the artifact."""
    return join(self.url, name)

  def local_path(self, name: str) -> str:
    """Path of a file within the artifact's filesystem (for libraries that take fs + path)."""
    return posixpath.join(self._root, name)

  def exists(self, name: str) -> bool:
    return name in self.files

  def open(self, name: str, mode: str = "rb"):
    if name not in self.files:
      raise FileNotFoundError(f"{name!r} is not in artifact {self.url} (has: {sorted(self.files)})")
    return self.fs.open(self.local_path(name), mode)

  def glob(self, pattern: str) -> list[str]:
    """Names of the artifact's files matching a glob pattern, sorted."""
    import fnmatch
    return sorted(n for n in self.files if fnmatch.fnmatch(n, pattern))

  def read_json(self, name: str) -> Any:
    with self.open(name, "rb") as f:
      return json.loads(f.read())

  def load_npz(self, name: str) -> dict[str, np.ndarray]:
    with self.open(name, "rb") as f:
      with np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}

  @property
  def report(self) -> dict[str, Any]:
    return self.read_json(REPORT)

  def verify(self, names: list[str] | None = None) -> None:
    """Recompute sha256 of files (all by default); raise ChecksumError on a mismatch."""
    for name in names if names is not None else sorted(self.files):
      actual = sha256_file(self.fs, self.local_path(name))
      if actual != self.files[name]["sha256"]:
        raise ChecksumError(f"{self.path(name)}: sha256 {actual} != manifest {self.files[name]['sha256']}")


def load(url: str, stage: str | None = None) -> Artifact:
  """Open a complete artifact; fail clearly if it is missing, incomplete or of another stage."""
  fs, path = url_to_fs(url)
  manifest_path = posixpath.join(path, MANIFEST)
  if not fs.isfile(manifest_path):
    hint = f" (run `alignet {stage}` first)" if stage else ""
    raise IncompleteArtifactError(f"No complete artifact at {url}: {MANIFEST} is missing{hint}.")
  with fs.open(manifest_path, "rb") as f:
    manifest = json.loads(f.read())
  if stage is not None and manifest.get("stage") != stage:
    raise ValueError(f"{url} is a {manifest.get('stage')!r} artifact, expected {stage!r}.")
  if manifest.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{url}: manifest schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}.")
  return Artifact(url, manifest)


def try_load(url: str) -> Artifact | None:
  try:
    return load(url)
  except IncompleteArtifactError:
    return None


class ArtifactWriter:
  """Writes one artifact into a hidden temporary directory; `commit` makes it visible."""

  def __init__(self, url: str, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]):
    self.url = url.rstrip("/")
    self.stage = stage
    self.config = dict(config)
    self.inputs = dict(inputs)
    self.fs, self._final = url_to_fs(self.url)
    parent, name = posixpath.split(self._final.rstrip("/"))
    self._tmp = posixpath.join(parent, f".{name}.incomplete")
    self.tmp_url = join(posixpath.dirname(self.url), f".{name}.incomplete") if "://" in self.url else self._tmp
    self.rows: dict[str, int] = {}
    if self.fs.exists(self._tmp):  # Left by a crashed run of this stage: start clean.
      self.fs.rm(self._tmp, recursive=True)
    self.fs.makedirs(self._tmp, exist_ok=True)

  def path(self, name: str) -> str:
    """URL of a file to write inside the temporary directory (for Beam, pyarrow, ...)."""
    return join(self.tmp_url, name)

  def local_path(self, name: str) -> str:
    return posixpath.join(self._tmp, name)

  def makedirs(self, name: str) -> str:
    self.fs.makedirs(self.local_path(name), exist_ok=True)
    return self.path(name)

  def open(self, name: str, mode: str = "wb"):
    parent = posixpath.dirname(self.local_path(name))
    self.fs.makedirs(parent, exist_ok=True)
    return self.fs.open(self.local_path(name), mode)

  def write_json(self, name: str, obj: Any) -> None:
    with self.open(name, "wb") as f:
      f.write(json_bytes(obj))

  def write_npz(self, name: str, **arrays: np.ndarray) -> None:
    """Uncompressed npz: byte-identical for identical arrays (zip entries carry a fixed date)."""
    with self.open(name, "wb") as f:
      np.savez(f, **arrays)

  def set_rows(self, name: str, count: int) -> None:
    self.rows[name] = int(count)

  def abort(self) -> None:
    if self.fs.exists(self._tmp):
      self.fs.rm(self._tmp, recursive=True)

  def _file_table(self) -> dict[str, dict[str, Any]]:
    table = {}
    for p in sorted(self.fs.find(self._tmp)):
      name = posixpath.relpath(p, self._tmp)
      if name == MANIFEST:
        continue
      table[name] = {"sha256": sha256_file(self.fs, p), "bytes": self.fs.size(p)}
    return table

  def commit(self, report: Mapping[str, Any]) -> Artifact:
    """Write report.json, then the manifest, then move the directory into place."""
    self.write_json(REPORT, dict(report))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": self.stage,
        "config": json.loads(canonical_json(self.config)),
        "code_version": code_version(),
        "inputs": self.inputs,
        "row_counts": self.rows,
        "files": self._file_table(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if self.fs.exists(self._final):
      # --force: hide the old artifact first (manifest off), so no reader ever sees a mix of the two.
      old_manifest = posixpath.join(self._final, MANIFEST)
      if self.fs.exists(old_manifest):
        self.fs.rm(old_manifest)
      self.fs.rm(self._final, recursive=True)
    if is_local(self.fs):
      self.write_json(MANIFEST, manifest)
      os.replace(self._tmp, self._final)  # Atomic on one filesystem.
    else:
      # Object stores have no directory rename: data files first, the manifest (the commit point) last.
      for name in manifest["files"]:
        dst = posixpath.join(self._final, name)
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        self.fs.copy(posixpath.join(self._tmp, name), dst)
      with self.fs.open(posixpath.join(self._final, MANIFEST), "wb") as f:
        f.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
      self.fs.rm(self._tmp, recursive=True)
    return Artifact(self.url, manifest)


def is_up_to_date(url: str, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> Artifact | None:
  """The existing artifact at url if it was made by this stage from this config and these inputs."""
  art = try_load(url)
  if art is None:
    return None
  same = (art.stage == stage and digest(art.config) == digest(json.loads(canonical_json(config)))
          and art.manifest.get("inputs") == dict(inputs))
  return art if same else None


def run_stage(
    stage: str,
    out: str,
    config: Mapping[str, Any],
    input_urls: Mapping[str, str],
    fn: Callable[[ArtifactWriter], Mapping[str, Any]],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Artifact:
  """Run `fn` to produce the artifact `out`, unless an up-to-date one exists (or `force`).

  `fn` writes its files through the writer and returns the report (headline numbers); the wall time is added
  as `seconds`. On any exception the temporary directory is removed and nothing becomes visible.
  """
  inputs = {name: input_digest(url) for name, url in sorted(input_urls.items())}
  if not force:
    existing = is_up_to_date(out, stage, config, inputs)
    if existing is not None:
      log(f"[{stage}] up to date, skipped: {existing.url}")
      return existing
  writer = ArtifactWriter(out, stage, config, inputs)
  start = time.perf_counter()
  try:
    report = dict(fn(writer))
    report.setdefault("seconds", round(time.perf_counter() - start, 2))
    art = writer.commit(report)
  except BaseException:
    writer.abort()
    raise
  log(f"[{stage}] wrote {art.url} ({len(art.files)} files, {report['seconds']:.1f} s)")
  return art
