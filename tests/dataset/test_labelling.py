"""Teacher soft labels: ordering s01 >= s02 >= s12, probabilities, entropy, block-size independence."""
import numpy as np
import pytest

from alignet_data import triplet_math
from alignet_data.dataset import labelling, sampling


def _data(n=500, d=13, seed=0):
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(n, d)).astype(np.float32)
  triplets = sampling.TripletSampler("random", n, seed=seed).sample(np.arange(4000))
  return vectors, triplets


def test_labels_satisfy_the_invariants_consumers_rely_on():
  vectors, triplets = _data()
  out = labelling.label_block(vectors, triplets)
  s, p, h = out["similarities"], out["soft_label"], out["entropy"]
  assert s.dtype == p.dtype == h.dtype == np.float32
  assert np.all(s[:, 0] >= s[:, 1]) and np.all(s[:, 1] >= s[:, 2])
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  assert np.all((h >= 0) & (h <= np.log(3) + 1e-6))
  # Item 2 is the teacher's odd one out, and the reordered items are the sampled ones.
  assert np.all(triplet_math.odd_one_out(s) == 2)
  np.testing.assert_array_equal(np.sort(out["positions"], 1), np.sort(triplets, 1))
  # The stored similarities are those of the reordered items.
  np.testing.assert_allclose(s, triplet_math.triplet_similarities(vectors, out["positions"]), rtol=1e-5, atol=1e-5)
  labelling.check_labels(s, p, h)


def test_a_hand_computed_triplet():
  vectors = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], np.float32)
  out = labelling.label_block(vectors, np.array([[0, 1, 2]]))
  # Pairs: s(0,1)=0, s(0,2)=2, s(1,2)=0. Most similar pair (0, 2); odd item 1. Of the pair, item 0 and item 2
  # are equally similar to item 1 (0), so the order within the pair keeps the sampled order.
  np.testing.assert_array_equal(out["positions"], [[0, 2, 1]])
  np.testing.assert_allclose(out["similarities"], [[2.0, 0.0, 0.0]])
  e2 = np.exp(2.0)
  np.testing.assert_allclose(out["soft_label"], [[e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]], rtol=1e-6)
  p = out["soft_label"][0].astype(np.float64)
  np.testing.assert_allclose(out["entropy"], [-(p * np.log(p)).sum()], rtol=1e-5)


def test_labels_do_not_depend_on_block_boundaries():
  vectors, triplets = _data(d=13)  # An odd dimension: rows start at every alignment inside a gathered block.
  whole = labelling.label_block(vectors, triplets)
  for size in (1, 7, 333):
    parts = [labelling.label_block(vectors, triplets[i:i + size]) for i in range(0, len(triplets), size)]
    for key in ("positions", "similarities", "soft_label", "entropy"):
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]), err_msg=key)


def test_odd_changed_counts_where_the_transform_moves_the_odd_one_out():
  raw = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)  # Raw teacher: item 2 is the odd one.
  swap = np.array([[1.0, 0.0], [0.1, 0.9], [0.0, 1.0]], np.float32)  # "Transformed": item 0 is the odd one.
  out = labelling.label_block(swap, np.array([[0, 1, 2]]), raw_vectors=raw)
  assert out["odd_changed"].tolist() == [True]
  same = labelling.label_block(raw, np.array([[0, 1, 2]]), raw_vectors=raw)
  assert same["odd_changed"].tolist() == [False]
  assert same["sampled_odd_kept"].tolist() == [True] and out["sampled_odd_kept"].tolist() == [False]


def test_check_labels_rejects_broken_blocks():
  with pytest.raises(ValueError, match="not ordered"):
    labelling.check_labels(np.array([[1.0, 2.0, 0.0]]), np.full((1, 3), 1 / 3), np.array([1.0]))
  with pytest.raises(ValueError, match="summing to 1"):
    labelling.check_labels(np.array([[3.0, 2.0, 1.0]]), np.full((1, 3), 0.5), np.array([1.0]))


def test_entropy_histogram_has_fixed_edges_so_shards_add_up():
  h = np.array([0.0, 0.5, 1.0, np.log(3)], np.float32)
  counts, edges = labelling.entropy_histogram(h, bins=4)
  assert counts.sum() == 4 and edges[0] == 0.0 and edges[-1] == pytest.approx(np.log(3))
  a, _ = labelling.entropy_histogram(h[:2], bins=4)
  b, _ = labelling.entropy_histogram(h[2:], bins=4)
  np.testing.assert_array_equal(a + b, counts)


def test_records_carry_source_ids_file_names_labels_and_clusters():
  vectors, triplets = _data(n=500)
  out = labelling.label_block(vectors, triplets[:10])
  ids = np.arange(500) * 10 + 7
  names = np.array([f"img{i}.png" for i in range(500)])
  labels, clusters = np.arange(500) % 5, np.arange(500) % 3
  rec = labelling.to_records(out, np.arange(10), "random", ids, names, labels, clusters)
  np.testing.assert_array_equal(rec["indices"], ids[out["positions"]])
  np.testing.assert_array_equal(rec["file_names"], names[out["positions"]])
  np.testing.assert_array_equal(rec["clusters"], clusters[out["positions"]])
  assert (labelling.to_records(out, np.arange(10), "random", ids, names, labels, None)["clusters"] == -1).all()


def test_compiled_similarities_match_float64_and_check_their_inputs():
  vectors, triplets = _data(n=300, d=70)
  ref = triplet_math.pair_similarities(vectors[triplets].astype(np.float64))
  got = labelling.rowwise_similarities(vectors, triplets)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  # float64 or strided inputs are converted, and give the same float32 results.
  np.testing.assert_array_equal(labelling.rowwise_similarities(vectors.astype(np.float64), triplets), got)
  np.testing.assert_array_equal(labelling.rowwise_similarities(np.asfortranarray(vectors), triplets), got)
  with pytest.raises(ValueError, match=r"Row positions must lie in \[0, 300\)"):
    labelling.rowwise_similarities(vectors, np.array([[0, 1, 300]]))
  with pytest.raises(ValueError, match="shape"):
    labelling.rowwise_similarities(vectors, np.array([0, 1, 2]))


def test_threaded_labelling_gives_the_same_bytes_as_one_thread():
  rng = np.random.default_rng(3)
  vectors = rng.standard_normal((500, 33), dtype=np.float32)
  triplets = rng.integers(0, 500, (2000, 3))
  one = labelling.rowwise_similarities(vectors, triplets)
  for threads in (2, 3, 64):  # 64: more threads than rows per thread allows; capped, same answer.
    cpu: list[float] = []
    got = labelling.rowwise_similarities(vectors, triplets, threads=threads, cpu_seconds=cpu)
    np.testing.assert_array_equal(got, one)
    assert len(cpu) == 1 and cpu[0] >= 0.0
  a = labelling.label_block(vectors, triplets, raw_vectors=vectors[:, ::-1], threads=2)
  b = labelling.label_block(vectors, triplets, raw_vectors=vectors[:, ::-1])
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
