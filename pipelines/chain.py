"""`alignet run`: every stage in order on one preset, then the headline table and `summary.json`."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from alignet_data import artifacts
from pipelines import presets, stages

SUMMARY = "summary.json"
LEVELS = ("coarse", "fine", "boundary")


def run_chain(preset: str, out: str, *, force: bool = False, beam_args: Sequence[str] = (),
              until: str | None = None, verify: bool = True, reuse_stale: bool = False) -> dict[str, Any]:
  """Run (or resume) the chain into `out`; returns the summary (None-valued if the chain stopped early)."""
  start = time.perf_counter()
  configs = presets.configs(preset, out)
  arts: dict[str, artifacts.Artifact] = {}
  for i, (stage, config) in enumerate(configs.items(), 1):
    print(f"== [{i}/{len(configs)}] {stage}", flush=True)
    arts[stage] = stages.run(stage, config, artifacts.join(out, stage), beam_args=beam_args, force=force,
                             verify=verify, reuse_stale=reuse_stale)
    if stage == until:
      break
  if "evaluate" not in arts:
    print(f"Stopped after {until}; artifacts in {out}")
    return {}
  summary = make_summary(arts, preset, time.perf_counter() - start)
  fs, path = artifacts.url_to_fs(artifacts.join(out, SUMMARY))
  with fs.open(path, "w") as f:
    json.dump(summary, f, indent=2)
  print(format_table(summary))
  print(f"Artifacts: {out}/<stage>/  Summary: {artifacts.join(out, SUMMARY)}")
  return summary


def make_summary(arts: dict[str, artifacts.Artifact], preset: str, seconds: float) -> dict[str, Any]:
  """The paper's headline numbers, read from the stages' reports (never constants)."""
  align = arts["align"].report
  evaluation = arts["evaluate"].report
  levels = evaluation["levels"]
  per_level = lambda model: {lv: levels[model][lv]["accuracy"] for lv in LEVELS}
  return {
      "preset": preset,
      "teacher_accuracy_before": align["accuracy_before"],
      "teacher_accuracy_after": align["accuracy_after"],
      "student_accuracy_before": per_level("student_before"),
      "student_accuracy_after": per_level("student_after"),
      "human_test_accuracy": arts["human"].report["test_accuracy"],
      "published_to": arts["publish"].report.get("published_to"),
      "stage_seconds": {s: a.report.get("seconds") for s, a in arts.items()},
      "seconds": round(seconds, 1),
  }


def format_table(summary: dict[str, Any]) -> str:
  pct = lambda x: f"{100 * x:5.1f}%"
  lines = [
      "",
      "                                     before    after",
      f"Teacher, THINGS-like held-out         {pct(summary['teacher_accuracy_before'])}   "
      f"{pct(summary['teacher_accuracy_after'])}",
  ]
  for lv in LEVELS:
    lines.append(f"Student, Levels-like {lv:<16} {pct(summary['student_accuracy_before'][lv])}   "
                 f"{pct(summary['student_accuracy_after'][lv])}")
  lines.append(f"(odd-one-out accuracy; wall time {summary['seconds']:.0f} s)")
  return "\n".join(lines)
