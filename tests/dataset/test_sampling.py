"""Counter-based triplet samplers: constraints hold for every triplet, and triplet t depends only on (seed, t)."""
import itertools

import numpy as np
import pytest

from alignet_data.dataset import sampling

# Groups of uneven sizes, including ones too small for a pair (1 item) or a within-class triple (2 items).
GROUPS = np.repeat(np.arange(8), [40, 1, 25, 2, 60, 7, 3, 30])
N = len(GROUPS)
IDS = np.arange(20000)


def _sampler(strategy, seed=0):
  return sampling.TripletSampler(strategy, N, None if strategy == "random" else GROUPS, seed=seed)


@pytest.mark.parametrize("strategy", sampling.STRATEGIES)
def test_items_are_distinct_and_in_range(strategy):
  t = _sampler(strategy).sample(IDS)
  assert t.shape == (len(IDS), 3) and t.dtype == np.int64
  assert t.min() >= 0 and t.max() < N
  assert np.all((t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2]))


@pytest.mark.parametrize("strategy", ["class_boundary", "cluster_boundary"])
def test_boundary_triplets_have_two_from_one_group_and_the_odd_from_another(strategy):
  t = _sampler(strategy).sample(IDS)
  g = GROUPS[t]
  assert np.all(g[:, 0] == g[:, 1])
  assert np.all(g[:, 2] != g[:, 0])
  # The singleton group can never provide the pair, but its item can be the odd one.
  assert not np.any(g[:, 0] == 1)
  assert np.any(g[:, 2] == 1)


def test_within_class_triplets_come_from_one_group_with_at_least_three_items():
  t = _sampler("within_class").sample(IDS)
  g = GROUPS[t]
  assert np.all((g[:, 0] == g[:, 1]) & (g[:, 1] == g[:, 2]))
  assert set(np.unique(g[:, 0])) == {0, 2, 4, 5, 6, 7}  # Groups 1 (1 item) and 3 (2 items) are skipped.
  assert _sampler("within_class").describe()["skipped_small_groups"] == 2


@pytest.mark.parametrize("strategy", sampling.STRATEGIES)
def test_a_triplet_depends_only_on_seed_strategy_and_id(strategy):
  whole = _sampler(strategy).sample(IDS)
  # Any split into blocks, any order, a fresh sampler per block (another worker): the same triplets.
  rng = np.random.default_rng(1)
  perm = rng.permutation(len(IDS))
  pieces = [_sampler(strategy).sample(IDS[perm[i:i + 777]]) for i in range(0, len(IDS), 777)]
  again = np.empty_like(whole)
  again[perm] = np.concatenate(pieces)
  np.testing.assert_array_equal(whole, again)
  assert not np.array_equal(whole, _sampler(strategy, seed=1).sample(IDS))


def test_between_class_triplets_come_from_three_distinct_groups_each_uniform():
  t = _sampler("between_class").sample(IDS)
  g = GROUPS[t]
  assert np.all((g[:, 0] != g[:, 1]) & (g[:, 0] != g[:, 2]) & (g[:, 1] != g[:, 2]))
  # Every group, the singleton included, is drawn equally often (3 of 8 per triplet) ...
  counts = np.bincount(g.reshape(-1), minlength=8)
  expected = 3 * len(IDS) / 8
  assert np.all(np.abs(counts - expected) < 0.1 * expected)
  # ... and an item uniformly within its group: in group 4 (60 items), every item appears.
  assert set(t[g == 4].tolist()) == set(np.flatnonzero(GROUPS == 4).tolist())
  sizes = np.bincount(GROUPS)
  e3 = sum(sizes[a] * sizes[b] * sizes[c] for a, b, c in itertools.combinations(range(8), 3))
  assert _sampler("between_class").max_distinct() == e3


@pytest.mark.parametrize("block", [1, 97, 20000])
def test_between_class_does_not_depend_on_the_block_size(block):
  whole = _sampler("between_class").sample(IDS)
  pieces = np.concatenate([_sampler("between_class").sample(IDS[i:i + block]) for i in range(0, len(IDS), block)])
  np.testing.assert_array_equal(whole, pieces)
  # One id alone, on a fresh sampler (another worker), far into the id space: the triplet of that id.
  far = np.array([3 << 40, 12345])
  np.testing.assert_array_equal(_sampler("between_class").sample(far)[:1], _sampler("between_class").sample(far[:1]))


def test_strategies_draw_independent_streams():
  a = _sampler("class_boundary").sample(IDS)
  b = _sampler("cluster_boundary").sample(IDS)  # Same groups, different strategy key.
  assert np.mean(np.all(a == b, axis=1)) < 0.01


def test_distinct_three_is_uniform_over_all_triples():
  bits = sampling.random_bits(sampling.strategy_key(0, "test"), np.arange(60000))
  a, b, c = sampling.distinct_three(bits[:, 0], bits[:, 1], bits[:, 2], 5)
  codes = a * 25 + b * 5 + c
  counts = np.bincount(codes, minlength=125)
  ordered = [x * 25 + y * 5 + z for x, y, z in itertools.permutations(range(5), 3)]
  assert counts.sum() == counts[ordered].sum()  # Never a repeated item.
  expected = 60000 / len(ordered)
  assert np.all(np.abs(counts[ordered] - expected) < 0.15 * expected)


def test_boundary_pair_group_is_uniform_over_eligible_groups_and_odd_uniform_over_other_items():
  t = _sampler("cluster_boundary").sample(IDS)
  pair_groups = np.bincount(GROUPS[t[:, 0]], minlength=8)
  eligible = [0, 2, 3, 4, 5, 6, 7]
  expected = len(IDS) / len(eligible)
  assert np.all(np.abs(pair_groups[eligible] - expected) < 0.1 * expected)
  # Given the pair's group, the odd item is uniform over the items outside it: for the largest pair group
  # (group 4), every other item is equally likely.
  odd = t[GROUPS[t[:, 0]] == 4, 2]
  counts = np.bincount(odd, minlength=N)[GROUPS != 4]
  assert counts.min() > 0 and counts.max() < 4 * counts.mean()


def test_too_small_inputs_fail_with_clear_messages():
  with pytest.raises(ValueError, match="at least 3 items"):
    sampling.TripletSampler("random", 2)
  with pytest.raises(ValueError, match="at least 2 distinct"):
    sampling.TripletSampler("cluster_boundary", 5, np.zeros(5, int))
  with pytest.raises(ValueError, match="at least 2 items"):
    sampling.TripletSampler("class_boundary", 4, np.arange(4))
  with pytest.raises(ValueError, match="at least 3 items"):
    sampling.TripletSampler("within_class", 4, np.array([0, 0, 1, 1]))
  with pytest.raises(ValueError, match="'between_class' needs at least 3 distinct labels"):
    sampling.TripletSampler("between_class", 6, np.array([0, 0, 0, 1, 1, 1]))
  with pytest.raises(ValueError, match="needs a group"):
    sampling.TripletSampler("cluster_boundary", 4)
  with pytest.raises(ValueError, match="Unknown sampling strategy 'border'"):
    sampling.TripletSampler("border", 4)


def test_asking_for_more_triplets_than_distinct_ones_exist_is_refused():
  s = sampling.TripletSampler("within_class", 6, np.array([0, 0, 0, 1, 1, 1]))
  assert s.max_distinct() == 2
  s.check_count(2)
  with pytest.raises(ValueError, match="only 2 distinct"):
    s.check_count(3)
  assert sampling.TripletSampler("random", 5).max_distinct() == 10
  # Boundary: pairs within a group of 3 (3 of them) times 3 items outside, for each of the two groups.
  assert sampling.TripletSampler("class_boundary", 6, np.array([0, 0, 0, 1, 1, 1])).max_distinct() == 18


def test_strategy_mixes_are_allocated_exactly():
  assert sampling.parse_strategy("cluster_boundary") == {"cluster_boundary": 1.0}
  weights = sampling.parse_strategy("random:1, cluster_boundary:2")
  assert weights == {"random": 1.0, "cluster_boundary": 2.0}
  counts = sampling.allocate(1000, weights)
  assert counts == {"cluster_boundary": 667, "random": 333}
  assert sum(sampling.allocate(7, {"random": 1, "within_class": 1, "class_boundary": 1}).values()) == 7
  with pytest.raises(ValueError, match="name:weight"):
    sampling.parse_strategy("random:x")
  with pytest.raises(ValueError, match="Unknown sampling strategy"):
    sampling.allocate(10, {"nope": 1})
