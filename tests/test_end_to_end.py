"""`alignet run` end to end on the demo world at a reduced size (the `smoke` preset)."""
import fnmatch
import json

import pytest

from pipelines import cli, stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "smoke"
  assert cli.main(["run", "--preset", "smoke", "--out", str(out)]) == 0
  return out


def test_every_stage_leaves_a_manifest_and_a_report(run_dir):
  for stage in stages.STAGES:
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    assert manifest["stage"] == stage
    assert "report.json" in manifest["files"]


def test_summary_has_the_headline_numbers_and_alignment_helps(run_dir):
  summary = json.loads((run_dir / "summary.json").read_text())
  for key in ("student_accuracy_before", "student_accuracy_after"):
    assert set(summary[key]) == {"coarse", "fine", "boundary"}
    assert all(0.0 <= v <= 1.0 for v in summary[key].values())
  # Alignment to (simulated) human soft labels raises the teacher's held-out THINGS-like accuracy.
  assert summary["teacher_accuracy_after"] > summary["teacher_accuracy_before"] + 0.05


def test_rerun_skips_every_stage(run_dir, capsys):
  capsys.readouterr()
  assert cli.main(["run", "--preset", "smoke", "--out", str(run_dir)]) == 0
  out = capsys.readouterr().out
  for stage in stages.STAGES:
    assert f"[{stage}] up to date, skipped" in out


def test_same_config_gives_byte_identical_data(run_dir, tmp_path):
  """A second run elsewhere reproduces every data file (metadata that names paths or times may differ)."""
  other = tmp_path / "again"
  assert cli.main(["run", "--preset", "smoke", "--out", str(other), "--until", "train"]) == 0
  data = ("world.npz", "vice.npz", "soft_labels.npz", "embeddings/*", "transform.npz", "clusters.npz", "shards/*",
          "student.npz")
  for stage in list(stages.STAGES)[:8]:
    a = json.loads((run_dir / stage / "manifest.json").read_text())["files"]
    b = json.loads((other / stage / "manifest.json").read_text())["files"]
    names = [n for n in a if any(fnmatch.fnmatch(n, p) for p in data)]
    for name in names:
      assert a[name]["sha256"] == b[name]["sha256"], f"{stage}/{name} differs between two identical runs"
