"""Checks of a folder of released-layout npz files (ours or google-deepmind/alignet's bucket).

Users of the official trainer whose loss never decreased, or whose port scored at chance, could not tell whether
their files were wrong. Each check here answers one such question and gives a row
``{"file", "check", "status": pass | warn | fail | skip, "detail"}``:
* keys, shapes, dtypes: `indices` (n, 3) integers, `similarities` (n, 3) finite floats, `filenames` optional;
* index range: 0 <= index < the image source's size (ImageNet train: 1,281,167, unless told);
* order: s01 >= s02 >= s12 on every row (the released convention: pair 01 most similar, item 2 the odd one out),
  with which weaker reading a file follows when it does not (s01 the largest only) and how many rows violate it;
* duplicates: rows holding the same set of three images;
* train/val overlap, per transform folder, as sorted index sets;
* file names against the image source (TFDS records' `file_name`, or a folder's files) on a seeded sample;
* similarities recomputed from teacher representations and a transform, within a tolerance.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, numeric_files, triplet_math

IMAGENET_TRAIN = 1_281_167  # Records of tfds imagenet2012 train: what the released indices index.
_NAME = re.compile(r"^(?:alignet_(train|valid)|(train|val|valid)_(.+))\.npz$")


def row(file: str, check: str, status: str, detail: str) -> dict[str, str]:
  return {"file": file, "check": check, "status": status, "detail": detail}


def release_files(root: str) -> list[str]:
  """The npz files under `root` named as the released layout names them, relative to `root`."""
  fs, path = artifacts.url_to_fs(root)
  if not fs.isdir(path):
    raise FileNotFoundError(f"Not a folder: {root}")
  base = path.rstrip("/")
  names = sorted(p[len(base) + 1:] for p in fs.find(base) if p.endswith(".npz"))
  return [n for n in names if _NAME.match(posixpath.basename(n))]


def load(root: str, name: str) -> dict[str, np.ndarray]:
  return numeric_files.load_npz(artifacts.join(root, name), what="released-layout .npz")


def check_arrays(name: str, z: dict[str, np.ndarray], num_images: int) -> list[dict[str, str]]:
  """Keys, shapes, dtypes, finite values and the index range of one file."""
  missing = [k for k in ("indices", "similarities") if k not in z]
  if missing:
    return [row(name, "keys", "fail", f"lacks {missing} (has {sorted(z)})")]
  extra = sorted(set(z) - {"indices", "similarities", "filenames"})
  out = [row(name, "keys", "warn" if extra else "pass",
             f"indices, similarities{', filenames' if 'filenames' in z else ''}"
             + (f"; unexpected {extra}" if extra else ""))]
  idx, sims = z["indices"], z["similarities"]
  n = len(idx)
  shapes = {"indices": idx.shape, "similarities": sims.shape}
  if "filenames" in z:
    shapes["filenames"] = z["filenames"].shape
  bad = [f"{k} {s}" for k, s in shapes.items() if len(s) != 2 or s != (n, 3)]
  out.append(row(name, "shapes", "fail" if bad else "pass", f"not (n, 3): {bad}" if bad else f"n = {n}, (n, 3)"))
  kinds = []
  if idx.dtype.kind not in "iu":
    kinds.append(f"indices {idx.dtype}")
  if sims.dtype.kind != "f":
    kinds.append(f"similarities {sims.dtype}")
  if "filenames" in z and z["filenames"].dtype.kind not in "USO":
    kinds.append(f"filenames {z['filenames'].dtype}")
  out.append(row(name, "dtypes", "fail" if kinds else "pass",
                 f"wrong: {kinds}" if kinds else f"indices {idx.dtype}, similarities {sims.dtype}"))
  if bad or kinds:
    return out
  finite = np.isfinite(sims).all(axis=1)
  out.append(row(name, "finite", "pass" if finite.all() else "fail",
                 "every similarity is finite" if finite.all() else f"{int((~finite).sum())} rows with NaN/inf"))
  lo, hi = (int(idx.min()), int(idx.max())) if n else (0, -1)
  ok = lo >= 0 and hi < num_images
  out.append(row(name, "index range", "pass" if ok else "fail",
                 f"[{lo}, {hi}] within [0, {num_images})" if ok else f"[{lo}, {hi}] outside [0, {num_images})"))
  return out


def check_order(name: str, sims: np.ndarray) -> dict[str, str]:
  """s01 >= s02 >= s12 on every row; else which weaker reading holds and how many rows violate the strict one."""
  s = np.asarray(sims, np.float64)
  sorted_rows = (s[:, 0] >= s[:, 1]) & (s[:, 1] >= s[:, 2])
  first_max = (s[:, 0] >= s[:, 1]) & (s[:, 0] >= s[:, 2])
  n, violations = len(s), int((~sorted_rows).sum())
  if violations == 0:
    return row(name, "order", "pass", "s01 >= s02 >= s12 on every row (pair 01 most similar, item 2 odd)")
  if first_max.all():
    return row(name, "order", "warn", f"s01 is the largest on every row, but {violations} of {n} rows have "
               "s02 < s12 (odd one out last; the pair order after it differs)")
  return row(name, "order", "fail", f"{violations} of {n} rows break s01 >= s02 >= s12 and "
             f"{int((~first_max).sum())} have a pair other than 01 most similar: columns swapped or another "
             "convention (the released files list the most similar pair first)")


def check_duplicates(name: str, idx: np.ndarray) -> dict[str, str]:
  keys = np.sort(np.asarray(idx, np.int64), axis=1)
  dupes = len(keys) - len(np.unique(keys, axis=0))
  return row(name, "duplicates", "warn" if dupes else "pass",
             f"{dupes} rows repeat an earlier row's set of three images" if dupes else "no repeated triplet")


def check_overlap(folder: str, train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> list[dict[str, str]]:
  """Train/val overlap within one transform folder, as sorted index sets (the order of a triplet is a label)."""
  out = []
  for vname, vidx in val.items():
    vkeys = np.sort(np.asarray(vidx, np.int64), axis=1)
    for tname, tidx in train.items():
      tkeys = np.sort(np.asarray(tidx, np.int64), axis=1)
      both = np.concatenate([np.unique(tkeys, axis=0), np.unique(vkeys, axis=0)])
      shared = len(both) - len(np.unique(both, axis=0))
      pair = f"{posixpath.join(folder, posixpath.basename(vname))} ~ {posixpath.basename(tname)}"
      out.append(row(pair, "train/val overlap", "fail" if shared else "pass",
                     f"{shared} validation triplets also in training" if shared else "disjoint"))
  return out


def check_filenames(name: str, z: dict[str, np.ndarray], names_at: Callable[[np.ndarray], Sequence[str]],
                    sample: int, seed: int = 0) -> dict[str, str]:
  """`filenames` against the image source's names at `indices`, on a seeded sample of rows (by base name)."""
  if "filenames" not in z:
    return row(name, "file names", "pass", "no filenames array (optional; the official loader ignores it)")
  idx, stored = np.asarray(z["indices"]), np.asarray(z["filenames"]).astype(str)
  rows = np.sort(np.random.default_rng(seed).permutation(len(idx))[:sample])
  got = np.asarray(names_at(idx[rows].reshape(-1)), dtype=str).reshape(-1, 3)
  base = np.vectorize(lambda s: posixpath.basename(str(s)))
  wrong = (base(got) != base(stored[rows])).any(axis=1)
  if wrong.any():
    r = int(rows[np.flatnonzero(wrong)[0]])
    return row(name, "file names", "fail", f"{int(wrong.sum())} of {len(rows)} sampled rows name other images "
               f"than the source at their indices (row {r}: {stored[r].tolist()} vs "
               f"{got[np.flatnonzero(wrong)[0]].tolist()}): indices from another build or order")
  return row(name, "file names", "pass", f"{len(rows)} sampled rows match the source's file names")


def check_similarities(name: str, z: dict[str, np.ndarray], vectors: np.ndarray, rtol: float = 1e-3,
                       atol: float = 1e-3) -> dict[str, str]:
  """Stored similarities against [s01, s02, s12] recomputed from (transformed) teacher vectors."""
  idx = np.asarray(z["indices"], np.int64)
  if idx.size and int(idx.max()) >= len(vectors):
    return row(name, "recomputed", "fail", f"indices reach {int(idx.max())}; representations have {len(vectors)} rows")
  want = triplet_math.triplet_similarities(vectors, idx)
  close = np.isclose(np.asarray(z["similarities"], np.float64), want, rtol=rtol, atol=atol).all(axis=1)
  if close.all():
    return row(name, "recomputed", "pass", f"all {len(idx)} rows within rtol {rtol:g}, atol {atol:g}")
  return row(name, "recomputed", "fail", f"{int((~close).sum())} of {len(idx)} rows differ from the recomputed "
             "similarities (another teacher, transform or row order)")


def check_provenance(indices: dict[str, Any] | None) -> dict[str, str]:
  """What the indices index, as the triplets artifact around the files recorded it (ours only)."""
  if not indices:
    return row("(all)", "provenance", "pass", "no record (released files): assumed tfds imagenet2012 train order")
  if indices.get("tfds_imagenet2012_train_order"):
    return row("(all)", "provenance", "pass", f"indices are records of {indices.get('source')}, in "
               "tfds.data_source('imagenet2012', split='train') order")
  return row("(all)", "provenance", "warn", f"indices index {indices.get('source')}, not tfds imagenet2012 train: "
             "the official trainer would load other images")


def check_release(root: str, *, num_images: int = IMAGENET_TRAIN,
                  names_at: Callable[[np.ndarray], Sequence[str]] | None = None, sample: int = 1000,
                  vectors: np.ndarray | None = None, indices: dict[str, Any] | None = None,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
  """Every check on every released-layout npz under `root`: {"files", "rows", "failed", "passed"}.

  `indices` is the provenance record of a triplets artifact around the files (its triplets.json "indices").
  """
  names = release_files(root)
  if not names:
    raise FileNotFoundError(f"No released-layout npz files under {root} (expected <transform>/{{train,val}}_"
                            "<sampling>.npz or alignet_{train,valid}.npz).")
  rows: list[dict[str, str]] = [check_provenance(indices)]
  folders: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  for name in names:
    log(f"check-release: {name}")
    z = load(root, name)
    arrays = check_arrays(name, z, num_images)
    rows += arrays
    if any(r["status"] == "fail" and r["check"] in ("keys", "shapes", "dtypes") for r in arrays):
      continue
    rows.append(check_order(name, z["similarities"]))
    rows.append(check_duplicates(name, z["indices"]))
    in_range = all(r["status"] == "pass" for r in arrays if r["check"] == "index range")
    for check, wanted in (("file names", names_at), ("recomputed", vectors)):
      if wanted is not None and not in_range:
        rows.append(row(name, check, "skip", "not checked: indices out of range"))
    if names_at is not None and in_range:
      rows.append(check_filenames(name, z, names_at, sample))
    if vectors is not None and in_range:
      rows.append(check_similarities(name, z, vectors))
    m = _NAME.match(posixpath.basename(name))
    kind = "train" if (m.group(1) or m.group(2)) == "train" else "val"
    folders.setdefault(posixpath.dirname(name), {"train": {}, "val": {}})[kind][name] = z["indices"]
  for folder, sets in sorted(folders.items()):
    rows += check_overlap(folder, sets["train"], sets["val"])
  failed = sum(r["status"] == "fail" for r in rows)
  return {"root": root, "files": names, "rows": rows, "failed": failed, "passed": failed == 0,
          "num_images": num_images}


def table(report: dict[str, Any]) -> str:
  """The verdict table, one line per check."""
  width = max(len(r["file"]) for r in report["rows"])
  lines = [f"{'file':<{width}}  {'check':<17}  status  detail"]
  lines += [f"{r['file']:<{width}}  {r['check']:<17}  {r['status']:<6}  {r['detail']}" for r in report["rows"]]
  verdict = "PASS" if report["passed"] else f"FAIL ({report['failed']} failed checks)"
  return "\n".join(lines + [f"verdict: {verdict}"])
