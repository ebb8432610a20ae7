"""Artifacts: atomic commits, manifests, checksums and resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from alignet_data import artifacts


def _write(writer, value=1):
  writer.write_npz("data.npz", x=np.arange(5) * value)
  writer.set_rows("data", 5)
  return {"value": value}


@pytest.mark.parametrize("root", ["local", "memory"])
def test_run_stage_writes_manifest_with_checksums(tmp_path, root):
  out = str(tmp_path / "a") if root == "local" else f"memory://test-{os.getpid()}/a"
  art = artifacts.run_stage("toy", out, {"k": 1}, {}, _write)
  loaded = artifacts.load(out, stage="toy")
  assert loaded.manifest["row_counts"] == {"data": 5}
  assert set(loaded.files) == {"data.npz", "report.json"}
  assert loaded.report["value"] == 1 and "seconds" in loaded.report
  np.testing.assert_array_equal(loaded.load_npz("data.npz")["x"], np.arange(5))
  loaded.verify()
  assert art.digest == loaded.digest


def test_rerun_skips_when_config_and_inputs_match_and_reruns_otherwise(tmp_path):
  calls = []
  fn = lambda w: calls.append(1) or _write(w)
  out = str(tmp_path / "a")
  artifacts.run_stage("toy", out, {"k": 1}, {}, fn)
  artifacts.run_stage("toy", out, {"k": 1}, {}, fn)
  assert len(calls) == 1
  artifacts.run_stage("toy", out, {"k": 2}, {}, fn)  # config changed
  assert len(calls) == 2
  artifacts.run_stage("toy", out, {"k": 2}, {}, fn, force=True)
  assert len(calls) == 3


def test_changed_input_reruns_downstream(tmp_path):
  up, down = str(tmp_path / "up"), str(tmp_path / "down")
  calls = []
  artifacts.run_stage("up", up, {"v": 1}, {}, _write)
  artifacts.run_stage("down", down, {}, {"up": up}, lambda w: calls.append(1) or _write(w))
  artifacts.run_stage("down", down, {}, {"up": up}, lambda w: calls.append(1) or _write(w))
  assert len(calls) == 1
  artifacts.run_stage("up", up, {"v": 2}, {}, lambda w: _write(w, 2))
  artifacts.run_stage("down", down, {}, {"up": up}, lambda w: calls.append(1) or _write(w))
  assert len(calls) == 2


def test_failing_stage_leaves_nothing_visible_and_keeps_old_artifact(tmp_path):
  out = str(tmp_path / "a")

  def boom(writer):
    writer.write_npz("data.npz", x=np.zeros(3))
    raise RuntimeError("crash mid-stage")

  with pytest.raises(RuntimeError):
    artifacts.run_stage("toy", out, {}, {}, boom)
  assert not os.path.exists(out)
  assert os.listdir(tmp_path) == []
  with pytest.raises(artifacts.IncompleteArtifactError, match="manifest.json is missing"):
    artifacts.load(out)


def test_killed_stage_leaves_no_visible_output_and_rerun_completes(tmp_path):
  out = tmp_path / "a"
  script = textwrap.dedent(f"""
      import os, signal, numpy as np
      from alignet_data import artifacts
      def fn(w):
        w.write_npz("data.npz", x=np.arange(3))
        os.kill(os.getpid(), signal.SIGKILL)
      artifacts.run_stage("toy", {str(out)!r}, {{}}, {{}}, fn)
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
  assert proc.returncode == -signal.SIGKILL
  assert not out.exists()  # only the hidden .a.incomplete directory remains
  assert artifacts.try_load(str(out)) is None
  artifacts.run_stage("toy", str(out), {}, {}, _write)
  assert artifacts.load(str(out)).report["value"] == 1
  assert sorted(os.listdir(tmp_path)) == ["a"]  # the leftover was cleaned up


def test_corrupted_file_is_detected(tmp_path):
  out = str(tmp_path / "a")
  artifacts.run_stage("toy", out, {}, {}, _write)
  with open(os.path.join(out, "data.npz"), "r+b") as f:
    f.seek(-1, 2)
    f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
  with pytest.raises(artifacts.ChecksumError):
    artifacts.load(out).verify()


def test_wrong_stage_and_missing_artifact_errors(tmp_path):
  out = str(tmp_path / "a")
  artifacts.run_stage("toy", out, {}, {}, _write)
  with pytest.raises(ValueError, match="expected 'other'"):
    artifacts.load(out, stage="other")
  with pytest.raises(artifacts.IncompleteArtifactError, match="run `alignet human` first"):
    artifacts.load(str(tmp_path / "missing"), stage="human")


def test_same_inputs_give_byte_identical_files(tmp_path):
  a = artifacts.run_stage("toy", str(tmp_path / "a"), {}, {}, _write)
  b = artifacts.run_stage("toy", str(tmp_path / "b"), {}, {}, _write)
  assert a.files["data.npz"]["sha256"] == b.files["data.npz"]["sha256"]


def test_manifest_records_config_inputs_and_version(tmp_path):
  up = str(tmp_path / "up")
  artifacts.run_stage("up", up, {}, {}, _write)
  artifacts.run_stage("down", str(tmp_path / "down"), {"lr": 0.1}, {"up": up}, _write)
  manifest = json.loads((tmp_path / "down" / "manifest.json").read_text())
  assert manifest["schema_version"] == artifacts.SCHEMA_VERSION
  assert manifest["config"] == {"lr": 0.1}
  assert manifest["inputs"]["up"].startswith("manifest:")
  assert manifest["code_version"] and manifest["created"]
