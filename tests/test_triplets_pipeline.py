"""The `triplets` Beam pipeline end to end (cluster -> triplets -> publish) on a small synthetic embeddings store."""
import json

import numpy as np
import pytest

from alignet_data import artifacts, triplet_math
from alignet_data.dataset import clustering, publishing, shards, triplet_plan
from alignet_data.teacher import embeddings
from pipelines import cluster_stage, publish_stage
from pipelines import triplets_pipeline as tp

N, D, CLASSES = 600, 16, 6
MIX = "cluster_boundary:2,random:1,class_boundary:1,within_class:1"


def _quiet(_):
  pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """An embeddings artifact (ids offset, so ids != rows), a transform, and clusters of the transformed space."""
  root = tmp_path_factory.mktemp("triplets")
  rng = np.random.default_rng(0)
  labels = np.arange(N) % CLASSES
  x = (rng.normal(size=(CLASSES, D))[labels] * 2 + rng.normal(size=(N, D))).astype(np.float32)
  ids = np.arange(N) * 2 + 5

  def embed(writer):
    entry = embeddings.write_split(writer, "pool", ids, labels, [f"img{i:05d}.png" for i in ids], x,
                                   ids_per_shard=700)
    embeddings.write_index(writer, {"pool": entry})
    return {}

  emb = artifacts.run_stage("embed", str(root / "embed"), {}, {}, embed, log=_quiet)
  w = (np.eye(D) + 0.5 * rng.normal(size=(D, D))).astype(np.float32) / 4
  np.savez(root / "transform.npz", weights=w, bias=np.zeros(D, np.float32), mean=np.float32(0), std=np.float32(1))
  cconf = cluster_stage.default_config() | {"embeddings": emb.url, "transform": str(root / "transform.npz"), "k": 8}
  cl = artifacts.run_stage("cluster", str(root / "cluster"), cconf, cluster_stage.input_urls(cconf),
                           lambda wr: cluster_stage.run(cconf, wr), log=_quiet)
  config = tp.default_config() | {
      "embeddings": emb.url, "transform": str(root / "transform.npz"), "clusters": cl.url, "strategy": MIX,
      "num": 3000, "num_valid": 300, "seed": 0, "block_size": 500, "num_shards": 3,
      "formats": ["parquet", "tfrecord", "npz"]}
  return root, emb, cl, config


def _run(config, out, beam_args=()):
  return artifacts.run_stage("triplets", str(out), config, tp.input_urls(config),
                             lambda w: tp.run(config, w, beam_args), log=_quiet)


@pytest.fixture(scope="module")
def triplets(world):
  root, _, _, config = world
  return _run(config, root / "triplets")


def test_report_counts_every_split_and_strategy(triplets):
  r = triplets.report
  assert r["triplets"] == 3000 and r["splits"] == {"train_mixed": 3000, "val_mixed": 300}
  assert r["strategies_by_split"]["train_mixed"] == {"cluster_boundary": 1200, "random": 600, "class_boundary": 600,
                                               "within_class": 600}
  assert sum(r["strategies"].values()) == 3300
  assert sum(r["entropy"]["histogram"]["counts"]) == 3300
  assert 0.0 < r["entropy"]["mean"] < np.log(3)
  assert 0.0 <= r["odd_one_out_changed"] <= 1.0 and r["transformed"] and r["k"] == 8
  assert r["shards"] == {"train_mixed": 3, "val_mixed": 1}
  assert r["indices"] == {"source": None, "tfds_imagenet2012_train_order": False, "note": r["indices"]["note"]}


def test_every_record_satisfies_the_schema_and_the_sampling_constraints(world, triplets):
  _, emb_art, cl_art, _ = world
  emb = embeddings.load(emb_art, "pool")
  cl = clustering.load(cl_art)
  train = shards.read_split(triplets, "train")
  valid = shards.read_split(triplets, "val_mixed")
  for cols in (train, valid):
    s = cols["similarities"]
    assert np.all(s[:, 0] >= s[:, 1]) and np.all(s[:, 1] >= s[:, 2])
    np.testing.assert_allclose(cols["soft_label"], triplet_math.pair_probabilities(s), rtol=1e-5, atol=1e-6)
    assert np.all(triplet_math.odd_one_out(s) == 2)
    rows = emb.rows(cols["indices"])  # Every index is an embedding id ...
    np.testing.assert_array_equal(cols["file_names"], emb.file_names[rows])  # ... with its file name,
    np.testing.assert_array_equal(cols["labels"], emb.labels[rows])  # label and cluster.
    np.testing.assert_array_equal(cols["clusters"], cl.cluster[rows])
    i = cols["indices"]
    assert np.all((i[:, 0] != i[:, 1]) & (i[:, 0] != i[:, 2]) & (i[:, 1] != i[:, 2]))
    for strategy, group in (("cluster_boundary", "clusters"), ("class_boundary", "labels")):
      g = cols[group][cols["strategy"] == strategy]
      pair_same = (g[:, 0] == g[:, 1]).astype(int) + (g[:, 0] == g[:, 2]) + (g[:, 1] == g[:, 2])
      assert np.all(pair_same == 1), strategy  # Exactly one pair shares a group: 2 from one, 1 from another.
    g = cols["labels"][cols["strategy"] == "within_class"]
    assert np.all((g[:, 0] == g[:, 1]) & (g[:, 1] == g[:, 2]))
  # Train ids 0..2999 in shard order; validation ids are disjoint.
  np.testing.assert_array_equal(train["triplet_id"], np.arange(3000))
  np.testing.assert_array_equal(valid["triplet_id"], triplet_plan.VALID_ID_BASE + np.arange(300))


def test_tfrecord_and_npz_hold_the_same_triplets_as_parquet(triplets):
  train = shards.read_split(triplets, "train")
  tf_train = shards.read_split(triplets, "train", fmt="tfrecord")
  for k in train:
    np.testing.assert_array_equal(train[k], tf_train[k], err_msg=k)
  name = triplets.report["npz"]["train_mixed"]
  assert name == "npz/uncertainty_distillation/train_mixed.npz"  # A strategy mix is tagged "mixed".
  with triplets.open(name) as f:
    z = shards.read_npz(f)
  assert sorted(z) == ["filenames", "indices", "similarities"]
  np.testing.assert_array_equal(z["indices"], train["indices"])
  np.testing.assert_array_equal(z["similarities"], train["similarities"])
  np.testing.assert_array_equal(z["filenames"], train["file_names"])


def _data_hashes(art):
  return {k: v["sha256"] for k, v in art.files.items() if k != "report.json"}


def test_same_bytes_whatever_block_size_worker_and_thread_count(world, triplets, tmp_path, monkeypatch):
  _, _, _, config = world
  monkeypatch.setattr(tp, "_PART_ROWS", 7)  # The npz read back from its parts in other blocks: the same file.
  other = _run(config | {"block_size": 211}, tmp_path / "t2",
               ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
  assert _data_hashes(other) == _data_hashes(triplets)
  # Labelling kernel threads cut each block into chunks at other places: still the same bytes.
  threaded = _run(config | {"block_size": 1500, "label_threads": 3}, tmp_path / "t4")
  assert threaded.report["timing"]["label_threads"] == 3
  assert _data_hashes(threaded) == _data_hashes(triplets)
  # Another shard count re-cuts the same triplets.
  one = _run(config | {"num_shards": 1, "formats": ["parquet"]}, tmp_path / "t3")
  a, b = shards.read_split(triplets, "train"), shards.read_split(one, "train")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_one_validation_set_per_strategy_under_the_released_names(world, tmp_path):
  _, emb_art, _, config = world
  conf = config | {"strategy": "cluster_boundary", "valid_strategies": "class_boundary,within_class,between_class",
                   "num": 600, "num_valid": 120, "num_shards": 2, "num_valid_shards": 2, "formats": ["parquet", "npz"]}
  art = _run(conf, tmp_path / "v")
  info = art.read_json("triplets.json")
  keys = ["train_cluster_border_8", "val_between_class", "val_class_border", "val_within_class"]
  assert sorted(info["splits"]) == keys and info["npz"] == {k: f"npz/uncertainty_distillation/{k}.npz" for k in keys}
  assert {k: (e["strategy"], e["sampling"], e["num"]) for k, e in info["splits"].items()} == {
      "train_cluster_border_8": ("cluster_boundary", "cluster_border_8", 600),
      "val_between_class": ("between_class", "between_class", 120),
      "val_class_border": ("class_boundary", "class_border", 120),
      "val_within_class": ("within_class", "within_class", 120)}
  assert not [n for n in art.files if "valid" in n]
  ranges = sorted(tuple(e["triplet_ids"]) for e in info["splits"].values())
  assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))  # Disjoint ids.
  emb = embeddings.load(emb_art, "pool")
  same_pairs = {"val_between_class": 0, "val_class_border": 1, "val_within_class": 3}
  for key, pairs in same_pairs.items():
    cols = shards.read_split(art, key)
    assert set(cols["strategy"]) == {info["splits"][key]["strategy"]}
    g = emb.labels[emb.rows(cols["indices"])]
    assert np.all((g[:, 0] == g[:, 1]).astype(int) + (g[:, 0] == g[:, 2]) + (g[:, 1] == g[:, 2]) == pairs), key
    with art.open(info["npz"][key]) as f:
      np.testing.assert_array_equal(shards.read_npz(f)["indices"], cols["indices"])
  # A validation set is the same bytes whatever --num, the other validation sets, the workers and the block size.
  other = _run(conf | {"num": 300, "valid_strategies": ["between_class", "random"], "block_size": 37}, tmp_path / "w",
               ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
  assert sorted(other.read_json("triplets.json")["splits"]) == ["train_cluster_border_8", "val_between_class",
                                                                  "val_random"]
  for name in ("shards/val_between_class-00001-of-00002.parquet", info["npz"]["val_between_class"]):
    assert other.files[name]["sha256"] == art.files[name]["sha256"], name


def _official_load(root, transform, split, sampling):
  """google-deepmind/alignet's data.py contract: the path is root/transform/f"{split}_{sampling}.npz"; it reads
  only `indices` and `similarities`, the latter cast to float32."""
  with np.load(f"{root}/{transform}/{split}_{sampling}.npz") as z:
    return np.asarray(z["indices"]), np.asarray(z["similarities"]).astype(np.float32)


def test_the_official_loader_finds_every_file_its_config_asks_for_and_check_release_passes(world, tmp_path, capsys):
  from pipelines import cli
  _, _, _, config = world
  conf = config | {"strategy": "cluster_boundary", "valid_strategies": "class_boundary,within_class,between_class",
                   "npz_sampling": "cluster_border_500", "num": 300, "num_valid": 60, "num_shards": 1,
                   "formats": ["npz"]}
  art = _run(conf, tmp_path / "X")
  root = f"{art.url}/npz"
  wanted = [("train", "cluster_border_500")] + [("val", s) for s in ("class_border", "within_class", "between_class")]
  for split, sampling in wanted:  # configs/siglip.py: train_ds and its three evaluators.
    indices, sims = _official_load(root, "uncertainty_distillation", split, sampling)
    assert indices.shape == sims.shape == ((300 if split == "train" else 60), 3) and indices.dtype.kind == "i"
    assert np.all(np.diff(sims, axis=1) <= 0)  # s01 >= s02 >= s12: the official losses read pair 01 first.
  assert cli.main(["check-release", root, "--out", str(tmp_path / "R")]) == 0
  report = json.loads((tmp_path / "R" / "report.json").read_text())
  assert report["passed"] and {r["check"] for r in report["rows"]} >= {"order", "train/val overlap", "duplicates"}


def test_untransformed_labels_and_clear_errors(world, tmp_path):
  _, emb, cl, config = world
  raw = _run(config | {"transform": None, "strategy": "random", "num": 200, "num_valid": 0, "num_shards": 5,
                       "formats": ["parquet", "npz"]}, tmp_path / "raw")
  assert raw.report["odd_one_out_changed"] is None and raw.report["splits"] == {"train_random": 200}
  assert raw.report["npz"] == {"train_random": "npz/untransformed/train_random.npz"}
  with pytest.raises(ValueError, match="needs clusters: pass --clusters"):
    _run(config | {"clusters": None, "strategy": "cluster_boundary"}, tmp_path / "e1")
  with pytest.raises(ValueError, match="Unknown validation strategy 'valid'"):
    _run(config | {"valid_strategies": "valid"}, tmp_path / "e4")
  with pytest.raises(ValueError, match="needs at least 3 distinct labels"):
    _run(config | {"strategy": "random", "valid_strategies": "between_class", "transform": None, "clusters": None,
                   "embeddings": _two_class_embeddings(tmp_path)}, tmp_path / "e5")
  with pytest.raises(ValueError, match="Unknown output format"):
    _run(config | {"formats": ["csv"]}, tmp_path / "e2")
  with pytest.raises(ValueError, match="distinct ones exist"):
    _run(config | {"strategy": "random", "num": 40_000_000}, tmp_path / "e3")
  assert not (tmp_path / "e3").exists()


def _two_class_embeddings(tmp_path):
  def embed(writer):
    entry = embeddings.write_split(writer, "pool", np.arange(10), np.arange(10) % 2, [f"i{i}" for i in range(10)],
                                   np.random.default_rng(0).normal(size=(10, D)).astype(np.float32), ids_per_shard=16)
    embeddings.write_index(writer, {"pool": entry})
    return {}
  return artifacts.run_stage("embed", str(tmp_path / "two"), {}, {}, embed, log=_quiet).url


def test_publish_the_triplets_and_read_them_back(world, triplets):
  root = world[0]
  config = publish_stage.default_config() | {"source": triplets.url, "bucket": str(root / "bucket"),
                                             "name": "alignet-test"}
  art = artifacts.run_stage("publish", str(root / "publish"), config, publish_stage.input_urls(config),
                            lambda w: publish_stage.run(config, w), log=_quiet)
  published = publishing.verify(art.report["published_to"])
  assert published.manifest["publication"]["source_digest"] == triplets.digest
  np.testing.assert_array_equal(shards.read_split(published, "val")["indices"],
                                shards.read_split(triplets, "val")["indices"])


def test_card_of_demo_world_triplets_shows_their_images(tmp_path):
  """The dataset card's grid: the demo world's pool images of sample triplets, per strategy."""
  from alignet_data import demo_world
  from pipelines import world_stage
  wconf = world_stage.default_config() | {"images_per_class": 3, "things_train": 60, "things_test": 30,
                                          "levels_per_level": 6}
  world = artifacts.run_stage("world", str(tmp_path / "world"), wconf, {}, lambda w: world_stage.run(wconf, w),
                              log=_quiet)
  w = demo_world.load(world.url)
  n = len(w.pool_images)

  def embed(writer):
    vectors = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    entry = embeddings.write_split(writer, "pool", np.arange(n), w.pool_labels, w.pool_file_names, vectors,
                                   ids_per_shard=4096, source=f"demo:{world.url}:pool")
    embeddings.write_index(writer, {"pool": entry})
    return {}

  emb = artifacts.run_stage("embed", str(tmp_path / "embed"), {}, {}, embed, log=_quiet)
  config = tp.default_config() | {"embeddings": emb.url, "strategy": "random:1,class_boundary:1", "num": 40,
                                  "num_valid": 0, "num_shards": 1, "formats": ["parquet", "npz"]}
  trip = _run(config, tmp_path / "triplets")
  out = publishing.publish(trip.url, str(tmp_path / "bucket"), "demo", "0.1.0", log=_quiet)
  dest = tmp_path / "bucket" / "demo" / "0.1.0"
  assert (dest / publishing.SAMPLES_PLOT).read_bytes()[:4] == b"\x89PNG"
  card = (dest / "README.md").read_text()
  assert f"![sample triplets per strategy]({publishing.SAMPLES_PLOT})" in card
  assert card.count("| `random` |") == card.count("| `class_boundary` |") == publishing.SAMPLES_PER_STRATEGY
  # The demo world's indices are not imagenet2012 train record indices, and the card says so beside the npz hint.
  assert trip.read_json("triplets.json")["indices"]["tfds_imagenet2012_train_order"] is False
  assert "`untransformed/train_mixed.npz`" in card and "Caution: that trainer looks every index up" in card
  assert "Indices into the demo world's images" in card
  assert out["files"] == len(trip.files) + 3  # README.md, the entropy histogram, the grid


def _bench_module():
  """bench/imagenet_scale.py as a module (bench/ is not a package)."""
  import importlib.util
  import pathlib
  spec = importlib.util.spec_from_file_location(
      "imagenet_scale", pathlib.Path(__file__).parents[1] / "bench" / "imagenet_scale.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_reduced_imagenet_scale_benchmark_reports_its_figures(tmp_path):
  """bench/imagenet_scale.py end to end at a reduced size (the full size is run by hand; see its docstring): the
  README's commands, each stage with its wall and CPU time, peak memory and its own measured floor."""
  import pathlib
  import re
  root = pathlib.Path(__file__).parents[1]
  bench = _bench_module()
  out = tmp_path / "b.json"
  result = bench.main(["--n", "20000", "--d", "32", "--classes", "50", "--k", "20", "--num", "20000",
                       "--num-valid", "1000", "--num-shards", "2", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert result["total_seconds"] > 0 and result["peak_rss_gb"] > 0
  threads = result["machine"]["threads"]
  for stage in ("cluster", "triplets"):
    figures = result["stages"][stage]
    assert figures["seconds"] > 0 and figures["cpu_seconds"] > 0 and figures["peak_rss_gb"] > 0
    assert 0 < figures["floor_seconds"] and figures["floor_fraction"] == figures[f"floor_fraction_{threads}threads"] > 0
  # The rates are measured before and after the stages; the floors use the faster of each.
  measured = result["rates"]["measured"]
  assert set(measured) == {"before", "after"} and {"rates", "rates_after"} <= set(result["stages"])
  assert result["rates"]["sgemm_gflops"] == round(max(m["sgemm_flops"] for m in measured.values()) / 1e9, 1)
  assert set(result["floors"]["triplets"]["parts_seconds"]) == {"read_embeddings", "labelling", "write_output"}
  assert set(result["floors"]["cluster"]["flops"]) == {"kmeans_iterations", "assignment"}
  # The transform's work, left out of the issue's triplets floor, is reported beside it: a larger fraction.
  assert result["floors"]["triplets"]["not_in_floor"]["transform_flops"] == 2.0 * 20000 * 32 * 32
  trip = result["stages"]["triplets"]
  assert trip["floor_fraction_with_transform"] >= trip["floor_fraction"]  # Both rounded: equal at this tiny size.
  assert trip["floor_fraction_with_transform"] == pytest.approx(
      (trip["floor_seconds"] + result["floors"]["triplets"]["not_in_floor"]["transform_seconds"]) / trip["seconds"],
      abs=3e-4)
  assert result["stages"]["triplets"]["triplets"] == 23000 and result["stages"]["cluster"]["k"] == 20
  # The cluster step is the README's command: no flag the README's cluster line does not have.
  readme = (root / "README.md").read_text()
  readme_flags = set(re.findall(r"--[a-z-]+", re.search(r"^alignet cluster .*$", readme, re.M).group(0)))
  used = {a for a in result["stages"]["cluster"]["command"] if a.startswith("--")}
  assert used <= readme_flags, used - readme_flags


def test_benchmark_too_big_for_the_disk_stops_before_writing(tmp_path):
  """A run the disk cannot hold fails at once, saying how much it needs, instead of with ENOSPC mid-stage."""
  bench = _bench_module()
  work, out = tmp_path / "work", tmp_path / "b.json"
  with pytest.raises(SystemExit, match=r"bench needs about [0-9.]+ GiB free under .*--work"):
    bench.main(["--n", str(10**10), "--work", str(work), "--out", str(out)])  # 46 TB of float32 embeddings.
  assert list(work.iterdir()) == [] and not out.exists()
  # At full size the estimate covers what the acceptance run wrote (5.9 GB embed, 4.14 GiB triplets).
  assert bench.disk_needed(1_281_167, 1152, 10**7, 10**4) > 1_281_167 * 1152 * 4 + 4.14 * 2**30


def test_benchmark_write_probe_leaves_the_working_folder_as_it_found_it(tmp_path):
  """The write-rate probe (1 GiB at full size) writes a name of its own and removes it: a user's file in `--work`
  is never overwritten or deleted."""
  bench = _bench_module()
  (tmp_path / "write-rate.bin").write_bytes(b"a user's file")
  assert bench.write_rate(str(tmp_path), 1 << 20) > 0
  assert [p.name for p in tmp_path.iterdir()] == ["write-rate.bin"]
  assert (tmp_path / "write-rate.bin").read_bytes() == b"a user's file"


@pytest.mark.slow
def test_benchmark_at_the_issue_reduced_size(tmp_path):
  """100k x 64 embeddings, 10^5 cluster-boundary triplets: the issue's reduced benchmark, all formats."""
  bench = _bench_module()
  result = bench.main(["--n", "100000", "--d", "64", "--k", "50", "--num", "100000", "--num-shards", "4",
                       "--out", str(tmp_path / "b.json")])
  assert result["stages"]["triplets"]["triplets"] == 130000
  assert result["targets_met"]["total_seconds"] and result["targets_met"]["peak_rss_gb"]


@pytest.mark.slow
def test_same_bytes_in_multi_processing_mode(world, triplets, tmp_path):
  """Worker processes (each loading its own inputs) write the bytes of the in-process runner."""
  _, _, _, config = world
  other = _run(config, tmp_path / "mp", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  assert _data_hashes(other) == _data_hashes(triplets)
