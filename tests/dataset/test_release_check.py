"""`alignet check-release`: each check passes on well-formed files and fails, naming itself, on a broken one."""
import json

import numpy as np
import pytest

from alignet_data import triplet_math
from alignet_data.dataset import release_check
from pipelines import cli

N_IMAGES = 30


def _files(root, n_images=N_IMAGES):
  """Images as files (the source the indices index) and a release folder whose triplets point into them."""
  images = root / "images"
  for i in range(n_images):
    (images / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
    (images / f"c{i % 3}" / f"img_{i:03d}.png").write_bytes(b"x")
  paths = sorted(str(p) for p in images.rglob("*.png"))
  x = np.random.default_rng(0).normal(size=(n_images, 4))
  rng = np.random.default_rng(1)
  trip = np.stack([rng.choice(n_images, 3, replace=False) for _ in range(60)])
  trip, sims = triplet_math.order_by_similarity(trip, triplet_math.triplet_similarities(x, trip))
  keys = np.unique(np.sort(trip, axis=1), axis=0, return_index=True)[1]
  trip, sims = trip[np.sort(keys)], sims[np.sort(keys)]
  names = np.array([p.rsplit("/", 1)[1] for p in paths])[trip]
  ud = root / "release" / "uncertainty_distillation"
  ud.mkdir(parents=True)
  np.savez(ud / "train_cluster_border_3.npz", indices=trip[:40], similarities=sims[:40], filenames=names[:40])
  np.savez(ud / "val_class_border.npz", indices=trip[40:], similarities=sims[40:])
  np.save(root / "x.npy", x)
  return root / "release", f"files:{images}/*/*.png", trip, sims


def _cli(capsys, *argv):
  code = cli.main(["check-release", *map(str, argv)])
  return code, capsys.readouterr().out


def test_well_formed_files_pass_every_check(tmp_path, capsys):
  release, images, _, _ = _files(tmp_path)
  code, out = _cli(capsys, release, "--out", tmp_path / "R", "--images", images, "--representations",
                   tmp_path / "x.npy")
  assert code == 0, out
  report = json.loads((tmp_path / "R" / "report.json").read_text())
  checks = {r["check"] for r in report["rows"]}
  assert {"keys", "shapes", "dtypes", "finite", "index range", "order", "duplicates", "file names", "recomputed",
          "train/val overlap"} <= checks
  assert report["passed"] and all(r["status"] != "fail" for r in report["rows"])
  assert "verdict: PASS" in out and "train_cluster_border_3.npz" in out


def _rewrite(path, **changes):
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays.update(changes)
  np.savez(path, **arrays)


@pytest.mark.parametrize("fault, check", [("swapped", "order"), ("range", "index range"),
                                          ("overlap", "train/val overlap"), ("names", "file names"),
                                          ("sims", "recomputed")])
def test_a_broken_file_fails_naming_the_check(tmp_path, capsys, fault, check):
  release, images, trip, sims = _files(tmp_path)
  train = release / "uncertainty_distillation" / "train_cluster_border_3.npz"
  val = release / "uncertainty_distillation" / "val_class_border.npz"
  if fault == "swapped":
    _rewrite(train, similarities=sims[:40][:, ::-1])
  elif fault == "range":
    bad = trip[:40].copy()
    bad[0, 0] = N_IMAGES + 5
    _rewrite(train, indices=bad)
  elif fault == "overlap":
    _rewrite(val, indices=np.concatenate([trip[40:-1], trip[:1][:, [1, 0, 2]]]))
  elif fault == "names":
    with np.load(train) as z:
      names = z["filenames"].copy()
    names[3] = names[3][::-1]
    _rewrite(train, filenames=names)
  else:
    _rewrite(train, similarities=sims[:40] + 0.5)
  code, out = _cli(capsys, release, "--out", tmp_path / "R", "--images", images, "--representations",
                   tmp_path / "x.npy")
  assert code == 1
  failed = {r["check"] for r in json.loads((tmp_path / "R" / "report.json").read_text())["rows"]
            if r["status"] == "fail"}
  assert check in failed and failed <= {check, "recomputed"}, out  # Broken data cannot be recomputed either.
  assert "verdict: FAIL" in out


def test_order_reports_which_convention_a_file_follows():
  s = np.array([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0]])  # s01 largest on both; the second row fully sorted.
  r = release_check.check_order("f", s)
  assert r["status"] == "warn" and "1 of 2 rows have s02 < s12" in r["detail"]
  assert release_check.check_order("f", s[1:])["status"] == "pass"
  assert release_check.check_order("f", s[:, ::-1])["status"] == "fail"


def test_file_names_against_tfds_imagenet_records_under_the_mock(tmp_path, capsys):
  """--tfds-data-dir: `filenames` are compared with the imagenet2012 train records' `file_name` at `indices`."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    ds = tfds.data_source("imagenet2012", split="train")
    names = np.array([ds[i]["file_name"].decode() if isinstance(ds[i]["file_name"], bytes) else ds[i]["file_name"]
                      for i in range(12)])
    trip = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    sims = np.tile([3.0, 2.0, 1.0], (4, 1))
    folder = tmp_path / "release" / "untransformed"
    folder.mkdir(parents=True)
    np.savez(folder / "train_random.npz", indices=trip, similarities=sims, filenames=names[trip])
    assert cli.main(["check-release", str(tmp_path / "release"), "--out", str(tmp_path / "R"),
                     "--tfds-data-dir", str(tmp_path / "tfds")]) == 0
    report = json.loads((tmp_path / "R" / "report.json").read_text())
    assert report["num_images"] == 12 and any(r["check"] == "file names" and r["status"] == "pass"
                                               for r in report["rows"])
    np.savez(folder / "train_random.npz", indices=trip[:, [1, 0, 2]], similarities=sims, filenames=names[trip])
    assert cli.main(["check-release", str(tmp_path / "release"), "--out", str(tmp_path / "R2"),
                     "--tfds-data-dir", str(tmp_path / "tfds")]) == 1
  assert "indices from another build or order" in capsys.readouterr().out
