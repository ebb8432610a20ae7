"""Stage artifacts: one directory per stage output, complete or invisible.

An artifact is a directory (any fsspec URL: a local folder, ``gs://...``, ``memory://...``) holding data files,
``report.json`` (the stage's headline numbers) and ``manifest.json`` (schema version, stage, config, code
version, input digests, row counts, per-file sha256, created time). The manifest is written LAST: an artifact
without one is incomplete and never read. A stage writes into its own staging folder
``<parent>/.<name>.incomplete-<writer id>`` and moves it into place only when complete (a directory rename on local
disks; on object stores, files first and the manifest last). A rerun whose manifest matches the stage, config,
input digests and code version is skipped.

Safety rules (our product is trustworthy data):
- ownership: a stage writes ``out`` only if it does not exist, is empty, or holds a (complete or interrupted)
  artifact of the same stage and nothing else; ``out`` never equals, contains or lies inside an input;
- one writer: ``<parent>/.<name>.lock`` is created exclusively (host, pid, start time, writer id); the staging
  folder ``<parent>/.<name>.incomplete-<writer id>`` is the writer's own; the commit re-checks both;
- verified inputs: every input artifact's files are checked against its manifest sha256 before use.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import errno
import functools
import hashlib
import io
import json
import os
import pathlib
import posixpath
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import fsspec
import numpy as np

from alignet_data.checks import InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
_CHUNK = 1 << 22


INCOMPLETE_MARKER = ".alignet-incomplete.json"  # In `out` while an object-store commit copies files into it.
_SOURCE_PACKAGES = ("alignet_data", "pipelines", "trainer")


@functools.cache
def code_version() -> str:
  """The installed package's version plus a digest of the code's source (every .py of the project's packages
  and the shard schemas), so that an artifact written by other code is never silently reused."""
  from importlib import metadata
  try:
    version = metadata.version("alignet-data")
  except metadata.PackageNotFoundError:
    version = "unknown"
  return f"{version}+src.{source_digest()[:16]}"


@functools.cache
def source_digest() -> str:
  """sha256 over (relative path, bytes) of the project's source files, in path order; computed once."""
  import importlib.util
  files: dict[str, pathlib.Path] = {}
  for package in _SOURCE_PACKAGES:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
      root = pathlib.Path(next(iter(spec.submodule_search_locations)))
      files.update({f"{package}/{p.relative_to(root).as_posix()}": p for p in root.rglob("*.py")})
  schemas = pathlib.Path(__file__).resolve().parents[1] / "schemas"
  files.update({f"schemas/{p.name}": p for p in schemas.glob("*.json")})
  h = hashlib.sha256()
  for rel in sorted(files):
    h.update(rel.encode() + b"\0" + files[rel].read_bytes() + b"\0")
  return h.hexdigest()


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """(filesystem, path within it) for a URL or a plain local path."""
  return fsspec.core.url_to_fs(url)


def join(url: str, *names: str) -> str:
  return posixpath.join(url.rstrip("/"), *names)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
  protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
  return protocol in ("file", "local")


def write_bytes(url: str, data: bytes | memoryview) -> None:
  """Write a whole file at `url` (any fsspec URL), making its parent folders; never half-written: local files
  go to a hidden temporary name and are renamed into place (object stores show an object only once uploaded)."""
  fs, path = url_to_fs(url)
  fs.makedirs(posixpath.dirname(path), exist_ok=True)
  if not is_local(fs):
    with fs.open(path, "wb") as f:
      f.write(data)
    return
  tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fsync_tree(root: str) -> None:
  """Flush a local folder to the disk: every file, then every folder, deepest first (a rename made after this
  cannot reach the disk before the data it names, so a power cut leaves the old state or the whole new one)."""
  for dirpath, _, filenames in os.walk(root, topdown=False):
    for name in filenames:
      fsync_path(os.path.join(dirpath, name))
    fsync_path(dirpath)


def fsync_path(path: str) -> None:
  """fsync one local file or folder (a folder's fsync makes the names in it durable). A filesystem that cannot
  fsync a folder (EINVAL or ENOTSUP: some FUSE and network mounts) is let be; a file that fails to reach the disk
  raises."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError as e:
    if not (e.errno in (errno.EINVAL, errno.ENOTSUP) and os.path.isdir(path)):
      raise
  finally:
    os.close(fd)


def json_bytes(obj: Any) -> bytes:
  """The project's JSON file layout: indented, keys sorted, numpy scalars/arrays as plain values."""
  return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def read_json(url: str) -> Any:
  """A JSON file at any fsspec URL (FileNotFoundError when it is missing; InputError naming it when it is not
  valid JSON, e.g. truncated)."""
  fs, path = url_to_fs(url)
  with fs.open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{url} is not valid JSON ({e}); is it truncated?") from e


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
    if name not in self.files:
      raise FileNotFoundError(f"{name!r} is not in artifact {self.url} (has: {sorted(self.files)})")
    return read_json(self.path(name))

  def load_npz(self, name: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz in the artifact (InputError naming it when it is corrupt or not an npz)."""
    from alignet_data import numeric_files
    with self.open(name, "rb") as f:
      return numeric_files.load_npz(f, self.path(name))

  @property
  def report(self) -> dict[str, Any]:
    return self.read_json(REPORT)

  def verify(self, names: Iterable[str] | None = None, threads: int | None = None) -> int:
    """Recompute the sha256 of files (all by default), streaming, several files at once (hashlib releases the
    GIL); raise ChecksumError naming the first bad file (in name order) and both digests.

    A file verified before in this process, unchanged since (same manifest, same listing of sizes and
    modification stamps), is not read again. Returns how many files were read.
    """
    names = sorted(self.files) if names is None else list(names)
    key = (json.dumps(_location(self.url)), self.digest, _listing_digest(self))
    todo = [n for n in names if (key, n) not in _VERIFIED]
    threads = threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      actual = dict(zip(todo, pool.map(lambda n: sha256_file(self.fs, self.local_path(n)), todo), strict=True))
    for name in todo:
      if actual[name] != self.files[name]["sha256"]:
        raise ChecksumError(f"{self.path(name)} does not match its manifest: sha256 {actual[name]}, manifest says "
                            f"{self.files[name]['sha256']} (the file changed after the artifact was written; "
                            "regenerate it, or pass --no-verify to use it anyway)")
    _VERIFIED.update((key, n) for n in todo)
    return len(todo)


def load(url: str, stage: str | None = None) -> Artifact:
  """Open a complete artifact; fail clearly if it is missing, incomplete or of another stage."""
  fs, path = url_to_fs(url)
  manifest_path = posixpath.join(path, MANIFEST)
  if not fs.isfile(manifest_path):
    hint = f" (run `alignet {stage}` first)" if stage else ""
    raise IncompleteArtifactError(f"No complete artifact at {url}: {MANIFEST} is missing{hint}.")
  manifest = read_json(join(url, MANIFEST))
  if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
    raise InputError(f"{join(url, MANIFEST)} is not an artifact manifest (no `files` table).")
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


class OwnershipError(InputError):
  """An output path this stage may not write (it holds something that is not its own, or overlaps an input)."""


class LockedError(InputError):
  """Another writer holds the output's lock."""


def _location(url: str) -> tuple[str, str]:
  """(protocol, absolute normalised path) of a URL, for comparing locations."""
  fs, path = url_to_fs(url)
  protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
  if is_local(fs):
    return "file", os.path.realpath(path)
  return protocol, posixpath.normpath("/" + path.strip("/"))


def overlap(a: str, b: str) -> str | None:
  """How location `a` relates to `b`, as a verb phrase: "is the same folder as", "is inside", "contains", or None
  when they are apart."""
  (pa, xa), (pb, xb) = _location(a), _location(b)
  if pa != pb:
    return None
  if xa == xb:
    return "is the same folder as"
  if xa.startswith(xb.rstrip("/") + "/"):
    return "is inside"
  if xb.startswith(xa.rstrip("/") + "/"):
    return "contains"
  return None


def input_locations(input_urls: Mapping[str, str]) -> dict[str, str]:
  """The inputs that are set (a stage's `input_urls` may leave an optional one empty)."""
  return {name: url for name, url in input_urls.items() if url}


def check_output(url: str, stage: str, input_urls: Mapping[str, str] = ()) -> None:
  """Refuse (OwnershipError) to write `url` unless it is absent, empty, or this stage's own artifact.

  "Own artifact" means a manifest (or, mid-commit on an object store, the incomplete marker) of the same stage,
  and no file beside the ones it lists: nothing a user put there is ever deleted, not even with --force.
  """
  for name, input_url in input_locations(dict(input_urls)).items():
    how = overlap(url, input_url)
    if how:
      raise OwnershipError(f"--out {url} {how} the input `{name}` ({input_url}): a stage never writes over "
                           "its own inputs; choose another --out.")
  fs, path = url_to_fs(url)
  if not fs.exists(path):
    return
  if not fs.isdir(path):
    raise OwnershipError(f"--out {url} is a file, not an artifact folder; nothing was written.")
  listing = {posixpath.relpath(p, path): info for p, info in fs.find(path, withdirs=True, detail=True).items()}
  found = sorted(n for n in listing if n != ".")
  if not found:
    return
  refuse = (f"--out {url} is not empty and is not a {stage!r} artifact; refusing to replace it (nothing was "
            "deleted). Choose another --out, or empty it yourself")
  owner: dict[str, Any] = {}
  for marker in (MANIFEST, INCOMPLETE_MARKER):
    if marker in found:
      try:
        owner = read_json(join(url, marker))
      except (InputError, OSError):
        owner = {}
      break
  if not isinstance(owner, dict) or not owner.get("stage"):
    raise OwnershipError(f"{refuse} (it holds {_entries(len(found))}, e.g. {found[0]!r}).")
  if owner.get("stage") != stage:
    raise OwnershipError(f"--out {url} holds a {owner.get('stage')!r} artifact, not a {stage!r} one; refusing to "
                         "replace it (nothing was deleted). Choose another --out.")
  listed = set(owner.get("files", {})) | {MANIFEST, INCOMPLETE_MARKER}
  # Folders only matter for what they hold.
  foreign = [n for n in found if listing[n].get("type") != "directory" and n not in listed]
  if foreign and MANIFEST in found:
    raise OwnershipError(f"--out {url} holds a {stage!r} artifact AND {_entries(len(foreign))} it does not list "
                         f"(e.g. {foreign[0]!r}); refusing to replace it (nothing was deleted). Move them away first.")


def _entries(n: int) -> str:
  return f"{n} entry" if n == 1 else f"{n} entries"


def missing_ancestor(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
  """The highest folder on the way to `path` (itself included) that does not exist yet, or None."""
  top = None
  while path and path not in ("/", ".") and not fs.exists(path):
    top, path = path, posixpath.dirname(path.rstrip("/"))
  return top


def remove_if_empty(fs: fsspec.AbstractFileSystem, folder: str | None) -> None:
  """Remove a folder this writer created, if nothing was left in it (a refused or failed write leaves no trace)."""
  if folder and fs.exists(folder) and not fs.find(folder):
    fs.rm(folder, recursive=True)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # A zombie (killed, not yet reaped) holds nothing.
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return True


class WriteLock:
  """An exclusive lock on one output location: `<parent>/.<name>.lock`, created with mode "xb".

  The file records host, pid, start time and writer id. A lock left by a dead process of this host is
  reclaimed; any other holder is reported with its details (delete the lock file only if that writer is gone).
  """

  def __init__(self, url: str, writer_id: str, log: Callable[[str], None] = print):
    self.fs, final = url_to_fs(url.rstrip("/"))
    parent, name = posixpath.split(final.rstrip("/"))
    self.path = posixpath.join(parent, f".{name}.lock")
    self.url = join(posixpath.dirname(url.rstrip("/")), f".{name}.lock") if "://" in url else self.path
    self.writer_id = writer_id
    self.log = log
    self.held = False

  def acquire(self) -> None:
    self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "writer": self.writer_id,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    for attempt in range(3):
      try:
        with self.fs.open(self.path, "xb") as f:
          f.write(json_bytes(info))
        self.held = True
        return
      except FileExistsError:
        holder = self._settled_holder()
        stale = holder == {} or (holder is not None and holder.get("host") == info["host"]
                                 and not _pid_alive(int(holder.get("pid", -1))))
        if attempt < 2 and (holder is None or stale):
          if stale:
            self.log(f"reclaiming a stale lock {self.url} (held by {holder or 'an unreadable record'}; that "
                     "process is gone)")
            self._remove_stale(holder)
          continue  # None: its holder released it meanwhile.
        holder = holder or {}
        raise LockedError(f"{self.url} is held by another writer (host {holder.get('host')}, pid "
                          f"{holder.get('pid')}, since {holder.get('started')}): one writer per output. Wait for "
                          "it, or delete the lock file if that writer is gone.") from None

  def _settled_holder(self, wait: float = 2.0) -> dict[str, Any] | None:
    """The lock's record; None if the lock is gone; {} if it stays unreadable for `wait` seconds (a writer killed
    between creating the file and writing it: a live one writes its few bytes at once)."""
    deadline = time.monotonic() + wait
    while True:
      if not self.fs.exists(self.path):
        return None
      record = self.holder()
      if record is not None:
        return record
      if time.monotonic() > deadline:
        return {}
      time.sleep(0.05)

  def _remove_stale(self, record: dict[str, Any]) -> None:
    """Remove the stale lock whose record is `record`. Locally by an atomic rename aside first: if what was moved
    is not that record (another reclaimer already replaced it with its own fresh lock), it is linked back. On
    object stores a plain delete; a writer that lost its lock that way is stopped by the check at commit."""
    try:
      if not is_local(self.fs):
        self.fs.rm(self.path)
        return
      aside = f"{self.path}.stale-{self.writer_id}"
      os.rename(self.path, aside)
      try:
        with open(aside, "rb") as f:
          moved = json.loads(f.read() or b"{}")
      except ValueError:
        moved = {}
      if moved.get("writer") != record.get("writer"):
        with contextlib.suppress(FileExistsError):
          os.link(aside, self.path)  # Give the live writer its lock back (unless a third one has taken it).
      os.remove(aside)
    except FileNotFoundError:
      pass

  def holder(self) -> dict[str, Any] | None:
    """The lock file's record, or None when it is missing or unreadable (a writer killed while creating it)."""
    try:
      with self.fs.open(self.path, "rb") as f:
        record = json.loads(f.read())
      return record if isinstance(record, dict) else None
    except (OSError, ValueError):
      return None

  def check(self) -> None:
    """Raise LockedError unless this writer still holds the lock."""
    holder = self.holder()
    if not self.held or holder is None or holder.get("writer") != self.writer_id:
      raise LockedError(f"Lost the lock {self.url} (now held by {holder}); this writer's output is discarded.")

  def release(self) -> None:
    if self.held and (self.holder() or {}).get("writer") == self.writer_id:
      self.fs.rm(self.path)
    self.held = False


def new_writer_id() -> str:
  return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class ArtifactWriter:
  """Writes one artifact into its own hidden staging folder under an exclusive lock; `commit` makes it visible.

  Use as a context manager (or call `close`): the lock is released and the staging folder removed on exit.
  """

  def __init__(self, url: str, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], *,
               input_urls: Mapping[str, str] = (), log: Callable[[str], None] = print):
    self.url = url.rstrip("/")
    self.stage = stage
    self.config = dict(config)
    self.inputs = dict(inputs)
    self.input_urls = dict(input_urls)
    self.writer_id = new_writer_id()
    self.fs, self._final = url_to_fs(self.url)
    parent, name = posixpath.split(self._final.rstrip("/"))
    self._parent, self._name = parent, name
    staging = f".{name}.incomplete-{self.writer_id}"
    self._tmp = posixpath.join(parent, staging)
    self.tmp_url = join(posixpath.dirname(self.url), staging) if "://" in self.url else self._tmp
    self.rows: dict[str, int] = {}
    check_output(self.url, stage, self.input_urls)
    self._created = missing_ancestor(self.fs, self._parent)  # Removed again if we leave nothing in it.
    self.lock = WriteLock(self.url, self.writer_id, log)
    self.lock.acquire()
    try:
      check_output(self.url, stage, self.input_urls)  # Again, now that no other writer can change it.
      self._clear_leftovers()
      self.fs.makedirs(self._tmp, exist_ok=True)
    except BaseException:
      self.lock.release()
      remove_if_empty(self.fs, self._created)
      raise

  def __enter__(self) -> ArtifactWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _clear_leftovers(self) -> None:
    """Staging and trash folders of crashed writers of this output (we hold the lock: none is alive)."""
    prefix = (f".{self._name}.incomplete", f".{self._name}.old-")
    try:
      entries = self.fs.ls(self._parent, detail=False)
    except FileNotFoundError:
      return
    for entry in entries:
      if posixpath.basename(entry.rstrip("/")).startswith(prefix):
        self.fs.rm(entry, recursive=True)

  def _inside(self, name: str) -> str:
    """Path of `name` inside the staging folder; never outside it."""
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
      raise InputError(f"File name {name!r} would be written outside the artifact {self.url}.")
    return posixpath.join(self._tmp, norm)

  def path(self, name: str) -> str:
    """URL of a file to write inside the staging folder (for Beam, pyarrow, ...)."""
    self._inside(name)
    return join(self.tmp_url, posixpath.normpath(name))

  def local_path(self, name: str) -> str:
    return self._inside(name)

  def makedirs(self, name: str) -> str:
    self.fs.makedirs(self.local_path(name), exist_ok=True)
    return self.path(name)

  def open(self, name: str, mode: str = "wb"):
    path = self.local_path(name)
    self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return self.fs.open(path, mode)

  def write_json(self, name: str, obj: Any) -> None:
    with self.open(name, "wb") as f:
      f.write(json_bytes(obj))

  def write_npz(self, name: str, **arrays: np.ndarray) -> None:
    """Uncompressed npz: byte-identical for identical arrays (zip entries carry a fixed date), on any filesystem."""
    buf = io.BytesIO()  # zipfile lays out a file it cannot seek (gcsfs writers) otherwise: data descriptors.
    np.savez(buf, **arrays)
    with self.open(name, "wb") as f:
      f.write(buf.getbuffer())

  def set_rows(self, name: str, count: int) -> None:
    self.rows[name] = int(count)

  def abort(self) -> None:
    """Remove the staging folder and release the lock (nothing becomes visible)."""
    try:
      if self.fs.exists(self._tmp):
        self.fs.rm(self._tmp, recursive=True)
    finally:
      self.lock.release()
      remove_if_empty(self.fs, self._created)

  close = abort

  def _file_table(self) -> dict[str, dict[str, Any]]:
    """sha256 and size of every staged file, several files at once (hashlib releases the GIL)."""
    paths = [p for p in sorted(self.fs.find(self._tmp)) if posixpath.relpath(p, self._tmp) != MANIFEST]
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      digests = list(pool.map(lambda p: sha256_file(self.fs, p), paths))
    return {posixpath.relpath(p, self._tmp): {"sha256": d, "bytes": self.fs.size(p)}
            for p, d in zip(paths, digests, strict=True)}

  def commit(self, report: Mapping[str, Any]) -> Artifact:
    """Write report.json, then the manifest, then move the staging folder into place; release the lock."""
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
    self.lock.check()  # Still ours, and `out` still holds nothing foreign.
    check_output(self.url, self.stage, self.input_urls)
    if is_local(self.fs):
      self.write_json(MANIFEST, manifest)
      trash = posixpath.join(self._parent, f".{self._name}.old-{self.writer_id}")
      if os.path.lexists(self._final):  # --force or a changed config: the old artifact of this stage goes aside.
        os.replace(self._final, trash)
      os.replace(self._tmp, self._final)  # Atomic on one filesystem.
      if os.path.lexists(trash):
        self.fs.rm(trash, recursive=True)
    else:
      # Object stores have no directory rename. Hide the old artifact (manifest off) and mark `out` as this
      # stage's incomplete artifact, then data files, then the manifest (the commit point), then unmark.
      marker = posixpath.join(self._final, INCOMPLETE_MARKER)
      old_manifest = posixpath.join(self._final, MANIFEST)
      if self.fs.exists(old_manifest):
        self.fs.rm(old_manifest)
      with self.fs.open(marker, "wb") as f:
        f.write(json_bytes({"stage": self.stage, "writer": self.writer_id}))
      for p in self.fs.find(self._final):
        if posixpath.relpath(p, self._final) != INCOMPLETE_MARKER:
          self.fs.rm(p)
      for name in manifest["files"]:
        dst = posixpath.join(self._final, name)
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        self.fs.copy(posixpath.join(self._tmp, name), dst)
      with self.fs.open(old_manifest, "wb") as f:
        f.write(json_bytes(manifest))
      self.fs.rm(marker)
      self.fs.rm(self._tmp, recursive=True)
    self.lock.release()
    return Artifact(self.url, manifest)


# ------------------------------------------------------------------------------------------- Verified inputs

_VERIFIED: set[tuple[tuple[str, str, str], str]] = set()  # ((location, manifest digest, listing digest), file)


def verify_inputs(input_urls: Mapping[str, str], log: Callable[[str], None] = print) -> None:
  """Check every input artifact's files against its manifest sha256 (once per process: `Artifact.verify`).

  An input that is a file inside an artifact (e.g. ``align/transform.npz``) is checked against that artifact's
  manifest; a plain file or folder has nothing to be checked against.
  """
  for name, url in sorted(input_locations(dict(input_urls)).items()):
    fs, path = url_to_fs(url)
    if fs.isfile(posixpath.join(path, MANIFEST)):
      art, names = load(url), None
    else:
      parent = posixpath.dirname(url.rstrip("/"))
      if not fs.isfile(path) or not fs.isfile(posixpath.join(posixpath.dirname(path), MANIFEST)):
        continue
      art = load(parent)
      base = posixpath.basename(path)
      if base not in art.files:
        continue
      names = [base]
    start = time.perf_counter()
    count = art.verify(names)
    if count:
      log(f"verified input `{name}`: {count} files against {join(art.url, MANIFEST)} "
          f"({time.perf_counter() - start:.1f} s)")


def _listing_digest(art: Artifact) -> str:
  """Digest of the artifact's file listing with sizes and modification stamps (one listing call): a file
  rewritten since the last verification in this process is verified again."""
  stamp = ("mtime", "updated", "generation", "etag", "created")
  listing = sorted((p, info.get("size"), str(next((info[k] for k in stamp if info.get(k) is not None), "")))
                   for p, info in art.fs.find(art.local_path(""), detail=True).items())
  return digest(listing)


# ------------------------------------------------------------------------------------------- Running a stage


def is_up_to_date(url: str, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], *,
                  reuse_stale: bool = False, log: Callable[[str], None] = print) -> Artifact | None:
  """The existing artifact at url if this code made it by this stage from this config and these inputs."""
  art = try_load(url)
  if art is None:
    return None
  same = (art.stage == stage and digest(art.config) == digest(json.loads(canonical_json(config)))
          and art.manifest.get("inputs") == dict(inputs))
  if not same:
    return None
  if art.manifest.get("code_version") != code_version():
    if reuse_stale:
      log(f"[{stage}] {url} was written by other code ({art.manifest.get('code_version')}, now {code_version()}); "
          "reused as asked (--reuse-stale)")
      return art
    log(f"[{stage}] {url} was written by other code ({art.manifest.get('code_version')}, now {code_version()}): "
        "rerunning (--reuse-stale keeps it)")
    return None
  return art


def run_stage(
    stage: str,
    out: str,
    config: Mapping[str, Any],
    input_urls: Mapping[str, str],
    fn: Callable[[ArtifactWriter], Mapping[str, Any]],
    *,
    force: bool = False,
    verify: bool = True,
    reuse_stale: bool = False,
    log: Callable[[str], None] = print,
) -> Artifact:
  """Run `fn` to produce the artifact `out`, unless an up-to-date one exists (or `force`).

  `out` must be this stage's to write (`check_output`); inputs are verified against their manifests first
  (`verify=False` skips that, with a warning). `fn` writes its files through the writer and returns the report
  (headline numbers); the wall time is added as `seconds`. On any exception the staging folder is removed and
  nothing becomes visible.
  """
  check_output(out, stage, input_urls)
  inputs = {name: input_digest(url) for name, url in sorted(input_urls.items())}
  if not force:
    existing = is_up_to_date(out, stage, config, inputs, reuse_stale=reuse_stale, log=log)
    if existing is not None:
      log(f"[{stage}] up to date, skipped: {existing.url}")
      return existing
  if verify:
    verify_inputs(input_urls, log=lambda m: log(f"[{stage}] {m}"))
  else:
    log(f"[{stage}] WARNING: inputs not verified against their manifests (--no-verify)")
  writer = ArtifactWriter(out, stage, config, inputs, input_urls=input_urls, log=log)
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
