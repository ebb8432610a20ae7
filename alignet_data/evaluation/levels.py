"""Loaders for the Levels odd-one-out data (Born, Muttenthaler et al.): released responses and design files.

Released responses (GIN, one CSV per triplet type or one for all) are PER-TRIAL rows: the three ImageNet images
(`image1Path`..`image3Path`, or `image1`..`image3`), the chosen image (`selected_image`: a file name, matched by
base name; or a position with `choice_base`), the participant (`subject_id`/`participant`/`id`), the response
time (`rt`, in ms or s: "auto" reads medians above 100 as ms) and the triplet type (`triplet_class`; else the
file name, e.g. `class_border.csv`). The experiment design files (`id,image1,image2,image3,trial,triplet_class`)
have the same shape without responses: they load with every choice missing.

Trials are grouped into triplets by their SET of images, whatever the order shown: a triplet's items are put
in sorted base-name order, and each response becomes a position 0..2 in that order. The result matches the
demo world's Levels arrays: choices (L, R) with -1 where missing, rt (L, R) seconds with NaN where missing.
Triplet types map to the paper's names: between_class -> coarse, within_class -> fine, class_boundary /
class_border -> boundary.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts

LEVEL_NAMES = {
    "between_class": "coarse", "coarse": "coarse", "coarse_grained": "coarse",
    "within_class": "fine", "fine": "fine", "fine_grained": "fine",
    "class_boundary": "boundary", "class_border": "boundary", "boundary": "boundary",
}
IMAGE_COLUMNS = (("image1Path", "image2Path", "image3Path"), ("image1", "image2", "image3"))
CHOICE_COLUMNS = ("selected_image", "selected", "choice", "response")
RT_COLUMNS = ("rt", "RT", "response_time", "rt_ms")
PARTICIPANT_COLUMNS = ("subject_id", "participant", "participant_id", "id")
LEVEL_COLUMNS = ("triplet_class", "level", "triplet_type")
_MISSING = {"", "nan", "none", "null", "na", "-1"}


@dataclasses.dataclass
class LevelsData:
  """Triplets with their responses; the demo world's Levels arrays have the same meaning."""
  images: np.ndarray        # (L, 3) str, image base names in sorted order
  level: np.ndarray         # (L,) str in {"coarse", "fine", "boundary"}
  choices: np.ndarray       # (L, R) int, odd-one-out position 0..2, -1 = no response
  rt: np.ndarray            # (L, R) float seconds, NaN = none
  participants: np.ndarray  # (L, R) str, "" = none
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # rows left out, by reason

  def __len__(self) -> int:
    return len(self.images)

  def summary(self) -> dict[str, Any]:
    n_resp = (self.choices >= 0).sum(1)
    return {"triplets": len(self), "trials": int((self.participants != "").sum()),
            "responses": int(n_resp.sum()), "by_level": {lv: int((self.level == lv).sum())
                                                         for lv in np.unique(self.level).tolist()},
            "participants": int(len(np.unique(self.participants[self.participants != ""]))),
            "dropped": dict(self.dropped)}


def image_key(path: str) -> str:
  """An image's name for matching: the base name without extension ("stimuli/x/n0153_12.JPEG" -> "n0153_12")."""
  return os.path.splitext(os.path.basename(str(path).strip()))[0]


def _files(urls: str | Sequence[str]) -> list[str]:
  """CSV files named directly, or every *.csv inside a directory, sorted."""
  out = []
  for url in [urls] if isinstance(urls, str) else list(urls):
    fs, path = artifacts.url_to_fs(url)
    if fs.isdir(path):
      found = sorted(p for p in fs.find(path) if p.endswith(".csv"))
      if not found:
        raise FileNotFoundError(f"No .csv files in the Levels directory {url}.")
      out += [artifacts.join(url, os.path.relpath(p, path)) if "://" in url else p for p in found]
    elif fs.isfile(path):
      out.append(url)
    else:
      raise FileNotFoundError(f"Levels file not found: {url}")
  return out


def read_rows(urls: str | Sequence[str]) -> list[dict[str, str]]:
  """All CSV rows of the given files/directories; each row remembers its file (`_file`) for the level."""
  rows = []
  for url in _files(urls):
    fs, path = artifacts.url_to_fs(url)
    with fs.open(path, "rb") as f:
      text = f.read().decode("utf-8-sig")
    for row in csv.DictReader(io.StringIO(text)):
      row["_file"] = os.path.splitext(os.path.basename(path))[0]
      rows.append(row)
  return rows


def _column(header: Iterable[str], candidates: Sequence[str]) -> str | None:
  header = list(header)
  return next((c for c in candidates if c in header), None)


def _level(row: dict[str, str], column: str | None) -> str:
  raw = (row.get(column, "") if column else "") or row["_file"]
  level = LEVEL_NAMES.get(raw.strip().lower())
  if level is None:
    raise ValueError(f"Unknown Levels triplet type {raw!r} (file {row['_file']}); expected one of "
                     f"{sorted(LEVEL_NAMES)} in column 'triplet_class' or as the file name.")
  return level


def from_rows(rows: Sequence[dict[str, str]], *, choice_base: int | None = None, rt_unit: str = "auto",
              drop_catch: bool = True) -> LevelsData:
  """Group per-trial rows into triplets (module doc). Rows without a chosen image count as missing responses.

  Args:
    rows: dicts as `read_rows` returns.
    choice_base: read a numeric `selected_image` as a position with this base (0 or 1); None = names only.
    rt_unit: "ms", "s" or "auto" (median RT above 100 -> ms).
    drop_catch: leave out catch trials (a column `exp_trial_type`/`trial_type` containing "catch").
  """
  if not rows:
    raise ValueError("No Levels rows to load (empty files?).")
  header = [k for k in rows[0] if k != "_file"]
  image_cols = next((cols for cols in IMAGE_COLUMNS if all(c in header for c in cols)), None)
  if image_cols is None:
    raise ValueError(f"Levels rows need image columns {IMAGE_COLUMNS[0]} or {IMAGE_COLUMNS[1]}; got {header}.")
  choice_col, rt_col = _column(header, CHOICE_COLUMNS), _column(header, RT_COLUMNS)
  part_col, level_col = _column(header, PARTICIPANT_COLUMNS), _column(header, LEVEL_COLUMNS)
  type_col = _column(header, ("exp_trial_type", "trial_type"))
  dropped = {"catch_trials": 0, "unmatched_choice": 0}

  triplets: dict[tuple[str, str, str], dict[str, Any]] = {}
  for row in rows:
    if drop_catch and type_col and "catch" in row.get(type_col, "").lower():
      dropped["catch_trials"] += 1
      continue
    shown = [image_key(row[c]) for c in image_cols]
    if len(set(shown)) != 3:
      raise ValueError(f"A Levels trial shows the same image twice: {shown} (file {row['_file']}).")
    key = tuple(sorted(shown))
    entry = triplets.setdefault(key, {"level": _level(row, level_col), "choices": [], "rt": [], "who": []})
    level = _level(row, level_col)
    if level != entry["level"]:
      raise ValueError(f"Triplet {key} appears as both {entry['level']} and {level}.")
    choice = -1
    raw = (row.get(choice_col, "") if choice_col else "").strip()
    if raw.lower() not in _MISSING:
      if image_key(raw) in key:
        choice = key.index(image_key(raw))
      elif choice_base is not None and raw.lstrip("-").isdigit() and 0 <= int(raw) - choice_base < 3:
        choice = key.index(shown[int(raw) - choice_base])
      else:
        dropped["unmatched_choice"] += 1
    rt = np.nan
    raw_rt = (row.get(rt_col, "") if rt_col else "").strip()
    if raw_rt.lower() not in _MISSING:
      rt = float(raw_rt)
    entry["choices"].append(choice)
    entry["rt"].append(rt if choice >= 0 else np.nan)
    entry["who"].append(str(row.get(part_col, "")) if part_col else "?")

  keys = sorted(triplets)
  r = max(len(triplets[k]["choices"]) for k in keys)
  choices = np.full((len(keys), r), -1, np.int64)
  rts = np.full((len(keys), r), np.nan)
  who = np.full((len(keys), r), "", dtype=object)
  for t, k in enumerate(keys):
    e = triplets[k]
    n = len(e["choices"])
    choices[t, :n], rts[t, :n], who[t, :n] = e["choices"], e["rt"], e["who"]
  finite = rts[np.isfinite(rts)]
  if rt_unit not in ("auto", "ms", "s"):
    raise ValueError(f"rt_unit must be 'auto', 'ms' or 's', got {rt_unit!r}.")
  if rt_unit == "ms" or (rt_unit == "auto" and len(finite) and np.median(finite) > 100):
    rts = rts / 1000.0
  return LevelsData(images=np.array(keys, dtype=str).reshape(-1, 3),
                    level=np.array([triplets[k]["level"] for k in keys], dtype=str),
                    choices=choices, rt=rts, participants=who.astype(str), dropped=dropped)


def load(urls: str | Sequence[str], **kwargs: Any) -> LevelsData:
  """Released Levels responses (files or directories of CSVs) as LevelsData; kwargs go to `from_rows`."""
  return from_rows(read_rows(urls), **kwargs)


def load_design(urls: str | Sequence[str]) -> LevelsData:
  """Levels experiment design files (which participant saw which triplet): no responses, choices all -1."""
  data = from_rows([{k: v for k, v in row.items() if k not in CHOICE_COLUMNS + RT_COLUMNS}
                    for row in read_rows(urls)])
  return data


def world_rows(world: Any) -> list[dict[str, str]]:
  """The demo world's Levels responses as released-style per-trial rows (one CSV for all types), e.g. to test
  a Levels pipeline on data whose answers are known. RT is written in ms, as jsPsych records it."""
  names = {"coarse": "between_class", "fine": "within_class", "boundary": "class_border"}
  rows = []
  for t, (trip, level) in enumerate(zip(world.levels_triplets, world.levels_level, strict=True)):
    files = [str(world.pool_file_names[i]) for i in trip]
    for r, (choice, rt) in enumerate(zip(world.levels_choices[t], world.levels_rt[t], strict=True)):
      if choice < 0:
        continue
      rows.append({"subject_id": f"p{(t * 7 + r) % 97:03d}", "image1Path": files[0], "image2Path": files[1],
                   "image3Path": files[2], "selected_image": files[int(choice)], "rt": f"{float(rt) * 1000:.1f}",
                   "triplet_class": names[str(level)], "_file": "levels"})
  return rows


def write_rows(fileobj: Any, rows: Sequence[dict[str, str]]) -> None:
  """Rows as CSV text (the `_file` bookkeeping column left out)."""
  cols = [k for k in rows[0] if k != "_file"]
  text = io.StringIO()
  w = csv.DictWriter(text, cols, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  fileobj.write(text.getvalue().encode())
