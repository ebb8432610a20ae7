"""Data safety through the CLI: never delete what is not ours, verify inputs, one writer, one error path."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from alignet_data import artifacts
from alignet_data.teacher import embeddings
from pipelines import cli

N, D = 120, 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run folder D holding an embed artifact (D/embed) of N random vectors."""
  root = tmp_path_factory.mktemp("safety") / "D"
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  ids = np.arange(N)

  def embed(writer):
    entry = embeddings.write_split(writer, "pool", ids, ids % 4, [f"img{i}.png" for i in ids], x, ids_per_shard=50)
    embeddings.write_index(writer, {"pool": entry})
    return {}

  artifacts.run_stage("embed", str(root / "embed"), {}, {}, embed, log=lambda _: None)
  return root


def _cluster(out, embed, *extra):
  return cli.main(["cluster", "--embeddings", str(embed), "--k", "3", "--out", str(out), *extra])


def _tree(path):
  return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_out_holding_a_users_file_is_refused_and_the_file_kept(run_dir, tmp_path, capsys):
  keep = tmp_path / "K" / "keep"
  keep.parent.mkdir()
  keep.write_text("mine")
  assert _cluster(keep.parent, run_dir / "embed") == 1
  assert keep.read_text() == "mine" and _tree(keep.parent) == ["keep"]
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("alignet cluster: error: --out ") and "not empty" in err[-1]
  assert _cluster(keep.parent, run_dir / "embed", "--force") == 1  # --force deletes only our own artifacts.
  assert keep.read_text() == "mine"


def test_out_containing_equal_to_or_inside_an_input_is_refused(run_dir, capsys):
  before = _tree(run_dir)
  assert _cluster(run_dir, run_dir / "embed") == 1
  assert "contains the input `embeddings`" in capsys.readouterr().err
  assert _cluster(run_dir / "embed", run_dir / "embed") == 1
  assert "is the same folder as the input" in capsys.readouterr().err
  assert _cluster(run_dir / "embed" / "sub", run_dir / "embed") == 1
  assert "inside the input" in capsys.readouterr().err
  assert _tree(run_dir) == before and (run_dir / "embed" / "manifest.json").exists()


def test_out_holding_another_stages_artifact_or_extra_files_is_refused(run_dir, tmp_path, capsys):
  other = tmp_path / "other"
  artifacts.run_stage("world", str(other), {}, {}, lambda w: {}, log=lambda _: None)
  assert _cluster(other, run_dir / "embed") == 1
  assert "holds a 'world' artifact" in capsys.readouterr().err
  out = tmp_path / "C"
  assert _cluster(out, run_dir / "embed") == 0
  assert _cluster(out, run_dir / "embed", "--force") == 0  # Our own artifact: replaced.
  (out / "notes.txt").write_text("a user's notes inside an artifact")
  assert _cluster(out, run_dir / "embed", "--force") == 1
  assert "does not list" in capsys.readouterr().err and (out / "notes.txt").exists()
  assert (out / "manifest.json").exists()


def test_a_flipped_byte_in_an_input_names_the_file_and_both_digests(run_dir, tmp_path, capsys):
  art = artifacts.load(str(run_dir / "embed"))
  name = art.glob("embeddings/*.parquet")[0]
  path = run_dir / "embed" / name
  good = path.read_bytes()
  path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
  try:
    assert _cluster(tmp_path / "C2", run_dir / "embed") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert name in err and art.files[name]["sha256"] in err and "does not match its manifest" in err
    assert not (tmp_path / "C2").exists()
    _cluster(tmp_path / "C3", run_dir / "embed", "--no-verify")  # Asked for: no check, and a warning says so.
    assert "inputs not verified" in capsys.readouterr().out
  finally:
    path.write_bytes(good)


def test_a_second_writer_of_one_out_fails_at_once(run_dir, tmp_path, capsys):
  out = tmp_path / "C"
  first = artifacts.ArtifactWriter(str(out), "cluster", {}, {}, log=lambda _: None)
  try:
    assert _cluster(out, run_dir / "embed") == 1
    err = capsys.readouterr().err
    assert "held by another writer" in err and f"pid {os.getpid()}" in err
  finally:
    first.abort()
  assert _cluster(out, run_dir / "embed") == 0


def test_a_lock_of_a_dead_process_is_reclaimed_and_its_staging_folder_cleared(run_dir, tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  pid = int(dead.stdout)
  out = tmp_path / "C"
  (tmp_path / ".C.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": pid,
                                                "writer": "crashed", "started": "then"}))
  (tmp_path / ".C.incomplete-crashed").mkdir()
  (tmp_path / ".C.incomplete-crashed" / "half.parquet").write_bytes(b"half")
  assert _cluster(out, run_dir / "embed") == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["C"]


def test_the_commit_rechecks_that_the_writer_still_owns_the_lock(tmp_path):
  out = tmp_path / "a"
  writer = artifacts.ArtifactWriter(str(out), "toy", {}, {}, log=lambda _: None)
  writer.write_npz("x.npz", x=np.arange(3))
  (tmp_path / ".a.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "writer": "thief"}))
  with pytest.raises(artifacts.LockedError, match="Lost the lock"):
    writer.commit({})
  writer.abort()
  assert not out.exists()


def test_a_name_cannot_write_outside_the_staging_folder(tmp_path):
  with artifacts.ArtifactWriter(str(tmp_path / "a"), "toy", {}, {}, log=lambda _: None) as writer:
    for bad in ("../escaped", "x/../../escaped", "/abs"):
      with pytest.raises(ValueError, match="outside the artifact"):
        writer.path(bad)
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_artifact_of_other_code_is_rerun_unless_reuse_stale(run_dir, tmp_path, capsys):
  out = tmp_path / "C"
  assert _cluster(out, run_dir / "embed") == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["code_version"] == artifacts.code_version() and "+src." in manifest["code_version"]
  manifest["code_version"] = "0.1.0+src.0000000000000000"
  (out / "manifest.json").write_text(json.dumps(manifest))
  capsys.readouterr()
  assert _cluster(out, run_dir / "embed", "--reuse-stale") == 0
  assert "reused as asked (--reuse-stale)" in capsys.readouterr().out
  assert _cluster(out, run_dir / "embed") == 0
  assert "written by other code" in capsys.readouterr().out
  assert json.loads((out / "manifest.json").read_text())["code_version"] == artifacts.code_version()


def test_a_truncated_manifest_is_named(run_dir, tmp_path, capsys):
  bad = tmp_path / "E"
  bad.mkdir()
  (bad / "manifest.json").write_text('{"schema_version": 1, "files": {')
  assert _cluster(tmp_path / "C", bad) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "manifest.json is not valid JSON" in err and str(bad) in err


def test_an_unknown_flag_of_a_beam_stage_is_an_error_naming_it(run_dir, tmp_path, capsys):
  code = cli.main(["triplets", "--embeddings", str(run_dir / "embed"), "--out", str(tmp_path / "X"),
                   "--bogus-flag", "7"])
  assert code == 1 and "--bogus-flag" in capsys.readouterr().err and not (tmp_path / "X").exists()


def test_a_worker_error_relayed_by_beam_ends_in_one_line_and_a_bug_stays_a_bug():
  oserror = OSError(28, "No space left on device", "/data/out/shard-0.parquet")

  def raised(outer, inner):
    try:
      try:
        raise inner
      except type(inner):
        raise outer  # noqa: B904 (as Beam's in-process runner does: the worker's error is the context)
    except BaseException as e:  # noqa: BLE001
      return e

  in_process = raised(RuntimeError(f"OSError: {oserror} [while running 'Write']"), oserror)
  relayed = RuntimeError("Pipeline failed.\nTraceback ...\nOSError: [Errno 28] No space left on device: "
                         "'/data/out/x' [while running 'SampleLabelWrite']")
  assert cli._user_error(in_process) == str(oserror)
  assert cli._user_error(relayed) == "[Errno 28] No space left on device: '/data/out/x'"
  assert cli._user_error(RuntimeError("IndexError: list index out of range")) is None  # A bug: traceback, exit 2.
  assert cli._user_error(raised(IndexError("bug in a handler"), oserror)) is None


def test_an_internal_error_prints_its_traceback_and_exits_2(monkeypatch, tmp_path, capsys):
  from pipelines import world_stage
  monkeypatch.setattr(world_stage, "run", lambda *a, **k: [][1])
  assert cli.main(["world", "--out", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and "IndexError" in err and "internal error" in err
  assert not (tmp_path / "w").exists()


def test_a_full_disk_inside_a_beam_worker_ends_in_one_line(run_dir, tmp_path, monkeypatch, capsys):
  """The shard writer runs inside Beam's DoFn; its OSError reaches the user as one line, not 137."""
  import errno

  from alignet_data.dataset import shards

  def full(url, record):
    raise OSError(errno.ENOSPC, "No space left on device", url)

  monkeypatch.setattr(shards, "write_parquet", full)
  argv = ["triplets", "--embeddings", str(run_dir / "embed"), "--strategy", "random", "--num", "200",
          "--num-valid", "20", "--format", "parquet", "--out", str(tmp_path / "X")]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) <= 3, err  # Beam's own logged tracebacks are not repeated at the user.
  assert err[-1].startswith("alignet triplets: error: [Errno 28] No space left on device")
  assert "train_random-" in err[-1]
  assert not (tmp_path / "X").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_a_lock_being_written_is_not_taken_for_stale(tmp_path):
  """A lock file that exists but is still empty belongs to a writer between its create and its write: a second
  writer must not remove it (only a record that stays unreadable is a dead writer's)."""
  out = str(tmp_path / "a")
  (tmp_path / ".a.lock").write_bytes(b"")
  lock = artifacts.WriteLock(out, "second", log=lambda _: None)
  threading.Timer(0.3, lambda: (tmp_path / ".a.lock").write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "writer": "first", "started": "now"}))).start()
  with pytest.raises(artifacts.LockedError, match="host elsewhere"):
    lock.acquire()
  assert json.loads((tmp_path / ".a.lock").read_text())["writer"] == "first"


def test_an_empty_lock_left_by_a_writer_killed_mid_create_is_reclaimed(tmp_path):
  (tmp_path / ".a.lock").write_bytes(b"")
  logs = []
  lock = artifacts.WriteLock(str(tmp_path / "a"), "second", log=logs.append)
  lock.acquire()
  assert lock.held and any("reclaiming" in m for m in logs)
  lock.release()


def test_two_reclaimers_of_one_stale_lock_cannot_remove_the_winners_fresh_lock(tmp_path):
  """B judged the lock stale (a dead writer's record), but A reclaimed it first and holds a fresh one now: B's
  removal must leave A's lock in place."""
  fresh = {"host": "h", "pid": os.getpid(), "writer": "A", "started": "now"}
  (tmp_path / ".a.lock").write_text(json.dumps(fresh))
  late = artifacts.WriteLock(str(tmp_path / "a"), "B", log=lambda _: None)
  late._remove_stale({"host": "h", "pid": 999999, "writer": "dead"})
  assert json.loads((tmp_path / ".a.lock").read_text()) == fresh
  assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock"]
