"""The embed stage end to end on DirectRunner: demo world, image files with bad ones, TFDS (mocked), 2 workers."""
import argparse
import dataclasses
import functools
import io
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from alignet_data import artifacts, demo_world, models
from alignet_data.models import preprocessing
from alignet_data.teacher import embed_blocks, embeddings, image_sources
from pipelines import embed_pipeline, world_stage

SMALL_WORLD = dict(n_super=2, n_basic_per_super=2, n_sub_per_basic=2, images_per_class=12, things_train=30,
                   things_test=10, levels_per_level=6)


# A tiny stand-in for `models.load_model(...)`: the same interface, a pure jax embed_fn.
@dataclasses.dataclass
class FakeModel:
  params: dict
  preprocess: object
  embed_fn: object
  dim: int = 6


def _fake_embed(params, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w"])


def fake_load(spec):
  assert spec == "fake"
  w = np.random.default_rng(0).normal(size=(8 * 8 * 3, 6)).astype(np.float32) / 10
  return FakeModel({"w": jnp.asarray(w)}, functools.partial(preprocessing.preprocess, image_size=8,
                                                             convention="siglip"), _fake_embed)


def _direct(images):
  """What the model gives called directly, one image at a time (no Beam, no padding)."""
  m = fake_load("fake")
  return np.concatenate([np.asarray(m.embed_fn(m.params, m.preprocess(np.asarray(im)[None]))) for im in images])


def _run(tmp_path, name, sources, beam_args=(), load_fn=fake_load, **overrides):
  config = {**embed_pipeline.default_config(), "model": "fake" if load_fn else "demo-teacher", "sources": sources,
            "batch_size": 8, "rows_per_shard": 16, "images_per_range": 20, **overrides}
  return artifacts.run_stage("embed", str(tmp_path / name), config, embed_pipeline.input_urls(config),
                             lambda w: embed_pipeline.run(config, w, beam_args, load_fn=load_fn), log=lambda s: None)


@pytest.fixture(scope="module")
def world_url(tmp_path_factory):
  url = str(tmp_path_factory.mktemp("world") / "world")
  config = {**world_stage.default_config(), **SMALL_WORLD}
  artifacts.run_stage("world", url, config, {}, lambda w: world_stage.run(config, w), log=lambda s: None)
  return url


def _demo_sources(world_url):
  return {"things": f"demo:{world_url}:things", "pool": f"demo:{world_url}:pool"}


def test_demo_world_embeddings_equal_the_model_called_directly(tmp_path, world_url):
  art = _run(tmp_path, "emb", _demo_sources(world_url), load_fn=None)  # The real demo teacher.
  world = demo_world.load(world_url)
  teacher = models.load_model("demo-teacher")
  pool = embeddings.load(art, "pool")
  np.testing.assert_array_equal(pool.ids, np.arange(len(world.pool_images)))
  np.testing.assert_array_equal(pool.labels, world.pool_labels)
  np.testing.assert_array_equal(pool.file_names, world.pool_file_names)
  assert pool.dim == teacher.dim
  np.testing.assert_allclose(pool.vectors, teacher.embed(world.pool_images), rtol=1e-5, atol=1e-5)
  things = embeddings.load(art, "things")
  np.testing.assert_array_equal(things.labels, world.concept_basic)
  np.testing.assert_allclose(things.vectors, teacher.embed(world.things_images), rtol=1e-5, atol=1e-5)
  report = art.report
  assert report["images"] == len(world.pool_images) + len(world.things_images) and report["failed"] == 0
  assert report["counters"]["images"] == report["images"]  # Beam counters agree with the files.
  assert report["splits"]["pool"]["shards"] == len(art.glob("embeddings/pool-*")) == 3  # 48 ids / 16 per shard.
  assert art.manifest["inputs"].keys() == {"world"}


def _png(size, mode="RGB"):
  buf = io.BytesIO()
  rng = np.random.default_rng(sum(size))
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  Image.fromarray(rng.integers(0, 255, (*size, channels), np.uint8).squeeze(), mode).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(size):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(7).integers(0, 255, (*size, 3), np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def test_files_source_dead_letters_bad_images(tmp_path):
  folder = tmp_path / "imgs"
  good = {"cat/a.png": _png((20, 16)), "cat/b.jpg": _jpeg((40, 40)), "dog/gray.png": _png((12, 12), "L"),
          "dog/rgba.png": _png((9, 30), "RGBA")}
  bad = {"dog/truncated.jpg": _jpeg((64, 64))[:1500], "dog/empty.jpg": b"", "cat/notes.jpg": b"just some text\n"}
  for name, data in {**good, **bad}.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)

  parser = argparse.ArgumentParser()
  embed_pipeline.add_arguments(parser)
  args = parser.parse_args(["--source", f"files:{folder}/**/*", "--batch-size", "2"])
  config = embed_pipeline.config_from_args(args)
  assert config["sources"] == {"train": f"files:{folder}/**/*"}
  art = _run(tmp_path, "emb", config["sources"], batch_size=2)  # Job finishes despite the bad files.

  report = art.report
  assert (report["images"], report["failed"]) == (4, 3)
  assert not [name for name in art.files if "staging" in name or "listing" in name]  # Staged paths removed.
  with art.open(report["dead_letter"]) as f:
    dead = {d["file_name"]: d["reason"] for d in map(json.loads, f)}
  assert dead.keys() == bad.keys()
  assert "truncated" in dead["dog/truncated.jpg"]
  assert "empty file (0 bytes)" in dead["dog/empty.jpg"]
  assert "not a known image format" in dead["cat/notes.jpg"]

  e = embeddings.load(art, "train")
  assert sorted(e.file_names) == sorted(good)
  expected_labels = {"cat": 0, "dog": 1}
  np.testing.assert_array_equal(e.labels, [expected_labels[n.split("/")[0]] for n in e.file_names])
  decoded = [image_sources.decode_image(good[n]) for n in e.file_names]
  assert all(im.shape[-1] == 3 for im in decoded)
  np.testing.assert_allclose(e.vectors, _direct(decoded), atol=1e-6)
  assert embeddings.info(art)["splits"]["train"]["label_names"] == ["cat", "dog"]


def test_files_source_reads_any_fsspec_filesystem():
  import fsspec
  fs = fsspec.filesystem("memory")
  fs.pipe({"/embed-test/n01/x.png": _png((5, 7)), "/embed-test/n02/y.png": _png((4, 4), "L"),
           "/embed-test/n02/z.png": b""})
  src = image_sources.parse("files:memory://embed-test/**/*.png")
  (task,) = src.tasks("train", 10)
  block, failures = src.read(pickle.loads(pickle.dumps(task)))  # Tasks carry their paths to the workers.
  assert list(block.file_names) == ["n01/x.png", "n02/y.png"] and list(block.labels) == [0, 1]
  assert [im.shape for im in block.images] == [(5, 7, 3), (4, 4, 3)]
  assert [(f.id, f.file_name) for f in failures] == [(2, "n02/z.png")]


def test_tfds_imagenet_under_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=11):
    art = _run(tmp_path, "emb", embed_pipeline.parse_source_flags(["tfds:imagenet2012:train"]))
    ds = tfds.data_source("imagenet2012", split="train")
    records = [ds[i] for i in range(len(ds))]
  e = embeddings.load(art, "train")
  np.testing.assert_array_equal(e.ids, np.arange(11))  # Ids are the data source's record indices.
  assert list(e.file_names) == [r["file_name"] for r in records]
  np.testing.assert_array_equal(e.labels, [r["label"] for r in records])
  np.testing.assert_allclose(e.vectors, _direct([r["image"] for r in records]), atol=1e-6)
  assert art.report["failed"] == 0


@pytest.mark.slow
def test_multiprocessing_gives_byte_identical_shards(tmp_path, world_url):
  # The real model (loaded by each worker process through models.load_model), 2 worker processes.
  sources = {"pool": f"demo:{world_url}:pool"}
  one = _run(tmp_path, "one", sources, load_fn=None)
  two = _run(tmp_path, "two", sources, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
             load_fn=None, images_per_range=10)  # Smaller read tasks: more of them, on both workers.
  names = one.glob("embeddings/*.parquet")
  assert names == two.glob("embeddings/*.parquet") and len(names) == 3
  assert [one.files[n]["sha256"] for n in names] == [two.files[n]["sha256"] for n in names]


def test_source_flags_and_config_errors(world_url):
  assert embed_pipeline.parse_source_flags([f"demo:{world_url}:pool", "extra=files:/x/**/*.png"]) == {
      "pool": f"demo:{world_url}:pool", "extra": "files:/x/**/*.png"}
  with pytest.raises(ValueError, match="name them"):
    embed_pipeline.parse_source_flags(["files:/a/*", "files:/b/*"])
  with pytest.raises(ValueError, match="name it: --source NAME="):
    embed_pipeline.parse_source_flags(["tfds:imagenet2012:train[:10]"])
  with pytest.raises(ValueError, match="Unknown image source kind 'imagenet'"):
    image_sources.parse("imagenet:train")
  with pytest.raises(ValueError, match="things.*pool.*got 'valid'"):
    image_sources.parse(f"demo:{world_url}:valid")
  src = image_sources.parse("tfds:imagenet2012:5.1.0:train[:1%]")
  assert (src.name, src.version, src.split) == ("imagenet2012", "5.1.0", "train[:1%]")
  config = {**embed_pipeline.default_config(), "sources": {}}
  with pytest.raises(ValueError, match="No image sources: pass --source"):
    embed_pipeline.run(config, None)
  with pytest.raises(FileNotFoundError, match="No files match"):
    image_sources.parse("files:/nonexistent-dir/**/*.jpg")


def test_bfloat16_compute_is_close_to_float32_and_returns_float32():
  teacher = models.load_model("demo-teacher")
  images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), np.uint8)
  x = teacher.preprocess(images)
  fn32, p32 = embed_blocks.compile_embed(teacher, "float32")
  fn16, p16 = embed_blocks.compile_embed(teacher, "bfloat16")
  auto_fn, auto_params = embed_blocks.compile_embed(teacher, "auto")  # On CPU: float32.
  want = np.asarray(fn32(p32, x))
  got = np.asarray(fn16(p16, x))
  assert got.dtype == np.float32 and str(jax.tree.leaves(p16)[0].dtype) == "bfloat16"
  rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
  assert 0 < rel.max() < 0.05
  np.testing.assert_array_equal(np.asarray(auto_fn(auto_params, x)), want)


def test_float16_storage_through_the_pipeline(tmp_path, world_url):
  art = _run(tmp_path, "h", {"things": f"demo:{world_url}:things"}, dtype="float16")
  full = _run(tmp_path, "f", {"things": f"demo:{world_url}:things"})
  half, single = embeddings.load(art, "things"), embeddings.load(full, "things")
  assert embeddings.info(art)["splits"]["things"]["dtype"] == "float16"
  np.testing.assert_array_equal(half.vectors, single.vectors.astype(np.float16).astype(np.float32))


def test_acceptance_cli_files_and_tfds_mock(tmp_path):
  """The issue's Acceptance through `alignet embed` itself: good JPEG/PNG plus a truncated JPEG, a zero-byte file
  and a text file named .jpg; then `--source tfds:imagenet2012:train` under tfds.testing.mock_data."""
  import tensorflow_datasets as tfds

  from pipelines import cli
  good = {"n01440764/a.jpg": _jpeg((40, 30)), "n01440764/b.png": _png((20, 24)), "n01443537/c.png": _png((33, 33))}
  bad = {"n01443537/truncated.jpg": _jpeg((64, 64))[:1500], "n01443537/zero.jpg": b"",
         "n01440764/text.jpg": b"not an image\n"}
  for name, data in {**good, **bad}.items():
    (tmp_path / "DIR" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "DIR" / name).write_bytes(data)
  out = tmp_path / "OUT"
  assert cli.main(["embed", "--source", f"files:{tmp_path}/DIR/**/*", "--model", "demo-teacher",
                   "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert (report["images"], report["failed"]) == (3, 3)
  dead = [json.loads(line) for line in (out / report["dead_letter"]).read_text().splitlines()]
  assert {d["file_name"] for d in dead} == bad.keys() and all(d["reason"] for d in dead)
  e = embeddings.load(str(out), "train")
  assert sorted(e.file_names) == sorted(good)
  np.testing.assert_array_equal(e.labels, [0 if n.startswith("n01440764") else 1 for n in e.file_names])
  teacher = models.load_model("demo-teacher")
  want = np.concatenate([teacher.embed(image_sources.decode_image(good[n])[None]) for n in e.file_names])
  np.testing.assert_allclose(e.vectors, want, rtol=1e-5, atol=1e-5)

  with tfds.testing.mock_data(num_examples=5):
    assert cli.main(["embed", "--source", "tfds:imagenet2012:train", "--model", "demo-teacher", "--out",
                     str(tmp_path / "TFDS")]) == 0
  e = embeddings.load(str(tmp_path / "TFDS"), "train")
  np.testing.assert_array_equal(e.ids, np.arange(5))
  assert e.vectors.shape == (5, teacher.dim) and np.all(np.isfinite(e.vectors))


def test_a_split_with_no_decodable_image_fails_naming_it(tmp_path, capsys):
  """Every image undecodable was a pyarrow `list_size` error from inside Beam: now one line naming the split and
  the first dead letters, exit 1, and no artifact."""
  from pipelines import cli
  bad = {"n01/text.jpg": b"not an image\n", "n01/zero.png": b"", "n02/cut.jpg": _jpeg((64, 64))[:900]}
  for name, data in bad.items():
    (tmp_path / "DIR" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "DIR" / name).write_bytes(data)
  code = cli.main(["embed", "--source", f"train=files:{tmp_path}/DIR/**/*", "--model", "demo-teacher",
                   "--out", str(tmp_path / "OUT")])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 1
  assert err.startswith("alignet embed: error: No image of split 'train'") and "3 of 3 records failed" in err
  assert "n01/text.jpg" in err and "empty file (0 bytes)" in err
  assert not (tmp_path / "OUT").exists()
