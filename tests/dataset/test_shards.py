"""Triplet shards: the versioned schema, Parquet / TFRecord round trips, schema checks, the released npz layout."""
import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignet_data.dataset import shards


def _columns(m=7, seed=0):
  rng = np.random.default_rng(seed)
  s = -np.sort(-rng.normal(size=(m, 3)), axis=1).astype(np.float32)
  p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
  return {
      "triplet_id": np.arange(m, dtype=np.int64) + 100,
      "strategy": np.array(["cluster_boundary", "random"] * m)[:m],
      "indices": rng.integers(0, 1_281_167, size=(m, 3)),
      "file_names": np.array([[f"n01440764_{i}{j}.JPEG" for j in range(3)] for i in range(m)]),
      "labels": rng.integers(0, 1000, size=(m, 3)),
      "clusters": rng.integers(-1, 500, size=(m, 3)),
      "similarities": s,
      "soft_label": p.astype(np.float32),
      "entropy": (-(p * np.log(p)).sum(1)).astype(np.float32),
  }


def _assert_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a[k].dtype.kind == b[k].dtype.kind, k


def test_schema_is_versioned_data_and_the_arrow_schema_follows_it():
  spec = shards.schema_spec()
  assert spec["version"] == shards.SCHEMA_VERSION == 1
  schema = shards.arrow_schema()
  assert schema.names == [f["name"] for f in spec["fields"]]
  assert schema.field("similarities").type == pa.list_(pa.float32(), 3)
  assert schema.field("file_names").type == pa.list_(pa.string(), 3)
  assert schema.field("entropy").type == pa.float32()
  assert schema.metadata[b"alignet.schema_version"] == b"1"


def test_parquet_round_trip_and_deterministic_bytes(tmp_path):
  cols = _columns()
  url = str(tmp_path / "a.parquet")
  assert shards.write_parquet(url, cols) == 7
  assert shards.check_parquet(url) == 7
  _assert_equal(shards.read_parquet(url), cols)
  shards.write_parquet(str(tmp_path / "b.parquet"), cols)
  assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_parquet_with_another_schema_is_rejected(tmp_path):
  cols = _columns()
  table = shards.to_table(cols)
  wrong = table.set_column(table.schema.get_field_index("entropy"), "entropy",
                           pa.array(cols["entropy"].astype(np.float64)))
  pq.write_table(wrong, tmp_path / "wrong.parquet")
  with pytest.raises(shards.SchemaError, match="does not match"):
    shards.check_parquet(str(tmp_path / "wrong.parquet"))
  pq.write_table(table.drop_columns(["clusters"]), tmp_path / "missing.parquet")
  with pytest.raises(shards.SchemaError):
    shards.read_parquet(str(tmp_path / "missing.parquet"))


def test_tfrecord_round_trip_checksums_and_schema_check(tmp_path):
  cols = _columns()
  url = str(tmp_path / "a.tfrecord")
  assert shards.write_tfrecord(url, cols) == 7
  assert shards.check_tfrecord(url) == 7
  _assert_equal(shards.read_tfrecord(url), cols)
  shards.write_tfrecord(str(tmp_path / "b.tfrecord"), cols)
  data = (tmp_path / "a.tfrecord").read_bytes()
  assert data == (tmp_path / "b.tfrecord").read_bytes()
  # A flipped byte inside a record is caught by its crc32c.
  corrupt = bytearray(data)
  corrupt[40] ^= 0xFF
  (tmp_path / "c.tfrecord").write_bytes(bytes(corrupt))
  with pytest.raises(shards.SchemaError, match="corrupt"):
    shards.check_tfrecord(str(tmp_path / "c.tfrecord"))
  # A record without one of the schema's features is rejected.
  cls = shards._example_class()
  ex = cls.FromString(shards.encode_examples(cols)[0])
  del ex.features.feature["entropy"]
  (tmp_path / "d.tfrecord").write_bytes(shards.frame_records([ex.SerializeToString()]))
  with pytest.raises(shards.SchemaError, match="do not match the schema"):
    shards.check_tfrecord(str(tmp_path / "d.tfrecord"))


def test_blocks_with_wrong_shapes_or_types_are_refused():
  cols = _columns()
  with pytest.raises(shards.SchemaError, match="'indices' has shape"):
    shards.check_columns({**cols, "indices": cols["indices"][:, :2]})
  with pytest.raises(shards.SchemaError, match="must hold strings"):
    shards.check_columns({**cols, "strategy": np.zeros(7)})
  with pytest.raises(shards.SchemaError, match="do not match the schema fields"):
    shards.check_columns({k: v for k, v in cols.items() if k != "entropy"})


def test_released_npz_has_the_official_names_dtypes_and_shapes():
  cols = _columns(m=11)
  buf = io.BytesIO()
  shards.write_npz(buf, cols)
  buf.seek(0)
  with np.load(buf, allow_pickle=False) as z:  # Loads without pickle, as the released trainer does.
    assert sorted(z.files) == ["filenames", "indices", "similarities"]
    assert z["filenames"].shape == z["similarities"].shape == z["indices"].shape == (11, 3)
    assert z["filenames"].dtype.kind == "U"
    assert z["similarities"].dtype == np.float32 and z["indices"].dtype == np.int64
    np.testing.assert_array_equal(z["filenames"], cols["file_names"])
    # The released order: s12 is the smallest.
    assert np.all(z["similarities"][:, 2] <= z["similarities"][:, :2].min(1))
  again = io.BytesIO()
  shards.write_npz(again, cols)
  assert buf.getvalue() == again.getvalue()
  assert shards.npz_name("uncertainty_distillation", "train", "cluster_border_500") == \
      "uncertainty_distillation/train_cluster_border_500.npz"
  assert shards.sampling_name(["cluster_boundary"], 500) == "cluster_border_500"
  assert shards.sampling_name(["class_boundary"]) == "class_border"
  assert shards.sampling_name(["between_class"]) == "between_class"
  assert shards.sampling_name(["random", "within_class"]) == "mixed"
  with pytest.raises(ValueError, match="names the cluster count k"):
    shards.sampling_name(["cluster_boundary"])
  # Split keys are the released file stems: the npz of set `key` is <transform>/<key>.npz.
  assert shards.split_key("train", "cluster_border_500") == "train_cluster_border_500"
  assert shards.npz_name("uncertainty_distillation", "val", "between_class") == \
      f"uncertainty_distillation/{shards.split_key('val', 'between_class')}.npz"
  with pytest.raises(ValueError, match="Unknown split role 'valid'"):
    shards.split_key("valid", "random")
  with pytest.raises(ValueError, match="released layout uses"):
    shards.npz_name("aligned", "train", "random")


def test_shard_bounds_cover_a_split_evenly():
  b = shards.shard_bounds(10, 4)
  assert b.tolist() == [0, 2, 5, 7, 10]
  assert shards.shard_bounds(2, 4).tolist() == [0, 0, 1, 1, 2]  # More shards than rows: some are empty.
  assert shards.shard_name("train_random", 3, 16, "parquet") == "shards/train_random-00003-of-00016.parquet"
  assert shards.shard_name("val_class_border", 0, 1, "tfrecord") == "shards/val_class_border-00000-of-00001.tfrecord"
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    shards.shard_name("test", 0, 1, "parquet")


@pytest.mark.slow
def test_tensorflow_parses_our_tfrecords_with_the_feature_spec(tmp_path):
  import tensorflow as tf
  cols = _columns()
  url = str(tmp_path / "a.tfrecord")
  shards.write_tfrecord(url, cols)
  batch = next(iter(tf.data.TFRecordDataset(url).batch(100).map(
      lambda x: tf.io.parse_example(x, shards.tf_feature_spec()))))
  got = {k: v.numpy() for k, v in batch.items()}
  for k in ("strategy", "file_names"):
    got[k] = got[k].astype(str)
  _assert_equal(got, cols)


def test_compiled_example_encoder_writes_protobufs_bytes_exactly():
  """The numba encoder (~1 us a record) against protobuf's own deterministic serialisation (~50 us)."""
  for m, seed in ((1, 1), (7, 2), (300, 3)):
    cols = _columns(m=m, seed=seed)
    assert shards.encode_examples(cols) == shards._encode_examples_proto(cols)
    assert shards.tfrecord_bytes(cols) == shards.frame_records(shards._encode_examples_proto(cols))
  cols = _columns(m=5)
  names = cols["file_names"].astype(object)
  names[0, 1] = "é日本/ünïcode.JPEG"  # Non-ASCII names take the UTF-8 path.
  cols["file_names"] = names.astype(str)
  cols["triplet_id"][:] = [0, 127, 128, 2**40, 2**63 - 1]  # Varints of 1, 1, 2, 6 and 9 bytes ...
  cols["clusters"][0] = [-1, -1, 0]  # ... and negatives (10 bytes).
  assert shards.encode_examples(cols) == shards._encode_examples_proto(cols)
  assert shards.encode_examples(shards.empty()) == [] and shards.tfrecord_bytes(shards.empty()) == b""


def test_tfrecord_scan_counts_records_and_rejects_truncation(tmp_path):
  data = shards.tfrecord_bytes(_columns(m=50))
  assert shards.count_tfrecord(data) == 50
  with pytest.raises(shards.SchemaError, match="truncated"):
    shards.count_tfrecord(data[:-3])
  with pytest.raises(shards.SchemaError, match="corrupt length checksum"):
    shards.count_tfrecord(bytes([data[0] ^ 1]) + data[1:])


def test_npz_streamed_from_parts_equals_the_whole_and_checks_sizes():
  cols = _columns(m=30)
  whole = io.BytesIO()
  shards.write_npz(whole, cols)
  arrays = shards.npz_arrays(cols)
  parts = io.BytesIO()
  shards.write_npz_parts(parts, {name: (a.dtype, a.shape, [a[:10].tobytes(), a[10:11].tobytes(), a[11:].tobytes()])
                                 for name, a in arrays.items()})
  assert parts.getvalue() == whole.getvalue()
  parts.seek(0)
  got = shards.read_npz(parts)
  for name, a in arrays.items():
    np.testing.assert_array_equal(got[name], a)
  with pytest.raises(ValueError, match="bytes of parts"):
    shards.write_npz_parts(io.BytesIO(), {"indices": (np.int64, (31, 3), [arrays["indices"].tobytes()])})


def test_npz_members_deflated_in_parallel_pieces_are_one_valid_stream_whatever_the_threads(monkeypatch):
  """The npz writer deflates fixed pieces on a thread pool: zip readers inflate them as one stream (CRC checked),
  the arrays round-trip, and the bytes do not depend on the thread count or on how the parts were cut."""
  import io
  import zipfile
  import zlib
  monkeypatch.setattr(shards, "_DEFLATE_PIECE", 1 << 14)
  rng = np.random.default_rng(0)
  names = np.array([f"n{rng.integers(1000):08d}_{i}.JPEG" for i in range(30000)]).reshape(-1, 3)
  sims = rng.normal(size=(10000, 3)).astype(np.float32)
  data = names.tobytes() + sims.tobytes()
  outs = []
  for threads, cuts in ((1, [7777]), (3, [7777]), (2, [5000, 5001, 60000, 60001, 200000])):
    c = shards._ParallelDeflate(1, threads)  # Whole pieces straight from big writes, small ones buffered.
    bounds = [0, *cuts, len(data)]
    outs.append(b"".join([*(c.compress(data[a:b]) for a, b in itertools.pairwise(bounds)), c.flush()]))
  assert outs[0] == outs[1] == outs[2] and zlib.decompress(outs[0], -15) == data
  files = []
  for cut in (1000, 9000):
    f = io.BytesIO()
    shards.write_npz_parts(f, {"filenames": (names.dtype, names.shape, [names[:cut].tobytes(), names[cut:].tobytes()]),
                               "similarities": (sims.dtype, sims.shape, [sims.tobytes()])})
    files.append(f.getvalue())
  assert files[0] == files[1]
  with zipfile.ZipFile(io.BytesIO(files[0])) as zf:
    assert zf.testzip() is None
  z = np.load(io.BytesIO(files[0]))
  np.testing.assert_array_equal(z["filenames"], names)
  np.testing.assert_array_equal(z["similarities"], sims)
