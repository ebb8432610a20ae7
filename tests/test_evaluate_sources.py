"""`evaluate` on every kind of input: embeddings artifacts, released-format Levels CSVs (with embeddings or with
image files), RSA matrices, labelled splits, transforms, soft labels of a human artifact."""
import io

import numpy as np
import pytest
from conftest import tiny_world

from alignet_data import artifacts, demo_world, triplet_math
from alignet_data.evaluation import levels, metrics, rsa
from alignet_data.teacher import embeddings
from pipelines import evaluate_stage


@pytest.fixture(scope="module")
def world_url(tmp_path_factory):
  return tiny_world(tmp_path_factory.mktemp("w"), 30)  # big enough that no Levels triplet is drawn twice


def _embed_artifact(url, world, pool_vectors, things_vectors):
  """An embed artifact like `alignet embed` writes: "pool" and "train" (the pool again, found by file name)."""
  def fn(writer):
    n = len(world.pool_images)
    entries = {split: embeddings.write_split(writer, split, np.arange(n), world.pool_labels, world.pool_file_names,
                                             pool_vectors, ids_per_shard=50)
               for split in ("pool", "train")}
    c = len(things_vectors)
    entries["things"] = embeddings.write_split(writer, "things", np.arange(c), np.zeros(c, int),
                                               [f"c{i}.png" for i in range(c)], things_vectors, ids_per_shard=50)
    embeddings.write_index(writer, entries, model="test")
    return {}
  return artifacts.run_stage("embed", url, {"u": url}, {}, fn, log=lambda _: None).url


def _run(config, out):
  config = {**evaluate_stage.default_config(), "bootstrap": 20, **config}
  return artifacts.run_stage("evaluate", out, config, evaluate_stage.input_urls(config),
                             lambda w: evaluate_stage.run(config, w), log=lambda _: None)


def test_embeddings_artifact_released_levels_rsa_probe_and_transform(world_url, tmp_path):
  world = demo_world.load(world_url)
  rng = np.random.default_rng(0)
  semantic = world.human_embedding[world.pool_concepts] + rng.normal(0, 0.3, (len(world.pool_images),
                                                                             world.human_embedding.shape[1]))
  emb_url = _embed_artifact(str(tmp_path / "emb"), world, semantic, world.human_embedding)
  # The same world's Levels responses, written the way the released data are (per-trial CSV rows).
  buf = io.BytesIO()
  levels.write_rows(buf, levels.world_rows(world))
  (tmp_path / "levels.csv").write_bytes(buf.getvalue())
  # A human RSM over 30 pool images (from the simulated humans' semantics) and its stimulus list.
  stim = np.arange(0, len(world.pool_images), len(world.pool_images) // 30)[:30]
  np.save(tmp_path / "rsm.npy", rsa.rsm(world.human_embedding[world.pool_concepts[stim]] + 0.1))
  (tmp_path / "stimuli.txt").write_text("\n".join(world.pool_file_names[stim]) + "\n")
  # A transform that keeps the first 4 dimensions.
  dim = semantic.shape[1]
  np.savez(tmp_path / "t.npz", weights=np.eye(dim, 4, dtype=np.float32), bias=np.zeros(4, np.float32),
           mean=np.float32(0), std=np.float32(1))

  on_world = _run({"world": world_url, "models": {"emb": f"embeddings:{emb_url}"}}, str(tmp_path / "a")).report
  released = _run({"levels": str(tmp_path / "levels.csv"), "levels_split": "train",
                   "rsa": [{"name": "toy", "matrix": str(tmp_path / "rsm.npy"),
                            "stimuli": str(tmp_path / "stimuli.txt"), "kind": "rsm"}],
                   "probe": {"split": "train", "shots": [1, 5]},
                   "models": {"emb": f"embeddings:{emb_url}",
                              "emb4": {"model": f"embeddings:{emb_url}", "transform": str(tmp_path / "t.npz")}}},
                  str(tmp_path / "b")).report
  # Released-format Levels through file names == the world's arrays through pool ids (same vectors, same votes).
  for lv in ("coarse", "fine", "boundary"):
    assert released["levels"]["emb"][lv]["accuracy"] == pytest.approx(on_world["levels"]["emb"][lv]["accuracy"])
    assert released["noise_ceiling"][lv] == pytest.approx(on_world["noise_ceiling"][lv])
  assert released["levels_data"]["triplets"] == len(world.levels_triplets)
  assert on_world["things"]["n"] == 80 and "soft" in on_world["things"]  # the "things" split, the world's labels
  assert on_world["levels"]["emb"]["coarse"]["accuracy"] > 0.5  # semantic vectors agree with the simulated humans
  # The transform is applied: emb4's figures are those of the first 4 dimensions, computed here by hand.
  trip = world.levels_triplets
  majority = metrics.majority_vote(world.levels_choices)
  sel = (world.levels_level == "coarse") & (majority >= 0)
  sims = triplet_math.triplet_similarities(semantic[:, :4].astype(np.float32).astype(np.float64), trip[sel])
  hand = triplet_math.odd_one_out_correct(sims, majority[sel]).mean()
  assert released["levels"]["emb4"]["coarse"]["accuracy"] == pytest.approx(hand)
  assert released["models"]["emb4"]["dim"] == dim  # the model's own dimension; the transform maps it to 4
  # RSA: the semantic vectors correlate with the humans' RSM; every kernel and measure is reported with a CI.
  toy = released["rsa"]["toy"]
  assert toy["stimuli"] == 30
  row = toy["models"]["emb"]["pearson"]["spearman"]
  assert row["value"] > 0.5 and row["ci"][0] <= row["value"] <= row["ci"][1]
  assert set(toy["models"]["emb"]) == {"pearson", "cosine"}
  # Few-shot probing on the labelled split; a paired comparison of the two models on the same items.
  assert released["probe"]["emb"]["5shot"]["n"] == len(world.pool_images) - 5 * world.n_basic
  comp = released["comparisons"]["emb4_vs_emb"]
  assert {"levels/coarse", "probe/1shot"} <= set(comp)
  assert "things" not in released and released["skipped"] == []
  # A bare .npy cannot match file names: that part is skipped with the reason, the rest still runs.
  np.save(tmp_path / "x.npy", semantic)
  mixed = _run({"levels": str(tmp_path / "levels.csv"),
                "models": {"emb": f"embeddings:{emb_url}", "bare": f"embeddings:{tmp_path / 'x.npy'}"}},
               str(tmp_path / "c")).report
  assert set(mixed["levels"]) == {"emb"} and any(s.startswith("levels/bare:") for s in mixed["skipped"])


def test_image_model_on_released_levels_reads_the_image_files(world_url, tmp_path):
  from PIL import Image
  world = demo_world.load(world_url)
  buf = io.BytesIO()
  levels.write_rows(buf, levels.world_rows(world))
  (tmp_path / "levels.csv").write_bytes(buf.getvalue())
  for i in np.unique(world.levels_triplets):  # The images, as files in nested folders (found by base name).
    path = tmp_path / "images" / str(world.pool_file_names[i])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(world.pool_images[i]).save(path)
  files = _run({"levels": str(tmp_path / "levels.csv"), "images": str(tmp_path / "images"),
                "models": {"student": "demo-student"}}, str(tmp_path / "a")).report
  arrays = _run({"world": world_url, "models": {"student": "demo-student"}, "probe": {"shots": []}},
                str(tmp_path / "b")).report
  for lv in ("coarse", "fine", "boundary"):
    assert files["levels"]["student"][lv]["accuracy"] == pytest.approx(arrays["levels"]["student"][lv]["accuracy"])
  no_images = _run({"levels": str(tmp_path / "levels.csv"), "models": {"student": "demo-student"}},
                   str(tmp_path / "c")).report
  assert "levels" not in no_images and "--images" in no_images["skipped"][0]


def test_soft_labels_from_a_human_artifact_bring_their_test_triplets(tmp_path):
  x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
  np.save(tmp_path / "x.npy", x)
  test = np.array([[0, 1, 2], [2, 3, 0], [0, 2, 1]])
  probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.3, 0.4, 0.3]])

  def fn(writer):
    writer.write_npz("soft_labels.npz", train_triplets=test, train_probs=probs, test_triplets=test, test_probs=probs)
    return {}
  human = artifacts.run_stage("human", str(tmp_path / "human"), {}, {}, fn, log=lambda _: None).url
  report = _run({"models": {"x": f"embeddings:{tmp_path / 'x.npy'}"}, "things_soft_labels": human},
                str(tmp_path / "e")).report
  q = np.exp(triplet_math.log_softmax(triplet_math.triplet_similarities(x, test)))
  assert report["things"]["n"] == 3 and report["things"]["accuracy"] == pytest.approx(2 / 3)
  assert report["things"]["soft"]["kl"]["value"] == pytest.approx((probs * np.log(probs / q)).sum(1).mean())
  np.savetxt(tmp_path / "other.txt", test[:2], fmt="%d")
  with pytest.raises(ValueError, match="own test triplets"):
    _run({"models": {"x": f"embeddings:{tmp_path / 'x.npy'}"}, "things_soft_labels": human,
          "things_triplets": str(tmp_path / "other.txt")}, str(tmp_path / "f"))
