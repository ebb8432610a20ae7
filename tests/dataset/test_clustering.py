"""k-means clusters and the elbow criterion; the `cluster` stage on a small synthetic embeddings artifact."""
import os
import subprocess
import sys

import numpy as np
import pytest

from alignet_data import artifacts
from alignet_data.checks import InputError
from alignet_data.dataset import clustering
from alignet_data.teacher import embeddings
from alignet_data.teacher.transform import Transform
from pipelines import cluster_stage


def _planted(n=1200, d=16, c=8, seed=0, spread=6.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(c, d)) * spread
  labels = np.arange(n) % c
  return (centers[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def _embeddings_artifact(url, x, labels):
  def fn(writer):
    n = len(x)
    entry = embeddings.write_split(writer, "pool", np.arange(n), labels, [f"img{i:05d}.png" for i in range(n)], x,
                                   ids_per_shard=500)
    embeddings.write_index(writer, {"pool": entry})
    return {}
  return artifacts.run_stage("embed", url, {"rows": len(x)}, {}, fn, log=lambda s: None)


def _purity(truth, found):
  """Fraction of points whose k-means cluster's majority true class is their own."""
  hits = 0
  for c in np.unique(found):
    hits += np.bincount(truth[found == c]).max()
  return hits / len(truth)


def test_kmeans_recovers_planted_clusters_and_is_seeded():
  x, truth = _planted()
  c = clustering.kmeans(x, 8, seed=0)
  labels, dist = clustering.assign(x, c)
  assert _purity(truth, labels) > 0.97
  np.testing.assert_array_equal(c, clustering.kmeans(x, 8, seed=0))
  # assign is the nearest centroid by squared Euclidean distance.
  brute = ((x[:, None, :] - c[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(labels, brute.argmin(1))
  np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-3)


def test_elbow_picks_the_knee():
  assert clustering.elbow([2, 4, 6, 8, 10, 12], [100.0, 60.0, 20.0, 17.0, 15.0, 14.0]) == 6
  assert clustering.elbow([5, 10], [10.0, 5.0]) == 10  # No knee on two points: the largest k.
  x, _ = _planted(c=8)
  result = clustering.cluster(x, np.arange(len(x)), k_grid=[2, 4, 6, 8, 10, 12, 16, 24], seed=0)
  assert result.chosen_by == "elbow" and result.clusters.k == 8
  assert len(result.inertias) == 8 and result.inertia == result.inertias[3]


def test_bad_k_fails_clearly():
  x, _ = _planted(n=50)
  with pytest.raises(ValueError, match="k = 60"):
    clustering.kmeans(x, 60)
  with pytest.raises(ValueError, match="No usable k"):
    clustering.cluster(x, np.arange(50), k_grid=[100, 200])


def test_clusters_for_other_embeddings_are_refused():
  cl = clustering.Clusters(np.array([0, 1, 2]), np.array([0, 1, 1]), np.zeros((2, 4), np.float32))
  np.testing.assert_array_equal(cl.for_ids(np.array([2, 0])), [1, 0])
  with pytest.raises(ValueError, match="made from other embeddings"):
    cl.for_ids(np.array([0, 5]))


def test_cluster_stage_writes_clusters_elbow_and_report(tmp_path):
  x, truth = _planted(n=900, c=6)
  emb = _embeddings_artifact(str(tmp_path / "embed"), x, truth)
  # A transform that scales and shifts: clusters of the transformed features are the same partition.
  w = (np.eye(16) * 2).astype(np.float32)
  np.savez(tmp_path / "t.npz", weights=w, bias=np.ones(16, np.float32), mean=np.float32(0), std=np.float32(1))
  config = cluster_stage.default_config()
  config.update(embeddings=emb.url, transform=str(tmp_path / "t.npz"), k_grid=[2, 4, 6, 9, 12])
  art = artifacts.run_stage("cluster", str(tmp_path / "cluster"), config, cluster_stage.input_urls(config),
                            lambda w: cluster_stage.run(config, w), log=lambda s: None)
  report = art.report
  assert report["k"] == 6 and report["chosen_by"] == "elbow" and report["transformed"]
  assert report["elbow"]["k"] == [2, 4, 6, 9, 12] and len(report["elbow"]["inertia"]) == 5
  assert {"clusters.npz", "elbow.json", "elbow.png"} <= set(art.files)
  cl = clustering.load(art.url)
  assert cl.ids.dtype == np.int64 and cl.cluster.dtype == np.int64 and cl.centroids.dtype == np.float32
  assert cl.centroids.shape == (6, 16)
  assert _purity(truth, cl.cluster) > 0.97
  # Centroids live in the transformed space.
  t = Transform.load(str(tmp_path / "t.npz")).apply(x)
  np.testing.assert_array_equal(cl.cluster, clustering.assign(t, cl.centroids)[0])

  fixed = dict(config, k=3)
  art3 = artifacts.run_stage("cluster", str(tmp_path / "c3"), fixed, cluster_stage.input_urls(fixed),
                             lambda w: cluster_stage.run(fixed, w), log=lambda s: None)
  assert art3.report["k"] == 3 and art3.report["chosen_by"] == "fixed" and "elbow.png" not in art3.files


def test_embeddings_load_copies_shard_by_shard_into_one_matrix_and_transform_rows_blocks(tmp_path):
  x, labels = _planted(n=1300)
  art = _embeddings_artifact(str(tmp_path / "embed"), x, labels)  # 3 shards of 500 ids.
  e = embeddings.load(art.url, "pool")
  np.testing.assert_array_equal(e.vectors, x)
  np.testing.assert_array_equal(e.labels, labels)
  assert e.vectors.dtype == np.float32 and e.vectors.flags.c_contiguous and e.ids.dtype == np.int64
  assert len(e.file_names) == len(x)
  with pytest.raises(KeyError, match="has \\['pool'\\]"):
    embeddings.load(art.url, "things")
  t = Transform(np.eye(16, dtype=np.float32) * 2, np.ones(16, np.float32))
  np.testing.assert_allclose(clustering.transform_rows(t, x), t.apply(x), rtol=1e-6)


def test_transform_rows_gives_the_same_bits_whatever_the_thread_count(tmp_path):
  """A Dask worker (BLAS pinned to one thread by its nanny) must label with the launcher's exact vectors."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5000, 96)).astype(np.float32)
  t = Transform(rng.standard_normal((96, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32))
  one = clustering.transform_rows(t, x, threads=1)
  np.testing.assert_array_equal(clustering.transform_rows(t, x, threads=2), one)
  np.testing.assert_array_equal(clustering.transform_rows(t, x, threads=3), one)
  np.testing.assert_allclose(one, t.apply(x), rtol=1e-5, atol=1e-5)
  # A process whose BLAS is pinned to one thread, as in a Dask worker, computes the same bits.
  np.save(tmp_path / "x.npy", x)
  np.savez(tmp_path / "t.npz", **t.arrays())
  code = ("import sys, numpy as np; from alignet_data.dataset import clustering; "
          "from alignet_data.teacher.transform import Transform; "
          "t = Transform.from_arrays(dict(np.load(sys.argv[2]))); "
          "np.save(sys.argv[3], clustering.transform_rows(t, np.load(sys.argv[1])))")
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "t.npz"),
                  str(tmp_path / "y.npy")], check=True, timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), one)
  x[4321, 5] = np.float32(3e38)
  with pytest.raises(InputError, match="rows from 4096"):
    clustering.transform_rows(t, x, threads=2)


def test_one_pass_assignment_of_raw_rows_matches_transforming_them_first():
  """`assign_all` never transforms the points: its nearest centroids and inertia are those of the transformed points
  (brute force in float64), for several k at once, with the same bits whatever the thread count."""
  x, _ = _planted(n=5000, d=24, c=6)
  rng = np.random.default_rng(3)
  t = Transform(rng.normal(size=(24, 12)).astype(np.float32), rng.normal(size=12).astype(np.float32), 0.3, 1.7)
  xt = t.apply(x).astype(np.float64)
  cents = [xt[rng.choice(len(x), k, replace=False)].astype(np.float32) for k in (3, 6, 11)]
  blocks = clustering.array_blocks(x, rows=1500)  # Blocks that do not align with the 4096-row BLAS calls.
  labels, inertias = clustering.assign_all(blocks, len(x), cents, t, threads=1)
  for c, lab, inertia in zip(cents, labels, inertias, strict=True):
    d2 = ((xt[:, None, :] - c[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(lab, d2.argmin(1))
    assert inertia == pytest.approx(d2.min(1).sum(), rel=1e-5)
  again = clustering.assign_all(blocks, len(x), cents, t, threads=3)
  assert again[1] == inertias
  for a, b in zip(again[0], labels, strict=True):
    np.testing.assert_array_equal(a, b)
  # No transform: plain nearest centroids of the rows.
  plain_labels, plain = clustering.assign_all(blocks, len(x), [x[:5]], None)
  d2 = ((x[:, None, :].astype(np.float64) - x[None, :5]) ** 2).sum(-1)
  np.testing.assert_array_equal(plain_labels[0], d2.argmin(1))
  assert plain[0] == pytest.approx(d2.min(1).sum(), rel=1e-5)


def test_streamed_clustering_equals_in_memory_clustering():
  """The stage streams blocks; the result is the one of the in-memory matrix (the same samples, fits and sums)."""
  x, _ = _planted(n=3000, d=16, c=8)
  t = Transform((np.eye(16) * 1.5).astype(np.float32), np.ones(16, np.float32))
  kw = dict(k_grid=[4, 8, 12], seed=1, max_points_per_centroid=64, transform=t)
  mem = clustering.cluster(x, np.arange(len(x)), **kw)
  streamed = clustering.cluster(None, np.arange(len(x)), blocks=clustering.array_blocks(x, rows=700), dim=16, **kw)
  assert streamed.inertias == mem.inertias and streamed.clusters.k == mem.clusters.k == 8
  np.testing.assert_array_equal(streamed.clusters.cluster, mem.clusters.cluster)
  np.testing.assert_array_equal(streamed.clusters.centroids, mem.clusters.centroids)
