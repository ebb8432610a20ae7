"""Levels loaders: released per-trial rows and the experiment design files."""
import io

import numpy as np
import pytest

from alignet_data.evaluation import levels, metrics

HEADER = "subject_id,image1Path,image2Path,image3Path,selected_image,rt,triplet_class\n"


def _csv(tmp_path, text, name="levels.csv"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_trials_group_into_triplets_whatever_the_order_shown(tmp_path):
  text = HEADER + "".join([
      "p1,x/b.JPEG,x/a.JPEG,x/c.JPEG,x/c.JPEG,2500,between_class\n",   # sorted order a, b, c: c is position 2
      "p2,x/c.JPEG,x/b.JPEG,x/a.JPEG,c.JPEG,3000,between_class\n",     # same triplet, another order
      "p3,x/a.JPEG,x/b.JPEG,x/c.JPEG,x/a.JPEG,12000,between_class\n",  # slow (> 10 s): kept, dropped for RT
      "p4,x/a.JPEG,x/b.JPEG,x/c.JPEG,,,between_class\n",                # no response
      "p1,x/d.JPEG,x/e.JPEG,x/f.JPEG,x/e.JPEG,1500,class_border\n",
  ])
  data = levels.load(_csv(tmp_path, text))
  np.testing.assert_array_equal(data.images, [["a", "b", "c"], ["d", "e", "f"]])
  np.testing.assert_array_equal(data.level, ["coarse", "boundary"])
  np.testing.assert_array_equal(data.choices, [[2, 2, 0, -1], [1, -1, -1, -1]])
  np.testing.assert_allclose(data.rt[0, :3], [2.5, 3.0, 12.0])  # ms -> s ("auto": median > 100)
  assert np.isnan(data.rt[0, 3]) and data.participants[0, 3] == "p4"
  assert metrics.majority_vote(data.choices).tolist() == [2, 1]
  assert data.summary()["responses"] == 4 and data.summary()["trials"] == 5
  # Positions instead of names, 1-based, and seconds.
  text2 = "participant,image1,image2,image3,choice,rt,triplet_class\np,b,a,c,1,2.5,within_class\n"
  data2 = levels.load(_csv(tmp_path, text2, "b.csv"), choice_base=1)
  assert data2.choices.tolist() == [[1]] and data2.rt.tolist() == [[2.5]] and data2.level.tolist() == ["fine"]


def test_level_from_file_name_and_errors(tmp_path):
  text = "subject_id,image1Path,image2Path,image3Path,selected_image,rt\np,a,b,c,b,900\n"
  assert levels.load(_csv(tmp_path, text, "within_class.csv")).level.tolist() == ["fine"]
  with pytest.raises(ValueError, match="Unknown Levels triplet type"):
    levels.load(_csv(tmp_path, text, "other.csv"))
  with pytest.raises(ValueError, match="image columns"):
    levels.load(_csv(tmp_path, "a,b\n1,2\n"))
  with pytest.raises(ValueError, match="same image twice"):
    levels.load(_csv(tmp_path, HEADER + "p,a,a,c,a,1000,fine\n"))
  with pytest.raises(FileNotFoundError):
    levels.load(str(tmp_path / "nope.csv"))
  data = levels.load(_csv(tmp_path, HEADER + "p,a,b,c,z,1000,fine\n"))  # a chosen image not in the triplet
  assert data.choices.tolist() == [[-1]] and data.dropped["unmatched_choice"] == 1


def test_demo_world_rows_round_trip_through_the_loader(tmp_path):
  from alignet_data import demo_world
  cfg = demo_world.WorldConfig(n_super=3, n_basic_per_super=2, n_sub_per_basic=2, images_per_class=10,
                               things_train=50, things_test=20, levels_per_level=30)
  world = demo_world.make_world(cfg)
  buf = io.BytesIO()
  levels.write_rows(buf, levels.world_rows(world))
  data = levels.load(_csv(tmp_path, buf.getvalue().decode()))
  assert len(data) == len(world.levels_triplets)
  human_world = metrics.levels_human(world.levels_choices, world.levels_level, world.levels_rt, n_resamples=5)
  human_file = metrics.levels_human(data.choices, data.level, data.rt, n_resamples=5)
  for lv in ("coarse", "fine", "boundary"):
    assert human_file[lv]["noise_ceiling"]["value"] == pytest.approx(human_world[lv]["noise_ceiling"]["value"])
    assert human_file[lv]["mean_log_rt"] == pytest.approx(human_world[lv]["mean_log_rt"], abs=1e-4)


def test_released_design_files_load_as_5_participants_per_triplet(shared_data):
  design = shared_data / "levels_design"
  first = levels.load_design(str(design / "triplets_experiment_first_100_participants.csv"))
  assert first.summary()["by_level"] == {"boundary": 659, "coarse": 1330, "fine": 1311}
  assert (first.choices == -1).all() and ((first.participants != "").sum(1) == 5).all()
  both = levels.load_design(str(design))  # a directory: every CSV in it
  assert len(both) == 6600 and both.summary()["participants"] == 100
  assert all(name.startswith("n") for name in both.images[:5].ravel())  # ImageNet base names, e.g. n01440764_10251
