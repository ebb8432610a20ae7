"""The embeddings store: image ids, labels, file names and vectors as Parquet shards inside an embed artifact.

Layout of an embed artifact (one or more named splits, e.g. the demo world's `things` and `pool`):

  embeddings/<split>-<i:05d>-of-<n:05d>.parquet   columns: id int64, label int64, file_name string,
                                                   embedding fixed_size_binary[dim x itemsize]: the vector's
                                                   little-endian bytes (field metadata: dtype, dim)
  embeddings.json                                 per split: dim, dtype, rows, shards, ids_per_shard, source

Invariants (changing them changes bytes: bump the artifact schema):
* Ids are the source's record indices (the demo world's image index, the `tfds.data_source` record index), so
  they match the released AligNet `indices`. Within a split every id appears at most once.
* Shard i of n holds exactly the ids in [i * ids_per_shard, (i + 1) * ids_per_shard), sorted by id. The layout
  is a function of the source size and `ids_per_shard` only, never of the runner or the worker count, so any
  runner writes each shard once with the same bytes. Ids that failed to decode leave a gap; a shard may be empty.
* Parquet files carry no timestamps: identical rows give identical bytes (for one pyarrow version).

Why bytes, not `fixed_size_list<float>`: Parquet stores a list element by element with repetition levels, and
decoding 150M of them per ImageNet shard cost 2-6 CPU seconds (zstd and a dictionary on top); the raw bytes, plain
and uncompressed (random floats do not compress: zstd saved 8%), read 10-25x faster, which every stage that loads
the matrix pays. `np.frombuffer(value, dtype)` reads one in any tool. Shards written as lists still load.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignet_data import artifacts
from alignet_data.checks import InputError, require_finite

SHARD_DIR = "embeddings"
INDEX = "embeddings.json"
STORAGE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
_SMALL_COLUMNS = ["id", "label", "file_name"]  # zstd + dictionary; the vectors' bytes are stored plain.
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_COMPRESSION = "zstd"
_NONE = np.zeros(0, np.int64)
READ_ROWS = 8192  # Rows per block when reading vectors (38 MB at d = 1152; see `iter_shard`).


@dataclasses.dataclass
class Embeddings:
  """One split of an embeddings store, sorted by id."""
  ids: np.ndarray         # (n,) int64
  labels: np.ndarray      # (n,) int64, -1 where the source has no label
  file_names: np.ndarray  # (n,) str
  vectors: np.ndarray     # (n, dim) float32 (`load_matrix`: a read-only memmap, the storage dtype by default)

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def dim(self) -> int:
    return self.vectors.shape[1]

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Row of each id (any shape); raises KeyError naming ids that are absent (e.g. failed to decode)."""
    ids = np.asarray(ids, np.int64)
    pos = np.clip(np.searchsorted(self.ids, ids), 0, max(len(self.ids) - 1, 0))
    found = (self.ids[pos] == ids) if len(self.ids) else np.zeros(ids.shape, bool)
    if not np.all(found):
      missing = np.unique(ids[~found])
      raise KeyError(f"ids not in the embeddings (missing or failed to decode): {missing[:10].tolist()}"
                     f"{' ...' if len(missing) > 10 else ''}")
    return pos

  def take(self, ids: np.ndarray) -> np.ndarray:
    """Vectors of the given ids, shape ids.shape + (dim,)."""
    return self.vectors[self.rows(ids)]


def check_split_name(split: str) -> str:
  if not _SPLIT_RE.match(split):
    raise ValueError(f"Bad split name {split!r}: use letters, digits and '_' only (it names shard files).")
  return split


def check_dtype(dtype: str) -> str:
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"Unsupported embedding storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}.")
  return dtype


def schema(dim: int, dtype: str = "float32") -> pa.Schema:
  """The Parquet schema of a shard (explicit, never inferred from the data)."""
  width = int(dim) * np.dtype(check_dtype(dtype)).itemsize
  return pa.schema([
      ("id", pa.int64()),
      ("label", pa.int64()),
      ("file_name", pa.string()),
      pa.field("embedding", pa.binary(width), metadata={"dtype": dtype, "dim": str(int(dim))}),
  ])


def vector_dim(field: pa.Field) -> int:
  """The vector size a shard's `embedding` field holds (bytes with metadata, or a legacy fixed-size list)."""
  if pa.types.is_fixed_size_binary(field.type):
    return int((field.metadata or {})[b"dim"])
  return int(field.type.list_size)


def _vectors(table: pa.Table | pa.RecordBatch) -> np.ndarray:
  """The (n, dim) float32 vectors of a shard's table (or a batch of it): a view of Arrow's buffer when stored as
  float32 in one chunk (no `combine_chunks`, which copied the 605 MB of an ImageNet shard)."""
  field = table.schema.field("embedding")
  column = table.column("embedding")
  chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
  if any(c.null_count for c in chunks):
    raise KeyError(f"{sum(c.null_count for c in chunks)} null embeddings")
  dim = vector_dim(field)
  if not pa.types.is_fixed_size_binary(field.type):  # Shards written before the vectors were stored as bytes.
    values = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]
  else:
    dtype = np.dtype(check_dtype((field.metadata or {}).get(b"dtype", b"float32").decode())).newbyteorder("<")
    if dim * dtype.itemsize != field.type.byte_width:
      raise KeyError(f"embedding width {field.type.byte_width} bytes is not dim {dim} x {dtype}")
    values = [np.frombuffer(c.buffers()[1], dtype, count=len(c) * dim, offset=c.offset * field.type.byte_width)
              for c in chunks]
  flat = values[0] if len(values) == 1 else np.concatenate(values) if values else np.zeros(0, np.float32)
  return flat.astype(np.float32, copy=False).reshape(-1, dim)


def num_shards(num_ids: int, ids_per_shard: int) -> int:
  if ids_per_shard < 1:
    raise ValueError(f"ids_per_shard (rows_per_shard) must be >= 1, got {ids_per_shard}.")
  return max(1, -(-num_ids // ids_per_shard))


def shard_name(split: str, index: int, count: int) -> str:
  return f"{SHARD_DIR}/{check_split_name(split)}-{index:05d}-of-{count:05d}.parquet"


def shard_of(ids: np.ndarray, ids_per_shard: int) -> np.ndarray:
  """Shard index of each id (the id-range rule above)."""
  return np.asarray(ids, np.int64) // ids_per_shard


def to_table(ids: np.ndarray, labels: np.ndarray, file_names: Sequence[str], vectors: np.ndarray,
             dtype: str = "float32") -> pa.Table:
  """Rows sorted by id as an Arrow table with the store's schema."""
  ids = np.asarray(ids, np.int64)
  vectors = np.asarray(vectors, np.float32)
  if vectors.ndim != 2 or len(vectors) != len(ids) or len(labels) != len(ids) or len(file_names) != len(ids):
    raise ValueError(f"Mismatched columns: ids {ids.shape}, labels {np.shape(labels)}, "
                     f"file_names {len(file_names)}, vectors {vectors.shape} (need (n,), (n,), n, (n, dim)).")
  order = np.argsort(ids, kind="stable")
  ids = ids[order]
  if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
    raise ValueError(f"Duplicate ids in embeddings: {np.unique(ids[1:][ids[1:] == ids[:-1]])[:10].tolist()}")
  out_schema = schema(vectors.shape[1], dtype)
  data = np.ascontiguousarray(vectors[order].astype(np.dtype(check_dtype(dtype)).newbyteorder("<")))
  return pa.Table.from_arrays([
      pa.array(ids, pa.int64()),
      pa.array(np.asarray(labels, np.int64)[order], pa.int64()),
      pa.array([str(file_names[i]) for i in order], pa.string()),
      pa.FixedSizeBinaryArray.from_buffers(out_schema.field("embedding").type, len(ids), [None, pa.py_buffer(data)]),
  ], schema=out_schema)


def write_table(f: Any, table: pa.Table) -> None:
  """One row group, fixed options: the same rows always give the same bytes."""
  pq.write_table(table, f, compression={**dict.fromkeys(_SMALL_COLUMNS, _COMPRESSION), "embedding": "none"},
                 use_dictionary=_SMALL_COLUMNS, write_statistics=_SMALL_COLUMNS, row_group_size=max(len(table), 1),
                 store_schema=True)


def write_shard(url: str, ids: np.ndarray, labels: np.ndarray, file_names: Sequence[str], vectors: np.ndarray,
                dim: int, dtype: str = "float32") -> int:
  """Write one shard file at `url` (any fsspec URL; Beam workers write here). Returns the row count."""
  vectors = np.asarray(vectors, np.float32).reshape(len(ids), dim)
  table = to_table(ids, labels, file_names, vectors, dtype)
  fs, path = artifacts.url_to_fs(url)
  fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
  with fs.open(path, "wb") as f:
    write_table(f, table)
  return len(table)


def index_entry(num_ids: int, ids_per_shard: int, dim: int, dtype: str, rows: int, source: str) -> dict[str, Any]:
  return {"dim": int(dim), "dtype": dtype, "rows": int(rows), "num_ids": int(num_ids),
          "shards": num_shards(num_ids, ids_per_shard), "ids_per_shard": int(ids_per_shard), "source": source}


def write_split(writer: artifacts.ArtifactWriter, split: str, ids: np.ndarray, labels: np.ndarray,
                file_names: Sequence[str], vectors: np.ndarray, *, ids_per_shard: int, num_ids: int | None = None,
                dtype: str = "float32", source: str = "") -> dict[str, Any]:
  """Write a whole split from memory (no Beam): the same files the embed pipeline writes for these rows.

  `num_ids` is the size of the id space (the source's record count); defaults to max(id) + 1.
  Returns the split's index entry; call `write_index` once with all entries.
  """
  ids = np.asarray(ids, np.int64)
  vectors = np.asarray(vectors, np.float32)
  num_ids = int(ids.max()) + 1 if num_ids is None and len(ids) else int(num_ids or 0)
  if len(ids) and (ids.min() < 0 or ids.max() >= num_ids):
    raise ValueError(f"ids must lie in [0, num_ids={num_ids}), got [{ids.min()}, {ids.max()}].")
  n = num_shards(num_ids, ids_per_shard)
  shard = shard_of(ids, ids_per_shard)
  names = np.asarray(file_names, dtype=object)
  for i in range(n):
    sel = np.flatnonzero(shard == i)
    write_shard(writer.path(shard_name(split, i, n)), ids[sel], np.asarray(labels)[sel], names[sel],
                vectors[sel], vectors.shape[1], dtype)
  writer.set_rows(f"{SHARD_DIR}/{split}", len(ids))
  return index_entry(num_ids, ids_per_shard, vectors.shape[1], dtype, len(ids), source)


def write_index(writer: artifacts.ArtifactWriter, entries: dict[str, dict[str, Any]], **extra: Any) -> None:
  """`embeddings.json`: per-split layout and anything global (the model name) in `extra`."""
  writer.write_json(INDEX, {"splits": entries, **extra})


def _artifact(url_or_artifact: str | artifacts.Artifact) -> artifacts.Artifact:
  if isinstance(url_or_artifact, artifacts.Artifact):
    return url_or_artifact
  return artifacts.load(url_or_artifact, stage="embed")


def splits(url_or_artifact: str | artifacts.Artifact) -> list[str]:
  """Names of the splits in an embeddings artifact."""
  return sorted(_artifact(url_or_artifact).read_json(INDEX)["splits"])


def read_shard(f: Any) -> Embeddings:
  """One shard file (a path or file object) as Embeddings."""
  table = pq.read_table(f)
  vectors = _vectors(table)
  return Embeddings(ids=table.column("id").to_numpy(), labels=table.column("label").to_numpy(),
                    file_names=np.asarray(table.column("file_name").to_pylist(), dtype=str), vectors=vectors)


def iter_shard(art: artifacts.Artifact, name: str, rows: int = READ_ROWS, vectors_only: bool = False
               ) -> Iterator[Embeddings]:
  """One shard of `art` in blocks of at most `rows` rows, in id order; NaN/inf or an unreadable file is refused
  with an InputError naming the file. A block's vectors are float32 and valid until the next block is read.
  `vectors_only` leaves ids, labels and file names empty (decoding 1.28M file names cost seconds per pass).

  Why blocks: reading a whole ImageNet shard made Arrow allocate its 605 MB afresh for every shard, and touching
  fresh memory is what loading cost on our 2-core VMs (measured: 1-3 s per GB of first-touched pages, against
  0.6 s per GB to read and copy it); blocks reuse the same few MB. Each block is checked while in cache.
  """
  url = art.path(name)
  try:
    # A local shard is memory-mapped: Arrow then reads the plain, uncompressed vector bytes in place (the page
    # cache) instead of copying them through Python file reads into fresh buffers (measured: 9 s of a 10 s pass).
    local = artifacts.is_local(art.fs) and name in art.files
    with (pa.memory_map(art.local_path(name)) if local else art.open(name)) as f:
      pf = pq.ParquetFile(f)
      small = pf.read(columns=[] if vectors_only else _SMALL_COLUMNS, use_threads=False)
      start = 0
      for batch in pf.iter_batches(batch_size=rows, columns=["embedding"], use_threads=False):
        m = batch.num_rows
        vectors = _vectors(batch)
        require_finite(vectors, f"Embeddings shard {url} (rows from {start})")
        if vectors_only:
          yield Embeddings(ids=_NONE, labels=_NONE, file_names=_NONE.astype(str), vectors=vectors)
        else:
          part = small.slice(start, m)
          yield Embeddings(ids=part.column("id").to_numpy(), labels=part.column("label").to_numpy(),
                           file_names=np.asarray(part.column("file_name").to_pylist(), dtype=str), vectors=vectors)
        start += m
      if not vectors_only and start != len(small):
        raise KeyError(f"{start} vectors for {len(small)} rows")
  except (pa.ArrowException, KeyError) as e:
    raise InputError(f"{url}: not a readable embeddings shard ({type(e).__name__}: {e}).") from None


def load(url_or_artifact: str | artifacts.Artifact, split: str) -> Embeddings:
  """Load one split of an embed artifact, sorted by id, vectors float32 (n, dim); NaN/inf refused (InputError).

  Shards are copied block by block (`iter_shard`) into one preallocated matrix: the peak is that matrix plus a
  block (holding every shard and their concatenation peaked at 3.5x the matrix, 20 GB for ImageNet at d = 1152).
  For a matrix larger than memory use `load_matrix` (memory-mapped).
  """
  art = _artifact(url_or_artifact)
  entry, names = _split_shards(art, split)
  n, dim = int(entry["rows"]), int(entry["dim"])
  vectors = np.empty((n, dim), np.float32)
  ids, labels, file_names = [], [], []
  row = 0
  threads = len(os.sched_getaffinity(0))
  # The copies run on a thread pool: first touching the fresh matrix is most of a load on a VM (measured: 18 s of
  # kernel time for ImageNet's 5.9 GB, against 3 s to read it), and the page faults proceed in parallel.
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending: collections.deque = collections.deque()
    for name in names:
      for part in iter_shard(art, name):
        m = len(part.ids)
        if row + m > n:
          raise ValueError(f"Embeddings {art.url}/{split}: more rows than the {n} its index lists; the artifact "
                           "is corrupt, rerun `alignet embed --force`.")
        pending.append(pool.submit(np.copyto, vectors[row:row + m], part.vectors))
        while len(pending) > 2 * threads:  # A few blocks in flight: bounded memory.
          pending.popleft().result()
        ids.append(part.ids)
        labels.append(part.labels)
        file_names.append(part.file_names)
        row += m
    for future in pending:
      future.result()
  out = Embeddings(ids=np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
                   labels=np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
                   file_names=np.concatenate(file_names) if file_names else np.zeros(0, str), vectors=vectors)
  _check_ids(art, split, out.ids, n)
  return out


def _split_shards(art: artifacts.Artifact, split: str) -> tuple[dict[str, Any], list[str]]:
  """A split's index entry and shard file names (all present)."""
  index = art.read_json(INDEX)["splits"]
  if split not in index:
    raise KeyError(f"Split {split!r} is not in embeddings {art.url}; it has {sorted(index)}.")
  entry = index[split]
  names = [shard_name(split, i, entry["shards"]) for i in range(entry["shards"])]
  missing = [name for name in names if not art.exists(name)]
  if missing:
    raise FileNotFoundError(f"Embeddings {art.url} lacks shards {missing[:3]} listed in {INDEX}.")
  return entry, names


def _check_ids(art: artifacts.Artifact, split: str, ids: np.ndarray, n: int) -> None:
  if len(ids) != n or (n > 1 and np.any(np.diff(ids) <= 0)):
    raise ValueError(f"Embeddings {art.url}/{split}: {len(ids)} rows (index says {n}) or ids not strictly "
                     "increasing; the artifact is corrupt, rerun `alignet embed --force`.")


def read_ids(url_or_artifact: str | artifacts.Artifact, split: str) -> tuple[np.ndarray, int]:
  """A split's ids (sorted, checked against the index) and its vector dim, reading only the id column."""
  art = _artifact(url_or_artifact)
  entry, names = _split_shards(art, split)
  parts = []
  for name in names:
    try:
      with art.open(name) as f:
        parts.append(pq.read_table(f, columns=["id"]).column("id").to_numpy())
    except (pa.ArrowException, KeyError) as e:
      raise InputError(f"{art.path(name)}: not a readable embeddings shard ({type(e).__name__}: {e}).") from None
  ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
  _check_ids(art, split, ids, int(entry["rows"]))
  return ids, int(entry["dim"])


def iter_vectors(url_or_artifact: str | artifacts.Artifact, split: str, rows: int = READ_ROWS) -> Iterator[np.ndarray]:
  """Every vector of a split in id order, block by block (`iter_shard`): one pass that never holds the matrix."""
  art = _artifact(url_or_artifact)
  _, names = _split_shards(art, split)
  for name in names:
    for part in iter_shard(art, name, rows, vectors_only=True):
      yield part.vectors


def info(url_or_artifact: str | artifacts.Artifact) -> dict[str, Any]:
  """The parsed `embeddings.json` (per-split dim, dtype, rows, shards, source; the model)."""
  return _artifact(url_or_artifact).read_json(INDEX)


def default_cache_dir() -> str:
  return os.environ.get("ALIGNET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "alignet", "embeddings"))


def load_matrix(url_or_artifact: str | artifacts.Artifact, split: str, *, cache_dir: str | None = None,
                dtype: str | None = None) -> Embeddings:
  """One split as one memory-mapped matrix (ImageNet with So400m: 1.28M x 1152 float32 = 5.9 GB, or half in
  float16) without holding it in memory: the shards are unpacked once, shard by shard, into `.npy` files in a
  local cache keyed by the shards' sha256 (artifacts are immutable, so the key never goes stale), then opened
  with `np.load(mmap_mode="r")`. Vectors keep the storage dtype unless `dtype` ("float32"/"float16") is given.
  Rows, ids, labels and file names are exactly those of `load` (sorted by id); NaN/inf is refused at unpacking.
  """
  art = _artifact(url_or_artifact)
  entry = art.read_json(INDEX)["splits"].get(split)
  if entry is None:
    raise KeyError(f"Split {split!r} is not in embeddings {art.url}; it has {splits(art)}.")
  dtype = check_dtype(dtype or entry["dtype"])
  names = [shard_name(split, i, entry["shards"]) for i in range(entry["shards"])]
  missing = [n for n in names if not art.exists(n)]
  if missing:
    raise FileNotFoundError(f"Embeddings {art.url} lacks shards {missing[:3]} listed in {INDEX}.")
  # "finite": caches unpacked before the finite check are not reused unchecked.
  key = hashlib.sha256(json.dumps([[n, art.files[n]["sha256"]] for n in names] + [dtype, "finite"]).encode()
                       ).hexdigest()
  folder = os.path.join(cache_dir or default_cache_dir(), key[:32])
  if not os.path.exists(os.path.join(folder, "vectors.npy")):
    _unpack(art, names, entry, dtype, folder)
  out = Embeddings(**{k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r")
                      for k in ("ids", "labels", "file_names", "vectors")})
  if len(out.ids) != entry["rows"] or out.vectors.shape != (entry["rows"], entry["dim"]):
    raise ValueError(f"Cached embeddings {folder} do not match {art.url}/{split}; delete that folder.")
  return out


def _unpack(art: artifacts.Artifact, names: list[str], entry: dict[str, Any], dtype: str, folder: str) -> None:
  """Shards -> ids/labels/file_names/vectors `.npy` in `folder`, written in a temp dir renamed into place (so a
  crash or a concurrent reader never sees half a cache)."""
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    rows, dim = entry["rows"], entry["dim"]
    vectors = np.lib.format.open_memmap(os.path.join(tmp, "vectors.npy"), mode="w+",
                                        dtype=np.float16 if dtype == "float16" else np.float32, shape=(rows, dim))
    ids, labels, file_names, start = [], [], [], 0
    for name in names:
      for part in iter_shard(art, name):  # Checked for NaN/inf once, here: the cache holds checked vectors.
        n = len(part.ids)
        if start + n > rows:
          raise ValueError(f"Embeddings {art.url}: shards hold more rows than {INDEX} says ({rows}).")
        vectors[start:start + n] = part.vectors
        ids.append(part.ids)
        labels.append(part.labels)
        file_names.append(part.file_names)
        start += n
    if start != rows:
      raise ValueError(f"Embeddings {art.url}: shards hold {start} rows, {INDEX} says {rows}.")
    vectors.flush()
    del vectors
    np.save(os.path.join(tmp, "ids.npy"), np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64))
    np.save(os.path.join(tmp, "labels.npy"),
            np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))
    np.save(os.path.join(tmp, "file_names.npy"), np.concatenate(file_names) if file_names else np.zeros(0, str))
    try:
      os.rename(tmp, folder)
    except OSError:  # Another process cached it first: theirs is identical.
      if not os.path.exists(os.path.join(folder, "vectors.npy")):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
