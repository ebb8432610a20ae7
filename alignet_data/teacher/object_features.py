"""Teacher features of the THINGS objects, one row per object in canonical order, from an embed artifact.

The align stage needs an (n_objects, p) matrix whose row i is object i of the triplet files. An embed artifact
keeps one row per IMAGE, keyed by the source's record id and file name. For the demo world the ids are the
object indices; for real THINGS images the object is named by the file: THINGS stores image `<uniqueID>_<nn><x>.jpg`
(e.g. `aardvark_01b.jpg`) in folder `<uniqueID>/`, and the canonical order is `unique_id.txt`. So an artifact is
read either by id (row i = id i) or by uniqueID (row i = the image(s) of the i-th uniqueID).
"""
from __future__ import annotations

import posixpath
import re

import numpy as np

from alignet_data import artifacts

REDUCTIONS = ("first", "mean")
_IMAGE_SUFFIX = re.compile(r"_\d+[a-z]?$")  # THINGS: aardvark_01b, bat1_12s.


def read_unique_ids(url: str) -> list[str]:
  """One uniqueID per non-empty line (THINGS `unique_id.txt`), in canonical object order."""
  fs, path = artifacts.url_to_fs(url)
  if not fs.isfile(path):
    raise FileNotFoundError(f"uniqueID list not found: {url} (give THINGS unique_id.txt: one id per line).")
  with fs.open(path, "rb") as f:
    ids = [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]
  if not ids:
    raise ValueError(f"{url}: no uniqueIDs in the file.")
  repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
  if repeated:
    raise ValueError(f"{url}: uniqueIDs repeat: {repeated[:5]}.")
  return ids


def object_of_file_name(name: str, known: set[str] | dict[str, int]) -> str | None:
  """The uniqueID an image file belongs to, or None: its folder (`aardvark/aardvark_01b.jpg`), else its stem
  without the THINGS image suffix (`aardvark_01b.jpg`), else its stem (`aardvark.png`)."""
  parent = posixpath.basename(posixpath.dirname(name))
  if parent in known:
    return parent
  stem = posixpath.splitext(posixpath.basename(name))[0]
  for candidate in (_IMAGE_SUFFIX.sub("", stem), stem):
    if candidate in known:
      return candidate
  return None


def features_by_unique_id(file_names: np.ndarray, vectors: np.ndarray, unique_ids: list[str],
                          reduce: str = "first") -> np.ndarray:
  """(len(unique_ids), p) features: row i from the images of unique_ids[i].

  Args:
    reduce: "first" takes the image whose file name sorts first (THINGS' `_01b` reference image, the one shown
      in the odd-one-out task); "mean" averages all of the object's images.

  Raises:
    KeyError naming objects with no image (their images failed to embed, or the uniqueID list is another one).
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"Unknown reduction {reduce!r}; use one of {REDUCTIONS}.")
  index = {u: i for i, u in enumerate(unique_ids)}
  names = [str(n) for n in file_names]
  obj = np.array([index.get(object_of_file_name(n, index), -1) for n in names], np.int64)
  missing = np.setdiff1d(np.arange(len(unique_ids)), obj)
  if len(missing):
    shown = [unique_ids[i] for i in missing[:10]]
    raise KeyError(f"{len(missing)} of {len(unique_ids)} objects have no image in the embeddings: {shown}"
                   f"{' ...' if len(missing) > 10 else ''}; their images failed to embed, or the file names do "
                   f"not name these uniqueIDs (expected <uniqueID>/<uniqueID>_01b.jpg or <uniqueID>.<ext>).")
  vectors = np.asarray(vectors)
  keep = np.flatnonzero(obj >= 0)
  if reduce == "mean":
    out = np.zeros((len(unique_ids), vectors.shape[1]), np.float64)
    np.add.at(out, obj[keep], vectors[keep].astype(np.float64))
    return (out / np.bincount(obj[keep], minlength=len(unique_ids))[:, None]).astype(np.float32)
  order = keep[np.lexsort((np.array(names)[keep], obj[keep]))]
  first = order[np.r_[True, obj[order][1:] != obj[order][:-1]]]
  return np.asarray(vectors[first], np.float32)
