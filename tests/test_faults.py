"""Faults and bad inputs, as a user meets them (slow: CI runs it).

1. A table of bad inputs across every stage: each exits 1 with one line `alignet <stage>: error: ...` naming the
   problem, and writes or deletes nothing outside a hidden staging folder.
2. A fault harness: `embed`, `triplets`, `publish` and `train` are killed with SIGKILL at seeded random moments;
   nothing half-written is visible afterwards, and a rerun gives every data file's sha256 of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alignet_data import artifacts
from alignet_data.teacher import embeddings
from pipelines import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
  """The smoke chain up to `triplets` (world, human, embed, align, cluster, triplets), about 20 s."""
  out = tmp_path_factory.mktemp("faults") / "R"
  assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--until", "triplets"]) == 0
  return out


# ----------------------------------------------------------------------------------------------- Bad inputs


def _npy(path: pathlib.Path, array: np.ndarray) -> str:
  np.save(path, array)
  return str(path)


def _bytes(path: pathlib.Path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def _nan_transform(path: pathlib.Path, dim: int) -> str:
  w = np.eye(dim, dtype=np.float32)
  w[0, 0] = np.nan
  np.savez(path, weights=w, bias=np.zeros(dim, np.float32), mean=np.float32(0), std=np.float32(1))
  return str(path)


def _dim(r: pathlib.Path) -> int:
  return int(embeddings.info(str(r / "embed"))["splits"]["pool"]["dim"])


def _triplet_file(path: pathlib.Path, rows: list[list[int]]) -> str:
  path.write_text("\n".join(" ".join(map(str, row)) for row in rows) + "\n")
  return str(path)


def _user_folder(path: pathlib.Path) -> str:
  path.mkdir()
  (path / "keep.txt").write_text("a user's file")
  return str(path)


def _run_folder_with_user_world(s: pathlib.Path) -> str:
  (s / "D").mkdir()
  _user_folder(s / "D" / "world")
  return str(s / "D")


def _locked(path: pathlib.Path) -> str:
  """An output whose lock a live writer (this test process) holds."""
  lock = path.parent / f".{path.name}.lock"
  lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": os.getpid(), "writer": "live",
                              "started": "now"}))
  return str(path)


def _published(r: pathlib.Path, s: pathlib.Path) -> str:
  bucket = s / "bucket"
  assert cli.main(["publish", "--from", str(r / "triplets"), "--to", str(bucket), "--name", "ds", "--version",
                   "1.0.0"]) == 0
  return str(bucket)


def _tampered(artifact: pathlib.Path, s: pathlib.Path, pattern: str) -> str:
  """A copy of an artifact with one byte flipped in its first file matching `pattern`."""
  import shutil
  copy = s / f"tampered_{artifact.name}"
  shutil.copytree(artifact, copy)
  shard = sorted(copy.glob(pattern))[0]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  return str(copy)


def _garbage_pngs(s: pathlib.Path) -> str:
  folder = s / "imgs"
  folder.mkdir()
  for i in range(3):
    (folder / f"img{i}.png").write_bytes(b"not a png at all" * 10)
  return f"files:{folder}/*.png"


E = lambda r: str(r / "embed")  # noqa: E731
T = lambda r: str(r / "align")  # noqa: E731
C = lambda r: str(r / "cluster")  # noqa: E731
X = lambda r: str(r / "triplets")  # noqa: E731
W = lambda r: str(r / "world")  # noqa: E731

# (case id, argv builder (run dir r, scratch folder s), words the message must contain)
CASES = [
    # cluster
    ("cluster-out-user-folder", lambda r, s: ["cluster", "--embeddings", E(r), "--k", "3", "--out",
                                              _user_folder(s / "K")], "not empty"),
    ("cluster-out-run-folder", lambda r, s: ["cluster", "--embeddings", E(r), "--k", "3", "--out", str(r)],
     "contains the input"),
    ("cluster-out-equals-input", lambda r, s: ["cluster", "--embeddings", E(r), "--k", "3", "--out", E(r)],
     "is the same folder as the input"),
    ("cluster-out-inside-input", lambda r, s: ["cluster", "--embeddings", E(r), "--k", "3", "--out",
                                               E(r) + "/sub"], "inside the input"),
    ("cluster-out-other-stage", lambda r, s: ["cluster", "--embeddings", E(r), "--k", "3", "--out", T(r)],
     "holds a 'align' artifact"),
    ("cluster-missing-embeddings", lambda r, s: ["cluster", "--embeddings", str(s / "nope"), "--k", "3", "--out",
                                                 str(s / "C")], "nope"),
    ("cluster-wrong-stage-input", lambda r, s: ["cluster", "--embeddings", W(r), "--k", "3", "--out",
                                                str(s / "C")], "expected 'embed'"),
    ("cluster-nan-transform", lambda r, s: ["cluster", "--embeddings", E(r), "--transform",
                                            _nan_transform(s / "t.npz", _dim(r)), "--k", "3", "--out",
                                            str(s / "C")], "non-finite"),
    ("cluster-garbage-transform", lambda r, s: ["cluster", "--embeddings", E(r), "--transform",
                                                _bytes(s / "t.npz", b"garbage"), "--k", "3", "--out",
                                                str(s / "C")], "t.npz"),
    ("cluster-unknown-split", lambda r, s: ["cluster", "--embeddings", E(r), "--split", "nosuch", "--k", "3",
                                            "--out", str(s / "C")], "nosuch"),
    ("cluster-zero-iterations", lambda r, s: ["cluster", "--embeddings", E(r), "--niter", "0", "--out",
                                              str(s / "C")], "niter"),
    ("cluster-locked-out", lambda r, s: ["cluster", "--embeddings", E(r), "--k", "3", "--out",
                                         _locked(s / "C")], "held by another writer"),
    # triplets
    ("triplets-bogus-flag", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r), "--out",
                                          str(s / "X"), "--bogus-flag", "7"], "--bogus-flag"),
    ("triplets-typo-beam-flag", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r), "--out",
                                              str(s / "X"), "--direct_num_worker=2"], "--direct_num_worker"),
    ("triplets-escaping-npz-sampling", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r),
                                                     "--format", "npz", "--npz-sampling", "x/../../../../ESCAPED",
                                                     "--out", str(s / "X")], "ESCAPED"),
    ("triplets-unknown-format", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r), "--format",
                                              "csv", "--out", str(s / "X")], "csv"),
    ("triplets-unknown-strategy", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r),
                                                "--strategy", "nearest", "--out", str(s / "X")], "nearest"),
    ("triplets-nan-transform", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r), "--transform",
                                             _nan_transform(s / "t.npz", _dim(r)), "--out", str(s / "X")],
     "non-finite"),
    ("triplets-clusters-is-embed", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", E(r), "--out",
                                                 str(s / "X")], "expected 'cluster'"),
    ("triplets-tampered-embeddings", lambda r, s: ["triplets", "--embeddings",
                                                   _tampered(r / "embed", s, "embeddings/pool-*.parquet"),
                                                   "--clusters", C(r), "--out", str(s / "Y")],
     "does not match its manifest"),
    ("triplets-out-is-input-clusters", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r),
                                                     "--out", C(r)], "is the same folder as the input"),
    ("triplets-locked-out", lambda r, s: ["triplets", "--embeddings", E(r), "--clusters", C(r), "--out",
                                          _locked(s / "X")], "held by another writer"),
    # embed
    ("embed-escaping-split-name", lambda r, s: ["embed", "--source", f"../up=demo:{W(r)}:pool", "--model",
                                                "demo-teacher", "--out", str(s / "E")], "../up"),
    ("embed-missing-world", lambda r, s: ["embed", "--source", f"pool=demo:{s / 'noworld'}:pool", "--model",
                                          "demo-teacher", "--out", str(s / "E")], "noworld"),
    ("embed-unknown-model", lambda r, s: ["embed", "--source", f"pool=demo:{W(r)}:pool", "--model", "nosuchmodel",
                                          "--out", str(s / "E")], "nosuchmodel"),
    ("embed-every-image-undecodable", lambda r, s: ["embed", "--source", "pool=" + _garbage_pngs(s), "--model",
                                                    "demo-teacher", "--out", str(s / "E")], "decod"),
    ("embed-out-is-world", lambda r, s: ["embed", "--source", f"pool=demo:{W(r)}:pool", "--model", "demo-teacher",
                                         "--out", W(r)], "is the same folder as the input"),
    # publish
    ("publish-into-its-source", lambda r, s: ["publish", "--from", X(r), "--to", X(r)], "inside the source"),
    ("publish-escaping-version", lambda r, s: ["publish", "--from", X(r), "--to", str(s / "b"), "--version",
                                               "../x"], "--version"),
    ("publish-slash-in-name", lambda r, s: ["publish", "--from", X(r), "--to", str(s / "b"), "--name", "a/b"],
     "--name"),
    ("publish-version-twice", lambda r, s: ["publish", "--from", X(r), "--to", _published(r, s), "--name", "ds",
                                            "--version", "1.0.0"], "never overwritten"),
    ("publish-not-an-artifact", lambda r, s: ["publish", "--from", _user_folder(s / "U"), "--to", str(s / "b")],
     "manifest.json is missing"),
    ("publish-tampered-source", lambda r, s: ["publish", "--from",
                                              _tampered(r / "triplets", s, "shards/train_*.parquet"), "--to",
                                              str(s / "b")],
     "is corrupt"),
    # evaluate
    ("evaluate-all-nan-embeddings", lambda r, s: ["evaluate", "--embeddings",
                                                  _npy(s / "n.npy", np.full((20, 4), np.nan, np.float32)),
                                                  "--things-triplets", _triplet_file(s / "t.txt", [[0, 1, 2]] * 5),
                                                  "--out", str(s / "R")], "non-finite"),
    ("evaluate-empty-npy", lambda r, s: ["evaluate", "--embeddings", _bytes(s / "e.npy", b""), "--things-triplets",
                                         _triplet_file(s / "t.txt", [[0, 1, 2]]), "--out", str(s / "R")], "e.npy"),
    ("evaluate-garbage-npy", lambda r, s: ["evaluate", "--embeddings", _bytes(s / "g.npy", b"\x93NUMPY garbage"),
                                           "--things-triplets", _triplet_file(s / "t.txt", [[0, 1, 2]]), "--out",
                                           str(s / "R")], "g.npy"),
    ("evaluate-non-zip-npz", lambda r, s: ["evaluate", "--embeddings", _bytes(s / "z.npz", b"PK not a zip"),
                                           "--things-triplets", _triplet_file(s / "t.txt", [[0, 1, 2]]), "--out",
                                           str(s / "R")], "z.npz"),
    ("evaluate-index-out-of-range", lambda r, s: ["evaluate", "--embeddings",
                                                  _npy(s / "x.npy", np.eye(5, dtype=np.float32)),
                                                  "--things-triplets", _triplet_file(s / "t.txt", [[0, 1, 9]]),
                                                  "--out", str(s / "R")], "t.txt"),
    ("evaluate-nan-transform", lambda r, s: ["evaluate", "--embeddings",
                                             _npy(s / "x.npy", np.eye(5, dtype=np.float32)), "--transform",
                                             "x=" + _nan_transform(s / "t.npz", 5), "--things-triplets",
                                             _triplet_file(s / "t.txt", [[0, 1, 2]]), "--out", str(s / "R")],
     "non-finite"),
    ("evaluate-zero-resamples", lambda r, s: ["evaluate", "--embeddings",
                                              _npy(s / "x.npy", np.eye(5, dtype=np.float32)), "--things-triplets",
                                              _triplet_file(s / "t.txt", [[0, 1, 2]]), "--bootstrap-resamples", "0",
                                              "--out", str(s / "R")], "bootstrap_resamples"),
    # align
    ("align-nan-features", lambda r, s: ["align", "--features", _npy(s / "f.npy", np.full((10, 3), np.nan)),
                                         "--train", _triplet_file(s / "t.txt", [[0, 1, 2]] * 3), "--loss", "hard",
                                         "--out", str(s / "A")], "non-finite"),
    ("align-human-is-cluster", lambda r, s: ["align", "--features", E(r), "--features-split", "things", "--human",
                                             C(r), "--out", str(s / "A")], "expected 'human'"),
    # human
    ("human-missing-train-file", lambda r, s: ["human", "--train", str(s / "missing.txt"), "--out", str(s / "H")],
     "missing.txt"),
    ("human-malformed-train-file", lambda r, s: ["human", "--train", _bytes(s / "bad.txt", b"1 2\nthree four\n"),
                                                 "--test", str(s / "bad.txt"), "--out", str(s / "H")], "bad.txt"),
    # train
    ("train-negative-steps", lambda r, s: ["train", "--shards", X(r), "--student", "demo-student", "--steps", "-3",
                                           "--workdir", str(s / "W")], "steps"),
    ("train-zero-steps", lambda r, s: ["train", "--shards", X(r), "--student", "demo-student", "--steps", "0",
                                       "--workdir", str(s / "W")], "steps"),
    ("train-zero-batch", lambda r, s: ["train", "--shards", X(r), "--student", "demo-student", "--batch-size", "0",
                                       "--workdir", str(s / "W")], "batch_size"),
    ("train-shards-not-triplets", lambda r, s: ["train", "--shards", _user_folder(s / "U"), "--student",
                                                "demo-student", "--steps", "2", "--workdir", str(s / "W")], "U"),
    ("train-tampered-world", lambda r, s: ["train", "--shards", X(r), "--world",
                                           _tampered(r / "world", s, "world.npz"), "--student", "demo-student",
                                           "--steps", "2", "--workdir", str(s / "W")], "does not match its manifest"),
    # world and run
    ("world-zero-images", lambda r, s: ["world", "--images-per-class", "0", "--out", str(s / "w")],
     "images_per_class"),
    ("world-out-user-folder", lambda r, s: ["world", "--out", _user_folder(s / "K")], "not empty"),
    ("run-into-a-folder-with-a-users-stage-dir", lambda r, s: ["run", "--preset", "smoke", "--out",
                                                               _run_folder_with_user_world(s)], "not empty"),
]


def _snapshot(*roots: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every non-hidden file and folder under the roots: (size, mtime)."""
  out = {}
  for root in roots:
    for p in root.rglob("*"):
      rel = p.relative_to(root)
      if any(part.startswith(".") for part in rel.parts):
        continue
      st = p.lstat()
      out[f"{root.name}/{rel.as_posix()}"] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
  return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_exits_1_naming_the_problem_and_touches_nothing(case, run_dir, tmp_path, capsys):
  name, build, words = case
  scratch = tmp_path / "s"
  scratch.mkdir()
  argv = build(run_dir, scratch)
  before = _snapshot(run_dir, scratch)
  capsys.readouterr()
  code = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1, f"{name}: exit {code}; stderr: {err[-5:]}"
  stage = argv[0]
  assert err and err[-1].startswith(f"alignet {stage}: error: "), err[-5:]
  assert words.lower() in err[-1].lower(), err[-1]
  assert _snapshot(run_dir, scratch) == before, "something was written or deleted outside a staging folder"


def test_the_table_covers_every_stage_with_at_least_40_cases():
  assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
  assert {n.split("-")[0] for n, _, _ in CASES} == {"cluster", "triplets", "embed", "publish", "evaluate",
                                                    "align", "human", "train", "world", "run"}


# ----------------------------------------------------------------------------------------------- Kills


def _alignet(*argv: str) -> list[str]:
  return [sys.executable, "-m", "pipelines.cli", *argv]


def _data_digests(folder: pathlib.Path) -> dict[str, str]:
  """sha256 of every file of a run's output but the ones that record wall time or paths."""
  skip = {"report.json", "manifest.json", "metrics.jsonl", "metrics.json", "config.json", "README.md"}
  out = {}
  for p in sorted(folder.rglob("*")):
    rel = p.relative_to(folder)
    if p.is_file() and p.name not in skip and not any(part.startswith(".") for part in rel.parts) \
        and "checkpoints" not in rel.parts and "tensorboard" not in rel.parts:
      out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _visible_is_complete(out: pathlib.Path) -> None:
  """An artifact folder is either absent or complete (manifest present, every sha256 right)."""
  if out.exists():
    artifacts.load(str(out)).verify()


def _started(watch: pathlib.Path, pid: int, locked: bool) -> bool:
  """Whether process `pid` began writing `watch`: it holds the output's lock (stages that lock), or `watch`
  exists (the train workdir)."""
  if not locked:
    return watch.exists()
  try:
    return json.loads((watch.parent / f".{watch.name}.lock").read_text())["pid"] == pid
  except (OSError, ValueError, KeyError):
    return False


def _run_watched(cmd: list[str], watch: pathlib.Path, kill_after: float | None = None, locked: bool = True,
                 began: float | None = None) -> tuple[float, float, bool]:
  """Run `cmd`; returns (seconds until it began writing, total seconds, killed). With `kill_after`, SIGKILL it
  that many seconds after it began writing (if it is still running); `began` fixes that moment instead."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  while proc.poll() is None:
    now = time.perf_counter() - start
    if began is None and _started(watch, proc.pid, locked):
      began = now
    if kill_after is not None and began is not None and now >= began + kill_after:
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=30)
      return began, now, True
    assert now < 600, "command did not finish"
    time.sleep(0.02)
  total = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]  # Each attempt not killed must succeed.
  return began if began is not None else total, total, False


STAGE_COMMANDS = {
    "embed": lambda r, out: ["embed", "--source", f"pool=demo:{W(r)}:pool", "--source",
                             f"things=demo:{W(r)}:things", "--model", "demo-teacher", "--out", str(out)],
    "triplets": lambda r, out: ["triplets", "--embeddings", E(r), "--transform", T(r), "--clusters", C(r),
                                "--num", "4000", "--num-valid", "400", "--format", "tfrecord,parquet,npz",
                                "--out", str(out)],
    "publish": lambda r, out: ["publish", "--from", X(r), "--to", str(out), "--name", "ds", "--version", "1.0.0",
                               "--if-exists", "skip_identical"],
    "train": lambda r, out: ["train", "--shards", X(r), "--world", W(r), "--student", "demo-student", "--steps",
                             "30", "--checkpoint-every", "10", "--workdir", str(out)],
}


KILLS = 3


@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_a_killed_stage_shows_nothing_half_written_and_its_rerun_equals_a_straight_run(stage, run_dir, tmp_path):
  ref, out = tmp_path / "ref", tmp_path / "out"
  watch = {"publish": lambda root: root / "ds" / "1.0.0"}.get(stage, lambda root: root)
  locked = stage != "train"  # Train resumes in its workdir (no lock): its kills are timed from the start.
  began, total, _ = _run_watched(_alignet(*STAGE_COMMANDS[stage](run_dir, ref)), watch(ref), locked=locked)
  if stage == "publish":
    def check_visible():
      if watch(out).exists():
        artifacts.load(str(watch(out))).verify()
      if (out / "ds").exists():
        assert [p.name for p in (out / "ds").iterdir() if not p.name.startswith(".")] in ([], ["1.0.0"])
  elif stage == "train":
    def check_visible():
      for name in ("student.npz", "metrics.json"):
        if (out / name).exists():  # Whole files only: each one loads.
          (np.load(out / name) if name.endswith(".npz") else json.loads((out / name).read_text()))
  else:
    check_visible = lambda: _visible_is_complete(out)  # noqa: E731
  rng = np.random.default_rng(list(STAGE_COMMANDS).index(stage))
  moments = []
  # Seeded moments within the writing phase of the uninterrupted run, earliest first: an attempt that finishes
  # leaves nothing for the next ones to do, and a busy machine can make the reference run slower than an attempt.
  for fraction in np.sort(rng.uniform(0.0, 0.95, KILLS)):
    after = float(fraction * (total - began))
    _, _, killed = _run_watched(_alignet(*STAGE_COMMANDS[stage](run_dir, out)), watch(out), kill_after=after,
                                locked=locked, began=None if locked else began)
    moments.append((round(after, 2), killed))
    check_visible()
  rerun = subprocess.run(_alignet(*STAGE_COMMANDS[stage](run_dir, out)), capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  check_visible()
  a, b = _data_digests(ref), _data_digests(out)
  assert a and a == b, f"{stage}: files differ after kills at {moments}"
  kills = sum(k for _, k in moments)
  assert kills >= 1, f"{stage}: no attempt was still running at its kill moment {moments}"
  print(f"[faults] {stage}: straight run {total:.1f} s (writing from {began:.1f} s); SIGKILL at {moments} "
        f"(seconds after writing began, killed?); {kills} kills; rerun: {len(a)} data files, sha256 all equal")


def test_two_writers_of_one_out_at_once_one_wins_and_the_artifact_is_all_its_own(run_dir, tmp_path):
  """`alignet triplets --seed 1` is writing --out X when `alignet triplets --seed 2 --out X` starts: the second is
  refused at once, the first commits, and every shard is the first's (they match a lone seed-1 run)."""
  out = tmp_path / "X"
  cmd = lambda seed, dest: _alignet("triplets", "--embeddings", E(run_dir), "--transform", T(run_dir),  # noqa: E731
                                    "--clusters", C(run_dir), "--num", "500000", "--num-shards", "8", "--seed",
                                    str(seed), "--format", "tfrecord,parquet,npz", "--out", str(dest))
  first = subprocess.Popen(cmd(1, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not _started(out, first.pid, locked=True):
    assert first.poll() is None and time.monotonic() < deadline, "the first writer never took the lock"
    time.sleep(0.02)
  second = subprocess.run(cmd(2, out), capture_output=True, text=True, timeout=600)
  assert first.poll() is None, "the first writer finished before the second tried: make it write more"
  assert second.returncode == 1 and "held by another writer" in second.stderr.strip().splitlines()[-1]
  assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
  art = artifacts.load(str(out))
  art.verify()
  assert art.config["seed"] == 1
  alone = tmp_path / "alone"
  subprocess.run(cmd(1, alone), check=True, capture_output=True, timeout=600)
  assert _data_digests(out) == _data_digests(alone)
