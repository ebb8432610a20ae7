"""Publishing: verified copies, manifest last, never overwriting a version, corruption detected."""
import json

import numpy as np
import pytest

from alignet_data import artifacts
from alignet_data.dataset import publishing
from pipelines import publish_stage


def _source(url):
  """A small complete artifact shaped like a triplets artifact (a shard, a schema, a report)."""
  def fn(writer):
    with writer.open("shards/train_random-00000-of-00001.parquet") as f:
      f.write(b"parquet bytes" * 100)
    writer.write_npz("npz/untransformed/train_random.npz", indices=np.arange(6).reshape(2, 3))
    return {"splits": {"train_random": 2}, "strategies": {"random": 2},
            "entropy": {"mean": 0.5, "max": float(np.log(3)),
                        "histogram": {"edges": [0.0, 0.5, 1.0986], "counts": [1, 1]}}}
  return artifacts.run_stage("triplets", url, {"num": 2, "seed": 0}, {}, fn, log=lambda s: None)


def test_publish_copies_verifies_and_writes_card_and_manifest(tmp_path):
  src = _source(str(tmp_path / "src"))
  out = publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  dest = tmp_path / "bucket" / "alignet" / "0.1.0"
  assert out["published_to"] == str(dest) and not out["already_published"]
  for name in src.files:
    assert (dest / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
  card = (dest / "README.md").read_text()
  assert "alignet 0.1.0" in card and "train_random: 2 triplets" in card and "tf.data" in card
  assert (dest / "entropy_histogram.png").read_bytes()[:4] == b"\x89PNG"
  # A published version reads like any artifact, and every sha256 checks out.
  art = publishing.verify(str(dest))
  assert art.stage == "triplets" and art.manifest["publication"]["version"] == "0.1.0"
  assert set(art.files) == set(src.files) | {"README.md", "entropy_histogram.png"}


def test_a_second_publish_of_a_version_is_refused(tmp_path):
  src = _source(str(tmp_path / "src"))
  bucket = str(tmp_path / "bucket")
  publishing.publish(src.url, bucket, "alignet", "0.1.0", log=lambda s: None)
  before = (tmp_path / "bucket" / "alignet" / "0.1.0" / "manifest.json").read_bytes()
  with pytest.raises(publishing.PublishError, match="never overwritten: publish under a new --version"):
    publishing.publish(src.url, bucket, "alignet", "0.1.0", log=lambda s: None)
  assert (tmp_path / "bucket" / "alignet" / "0.1.0" / "manifest.json").read_bytes() == before
  # A resumable chain may accept an identical earlier publish.
  again = publishing.publish(src.url, bucket, "alignet", "0.1.0", if_exists="skip_identical", log=lambda s: None)
  assert again["already_published"]
  # ... also when the source was regenerated (new timestamps and wall time) with the same data bytes.
  regenerated = _source(str(tmp_path / "src2"))
  assert publishing.publish(regenerated.url, bucket, "alignet", "0.1.0", if_exists="skip_identical",
                            log=lambda s: None)["already_published"]
  publishing.publish(src.url, bucket, "alignet", "0.1.1", log=lambda s: None)  # A new version is fine.


def test_an_interrupted_publish_leaves_nothing_visible_and_a_retry_completes(tmp_path, monkeypatch):
  src = _source(str(tmp_path / "src"))
  bucket = str(tmp_path / "bucket")
  real = publishing._copy_verified
  calls = []

  def dies_on_second_file(*args):
    calls.append(args[1])
    if len(calls) == 2:
      raise KeyboardInterrupt("killed mid-publish")
    return real(*args)

  monkeypatch.setattr(publishing, "_copy_verified", dies_on_second_file)
  with pytest.raises(KeyboardInterrupt):
    publishing.publish(src.url, bucket, "alignet", "0.1.0", log=lambda s: None)
  dest = tmp_path / "bucket" / "alignet" / "0.1.0"
  assert not (tmp_path / "bucket").exists()  # Not even the folders the publish made for itself.
  with pytest.raises(artifacts.IncompleteArtifactError):
    artifacts.load(str(dest))
  monkeypatch.setattr(publishing, "_copy_verified", real)
  publishing.publish(src.url, bucket, "alignet", "0.1.0", log=lambda s: None)
  publishing.verify(str(dest))


def test_a_local_publish_is_on_the_disk_before_it_is_named(tmp_path, monkeypatch):
  """Power-cut safety: every file and folder of the version is fsynced before the rename that makes it visible,
  then the rename and each folder the publish created, up to an existing one."""
  import os
  src = _source(str(tmp_path / "src"))
  events = []
  real_fsync, real_rename = artifacts.fsync_path, os.rename
  monkeypatch.setattr(artifacts, "fsync_path", lambda p: (events.append(("fsync", os.path.normpath(p))),
                                                          real_fsync(p)))
  monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", a, b)), real_rename(a, b)))
  publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  dest = tmp_path / "bucket" / "alignet" / "0.1.0"
  [at] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dest)]
  staging = events[at][1]
  before = {e[1] for e in events[:at] if e[0] == "fsync"}
  published = {os.path.relpath(os.path.join(d, n), dest) for d, dirs, files in os.walk(dest) for n in files + dirs}
  assert {os.path.join(staging, p) for p in published} | {staging} <= before
  assert "manifest.json" in published and "npz/untransformed" in published
  after = [e[1] for e in events[at + 1:] if e[0] == "fsync"]
  assert after == [str(tmp_path / "bucket" / "alignet"), str(tmp_path / "bucket"), str(tmp_path)]
  # A second version under the same name needs only its own entry made durable.
  events.clear()
  publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.1", log=lambda s: None)
  [at] = [i for i, e in enumerate(events) if e[0] == "rename"]
  assert [e[1] for e in events[at + 1:] if e[0] == "fsync"] == [str(tmp_path / "bucket" / "alignet")]


def test_an_fsync_failure_fails_the_publish_unless_only_folders_cannot_be_fsynced(tmp_path, monkeypatch):
  """A file that cannot reach the disk (EIO) fails the publish and leaves nothing visible; a mount that cannot
  fsync folders (EINVAL) still publishes."""
  import errno
  import os
  src = _source(str(tmp_path / "src"))
  real = os.fsync

  def fsync_failing(parquet_fails):
    def fsync(fd):
      path = os.readlink(f"/proc/self/fd/{fd}")
      if os.path.isdir(path):
        raise OSError(errno.EINVAL, "Invalid argument")
      if parquet_fails and path.endswith(".parquet"):
        raise OSError(errno.EIO, "Input/output error")
      return real(fd)
    return fsync

  monkeypatch.setattr(os, "fsync", fsync_failing(parquet_fails=True))
  with pytest.raises(OSError, match="Input/output error"):
    publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  assert not (tmp_path / "bucket").exists()
  monkeypatch.setattr(os, "fsync", fsync_failing(parquet_fails=False))
  publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  publishing.verify(str(tmp_path / "bucket" / "alignet" / "0.1.0"))


def test_a_corrupt_source_is_not_published_and_a_corrupt_copy_is_detected(tmp_path):
  src = _source(str(tmp_path / "src"))
  shard = tmp_path / "src" / "shards" / "train_random-00000-of-00001.parquet"
  good = shard.read_bytes()
  shard.write_bytes(b"X" + good[1:])
  with pytest.raises(artifacts.ChecksumError, match="is corrupt"):
    publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  assert not (tmp_path / "bucket").exists()  # "Nothing was published" is true: no staging, lock or folder left.
  shard.write_bytes(good)
  publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  copy = tmp_path / "bucket" / "alignet" / "0.1.0" / "shards" / "train_random-00000-of-00001.parquet"
  copy.write_bytes(good[:-1] + b"Y")
  with pytest.raises(artifacts.ChecksumError, match="train_random-00000-of-00001.parquet"):
    publishing.verify(str(tmp_path / "bucket" / "alignet" / "0.1.0"))


def test_publish_works_on_any_fsspec_filesystem():
  src = _source("memory://pub-test/src")
  out = publishing.publish(src.url, "memory://pub-test/bucket", "alignet", "1.0.0", log=lambda s: None)
  assert out["published_to"] == "memory://pub-test/bucket/alignet/1.0.0"
  publishing.verify(out["published_to"])
  with pytest.raises(ValueError, match="Bad dataset --version"):
    publishing.publish(src.url, "memory://pub-test/bucket", "alignet", "../x", log=lambda s: None)


def test_publish_stage_records_where_it_published(tmp_path):
  src = _source(str(tmp_path / "src"))
  config = publish_stage.default_config()
  config.update(source=src.url, bucket=str(tmp_path / "bucket"), name="alignet-demo")
  art = artifacts.run_stage("publish", str(tmp_path / "publish"), config, publish_stage.input_urls(config),
                            lambda w: publish_stage.run(config, w), log=lambda s: None)
  assert art.report["published_to"] == str(tmp_path / "bucket" / "alignet-demo" / "0.1.0")
  assert json.loads((tmp_path / "publish" / "publication.json").read_text())["files"] == art.report["files"]
  with pytest.raises(ValueError, match="--to"):
    publish_stage.input_urls(publish_stage.default_config() | {"source": src.url})


def test_cli_publishes_without_out_and_refuses_the_same_version_clearly(tmp_path, capsys):
  from pipelines import cli
  src = _source(str(tmp_path / "src"))
  argv = ["publish", "--from", src.url, "--to", f"file://{tmp_path}/bucket", "--name", "alignet", "--version",
          "0.1.0"]
  assert cli.main(argv) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["published_to"] == f"file://{tmp_path}/bucket/alignet/0.1.0" and not out["already_published"]
  publishing.verify(out["published_to"])
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert "alignet publish: error:" in err and "already exists" in err and "new --version" in err
  # --out additionally records the publication as a publish artifact (what the chain does).
  assert cli.main(argv[:-1] + ["0.2.0", "--out", str(tmp_path / "record")]) == 0
  assert artifacts.load(str(tmp_path / "record")).report["version"] == "0.2.0"


def test_card_lists_sample_triplets_and_says_when_images_are_unavailable(tmp_path):
  from alignet_data.dataset import shards, triplet_blocks
  from alignet_data.teacher import embeddings

  def emb(writer):
    entry = embeddings.write_split(writer, "pool", np.arange(4), np.zeros(4), [f"n0_{i}.JPEG" for i in range(4)],
                                   np.eye(4, dtype=np.float32), ids_per_shard=8, source="tfds:imagenet2012:train")
    embeddings.write_index(writer, {"pool": entry})
    return {}

  emb_art = artifacts.run_stage("embed", str(tmp_path / "embed"), {}, {}, emb, log=lambda s: None)

  def trip(writer):
    cols = {"triplet_id": np.arange(2), "strategy": np.array(["random", "random"]),
            "indices": np.array([[0, 1, 2], [1, 2, 3]]), "file_names": np.array([["a", "b", "c"], ["b", "c", "d"]]),
            "labels": np.zeros((2, 3), np.int64), "clusters": -np.ones((2, 3), np.int64),
            "similarities": np.array([[0.5, 0.2, 0.1]] * 2, np.float32),
            "soft_label": np.array([[0.4, 0.31, 0.29]] * 2, np.float32), "entropy": np.ones(2, np.float32)}
    shards.write_parquet(writer.path("shards/train_random-00000-of-00001.parquet"), cols)
    with writer.open("npz/untransformed/train_random.npz", "wb") as f:
      shards.write_npz(f, cols)
    return {"splits": {"train_random": 2}, "strategies": {"random": 2},
            "npz": {"train_random": "npz/untransformed/train_random.npz"},
            "indices": triplet_blocks.indices_provenance(emb_art.url, "pool")}

  src = artifacts.run_stage("triplets", str(tmp_path / "src"), {"embeddings": emb_art.url, "split": "pool"}, {},
                            trip, log=lambda s: None)
  out = publishing.publish(src.url, str(tmp_path / "bucket"), "alignet", "0.1.0", log=lambda s: None)
  card = (tmp_path / "bucket" / "alignet" / "0.1.0" / "README.md").read_text()
  assert "## Sample triplets" in card and "| `random` | `a` | `b` | `c` | [0.400, 0.310, 0.290] |" in card
  assert "No picture: the images of source `tfds:imagenet2012:train` are not available" in card
  assert "shards/train_random-*.parquet" in card
  assert "point its `data_dir` at" in card and "`untransformed/train_random.npz`" in card
  assert "record indices of `tfds.data_source('imagenet2012', split='train')`" in card and "Caution" not in card
  assert not (tmp_path / "bucket" / "alignet" / "0.1.0" / publishing.SAMPLES_PLOT).exists()
  assert out["files"] == len(src.files) + 1  # + README.md (no histogram in this report, no grid)


def test_publish_refuses_a_destination_inside_the_source_or_containing_it(tmp_path):
  src = _source(str(tmp_path / "src"))
  inner = _source(str(tmp_path / "b" / "alignet" / "0.2.0" / "src"))
  before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
  with pytest.raises(publishing.PublishError, match="inside the source"):
    publishing.publish(src.url, src.url, "alignet", "0.1.0", log=lambda s: None)
  with pytest.raises(publishing.PublishError, match="contains the source"):
    publishing.publish(inner.url, str(tmp_path / "b"), "alignet", "0.2.0", log=lambda s: None)
  assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_a_second_publisher_of_one_version_is_refused_while_the_first_holds_the_lock(tmp_path):
  src = _source(str(tmp_path / "src"))
  bucket = str(tmp_path / "bucket")
  held = artifacts.WriteLock(publishing.version_url(bucket, "alignet", "0.1.0"), "other-writer")
  held.acquire()  # A live publisher (this very process) holds the version.
  with pytest.raises(artifacts.LockedError, match="held by another writer"):
    publishing.publish(src.url, bucket, "alignet", "0.1.0", log=lambda s: None)
  held.release()
  publishing.publish(src.url, bucket, "alignet", "0.1.0", log=lambda s: None)
  publishing.verify(publishing.version_url(bucket, "alignet", "0.1.0"))
