"""Unreadable inputs end in one line naming the file, at the reader (issue 12, "Unclear errors"): a 0-byte .npy
(was EOFError), a garbage .npy or checkpoint (was numpy's "allow_pickle" advice), a corrupt or non-zip .npz (was
BadZipFile)."""
import io

import numpy as np
import pytest

from alignet_data import artifacts, checks, models, numeric_files
from alignet_data.checks import InputError
from alignet_data.teacher import embeddings
from alignet_data.teacher.transform import Transform
from pipelines import cli


def _npz_bytes(compressed=False, **arrays):
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  return buf.getvalue()


def _npy_bytes(array, allow_pickle=False):
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=allow_pickle)
  return buf.getvalue()


def _flip(data, at):
  b = bytearray(data)
  b[at] ^= 0xFF
  return bytes(b)


_GOOD_NPZ = _npz_bytes(a=np.arange(50.0), b=np.ones((3, 3)))
_GOOD_NPZC = _npz_bytes(compressed=True, a=np.arange(500.0))
_GOOD_NPY = _npy_bytes(np.ones((6, 4), np.float32))

BAD_FILES = {  # name -> (bytes, what the message must say)
    "empty.npy": (b"", "is empty (0 bytes)"),
    "garbage.npy": (b"hello, these are not numbers\n" * 4, "not a numeric"),
    "text.npz": (b"i am not a zip\n", "not a numeric"),
    "fake_zip.npz": (b"PK\x03\x04" + b"\x00" * 40, "corrupt or truncated"),
    "truncated.npz": (_GOOD_NPZ[:len(_GOOD_NPZ) // 2], "corrupt or truncated"),
    "crc.npz": (_flip(_GOOD_NPZ, 200), "corrupt or truncated"),  # A flipped data byte: zip's CRC catches it.
    "inflate.npz": (_flip(_GOOD_NPZC, 120), "corrupt or truncated"),
    "truncated.npy": (_GOOD_NPY[:-7], "corrupt or truncated"),
    "objects.npy": (_npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True), "Python objects"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_unreadable_numpy_file_is_one_input_error_naming_it(tmp_path, name):
  data, says = BAD_FILES[name]
  (tmp_path / name).write_bytes(data)
  with pytest.raises(InputError) as e:
    numeric_files.load(str(tmp_path / name))
  message = str(e.value)
  assert str(tmp_path / name) in message and says in message
  assert "allow_pickle" not in message and "\n" not in message


def test_good_files_load_and_kinds_are_checked(tmp_path):
  (tmp_path / "a.npz").write_bytes(_GOOD_NPZ)
  (tmp_path / "a.npy").write_bytes(_GOOD_NPY)
  assert sorted(numeric_files.load_npz(str(tmp_path / "a.npz"))) == ["a", "b"]
  assert numeric_files.load_npy(str(tmp_path / "a.npy")).shape == (6, 4)
  with pytest.raises(InputError, match="is an .npz holding"):
    numeric_files.load_npy(str(tmp_path / "a.npz"))
  with pytest.raises(InputError, match="one bare array"):
    numeric_files.load_npz(str(tmp_path / "a.npy"))
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    numeric_files.load(str(tmp_path / "missing.npy"))


def test_require_finite_names_the_absolute_row_without_copying():
  x = np.zeros((10, 3), np.float32)
  assert checks.require_finite(x, "x", block=4) is x  # No copy.
  x[9, 1] = np.nan
  with pytest.raises(InputError, match="first at row 9"):
    checks.require_finite(x, "x", block=4)


# ---------------------------------------------------------------------------------- through the commands


def _cli(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  return code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["empty.npy", "garbage.npy", "truncated.npy", "objects.npy"])
def test_evaluate_with_an_unreadable_npy_exits_1_naming_it(tmp_path, capsys, name):
  (tmp_path / name).write_bytes(BAD_FILES[name][0])
  np.savetxt(tmp_path / "t.txt", [[0, 1, 2], [2, 3, 4]], fmt="%d")
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / name, "--things-triplets", tmp_path / "t.txt",
                   "--out", tmp_path / "R")
  assert code == 1 and err.startswith("alignet evaluate: error:") and name in err
  assert BAD_FILES[name][1] in err and "allow_pickle" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["text.npz", "truncated.npz", "crc.npz", "empty.npy"])
def test_evaluate_with_unreadable_soft_labels_or_triplets_exits_1(tmp_path, capsys, name):
  (tmp_path / name).write_bytes(BAD_FILES[name][0])
  np.save(tmp_path / "e.npy", np.ones((5, 2), np.float32))
  np.savetxt(tmp_path / "t.txt", [[0, 1, 2], [2, 3, 4]], fmt="%d")
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / "e.npy", "--things-triplets", tmp_path / "t.txt",
                   "--things-soft-labels", tmp_path / name, "--out", tmp_path / "R")
  assert code == 1 and name in err and BAD_FILES[name][1] in err
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / "e.npy", "--things-triplets", tmp_path / name,
                   "--out", tmp_path / "R")
  assert code == 1 and name in err and BAD_FILES[name][1] in err


def test_a_corrupt_transform_npz_is_refused_by_cluster(tmp_path, capsys):
  def fn(writer):
    entry = embeddings.write_split(writer, "pool", np.arange(9), np.zeros(9, int), [f"{i}.png" for i in range(9)],
                                   np.random.default_rng(0).normal(size=(9, 3)), ids_per_shard=9)
    embeddings.write_index(writer, {"pool": entry})
    return {}
  emb = artifacts.run_stage("embed", str(tmp_path / "emb"), {}, {}, fn, log=lambda _: None).url
  (tmp_path / "t.npz").write_bytes(BAD_FILES["truncated.npz"][0])
  code, err = _cli(capsys, "cluster", "--embeddings", emb, "--transform", tmp_path / "t.npz", "--k", 2,
                   "--out", tmp_path / "C")
  assert code == 1 and "t.npz" in err and "corrupt or truncated" in err and "transform" in err
  assert not (tmp_path / "C").exists()


def test_a_transform_npz_without_its_arrays_names_the_file(tmp_path):
  (tmp_path / "t.npz").write_bytes(_GOOD_NPZ)
  with pytest.raises(InputError, match=r"t\.npz: a transform file needs arrays 'weights' and 'bias'"):
    Transform.load(str(tmp_path / "t.npz"))


@pytest.mark.parametrize("name", ["garbage.npy", "empty.npy", "text.npz", "truncated.npz"])
def test_a_garbage_checkpoint_says_it_is_not_a_checkpoint(tmp_path, name):
  path = tmp_path / name.replace(".npy", ".npz")
  path.write_bytes(BAD_FILES[name][0])
  with pytest.raises(InputError, match="checkpoint") as e:
    models.load_model(f"vit-demo-student:{path}")
  assert str(path) in str(e.value) and "allow_pickle" not in str(e.value)


def test_align_with_an_empty_features_npy_exits_1(tmp_path, capsys):
  (tmp_path / "f.npy").write_bytes(b"")
  np.savetxt(tmp_path / "t.txt", [[0, 1, 2], [2, 3, 4]], fmt="%d")
  code, err = _cli(capsys, "align", "--features", tmp_path / "f.npy", "--train", tmp_path / "t.txt", "--test",
                   tmp_path / "t.txt", "--loss", "hard", "--out", tmp_path / "A")
  assert code == 1 and "f.npy" in err and "is empty (0 bytes)" in err


def test_one_reader_rule_for_npz_keys_and_suffixes(tmp_path):
  """numeric_files' rule, the same for every flag: .npz by preferred key, else its only array, else an error
  listing its arrays (never a silent pick); any other suffix is text with whitespace or commas and # comments."""
  (tmp_path / "s.npz").write_bytes(_npz_bytes(other=np.zeros(2), probs=np.ones((2, 3))))
  assert numeric_files.read_array(str(tmp_path / "s.npz"), npz_keys=("probs",)).shape == (2, 3)
  with pytest.raises(InputError, match=r"s.npz: holds none of \['embeddings'\] and 2 arrays \['other', 'probs'\]"):
    numeric_files.read_matrix(str(tmp_path / "s.npz"), npz_keys=("embeddings",))
  (tmp_path / "one.npz").write_bytes(_npz_bytes(x=np.ones((4, 2))))
  assert numeric_files.read_matrix(str(tmp_path / "one.npz"), npz_keys=("embeddings",)).shape == (4, 2)
  (tmp_path / "m.csv").write_text("# a comment\n1,2,3\n4,5,6\n")
  (tmp_path / "m.txt").write_text("1 2 3  # a comment, with a comma\n4 5 6  # trailing\n")
  for name in ("m.csv", "m.txt"):
    np.testing.assert_array_equal(numeric_files.read_matrix(str(tmp_path / name)), [[1, 2, 3], [4, 5, 6]])
  assert numeric_files.is_array_file("x/m.CSV") and not numeric_files.is_array_file("runs/demo/embed")
  (tmp_path / "nan.txt").write_text("1 nan\n")
  with pytest.raises(InputError, match="nan.txt holds non-finite values"):
    numeric_files.read_matrix(str(tmp_path / "nan.txt"))
  with pytest.raises(FileNotFoundError, match="File not found: .*absent.npy"):
    numeric_files.read_array(str(tmp_path / "absent.npy"))


def test_evaluate_reads_an_npz_matrix_and_names_a_corrupt_one(tmp_path, capsys):
  triplets = tmp_path / "t.txt"
  triplets.write_text("0 1 2\n3 4 2\n")
  x = np.eye(5, dtype=np.float32)
  x[1] = x[0] * 0.9  # 0 and 1 similar: the first triplet's human pair is the model's too.
  np.savez(tmp_path / "x.npz", embeddings=x)
  assert cli.main(["evaluate", "--embeddings", str(tmp_path / "x.npz"), "--things-triplets", str(triplets),
                   "--bootstrap-resamples", "5", "--out", str(tmp_path / "R")]) == 0
  (tmp_path / "z.npz").write_bytes(b"PK not a zip")
  assert cli.main(["evaluate", "--embeddings", str(tmp_path / "z.npz"), "--things-triplets", str(triplets),
                   "--out", str(tmp_path / "R2")]) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "z.npz" in err and "manifest" not in err
