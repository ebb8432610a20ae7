"""NaN and inf never score and never enter a stage (issue 12, "Finite numbers only").

Each entry point gets a test on tiny data: `evaluate` (an .npy, an embed artifact, a transform, soft labels),
`cluster` and `triplets` (a transform; embeddings), `align` (features; a human artifact's soft labels). Every one
must end in exit 1 with a one-line message naming the file, and write no artifact.
"""
import numpy as np
import pytest

from alignet_data import artifacts, triplet_math
from alignet_data.checks import InputError
from alignet_data.dataset import clustering
from alignet_data.evaluation import metrics
from alignet_data.teacher import embeddings
from alignet_data.teacher.transform import Transform
from pipelines import cli

N_OBJECTS, DIM = 12, 4


def _cli(capsys, *argv):
  """(exit code, stderr) of `alignet ARGV`."""
  code = cli.main([str(a) for a in argv])
  return code, capsys.readouterr().err


def _triplet_file(path, n_objects=N_OBJECTS, n=60, seed=0):
  rng = np.random.default_rng(seed)
  rows = np.array([rng.choice(n_objects, 3, replace=False) for _ in range(n)])
  np.savetxt(path, rows, fmt="%d")
  return path


def _transform_file(path, dim=DIM, bad=None):
  w = np.eye(dim, dtype=np.float32)
  if bad is not None:
    w[1, 2] = bad
  np.savez(path, weights=w, bias=np.zeros(dim, np.float32), mean=np.float32(0), std=np.float32(1))
  return path


def _embed_artifact(url, vectors, split="pool", labels=None):
  n = len(vectors)
  labels = np.arange(n) % 3 if labels is None else labels

  def fn(writer):
    entry = embeddings.write_split(writer, split, np.arange(n), labels, [f"img{i}.png" for i in range(n)],
                                   np.asarray(vectors, np.float32), ids_per_shard=16)
    embeddings.write_index(writer, {split: entry})
    return {}
  return artifacts.run_stage("embed", str(url), {"u": str(url)}, {}, fn, log=lambda _: None).url


def _good(n=N_OBJECTS, d=DIM, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ------------------------------------------------------------------------------------------- accuracy logic


def test_a_nan_or_inf_similarity_is_never_the_odd_one_out():
  s = np.array([[3.0, 1.0, 0.0], [np.nan, np.nan, np.nan], [np.nan, 1.0, 0.0], [1.0, np.inf, 0.0],
                [2.0, 2.0, 0.0], [-np.inf, 1.0, 0.0]])
  np.testing.assert_array_equal(triplet_math.odd_one_out(s), [2, -1, -1, -1, -1, -1])
  assert triplet_math.odd_one_out_accuracy(np.full((50, 3), np.nan)) == 0.0  # Was 1.0: argmax(NaN) is pair 01.


def test_one_nan_row_in_good_embeddings_is_not_a_hit():
  x = _good()
  triplets = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])  # Stored (i, j, odd): the human odd one out is item 2.
  x[1] = x[2] = 1.0  # Items 1 and 2 alike, 0 far away: the model's odd one out is 0, a miss ...
  x[0] = -1.0
  sims = triplet_math.triplet_similarities(x, triplets)
  assert triplet_math.odd_one_out_correct(sims, 2)[0] == 0.0
  x[0] = np.nan  # ... and stays a miss when row 0 is NaN (argmax over [NaN, NaN, s12] picked pair 01: a "hit").
  sims = triplet_math.triplet_similarities(x, triplets)
  assert triplet_math.odd_one_out_correct(sims, 2)[0] == 0.0
  assert metrics.things_accuracy(sims[:1], n_resamples=5)["accuracy"] == 0.0
  # A model with no answer never matches "no majority" (-1) either.
  assert triplet_math.odd_one_out_correct(np.full((1, 3), np.nan), np.array([-1]))[0] == 0.0


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_refuses_an_all_nan_npy(tmp_path, capsys):
  """The issue's reproduction: it reported accuracy 1.000 [1.000, 1.000]."""
  np.save(tmp_path / "allnan.npy", np.full((N_OBJECTS, DIM), np.nan, np.float32))
  triplets = _triplet_file(tmp_path / "t.txt")
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / "allnan.npy", "--things-triplets", triplets,
                   "--out", tmp_path / "R")
  assert code == 1
  assert err.startswith("alignet evaluate: error:") and "allnan.npy" in err and "NaN" in err
  assert len(err.strip().splitlines()) == 1
  assert not (tmp_path / "R").exists()


def test_evaluate_refuses_one_inf_in_an_npy_naming_its_row(tmp_path, capsys):
  x = _good()
  x[7, 1] = np.inf
  np.save(tmp_path / "e.npy", x)
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / "e.npy", "--things-triplets",
                   _triplet_file(tmp_path / "t.txt"), "--out", tmp_path / "R")
  assert code == 1 and "e.npy" in err and "row 7" in err


def test_evaluate_refuses_a_nan_transform(tmp_path, capsys):
  np.save(tmp_path / "e.npy", _good())
  _transform_file(tmp_path / "t.npz", bad=np.nan)
  code, err = _cli(capsys, "evaluate", "--embeddings", f"m={tmp_path / 'e.npy'}", "--transform",
                   f"m={tmp_path / 't.npz'}", "--things-triplets", _triplet_file(tmp_path / "t.txt"),
                   "--out", tmp_path / "R")
  assert code == 1 and "t.npz" in err and "weights" in err and "NaN" in err
  assert not (tmp_path / "R").exists()


def test_evaluate_refuses_nan_in_an_embed_artifact(tmp_path, capsys):
  x = _good()
  x[3] = np.nan
  emb = _embed_artifact(tmp_path / "emb", x, split="things")
  code, err = _cli(capsys, "evaluate", "--embeddings", f"m={emb}", "--things-triplets",
                   _triplet_file(tmp_path / "t.txt"), "--out", tmp_path / "R")
  assert code == 1 and "embeddings/things-00000-of-00001.parquet" in err and "row 3" in err


def test_evaluate_refuses_nan_soft_labels(tmp_path, capsys):
  np.save(tmp_path / "e.npy", _good())
  triplets = _triplet_file(tmp_path / "t.txt", n=5)
  soft = np.full((5, 3), 1 / 3)
  soft[4, 0] = np.nan
  np.save(tmp_path / "soft.npy", soft)
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / "e.npy", "--things-triplets", triplets,
                   "--things-soft-labels", tmp_path / "soft.npy", "--out", tmp_path / "R")
  assert code == 1 and "soft.npy" in err and "row 4" in err


def test_evaluate_refuses_a_human_similarity_matrix_with_nan(tmp_path, capsys):
  np.save(tmp_path / "e.npy", _good())
  rsm = np.corrcoef(_good(5, 8, 3))
  rsm[0, 3] = rsm[3, 0] = np.nan
  np.save(tmp_path / "rsm.npy", rsm)
  (tmp_path / "stimuli.txt").write_text("0\n1\n2\n3\n4\n")
  code, err = _cli(capsys, "evaluate", "--embeddings", tmp_path / "e.npy", "--rsa",
                   f"toy={tmp_path / 'rsm.npy'},{tmp_path / 'stimuli.txt'}", "--out", tmp_path / "R")
  assert code == 1 and "rsm.npy" in err and "infinite" in err


def test_evaluate_still_scores_good_embeddings(tmp_path, capsys):
  """The checks refuse only what is wrong: the same files without a NaN give a report."""
  np.save(tmp_path / "e.npy", _good())
  _transform_file(tmp_path / "t.npz")
  code, _ = _cli(capsys, "evaluate", "--embeddings", f"m={tmp_path / 'e.npy'}", "--transform",
                 f"m={tmp_path / 't.npz'}", "--things-triplets", _triplet_file(tmp_path / "t.txt"),
                 "--out", tmp_path / "R", "--bootstrap-resamples", "5")
  assert code == 0 and (tmp_path / "R" / "report.json").exists()


# ----------------------------------------------------------------------------------------- cluster, triplets


@pytest.fixture()
def pool(tmp_path):
  """A 48-row embed artifact (3 shards) and a good and a NaN transform."""
  return (_embed_artifact(tmp_path / "emb", _good(48, DIM, 1)), _transform_file(tmp_path / "good.npz"),
          _transform_file(tmp_path / "nan.npz", bad=np.nan))


def test_cluster_refuses_a_nan_transform(tmp_path, pool, capsys):
  """Was a faiss RuntimeError traceback."""
  emb, _, bad = pool
  code, err = _cli(capsys, "cluster", "--embeddings", emb, "--transform", bad, "--k", 3, "--out", tmp_path / "C")
  assert code == 1 and "nan.npz" in err and "weights" in err
  assert not (tmp_path / "C").exists()


def test_cluster_refuses_nan_embeddings(tmp_path, capsys):
  x = _good(48, DIM, 1)
  x[20, 0] = np.nan  # Row 4 of the second shard (ids 16..31).
  emb = _embed_artifact(tmp_path / "emb", x)
  code, err = _cli(capsys, "cluster", "--embeddings", emb, "--k", 3, "--out", tmp_path / "C")
  assert code == 1 and "pool-00001-of-00003.parquet" in err and "row 4" in err


def test_cluster_refuses_a_transform_that_overflows(tmp_path, pool, capsys):
  emb, _, _ = pool
  # Every number finite, but x @ W overflows float32 (rows of 4 terms of ~1e38 each).
  np.savez(tmp_path / "huge.npz", weights=np.full((DIM, DIM), 3e38, np.float32), bias=np.zeros(DIM, np.float32))
  code, err = _cli(capsys, "cluster", "--embeddings", emb, "--transform", tmp_path / "huge.npz", "--k", 3,
                   "--out", tmp_path / "C")
  assert code == 1 and "after transform" in err and "huge.npz" in err


def test_cluster_with_good_inputs_still_runs(tmp_path, pool, capsys):
  emb, good, _ = pool
  code, _ = _cli(capsys, "cluster", "--embeddings", emb, "--transform", good, "--k", 3, "--out", tmp_path / "C")
  assert code == 0 and clustering.load(str(tmp_path / "C")).k == 3


def test_triplets_refuses_a_nan_transform(tmp_path, pool, capsys):
  """Was an IndexError inside the label check."""
  emb, _, bad = pool
  code, err = _cli(capsys, "triplets", "--embeddings", emb, "--transform", bad, "--strategy", "random",
                   "--num", 20, "--num-valid", 0, "--num-shards", 1, "--out", tmp_path / "X")
  assert code == 1 and "nan.npz" in err and "weights" in err
  assert not (tmp_path / "X").exists()


def test_triplets_refuses_nan_embeddings(tmp_path, capsys):
  x = _good(48, DIM, 1)
  x[40, 2] = -np.inf
  emb = _embed_artifact(tmp_path / "emb", x)
  code, err = _cli(capsys, "triplets", "--embeddings", emb, "--strategy", "random", "--num", 20, "--num-valid", 0,
                   "--num-shards", 1, "--out", tmp_path / "X")
  assert code == 1 and "pool-00002-of-00003.parquet" in err and "row 8" in err


def test_load_matrix_refuses_nan_and_caches_nothing(tmp_path):
  x = _good(48, DIM, 1)
  x[5] = np.nan
  emb = _embed_artifact(tmp_path / "emb", x)
  with pytest.raises(InputError, match="pool-00000-of-00003.parquet.*row 5"):
    embeddings.load_matrix(emb, "pool", cache_dir=str(tmp_path / "cache"))
  assert not [p for p in (tmp_path / "cache").rglob("vectors.npy")]


def test_a_label_check_on_nan_says_so():
  from alignet_data.dataset import labelling
  s = np.array([[3.0, 2.0, 1.0], [np.nan, 1.0, 0.0]], np.float32)
  with pytest.raises(ValueError, match="row 1 has non-finite"):
    labelling.check_labels(s, np.full((2, 3), 1 / 3), np.zeros(2))


# --------------------------------------------------------------------------------------------------- align


def _human_artifact(url, probs_train, probs_test):
  triplets = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])

  def fn(writer):
    writer.write_npz("soft_labels.npz", train_triplets=triplets[:2], train_probs=probs_train,
                     test_triplets=triplets[2:], test_probs=probs_test)
    return {}
  return artifacts.run_stage("human", str(url), {"u": str(url)}, {}, fn, log=lambda _: None).url


def test_align_refuses_nan_soft_labels(tmp_path, capsys):
  np.save(tmp_path / "f.npy", _good())
  good = np.full((2, 3), 1 / 3, np.float32)
  bad = good.copy()
  bad[1, 2] = np.nan
  human = _human_artifact(tmp_path / "human", good, bad)
  code, err = _cli(capsys, "align", "--features", tmp_path / "f.npy", "--human", human, "--out", tmp_path / "A")
  assert code == 1 and "soft_labels.npz" in err and "test_probs" in err and "row 1" in err
  assert not (tmp_path / "A").exists()


def test_align_refuses_nan_features(tmp_path, capsys):
  x = _good()
  x[2, 3] = np.nan
  np.save(tmp_path / "f.npy", x)
  human = _human_artifact(tmp_path / "human", np.full((2, 3), 1 / 3), np.full((2, 3), 1 / 3))
  code, err = _cli(capsys, "align", "--features", tmp_path / "f.npy", "--human", human, "--out", tmp_path / "A")
  assert code == 1 and "f.npy" in err and "row 2" in err


def test_transform_from_arrays_names_the_source():
  with pytest.raises(InputError, match="my.npz: transform array 'bias'"):
    Transform.from_arrays({"weights": np.eye(2), "bias": np.array([0.0, np.inf])}, "my.npz")
  with pytest.raises(InputError, match="'mean' must be one number"):
    Transform.from_arrays({"weights": np.eye(2), "bias": np.zeros(2), "mean": np.zeros(2)}, "my.npz")
