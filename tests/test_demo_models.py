"""Demo teacher and student: the committed checkpoints are the ones the script makes, and they classify."""
import dataclasses
import json
import os

import numpy as np
import pytest

from alignet_data import demo_models, demo_world, models
from alignet_data.models import registry


@pytest.fixture(scope="module")
def world():
  return demo_world.make_world(demo_world.WorldConfig())


@pytest.fixture(scope="module")
def report():
  with open(os.path.join(registry.CHECKPOINT_DIR, demo_models.REPORT_FILE)) as f:
    return json.load(f)


def test_split_is_deterministic_disjoint_and_per_class(world):
  train, heldout = demo_models.split(world.pool_labels)
  train2, heldout2 = demo_models.split(world.pool_labels)
  np.testing.assert_array_equal(heldout, heldout2)
  assert not set(train) & set(heldout) and len(train) + len(heldout) == len(world.pool_labels)
  assert np.bincount(world.pool_labels[heldout]).tolist() == [demo_models.HELDOUT_PER_CLASS] * world.n_basic


def test_committed_checkpoints_match_the_report_and_the_current_world(report):
  # A changed demo world (or a retrained model without its report) makes the committed checkpoints stale.
  assert report["split"]["world_config"] == dataclasses.asdict(demo_world.WorldConfig()), (
      "the demo world changed: retrain with `python -m alignet_data.demo_models`")
  for name in ("teacher", "student"):
    path = os.path.join(registry.CHECKPOINT_DIR, demo_models.TRAIN[name]["file"])
    assert demo_models._sha256(path) == report[name]["sha256"]
    assert os.path.getsize(path) < 2_000_000


def test_demo_models_classify_heldout_pool_images_well_above_chance(world, report):
  _, heldout = demo_models.split(world.pool_labels)
  images, labels = world.pool_images[heldout], world.pool_labels[heldout]
  teacher, student = models.load_model("demo-teacher"), models.load_model("demo-student")
  acc_t = demo_models.accuracy(teacher, images, labels)
  acc_s = demo_models.accuracy(student, images, labels)
  assert acc_t >= 0.9 and acc_s >= 0.6  # Chance is 1 / 20; the student is pretrained briefly (demo_models.TRAIN).
  assert acc_t > acc_s  # The teacher is the better model.
  assert acc_t == pytest.approx(report["teacher"]["heldout_accuracy"], abs=0.01)
  assert (teacher.image_size, teacher.dim, teacher.config["preprocessing"]) == (32, 96, "siglip")
  assert (student.image_size, student.dim, student.config["preprocessing"]) == (32, 64, "student")
  assert student.embed(images[:3]).shape == (3, 64)


def test_training_runs_and_writes_a_loadable_checkpoint(world, tmp_path, monkeypatch):
  monkeypatch.setitem(demo_models.TRAIN, "student", {**demo_models.TRAIN["student"], "steps": 3, "warmup_steps": 1,
                                                     "batch_size": 16})
  report = demo_models.train_demo_models(str(tmp_path), which=("student",), world=world, progress=False)
  assert report["student"]["train"]["steps"] == 3 and np.isfinite(report["student"]["final_loss"])
  trained = models.from_checkpoint(models.get_config("vit-demo-student"), str(tmp_path / "demo_student.npz"))
  fresh = models.build(models.get_config("vit-demo-student", num_classes=world.n_basic),
                       seed=demo_models.TRAIN["student"]["seed"])
  assert trained.config["num_classes"] == world.n_basic
  # Three steps moved the weights away from the seeded init.
  assert not np.allclose(trained.params["embedding"]["kernel"], fresh.params["embedding"]["kernel"])
  with open(tmp_path / demo_models.REPORT_FILE) as f:
    assert json.load(f)["student"]["sha256"] == report["student"]["sha256"]
