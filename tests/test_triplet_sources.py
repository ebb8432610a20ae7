"""`alignet train --shards DIR` on the released AligNet layout (google-deepmind/alignet's bucket and data.py)."""
import json

import numpy as np
import pytest
from conftest import tiny_world

from alignet_data.checks import InputError
from pipelines import cli
from trainer import input_pipeline, triplet_sources

OFFICIAL_VAL = ("class_border", "within_class", "between_class")


def _npz(path, n, n_images, seed, filenames=False):
  """A file as the bucket has them: indices (n, 3) and similarities (n, 3) float64 sorted s01 >= s02 >= s12."""
  rng = np.random.default_rng(seed)
  indices = np.stack([rng.choice(n_images, 3, replace=False) for _ in range(n)])
  sims = -np.sort(-rng.normal(size=(n, 3)), axis=1)
  arrays = {"indices": indices, "similarities": sims}
  if filenames:
    arrays["filenames"] = np.char.add("n0000_", indices.astype(str))
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)
  return arrays


def _bucket(root, n_images=40):
  """uncertainty_distillation/ with train_cluster_border_500 (+ a random one) and the three val files, no
  filenames; untransformed/ with its own train file."""
  ud = root / "uncertainty_distillation"
  _npz(ud / "train_cluster_border_500.npz", 64, n_images, 0)
  _npz(ud / "train_random.npz", 64, n_images, 1)
  for i, s in enumerate(OFFICIAL_VAL):
    _npz(ud / f"val_{s}.npz", 16, n_images, 10 + i)
  _npz(root / "untransformed" / "train_cluster_border_500.npz", 32, n_images, 5)
  return root


def test_the_bucket_layout_resolves_to_the_official_choices(tmp_path):
  root = str(_bucket(tmp_path / "bucket"))
  s = triplet_sources.resolve(root)
  assert (s.transform, s.sampling, s.fmt) == ("uncertainty_distillation", "cluster_border_500", "npz")
  assert s.train == "uncertainty_distillation/train_cluster_border_500.npz"
  assert list(s.valid) == sorted(OFFICIAL_VAL)
  other = triplet_sources.resolve(root, transform="untransformed")
  assert other.train == "untransformed/train_cluster_border_500.npz" and other.valid == {}
  assert triplet_sources.resolve(root, sampling="random").train.endswith("train_random.npz")
  # One transform folder given directly is a data_dir of its own.
  assert triplet_sources.resolve(f"{root}/uncertainty_distillation").sampling == "cluster_border_500"
  with pytest.raises(InputError, match=r"no training file for sampling 'class_border'.*'cluster_border_500'"):
    triplet_sources.resolve(root, sampling="class_border")
  with pytest.raises(InputError, match=r"no transform folder 'aligned'.*'uncertainty_distillation', 'untransformed'"):
    triplet_sources.resolve(root, transform="aligned")


def test_ambiguous_choices_are_errors_that_list_what_there_is(tmp_path):
  a = tmp_path / "a"
  _npz(a / "t1" / "train_random.npz", 8, 20, 0)
  _npz(a / "t2" / "train_random.npz", 8, 20, 1)
  with pytest.raises(InputError, match=r"several transforms .*--transform"):
    triplet_sources.resolve(str(a))
  b = tmp_path / "b"
  _npz(b / "train_random.npz", 8, 20, 0)
  _npz(b / "train_class_border.npz", 8, 20, 1)
  with pytest.raises(InputError, match=r"several training samplings \['class_border', 'random'\].*--sampling"):
    triplet_sources.resolve(str(b))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No training triplets"):
    triplet_sources.resolve(str(tmp_path / "empty"))


def test_val_wins_over_valid_and_legacy_names_still_read(tmp_path):
  d = tmp_path / "d"
  _npz(d / "train_random.npz", 8, 20, 0)
  val = _npz(d / "val_random.npz", 8, 20, 1)
  _npz(d / "valid_random.npz", 8, 20, 2)
  _npz(d / "valid_within_class.npz", 8, 20, 3)
  s = triplet_sources.resolve(str(d))
  assert s.valid == {"random": "val_random.npz", "within_class": "valid_within_class.npz"}
  got = input_pipeline.read_triplets(s, "random")
  np.testing.assert_array_equal(got.indices, val["indices"])
  assert got.similarities.dtype == np.float32  # as the official loader casts them
  legacy = tmp_path / "legacy"
  _npz(legacy / "alignet_train.npz", 8, 20, 0, filenames=True)
  _npz(legacy / "alignet_valid.npz", 8, 20, 1, filenames=True)
  s = triplet_sources.resolve(str(legacy))
  assert (s.train, s.valid) == ("alignet_train.npz", {"valid": "alignet_valid.npz"})


def test_train_the_demo_student_from_the_bucket_layout_choosing_transform_and_sampling(tmp_path, capsys):
  """The CLI trains from DIR/<transform>/{train,val}_<sampling>.npz and reports every val set by sampling; no
  validation file is a warning, not an error."""
  from alignet_data import demo_world
  world = tiny_world(tmp_path / "w", 10)
  n_images = len(demo_world.load(world).pool_images)  # The pool the indices point into.
  root = _bucket(tmp_path / "bucket", n_images)
  base = ["train", "--shards", str(root), "--world", world, "--student", "demo-student", "--steps", "3",
          "--batch-size", "8", "--set", "hooks=[]", "--set", "eval_batch_size=16"]
  assert cli.main(base + ["--workdir", str(tmp_path / "w1"), "--sampling", "cluster_border_500"]) == 0
  m = json.loads((tmp_path / "w1" / "metrics.json").read_text())
  for s in OFFICIAL_VAL:
    assert 0.0 <= m[f"val_triplet_accuracy/{s}"] <= 1.0 and m[f"val_triplets/{s}"] == 16
  assert m["val_triplet_accuracy"] == pytest.approx(np.mean([m[f"val_triplet_accuracy/{s}"] for s in OFFICIAL_VAL]))
  assert cli.main(base + ["--workdir", str(tmp_path / "w2"), "--transform", "untransformed"]) == 0
  m2 = json.loads((tmp_path / "w2" / "metrics.json").read_text())
  assert m2["train_triplets"] == 32 and "val_triplet_accuracy" not in m2
  assert "no validation file" in capsys.readouterr().out
