"""The embeddings store: Parquet round trip, the id-range shard layout, byte-determinism, reader errors."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignet_data import artifacts
from alignet_data.teacher import embeddings


def _rows(n=23, dim=5, seed=0, drop=(3, 17)):
  rng = np.random.default_rng(seed)
  ids = np.array([i for i in range(n) if i not in drop], np.int64)
  labels = ids % 4
  names = np.array([f"cls{lab}/img{i}.png" for i, lab in zip(ids, labels, strict=True)])
  vectors = rng.normal(size=(len(ids), dim)).astype(np.float32)
  return ids, labels, names, vectors


def _write(url, order=None, dtype="float32", ids_per_shard=8, n=23):
  ids, labels, names, vectors = _rows(n=n)
  order = np.arange(len(ids)) if order is None else order

  def fn(writer):
    entry = embeddings.write_split(writer, "pool", ids[order], labels[order], names[order], vectors[order],
                                   ids_per_shard=ids_per_shard, num_ids=n, dtype=dtype, source="test")
    embeddings.write_index(writer, {"pool": entry}, model="fake")
    return {}
  return artifacts.run_stage("embed", url, {"order": order.tolist(), "dtype": dtype}, {}, fn, log=lambda s: None)


def test_round_trip_sorted_by_id_with_gaps(tmp_path):
  ids, labels, names, vectors = _rows()
  shuffled = np.random.default_rng(1).permutation(len(ids))
  art = _write(str(tmp_path / "emb"), order=shuffled)
  e = embeddings.load(str(tmp_path / "emb"), "pool")
  np.testing.assert_array_equal(e.ids, ids)  # Sorted by id whatever the write order; failed ids 3, 17 absent.
  np.testing.assert_array_equal(e.labels, labels)
  np.testing.assert_array_equal(e.file_names, names)
  np.testing.assert_array_equal(e.vectors, vectors)
  assert e.vectors.dtype == np.float32 and e.dim == 5 and len(e) == 21
  assert embeddings.splits(art) == ["pool"]
  assert embeddings.info(art)["splits"]["pool"]["rows"] == 21


def test_shard_layout_is_by_id_range(tmp_path):
  art = _write(str(tmp_path / "emb"), ids_per_shard=8)
  names = art.glob("embeddings/*.parquet")
  assert names == [f"embeddings/pool-{i:05d}-of-00003.parquet" for i in range(3)]
  for i, name in enumerate(names):
    table = pq.read_table(art.local_path(name))
    ids = table.column("id").to_numpy()
    assert np.all((ids >= 8 * i) & (ids < 8 * (i + 1))) and np.all(np.diff(ids) > 0)
    field = table.schema.field("embedding")  # The vectors' little-endian float32 bytes, with their dtype and dim.
    assert field.type.byte_width == 5 * 4 and field.metadata == {b"dtype": b"float32", b"dim": b"5"}
  assert art.manifest["row_counts"]["embeddings/pool"] == 21


def test_same_rows_any_order_give_identical_bytes(tmp_path):
  a = _write(str(tmp_path / "a"))
  b = _write(str(tmp_path / "b"), order=np.random.default_rng(2).permutation(21))
  shards = a.glob("embeddings/*")
  assert shards and all(a.files[n]["sha256"] == b.files[n]["sha256"] for n in shards)


def test_empty_shard_is_written(tmp_path):
  # ids 16..22 only: shards 0 and 1 of 3 are empty but present, so readers and the layout never depend on luck.
  def fn(writer):
    ids, labels, names, vectors = _rows()
    keep = ids >= 16
    entry = embeddings.write_split(writer, "pool", ids[keep], labels[keep], names[keep], vectors[keep],
                                   ids_per_shard=8, num_ids=23)
    embeddings.write_index(writer, {"pool": entry})
    return {}
  art = artifacts.run_stage("embed", str(tmp_path / "e"), {}, {}, fn, log=lambda s: None)
  assert len(art.glob("embeddings/pool-*")) == 3
  e = embeddings.load(art, "pool")
  np.testing.assert_array_equal(e.ids, [16, 18, 19, 20, 21, 22])


def test_float16_storage(tmp_path):
  _, _, _, vectors = _rows()
  e = embeddings.load(_write(str(tmp_path / "h"), dtype="float16"), "pool")
  assert e.vectors.dtype == np.float32
  np.testing.assert_array_equal(e.vectors, vectors.astype(np.float16).astype(np.float32))


def test_rows_and_take_name_missing_ids(tmp_path):
  e = embeddings.load(_write(str(tmp_path / "e")), "pool")
  np.testing.assert_array_equal(e.take(np.array([[5, 0], [22, 4]])), e.vectors[[[4, 0], [20, 3]]])
  with pytest.raises(KeyError, match=r"\[3, 17\]"):
    e.rows(np.array([3, 17, 4]))


def test_reader_and_writer_errors(tmp_path):
  art = _write(str(tmp_path / "e"))
  with pytest.raises(KeyError, match="'things' is not in embeddings.*'pool'"):
    embeddings.load(art, "things")
  with pytest.raises(ValueError, match="Duplicate ids.*\\[1\\]"):
    embeddings.to_table(np.array([1, 1]), np.zeros(2), ["a", "b"], np.zeros((2, 3)))
  with pytest.raises(ValueError, match="Bad split name 'a-b'"):
    embeddings.shard_name("a-b", 0, 1)
  with pytest.raises(ValueError, match="bfloat16.*float16"):
    embeddings.schema(4, "bfloat16")
  with pytest.raises(ValueError, match="a 'world' artifact, expected 'embed'"):
    artifacts.run_stage("world", str(tmp_path / "w"), {}, {}, lambda w: {}, log=lambda s: None)
    embeddings.load(str(tmp_path / "w"), "pool")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_mapped_matrix_equals_load_and_is_cached(tmp_path, dtype):
  art = artifacts.load(_write(str(tmp_path / "m"), dtype=dtype).url)
  cache = str(tmp_path / "cache")
  full = embeddings.load(art, "pool")
  m = embeddings.load_matrix(art, "pool", cache_dir=cache)
  assert isinstance(m.vectors, np.memmap) and m.vectors.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(m.ids, full.ids)
  np.testing.assert_array_equal(m.labels, full.labels)
  np.testing.assert_array_equal(m.file_names, full.file_names)
  np.testing.assert_array_equal(np.asarray(m.vectors, np.float32), full.vectors)
  np.testing.assert_array_equal(m.take(np.array([22, 0])), full.take(np.array([22, 0])))
  (entry,) = [p for p in (tmp_path / "cache").iterdir()]
  stamp = (entry / "vectors.npy").stat().st_mtime_ns
  again = embeddings.load_matrix(art.url, "pool", cache_dir=cache, dtype="float32")  # Another dtype: another entry.
  assert again.vectors.dtype == np.float32
  assert len(list((tmp_path / "cache").iterdir())) == (2 if dtype == "float16" else 1)
  embeddings.load_matrix(art, "pool", cache_dir=cache)
  assert (entry / "vectors.npy").stat().st_mtime_ns == stamp  # Unpacked once.
  with pytest.raises(KeyError, match="Split 'nope' is not in embeddings"):
    embeddings.load_matrix(art, "nope", cache_dir=cache)


def test_shards_written_as_float_lists_still_load(tmp_path):
  """Embed artifacts written before the vectors were stored as bytes (fixed_size_list<float>) load unchanged."""
  ids, labels, names, vectors = _rows()

  def fn(writer):
    table = pa.table({"id": ids, "label": labels, "file_name": names.tolist(),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 5)})
    with writer.open(embeddings.shard_name("pool", 0, 1), "wb") as f:
      pq.write_table(table, f)
    writer.set_rows(f"{embeddings.SHARD_DIR}/pool", len(ids))
    embeddings.write_index(writer, {"pool": embeddings.index_entry(len(ids), len(ids), 5, "float32", len(ids), "")})
    return {}

  art = artifacts.run_stage("embed", str(tmp_path / "old"), {}, {}, fn, log=lambda s: None)
  e = embeddings.load(art.url, "pool")
  np.testing.assert_array_equal(e.vectors, vectors[np.argsort(ids)])
  np.testing.assert_array_equal(embeddings.load_matrix(art.url, "pool", cache_dir=str(tmp_path / "c")).vectors,
                                e.vectors)
