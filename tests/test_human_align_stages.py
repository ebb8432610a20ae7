import argparse
import io

import fsspec
import numpy as np
import pytest

from alignet_data import artifacts, demo_world
from alignet_data.teacher.transform import Transform
from pipelines import align_stage, human_stage

SMALL_WORLD = demo_world.WorldConfig(n_super=3, n_basic_per_super=2, n_sub_per_basic=5, images_per_class=5,
                                     things_train=3000, things_test=600, levels_per_level=5)
FAST_HUMAN = {"dims": 20, "epochs": 8, "lr": 1e-2, "mc_samples": 20}
FAST_ALIGN = {"lambdas": [1e-1, 1e-3], "folds": 2, "max_epochs": 30, "lr": 1e-2}


@pytest.fixture(scope="module")
def world_url(tmp_path_factory) -> str:
  url = str(tmp_path_factory.mktemp("stages") / "world")
  world = demo_world.make_world(SMALL_WORLD)

  def write(w):
    demo_world.save(world, w)
    return demo_world.summary(world)

  artifacts.run_stage("world", url, {"small": True}, {}, write, log=lambda s: None)
  return url


def _run(module, out: str, config: dict) -> artifacts.Artifact:
  return artifacts.run_stage(module.STAGE, out, config, module.input_urls(config),
                             lambda w: module.run(config, w), log=lambda s: None)


def _human_config(**overrides) -> dict:
  config = human_stage.default_config()
  config.update(FAST_HUMAN, **overrides)
  return config


@pytest.fixture(scope="module")
def human_url(world_url, tmp_path_factory) -> str:
  url = str(tmp_path_factory.mktemp("human") / "human")
  _run(human_stage, url, _human_config(world=world_url))
  return url


def test_human_stage_on_a_world(world_url, human_url):
  art = artifacts.load(human_url, stage="human")
  report = art.report
  for key in ("train_triplets", "test_triplets", "test_accuracy", "test_nll", "dims_kept", "epochs",
              "dropped_overlap", "simulation_test_accuracy"):
    assert key in report, key
  assert report["train_triplets"] == 3000 and report["test_triplets"] == 600 and report["epochs"] == 8
  assert report["dropped_overlap"] == 0
  assert report["test_accuracy"] > 0.55  # Chance is 1/3; the simulation's own model reaches ~0.84.
  assert report["test_nll"] < np.log(3)
  labels = art.load_npz("soft_labels.npz")
  world = demo_world.load(world_url)
  np.testing.assert_array_equal(labels["train_triplets"], world.things_train)
  np.testing.assert_array_equal(labels["test_triplets"], world.things_test)
  for split in ("train", "test"):
    p = labels[f"{split}_probs"]
    assert p.shape == (len(labels[f"{split}_triplets"]), 3) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
  params = art.load_npz("vice.npz")
  assert params["loc"].shape == params["scale"].shape == (30, report["dims_kept"])
  history = art.read_json("history.json")  # One entry per restart, the kept one's seed in the report.
  assert [h["seed"] for h in history] == [r["seed"] for r in report["restarts"]]
  assert len(history[0]["history"]) == 8 and report["seed"] in [h["seed"] for h in history]
  kept = next(r for r in report["restarts"] if r["seed"] == report["seed"])
  assert kept["val_nll"] == min(r["val_nll"] for r in report["restarts"])
  cal = report["calibration"]
  assert 0 <= cal["ece"] < 0.2 and 0 <= cal["ece_all_pairs"] < 0.2 and cal["reliability"]
  assert art.open("reliability.png").read(8) == b"\x89PNG\r\n\x1a\n"
  curve = report["accuracy_by_dims"]
  assert curve[-1]["dims"] == report["dims_kept"] and abs(curve[-1]["accuracy"] - report["test_accuracy"]) < 1e-9


def test_human_stage_is_byte_identical_for_a_seed(world_url, human_url, tmp_path):
  again = _run(human_stage, str(tmp_path / "again"), _human_config(world=world_url))
  first = artifacts.load(human_url)
  for name in ("vice.npz", "soft_labels.npz"):
    assert again.files[name]["sha256"] == first.files[name]["sha256"], name


def _write_text(url: str, rows: np.ndarray) -> str:
  with fsspec.open(url, "wb") as f:
    f.write("\n".join(" ".join(map(str, r)) for r in rows).encode())
  return url


def test_human_stage_on_triplet_files_drops_test_overlap(world_url, tmp_path):
  world = demo_world.load(world_url)
  train = np.concatenate([world.things_train[:1500], world.things_test[:7][:, [1, 0, 2]]])  # 7 repeats.
  subjects = np.arange(len(train))[:, None] % 4
  train_url = _write_text(str(tmp_path / "train.txt"), np.concatenate([train, subjects], 1))
  test_url = _write_text(str(tmp_path / "test.txt"), world.things_test)
  config = _human_config(train=train_url, test=test_url, epochs=3, val_fraction=0.1, keep_best=True, seeds=1)
  art = _run(human_stage, str(tmp_path / "human_files"), config)
  report = art.report
  assert report["dropped_overlap"] == 7 and report["train_triplets"] == 1500
  assert report["n_objects"] == 30
  assert 100 < report["val_triplets"] < 200 and 0 < report["val_accuracy"] <= 1
  assert 1 <= report["best_epoch"] <= 3 and len(art.read_json("history.json")[0]["history"]) == 3
  with pytest.raises(ValueError, match="world"):
    human_stage.load_triplets(human_stage.default_config())


def test_align_stage_from_human_artifact(world_url, human_url, tmp_path):
  world = demo_world.load(world_url)
  rng = np.random.default_rng(0)
  # Teacher-like features: the human space seen through a linear map, buried under an appearance grouping.
  feats = np.concatenate([world.human_embedding @ rng.normal(size=(32, 16)),
                          6.0 * rng.normal(size=(6, 16))[np.arange(30) % 6]], 1).astype(np.float32)
  feats_url = str(tmp_path / "features.npy")
  np.save(feats_url, feats)
  config = align_stage.default_config()
  config.update(FAST_ALIGN, features=feats_url, human=human_url)
  art = _run(align_stage, str(tmp_path / "align"), config)
  report = art.report
  for key in ("accuracy_before", "accuracy_after", "nll_before", "nll_after", "kl_after", "lambda", "loss",
              "target", "cv"):
    assert key in report, key
  assert report["loss"] == "soft" and report["target"] == "identity"
  assert report["lambda"] in (1e-1, 1e-3) and [c["lambda"] for c in report["cv"]] == [1e-1, 1e-3]
  assert report["accuracy_after"] > report["accuracy_before"] + 0.05, report
  assert report["kl_after"] < report["kl_before"]
  t = Transform.load(art)
  assert t.weights.shape == (32, 32) and t.std > 0
  assert art.exists("cv.png") and art.exists("cv.json")
  # Hard labels from the same artifact also run; KL to p* is still reported; --compare fits soft too.
  config.update(loss="hard", target="scaled_identity", lambdas=[1e-2], compare=True)
  report = _run(align_stage, str(tmp_path / "align_hard"), config).report
  assert report["loss"] == "hard" and report["cv"] == [] and "kl_after" in report
  cmp = report["comparison"]
  assert set(cmp) == {"soft", "hard", "p_star"} and cmp["hard"]["kl"] == report["kl_after"]
  assert cmp["soft"]["kl"] < cmp["hard"]["kl"] and cmp["p_star"]["kl"] == 0.0


def test_label_temperature_sharpens_and_flattens():
  p = np.array([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]], np.float32)
  assert align_stage.sharpen(p, 1.0) is p
  sharp, flat = align_stage.sharpen(p, 0.5), align_stage.sharpen(p, 2.0)
  np.testing.assert_allclose(sharp[0], np.array([36, 9, 1]) / 46, rtol=1e-6)
  np.testing.assert_allclose(sharp[1], p[1], rtol=1e-6)
  assert flat[0, 0] < p[0, 0] and np.all(np.argmax(sharp, 1) == np.argmax(p, 1))
  with pytest.raises(ValueError, match="label_temperature"):
    align_stage.sharpen(p, 0.0)


def test_align_stage_on_files_needs_hard_loss(world_url, tmp_path):
  world = demo_world.load(world_url)
  buf = io.BytesIO()
  np.save(buf, np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32))
  feats_url = "memory://align_files/features.npy"
  with fsspec.open(feats_url, "wb") as f:
    f.write(buf.getvalue())
  train_url = _write_text("memory://align_files/train.txt", world.things_train[:800])
  test_url = _write_text("memory://align_files/test.txt", world.things_test[:200])
  config = align_stage.default_config()
  config.update(FAST_ALIGN, features=feats_url, train=train_url, test=test_url, lambdas=[1e-2])
  with pytest.raises(ValueError, match="soft labels"):
    _run(align_stage, "memory://align_files/out_soft", config)
  assert artifacts.try_load("memory://align_files/out_soft") is None  # Nothing half-written is visible.
  config["loss"] = "hard"
  report = _run(align_stage, "memory://align_files/out", config).report
  assert report["test_triplets"] == 200 and "kl_after" not in report


def _embed_artifact(url: str, ids: np.ndarray, vectors: np.ndarray, num_ids: int) -> str:
  from alignet_data.teacher import embeddings

  def write(w):
    entry = embeddings.write_split(w, "things", ids, np.zeros(len(ids)), [f"{i}.png" for i in ids], vectors,
                                   ids_per_shard=16, num_ids=num_ids)
    embeddings.write_index(w, {"things": entry})
    return {}

  artifacts.run_stage("embed", url, {"n": len(ids)}, {}, write, log=lambda s: None)
  return url


def test_align_features_from_an_embed_artifact(tmp_path):
  vectors = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
  url = _embed_artifact(str(tmp_path / "embed"), np.arange(30), vectors, 30)
  np.testing.assert_array_equal(align_stage.load_features(url, "things"), vectors)
  gap = _embed_artifact(str(tmp_path / "embed_gap"), np.delete(np.arange(30), 29), vectors[:29], 30)
  with pytest.raises(KeyError, match="29"):
    align_stage.load_features(gap, "things")


def test_cli_flags_override_defaults():
  for module, argv, key, value in [
      (human_stage, ["--epochs", "3", "--world", "w"], "epochs", 3),
      (align_stage, ["--lambdas", "1", "0.1", "--loss", "hard"], "lambdas", [1.0, 0.1]),
  ]:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    config = module.config_from_args(parser.parse_args(argv))
    assert config[key] == value
    assert set(config) == set(module.default_config())
