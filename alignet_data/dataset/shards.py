"""Triplet shards: the versioned record schema, Parquet and TFRecord codecs, schema checks, released-npz export.

The schema lives as data in ``schemas/triplets_v1.json``; the pyarrow schema and the TF feature spec are both
built from it, never inferred from records. A block of records is a dict of numpy columns (``Columns``):
``triplet_id`` (m,) int64, ``strategy`` (m,) str, ``indices``/``labels``/``clusters`` (m, 3) int64,
``file_names`` (m, 3) str, ``similarities``/``soft_label`` (m, 3) float32, ``entropy`` (m,) float32.

TFRecord shards hold serialised ``tf.train.Example`` protos. They are encoded here with protobuf alone (the
Example message built in a private descriptor pool, serialised with sorted map keys) and framed with crc32c,
so writers need no TensorFlow (an 8 s, 730 MB import per Beam worker) and the bytes are deterministic; tests
parse them with TensorFlow itself.

Same rows => same bytes (for one pyarrow/protobuf version): Parquet with fixed options and no timestamps,
Examples with deterministic serialisation, npz with fixed zip dates.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import importlib.resources
import itertools
import json
import os
import posixpath
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignet_data import artifacts, checks

SCHEMA_NAME = "triplets"
SCHEMA_VERSION = 1
SCHEMA_FILE = f"triplets_v{SCHEMA_VERSION}.json"
SHARD_DIR = "shards"
NPZ_DIR = "npz"
ROLES = ("train", "val")  # A set's split key is <role>_<sampling tag>, the released trainer's file stem.
_COMPRESSION = "zstd"
_ARROW = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string()}
_NUMPY = {"int64": np.int64, "float32": np.float32, "string": np.str_}

Columns = dict[str, np.ndarray]


class SchemaError(ValueError):
  """A file or block of records does not match the triplet schema."""


@functools.cache
def schema_spec() -> dict[str, Any]:
  """The schema as data (name, version, fields with dtype, shape, description)."""
  text = importlib.resources.files("schemas").joinpath(SCHEMA_FILE).read_text()
  spec = json.loads(text)
  if spec["version"] != SCHEMA_VERSION:
    raise SchemaError(f"{SCHEMA_FILE} declares version {spec['version']}, code expects {SCHEMA_VERSION}.")
  return spec


def fields() -> list[dict[str, Any]]:
  return schema_spec()["fields"]


def field_names() -> list[str]:
  return [f["name"] for f in fields()]


def arrow_schema() -> pa.Schema:
  """The explicit Parquet schema: scalars, and fixed-size lists of 3 for per-item / per-pair fields."""
  cols = []
  for f in fields():
    t = _ARROW[f["dtype"]]
    cols.append(pa.field(f["name"], pa.list_(t, f["shape"][0]) if f["shape"] else t, nullable=False))
  return pa.schema(cols, metadata={b"alignet.schema": SCHEMA_NAME.encode(),
                                   b"alignet.schema_version": str(SCHEMA_VERSION).encode()})


def tf_feature_spec() -> dict[str, Any]:
  """`tf.io.parse_example` spec of the TFRecord shards (imports TensorFlow)."""
  import tensorflow as tf
  dtypes = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}
  return {f["name"]: tf.io.FixedLenFeature(f["shape"], dtypes[f["dtype"]]) for f in fields()}


def check_columns(columns: Columns) -> Columns:
  """The block as schema dtypes and shapes, or SchemaError naming the offending column."""
  names = field_names()
  if set(columns) != set(names):
    raise SchemaError(f"Columns {sorted(columns)} do not match the schema fields {sorted(names)}.")
  m = len(columns["triplet_id"])
  out = {}
  for f in fields():
    value = np.asarray(columns[f["name"]])
    if value.shape != (m, *f["shape"]):
      raise SchemaError(f"Column {f['name']!r} has shape {value.shape}, expected {(m, *f['shape'])}.")
    if f["dtype"] == "string":
      if value.dtype.kind not in "UO":
        raise SchemaError(f"Column {f['name']!r} must hold strings, got dtype {value.dtype}.")
      out[f["name"]] = value.astype(str, copy=False)  # No copy of a str column (3 file names a row).
    else:
      kind = "i" if f["dtype"] == "int64" else "f"
      if value.dtype.kind not in (kind + "u" if kind == "i" else kind):
        raise SchemaError(f"Column {f['name']!r} must be {f['dtype']}, got dtype {value.dtype}.")
      out[f["name"]] = value.astype(_NUMPY[f["dtype"]], copy=False)
  return out


def concat(blocks: Iterable[Columns]) -> Columns:
  blocks = list(blocks)
  if not blocks:
    return empty()
  return {name: np.concatenate([b[name] for b in blocks]) for name in field_names()}


def empty() -> Columns:
  return {f["name"]: np.zeros((0, *f["shape"]), _NUMPY[f["dtype"]]) for f in fields()}


def take(columns: Columns, rows: np.ndarray | slice) -> Columns:
  return {k: v[rows] for k, v in columns.items()}


# ---------------------------------------------------------------------------------------------------- Parquet


def to_table(columns: Columns) -> pa.Table:
  columns = check_columns(columns)
  arrays = []
  for f in fields():
    t = _ARROW[f["dtype"]]
    value = columns[f["name"]]
    if f["shape"]:
      flat = pa.array(value.reshape(-1), type=t)
      arrays.append(pa.FixedSizeListArray.from_arrays(flat, f["shape"][0]))
    else:
      arrays.append(pa.array(value, type=t))
  return pa.Table.from_arrays(arrays, schema=arrow_schema())


def from_table(table: pa.Table) -> Columns:
  out = {}
  for f in fields():
    col = table.column(f["name"]).combine_chunks()
    if f["shape"]:
      col = col.flatten()
    value = col.to_numpy(zero_copy_only=False)
    value = value.astype(str) if f["dtype"] == "string" else value.astype(_NUMPY[f["dtype"]], copy=False)
    out[f["name"]] = value.reshape(len(table), *f["shape"])
  return out


def write_parquet(url: str, columns: Columns) -> int:
  """One row group, fixed options (same rows => same bytes). Returns the row count."""
  table = to_table(columns)
  with _open(url, "wb") as f:
    # A dictionary only for the strategy name: file names are nearly all distinct within a shard, and building
    # their dictionary (abandoned at Arrow's 1 MB page limit) cost a third of the write and made files 34% larger.
    pq.write_table(table, f, compression=_COMPRESSION, row_group_size=max(len(table), 1), use_dictionary=["strategy"],
                   write_statistics=True, store_schema=True)
  return len(table)


def read_parquet(source: Any) -> Columns:
  """A Parquet shard (URL, path or file object) as columns, after checking its schema."""
  if isinstance(source, str):
    with _open(source, "rb") as f:
      table = pq.read_table(f)
  else:
    table = pq.read_table(source)
  _check_arrow_schema(table.schema, str(source))
  return from_table(table)


def _check_arrow_schema(schema: pa.Schema, what: str) -> None:
  expected = arrow_schema()
  if not schema.equals(expected, check_metadata=False):
    raise SchemaError(f"{what}: Parquet schema\n{schema}\ndoes not match triplets v{SCHEMA_VERSION}:\n{expected}")
  version = (schema.metadata or {}).get(b"alignet.schema_version")
  if version != str(SCHEMA_VERSION).encode():
    raise SchemaError(f"{what}: schema version {version!r}, expected {SCHEMA_VERSION}; rewrite the shards.")


def check_parquet(url: str) -> int:
  """Raise SchemaError unless the file has exactly the triplet schema; returns its row count."""
  with _open(url, "rb") as f:
    meta = pq.ParquetFile(f)
    _check_arrow_schema(meta.schema_arrow, url)
    return meta.metadata.num_rows


# ------------------------------------------------------------------------------------------ tf.train.Example


@functools.cache
def _example_class() -> type:
  """tensorflow.Example (tensorflow/core/example/{feature,example}.proto) built without TensorFlow.

  A private descriptor pool keeps it from clashing with TensorFlow's own registration in the same process.
  """
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  fdp = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(name="alignet/tf_example.proto", package="tensorflow",
                                             syntax="proto3")

  def message(name, *field_specs, oneof=None):
    msg = proto.message_type.add(name=name)
    if oneof:
      msg.oneof_decl.add(name=oneof)
    for fname, number, ftype, label, type_name in field_specs:
      fld = msg.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        fld.type_name = type_name
      if oneof:
        fld.oneof_index = 0
    return msg

  rep, opt = fdp.LABEL_REPEATED, fdp.LABEL_OPTIONAL
  message("BytesList", ("value", 1, fdp.TYPE_BYTES, rep, None))
  message("FloatList", ("value", 1, fdp.TYPE_FLOAT, rep, None))
  message("Int64List", ("value", 1, fdp.TYPE_INT64, rep, None))
  message("Feature", ("bytes_list", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
          ("float_list", 2, fdp.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
          ("int64_list", 3, fdp.TYPE_MESSAGE, opt, ".tensorflow.Int64List"), oneof="kind")
  features = message("Features", ("feature", 1, fdp.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry"))
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=fdp.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=fdp.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
  message("Example", ("features", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.Features"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


_KIND = {"int64": "int64_list", "float32": "float_list", "string": "bytes_list"}


def _encode_examples_proto(columns: Columns) -> list[bytes]:
  """Reference encoder: protobuf objects, one Example per row (~50 us a record). Tests pin `encode_examples`
  to its bytes."""
  columns = check_columns(columns)
  example_cls = _example_class()
  lists = {}
  for f in fields():
    value = columns[f["name"]].reshape(len(columns["triplet_id"]), -1)
    if f["dtype"] == "string":
      lists[f["name"]] = [[s.encode() for s in row] for row in value.tolist()]
    else:
      lists[f["name"]] = value.tolist()
  out = []
  for r in range(len(columns["triplet_id"])):
    ex = example_cls()
    feats = ex.features.feature
    for f in fields():
      getattr(feats[f["name"]], _KIND[f["dtype"]]).value.extend(lists[f["name"]][r])
    out.append(ex.SerializeToString(deterministic=True))
  return out


# Compiled wire format: protobuf's deterministic serialisation of tf.train.Example written byte by byte by a
# numba kernel (map entries sorted by key, packed numeric lists, as protobuf does), with the TFRecord framing and
# crc32c in the same pass: ~1 us a record instead of ~50 us; `_encode_examples_proto` pins the bytes in tests.
_KIND_CODE = {"int64": 0, "float32": 1, "string": 2}


def _utf8(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """UTF-8 bytes of strings (row-major) as (flat uint8, offsets (n + 1,))."""
  from alignet_data.dataset import kernels
  u = np.ascontiguousarray(np.asarray(strings).astype(str, copy=False).reshape(-1))
  width = u.dtype.itemsize // 4
  codes = u.view(np.uint32).reshape(len(u), width) if width else np.zeros((len(u), 0), np.uint32)
  flat, offsets, ascii_only = kernels.ascii_utf8(codes)  # File and strategy names: compiled, one byte a char.
  if ascii_only:
    return flat, offsets
  encoded = [s.encode() for s in u.tolist()]
  lengths = np.array([len(e) for e in encoded], np.int64)
  return np.frombuffer(b"".join(encoded), np.uint8), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _encode(columns: Columns, framed: bool) -> tuple[np.ndarray, np.ndarray]:
  columns = check_columns(columns)
  m = len(columns["triplet_id"])
  order = sorted(fields(), key=lambda f: f["name"].encode())  # Deterministic maps sort their keys.
  groups: dict[str, list[np.ndarray]] = {"int64": [], "float32": [], "string": []}
  kinds, widths, cols = [], [], []
  for f in order:
    width = f["shape"][0] if f["shape"] else 1
    kinds.append(_KIND_CODE[f["dtype"]])
    widths.append(width)
    cols.append(sum(a.shape[1] for a in groups[f["dtype"]]))
    groups[f["dtype"]].append(columns[f["name"]].reshape(m, width))
  stack = lambda parts, dtype: np.ascontiguousarray(np.concatenate(parts, 1) if parts else np.zeros((m, 0)), dtype)
  ints = stack(groups["int64"], np.int64).view(np.uint64)  # Negative int64 -> 10-byte varints, as protobuf.
  floats = stack(groups["float32"], "<f4").view(np.uint32)
  strings = stack(groups["string"], str) if groups["string"] else np.zeros((m, 0), str)
  str_bytes, str_off = _utf8(strings)
  keys = [f["name"].encode() for f in order]
  key_off = np.concatenate([[0], np.cumsum([len(k) for k in keys])]).astype(np.int64)
  from alignet_data.dataset import kernels  # numba: imported on first use.
  return kernels.encode_examples(ints, floats, str_bytes, str_off, strings.shape[1], np.array(kinds, np.int64),
                    np.array(widths, np.int64), np.array(cols, np.int64), np.frombuffer(b"".join(keys), np.uint8),
                    key_off, framed)


def encode_examples(columns: Columns) -> list[bytes]:
  """Serialised tf.train.Example per row (deterministic: map keys sorted)."""
  flat, lengths = _encode(columns, framed=False)
  data = flat.tobytes()
  ends = np.cumsum(lengths).tolist()
  return [data[e - n:e] for e, n in zip(ends, lengths.tolist(), strict=True)]


def tfrecord_bytes(columns: Columns) -> bytes:
  """A whole TFRecord file of the rows' Examples (framing and crc32c included)."""
  return _encode(columns, framed=True)[0].tobytes()


def decode_examples(records: Iterable[bytes]) -> Columns:
  """Parse serialised Examples back into columns; SchemaError on a missing/extra feature or a wrong length."""
  example_cls = _example_class()
  names = field_names()
  values: dict[str, list] = {n: [] for n in names}
  for i, raw in enumerate(records):
    feats = example_cls.FromString(raw).features.feature
    if set(feats.keys()) != set(names):
      raise SchemaError(f"Record {i}: features {sorted(feats.keys())} do not match the schema {sorted(names)}.")
    for f in fields():
      feature = feats[f["name"]]
      kind = feature.WhichOneof("kind")
      got = list(getattr(feature, _KIND[f["dtype"]]).value)
      want = f["shape"][0] if f["shape"] else 1
      if kind != _KIND[f["dtype"]] or len(got) != want:
        raise SchemaError(f"Record {i}: feature {f['name']!r} is {kind} of {len(got)} values, expected "
                          f"{_KIND[f['dtype']]} of {want}.")
      values[f["name"]].append(got)
  out = {}
  for f in fields():
    v = values[f["name"]]
    arr = np.array([[s.decode() for s in row] for row in v], dtype=str) if f["dtype"] == "string" else \
        np.array(v, dtype=_NUMPY[f["dtype"]])
    out[f["name"]] = arr.reshape(len(v), *f["shape"])
  return out


# ------------------------------------------------------------------------------------------- TFRecord framing


def _masked_crc(data: bytes) -> int:
  import google_crc32c
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_records(records: Iterable[bytes]) -> bytes:
  """TFRecord framing: length, masked crc32c of the length, data, masked crc32c of the data."""
  parts = []
  for rec in records:
    length = struct.pack("<Q", len(rec))
    parts += [length, struct.pack("<I", _masked_crc(length)), rec, struct.pack("<I", _masked_crc(rec))]
  return b"".join(parts)


def unframe_records(data: bytes, what: str = "TFRecord") -> Iterator[bytes]:
  """Records of a TFRecord file's bytes, checking both checksums of each."""
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise SchemaError(f"{what}: truncated record header at byte {pos}.")
    length_bytes = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", length_bytes)
    (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if crc != _masked_crc(length_bytes):
      raise SchemaError(f"{what}: corrupt length checksum at byte {pos}.")
    rec = data[pos + 12:pos + 12 + n]
    if len(rec) != n or pos + 16 + n > len(data):
      raise SchemaError(f"{what}: truncated record at byte {pos}.")
    (crc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
    if crc != _masked_crc(rec):
      raise SchemaError(f"{what}: corrupt data checksum in the record at byte {pos}.")
    yield rec
    pos += 16 + n


def write_tfrecord(url: str, columns: Columns) -> int:
  """One uncompressed TFRecord file of Examples. Returns the row count."""
  data = tfrecord_bytes(columns)
  with _open(url, "wb") as f:
    f.write(data)
  return len(columns["triplet_id"])


def read_tfrecord(url: str) -> Columns:
  with _open(url, "rb") as f:
    data = f.read()
  return decode_examples(unframe_records(data, url))


_SCAN_ERRORS = {1: "truncated record header", 2: "corrupt length checksum", 3: "truncated record",
                4: "corrupt data checksum in the record"}


def count_tfrecord(data: bytes, what: str = "TFRecord") -> int:
  """Records in a TFRecord file's bytes, checking every length and data crc32c (compiled: ~1 GB/s)."""
  from alignet_data.dataset import kernels
  count, error, pos = kernels.scan_tfrecord(np.frombuffer(data, np.uint8))
  if error:
    raise SchemaError(f"{what}: {_SCAN_ERRORS[error]} at byte {pos}.")
  return int(count)


def check_tfrecord(url: str, decode_limit: int | None = None) -> int:
  """Raise SchemaError unless every record is an Example with exactly the schema's features; returns the count.

  Every record's framing and checksums are verified; `decode_limit` parses only the first records as Examples
  (parsing is ~100 us per record in Python, for files the writer already built from checked columns).
  """
  with _open(url, "rb") as f:
    data = f.read()
  count = count_tfrecord(data, url)
  records = unframe_records(data, url)
  decode_examples(records if decode_limit is None else itertools.islice(records, decode_limit))
  return count


# ------------------------------------------------------------------------------------------------- Layout


def split_key(role: str, sampling: str) -> str:
  """``train_<sampling>`` / ``val_<sampling>``: the name of a set's shards and of its released npz file."""
  if role not in ROLES:
    raise ValueError(f"Unknown split role {role!r}; triplet sets are {ROLES}.")
  return f"{role}_{checks.check_name(sampling, 'sampling tag')}"


def shard_name(split: str, index: int, count: int, ext: str) -> str:
  """``shards/<split key>-%05d-of-%05d.<ext>``."""
  if not split.startswith(ROLES):
    raise ValueError(f"Unknown split {split!r}; triplet shards are named by split keys {ROLES[0]}_<sampling> and "
                     f"{ROLES[1]}_<sampling>.")
  return f"{SHARD_DIR}/{checks.check_name(split, 'split key')}-{index:05d}-of-{count:05d}.{ext}"


def shard_bounds(num: int, num_shards: int) -> np.ndarray:
  """Row offsets of each shard: shard i holds rows [b[i], b[i+1]) of a split (sizes differ by at most 1)."""
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
  return np.array([num * i // num_shards for i in range(num_shards + 1)], dtype=np.int64)


def split_keys(artifact: artifacts.Artifact, fmt: str = "parquet") -> list[str]:
  """The split keys of an artifact's shards in one format, sorted."""
  tail = len("-00000-of-00000.") + len(fmt)
  return sorted({posixpath.basename(n)[:-tail] for n in artifact.glob(f"{SHARD_DIR}/*-*-of-*.{fmt}")})


def read_split(artifact: artifacts.Artifact, split: str, fmt: str = "parquet") -> Columns:
  """Every record of a set in shard order (Parquet or TFRecord shards of a triplets artifact); `split` is a split
  key, or a role (train, val) that only one set of the artifact has."""
  if split in ROLES:
    keys = [k for k in split_keys(artifact, fmt) if k.startswith(f"{split}_")]
    if len(keys) > 1:
      raise ValueError(f"{artifact.url} has several {split} sets {keys}; name one.")
    split = keys[0] if keys else split
  names = artifact.glob(f"{SHARD_DIR}/{split}-*.{fmt}")
  if not names:
    raise FileNotFoundError(f"No {fmt} shards of split {split!r} in {artifact.url}.")
  read = read_parquet if fmt == "parquet" else read_tfrecord
  return concat(read(artifact.path(n)) for n in names)


# -------------------------------------------------------------------------------------- Released npz layout

TRANSFORM_NAMES = ("uncertainty_distillation", "untransformed")
_SAMPLING_NAMES = {"cluster_boundary": "cluster_border_{k}", "class_boundary": "class_border",
                   "within_class": "within_class", "between_class": "between_class", "random": "random"}


def sampling_name(strategies: Iterable[str], k: int | None = None) -> str:
  """The released trainer's sampling tag: cluster_border_500, class_border, within_class, between_class, random,
  or mixed (a mix of strategies)."""
  strategies = sorted(set(strategies))
  if len(strategies) != 1:
    return "mixed"
  name = _SAMPLING_NAMES[strategies[0]]
  if "{k}" in name and k is None:
    raise ValueError(f"The sampling tag of {strategies[0]} names the cluster count k; no clusters were given.")
  return name.format(k=k) if "{k}" in name else name


def npz_name(transform: str, split: str, sampling: str) -> str:
  """``<transform>/<split>_<sampling>.npz`` (split train or val: ``<transform>/<split key>.npz``), the path the
  released trainer reads under its data_dir."""
  if transform not in TRANSFORM_NAMES:
    raise ValueError(f"Unknown transform name {transform!r}; the released layout uses {TRANSFORM_NAMES}.")
  return f"{transform}/{split}_{sampling}.npz"


NPZ_ARRAYS = {"filenames": "file_names", "similarities": "similarities", "indices": "indices"}  # npz <- column
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# zlib level 1: 6x faster than numpy's default 6 on file-name arrays (0.29 s vs 1.6 s for 24 MB, measured), files
# ~40% larger; 10^7 triplets hold 2.6 GB of UTF-32 file names.
_ZIP_LEVEL = 1


def npz_arrays(columns: Columns, filename_dtype: Any = None) -> dict[str, np.ndarray]:
  """The released arrays of a block: `filenames` (m, 3) str, `similarities` (m, 3) float32, `indices` (m, 3) int64.

  `filename_dtype` (e.g. '<U24') fixes the string width, so that blocks written apart concatenate byte-wise.
  """
  columns = check_columns(columns)
  names = columns["file_names"]
  return {"filenames": names.astype(filename_dtype) if filename_dtype is not None else names,
          "similarities": columns["similarities"].astype(np.float32), "indices": columns["indices"].astype(np.int64)}


_DEFLATE_PIECE = 1 << 24  # Bytes per independently deflated piece of an npz member (`_ParallelDeflate`).


def _deflate_piece(piece: bytes | bytearray | memoryview, level: int) -> bytes:
  c = zlib.compressobj(level, zlib.DEFLATED, -15)
  return c.compress(piece) + c.flush(zlib.Z_SYNC_FLUSH)  # Byte-aligned, not final: pieces concatenate.


class _ParallelDeflate:
  """zlib's compress/flush interface, deflating fixed `_DEFLATE_PIECE`-byte pieces of the stream on a thread pool,
  as pigz does: each piece is its own raw deflate stream ended by a sync flush (byte-aligned, not final), and an
  empty final block ends them; together they are one valid deflate stream that any zip reader inflates. The
  pieces depend only on the bytes, so the output does not depend on the thread count. Whole pieces are deflated
  from the caller's buffer, not copied: it must not change them after `compress` returns. At ImageNet scale the
  released npz holds 2.6 GB of UTF-32 file names: one thread took ~17 s to deflate them."""

  def __init__(self, level: int, threads: int):
    self._level, self._threads = level, max(int(threads), 1)
    self._pool = concurrent.futures.ThreadPoolExecutor(self._threads)
    self._pending: collections.deque = collections.deque()
    self._buf = bytearray()

  def _submit(self, piece: bytes | bytearray | memoryview) -> None:
    self._pending.append(self._pool.submit(_deflate_piece, piece, self._level))

  def compress(self, data: Any) -> bytes:
    view = memoryview(data).cast("B")
    if self._buf:  # Top up the partial piece first: pieces are cut at fixed offsets of the stream.
      take = _DEFLATE_PIECE - len(self._buf)
      self._buf += view[:take]
      view = view[take:]
      if len(self._buf) == _DEFLATE_PIECE:
        self._submit(self._buf)  # Handed over whole: a fresh buffer takes its place.
        self._buf = bytearray()
    while len(view) >= _DEFLATE_PIECE:  # Whole pieces straight from the caller's buffer, not copied.
      self._submit(view[:_DEFLATE_PIECE])
      view = view[_DEFLATE_PIECE:]
    self._buf += view
    out = []  # Finished pieces, in order; at most 2 per thread in flight (bounded memory).
    while self._pending and (self._pending[0].done() or len(self._pending) > 2 * self._threads):
      out.append(self._pending.popleft().result())
    return b"".join(out)

  def flush(self) -> bytes:
    if self._buf:
      self._submit(self._buf)
      self._buf = bytearray()
    out = [f.result() for f in self._pending]
    self._pending.clear()
    self._pool.shutdown()
    return b"".join(out) + zlib.compressobj(self._level, zlib.DEFLATED, -15).flush()  # The final, empty block.


def write_npz_parts(f: Any, arrays: dict[str, tuple[np.dtype, tuple[int, ...], Iterable[Any]]]) -> None:
  """A compressed .npz streamed from parts: name -> (dtype, full shape, iterable of C-order bytes of its rows).

  What `np.savez_compressed` writes, without ever holding a whole array: each member's .npy header gives the
  final shape, then the parts follow in order. Zip entries carry a fixed date, so the bytes are deterministic.
  """
  if not f.seekable():  # gcsfs writers cannot seek, and zipfile then writes another layout (data descriptors):
    with tempfile.TemporaryFile() as tmp:  # build it in a local temporary file, so the bytes are the same anywhere.
      write_npz_parts(tmp, arrays)
      tmp.seek(0)
      shutil.copyfileobj(tmp, f, 1 << 24)
    return
  with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL, allowZip64=True) as zf:
    for name, (dtype, shape, parts) in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
      info.compress_type = zipfile.ZIP_DEFLATED
      try:
        info.compress_level = _ZIP_LEVEL  # Python >= 3.13
      except AttributeError:
        info._compresslevel = _ZIP_LEVEL  # Python 3.11, 3.12
      expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
      written = 0
      with zf.open(info, "w", force_zip64=True) as out:
        if isinstance(getattr(out, "_compressor", None), type(zlib.compressobj())):  # CPython's zip writer.
          out._compressor = _ParallelDeflate(_ZIP_LEVEL, len(os.sched_getaffinity(0)))
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        np.lib.format.write_array_header_1_0(out, header)
        for part in parts:
          data = memoryview(part).cast("B")
          out.write(data)
          written += data.nbytes
      if written != expected:
        raise ValueError(f"npz member {name}: {written} bytes of parts for shape {shape} {dtype} "
                         f"({expected} bytes expected).")


def write_npz(f: Any, columns: Columns) -> None:
  """The released arrays (`npz_arrays`) of one block of columns, compressed like the released files."""
  arrays = npz_arrays(columns)
  write_npz_parts(f, {name: (a.dtype, a.shape, [np.ascontiguousarray(a)]) for name, a in arrays.items()})


def read_npz(f: Any) -> dict[str, np.ndarray]:
  with np.load(f, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _open(url: str, mode: str):
  fs, path = artifacts.url_to_fs(url)
  if "w" in mode:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
  return fs.open(path, mode)
