"""The demo world: deterministic, and shaped like the real problem."""
import numpy as np
import pytest

from alignet_data import artifacts, demo_world, triplet_math

SMALL = demo_world.WorldConfig(images_per_class=12, things_train=1500, things_test=500, levels_per_level=40)


@pytest.fixture(scope="module")
def world():
  return demo_world.make_world(SMALL)


def test_same_seed_same_world_other_seed_other_world(world):
  again = demo_world.make_world(SMALL)
  np.testing.assert_array_equal(world.pool_images, again.pool_images)
  np.testing.assert_array_equal(world.things_train, again.things_train)
  np.testing.assert_array_equal(world.levels_choices, again.levels_choices)
  other = demo_world.make_world(demo_world.WorldConfig(**{**SMALL.__dict__, "seed": 1}))
  assert not np.array_equal(world.pool_images, other.pool_images)


def test_shapes_and_hierarchy(world):
  n_basic = SMALL.n_super * SMALL.n_basic_per_super
  assert world.pool_images.shape == (n_basic * SMALL.images_per_class, 32, 32, 3)
  assert world.pool_images.dtype == np.uint8
  assert world.things_images.shape == (n_basic * SMALL.n_sub_per_basic, 32, 32, 3)
  np.testing.assert_array_equal(world.pool_super, world.basic_super[world.pool_labels])
  np.testing.assert_array_equal(world.concept_basic[world.pool_concepts], world.pool_labels)


def test_things_train_and_test_share_no_triplet(world):
  as_set = lambda t: {tuple(r) for r in np.sort(t, 1)}
  assert not as_set(world.things_train) & as_set(world.things_test)
  assert len(as_set(world.things_train)) == len(world.things_train)
  for t in (world.things_train, world.things_test):
    assert np.all((t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2]))


def test_simulated_humans_are_noisy_but_structured(world):
  s = triplet_math.triplet_similarities(world.human_embedding, world.things_test)
  acc = triplet_math.odd_one_out_accuracy(s)
  assert 0.6 < acc < 0.9  # above chance (1/3), below perfect: a THINGS-like noise ceiling
  np.testing.assert_allclose(world.things_test_probs.sum(1), 1.0, rtol=1e-5)


def test_appearance_is_shared_across_superordinates(world):
  """Mean colour of a class predicts its palette, and every superordinate holds several palettes."""
  colour = world.pool_images.reshape(len(world.pool_images), -1, 3).mean(1)
  class_colour = np.stack([colour[world.pool_labels == b].mean(0) for b in range(world.n_basic)])
  dist = np.linalg.norm(class_colour[:, None] - class_colour[None], axis=-1)
  np.fill_diagonal(dist, np.inf)
  nearest = dist.argmin(1)
  # A class's nearest neighbour in colour is usually in ANOTHER superordinate.
  assert np.mean(world.basic_super[nearest] != world.basic_super) > 0.7


def test_levels_triplets_follow_their_level(world):
  lab = world.pool_labels[world.levels_triplets]
  distinct = np.array([len(set(r)) for r in lab])
  assert np.all(distinct[world.levels_level == "coarse"] == 3)
  assert np.all(distinct[world.levels_level == "fine"] == 1)
  assert np.all(distinct[world.levels_level == "boundary"] == 2)
  assert world.levels_choices.shape == (len(lab), SMALL.levels_responses)
  assert set(np.unique(world.levels_choices)) <= {0, 1, 2}
  assert np.all((world.levels_rt > 0) & (world.levels_rt <= 15))


def test_boundary_humans_mostly_pick_the_other_class(world):
  sel = world.levels_level == "boundary"
  lab = world.pool_labels[world.levels_triplets[sel]]
  other = np.array([[k for k in range(3) if (row == row[k]).sum() == 1][0] for row in lab])
  assert np.mean(world.levels_choices[sel] == other[:, None]) > 0.6


def test_save_and_load_round_trip(world, tmp_path):
  out = str(tmp_path / "world")
  artifacts.run_stage("world", out, {}, {}, lambda w: demo_world.save(world, w) or {})
  loaded = demo_world.load(out)
  np.testing.assert_array_equal(loaded.pool_images, world.pool_images)
  np.testing.assert_array_equal(loaded.pool_file_names, world.pool_file_names)
  assert loaded.n_basic == world.n_basic


def test_default_participants_agree_at_every_level_and_are_slower_when_they_disagree():
  """The demo's participants tell subordinates apart (the paper's Levels ceilings: 62% / 66% / 89%), so the
  fine level measures something and its disagreement tracks response time, as at the other levels."""
  from alignet_data.evaluation import metrics
  world = demo_world.make_world(demo_world.WorldConfig())
  human = metrics.levels_human(world.levels_choices, world.levels_level, world.levels_rt, n_resamples=10)
  for level, floor in (("coarse", 0.6), ("fine", 0.5), ("boundary", 0.9)):
    assert human[level]["noise_ceiling"]["value"] > floor, level
    assert human[level]["entropy_rt_spearman"]["value"] > 0.3, level
