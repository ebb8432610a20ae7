"""The human stage's real-data paths: profiles, fixed embeddings, SPoSE, upload order, the CLI, THINGS."""
import json
import math

import numpy as np
import pytest

from alignet_data import artifacts, triplet_math
from pipelines import cli, human_stage


def _run(out: str, **overrides) -> artifacts.Artifact:
  config = human_stage.default_config()
  config.update(overrides)
  return artifacts.run_stage("human", out, config, human_stage.input_urls(config),
                             lambda w: human_stage.run(config, w), log=lambda s: None)


def _files(tmp_path, n_objects=24, n=3000, seed=0):
  """Simulated choices of a planted 4-d embedding, written as a 4-column train file and a 3-column test file."""
  rng = np.random.default_rng(seed)
  emb = np.abs(rng.normal(size=(n_objects, 4))) * 1.5
  trip = np.stack([rng.choice(n_objects, 3, replace=False) for _ in range(n)])
  p = triplet_math.pair_probabilities(triplet_math.triplet_similarities(emb, trip))
  pair = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, 2)
  a, b = triplet_math.PAIRS[pair].T
  rows = np.arange(n)
  t = np.stack([trip[rows, a], trip[rows, b], trip[rows, triplet_math.ODD_OF_PAIR[pair]]], 1)
  train, test = tmp_path / "train.txt", tmp_path / "test.txt"
  np.savetxt(train, np.concatenate([t[:2500], rows[:2500, None] % 7], 1), fmt="%d")
  np.savetxt(test, t[2500:], fmt="%d")
  return emb, str(train), str(test)


def test_profiles_fill_unset_settings():
  config = human_stage.default_config()
  demo = human_stage.settings({**config, "world": "w"})
  files = human_stage.settings({**config, "train": "a", "test": "b"})
  # Burn-in plus window fit in the epoch cap (the convergence rule can fire); restarts are chosen on validation.
  for s in (demo, files, human_stage.settings({**config, "train": "a", "profile": "full"})):
    assert s["burnin"] + s["ws"] < s["epochs"] and s["lr_final"] < 1 and s["val_fraction"] > 0 and s["seeds"] >= 2
    assert not s["keep_best"] and not s["patience"]  # The converged posterior is the answer, not a best epoch.
  assert demo["epochs"] <= 200 and files["batch_size"] > demo["batch_size"]
  assert human_stage.settings({**config, "train": "a", "epochs": 3, "keep_best": False})["epochs"] == 3
  with pytest.raises(ValueError, match="profile"):
    human_stage.settings({**config, "train": "a", "profile": "huge"})
  spose_demo = human_stage.settings({**config, "world": "w", "model": "spose"})
  assert spose_demo["val_fraction"] > 0 and spose_demo["keep_best"]  # SPoSE needs early stopping.


def test_fixed_embedding_in_upload_order(tmp_path):
  emb, train, test = _files(tmp_path)
  art = _run(str(tmp_path / "canon"), train=train, test=test, embedding=_save(tmp_path / "e.npy", emb))
  r = art.report
  assert r["model"] == "embedding" and r["dims_kept"] == 4 and r["epochs"] == 0
  assert r["train_triplets"] == 2500 - r["dropped_overlap"] and r["test_triplets"] == 500
  assert abs(r["beta"] - 1.0) < 0.2  # The simulation's own temperature.
  assert r["test_accuracy"] > 0.6 and r["test_nll"] < math.log(3)
  # The same embedding stored in "upload order" (a permutation p: canonical = upload[p]) gives the same labels.
  p = np.random.default_rng(1).permutation(len(emb))
  upload = np.empty_like(emb)
  upload[p] = emb
  np.savetxt(tmp_path / "sortindex", p, fmt="%d")
  art2 = _run(str(tmp_path / "upload"), train=train, test=test, embedding=_save(tmp_path / "u.npy", upload),
              sortindex=str(tmp_path / "sortindex"), upload_order=["embedding"])
  np.testing.assert_allclose(art2.load_npz("soft_labels.npz")["test_probs"],
                             art.load_npz("soft_labels.npz")["test_probs"], atol=1e-6)
  with pytest.raises(ValueError, match="sortindex"):
    _run(str(tmp_path / "bad"), train=train, test=test, embedding=str(tmp_path / "u.npy"), upload_order=["embedding"])
  with pytest.raises(ValueError, match="upload_order"):
    _run(str(tmp_path / "bad"), train=train, test=test, sortindex=str(tmp_path / "sortindex"), upload_order=["x"])


def _save(path, arr) -> str:
  np.save(path, arr)
  return str(path)


def test_cli_trains_spose_on_files(tmp_path, capsys):
  _, train, test = _files(tmp_path)
  out = str(tmp_path / "spose")
  assert cli.main(["human", "--train", train, "--test", test, "--model", "spose", "--epochs", "12",
                   "--lr", "0.01", "--dims", "8", "--eval-every", "1", "--out", out]) == 0
  report = json.loads((tmp_path / "spose" / "report.json").read_text())
  assert report["model"] == "spose" and report["settings"]["epochs"] == 12 and report["settings"]["keep_best"]
  assert 1 <= report["best_epoch"] <= report["epochs"] <= 12 and report["test_accuracy"] > 0.5
  assert report["dims_kept"] <= 8 and report["seconds"] > 0
  labels = artifacts.load(out).load_npz("soft_labels.npz")
  np.testing.assert_allclose(labels["test_probs"].sum(1), 1.0, atol=1e-5)
  assert cli.main(["human", "--train", train, "--test", test, "--upload-order", "train", "--out",
                   str(tmp_path / "x")]) == 1
  assert "sortindex" in capsys.readouterr().err


def test_published_spose_through_the_stage(shared_data, tmp_path):
  root = shared_data / "things"
  art = _run(str(tmp_path / "h"), train=str(root / "triplets_127k_subjects.txt"),
             test=str(root / "triplets_50k.txt"), embedding=str(root / "spose49.npy"))
  r = art.report
  assert abs(r["test_accuracy"] - 0.640) <= 0.002, r  # Issue 3's acceptance for --embedding.
  assert r["test_nll"] < math.log(3) and r["n_objects"] == 1854 and r["dims_kept"] == 49
  assert r["test_triplets"] == 50000 and 1000 < r["dropped_overlap"] < 4000
  assert r["train_triplets"] == 127304 - r["dropped_overlap"]


def test_vice_on_real_things_a_few_epochs(shared_data, tmp_path):
  """A reduced real-data fit, ~10 s (the full run is the documented `alignet human` command of issue 3)."""
  root = shared_data / "things"
  art = _run(str(tmp_path / "h"), train=str(root / "triplets_127k_subjects.txt"),
             test=str(root / "triplets_50k.txt"), epochs=6, val_fraction=0.0, keep_best=False, mc_samples=10,
             seeds=1)
  r = art.report
  assert r["epochs"] == 6 and r["model"] == "vice"
  assert r["test_accuracy"] > 0.5, r  # Chance 1/3; the full run reaches ~0.58.
  assert r["test_nll"] < math.log(3)
