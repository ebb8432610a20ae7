"""THINGS-style triplet files: loading, validation, de-duplication, train/test and object-fold splits.

A triplet file is an N x 3 array of 0-based object indices (``.npy``, or whitespace-separated text) in the
THINGS/VICE/gLocal convention: columns 0 and 1 are the pair the participant kept together, column 2 the odd one
out. A fourth column, when present, is the participant (subject) id. Indices refer to the objects in canonical
THINGS order (``unique_id.txt``) or, for the demo world, to its concepts.

Two triplets are "the same triplet" when they show the same three objects, whatever the choice: their keys are
the sorted index rows. Splits never share a key, so no test triplet was ever seen in training, even with
another response.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator, Sequence

import numpy as np

from alignet_data import artifacts, numeric_files
from alignet_data.checks import InputError, require_finite


@dataclasses.dataclass(frozen=True)
class TripletFile:
  """Triplets (n, 3) int64 as (i, j, odd); subjects (n,) int64 or None when the file has no 4th column."""
  triplets: np.ndarray
  subjects: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.triplets)


def validate_triplets(triplets: np.ndarray, n_objects: int | None = None, name: str = "triplets") -> np.ndarray:
  """Check an index array and return it as (n, 3) int64; raise ValueError naming the problem and the fix.

  Args:
    triplets: array-like of shape (n, 3) (integer-valued floats are accepted, as text files may store them).
    n_objects: the number of objects; indices must lie in [0, n_objects). None skips the upper bound.
    name: what to call the array in error messages (usually its file name).
  """
  arr = np.asarray(triplets)
  if arr.ndim != 2:
    raise ValueError(f"{name}: expected a 2-d (n, 3) array of object indices, got shape {arr.shape}.")
  if arr.shape[0] == 0:
    raise ValueError(f"{name}: is empty (no triplets); give a file with at least one row (i, j, odd).")
  if arr.shape[1] != 3:
    raise ValueError(f"{name}: expected 3 columns (i, j, odd), got {arr.shape[1]}.")
  if not np.issubdtype(arr.dtype, np.integer):
    if not np.issubdtype(arr.dtype, np.number):
      raise ValueError(f"{name}: object indices must be integers, got dtype {arr.dtype}.")
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
      r = int(np.argwhere(bad)[0, 0])
      raise ValueError(f"{name}: object indices must be integers; row {r} is {arr[r].tolist()}.")
  arr = arr.astype(np.int64)
  low = np.argwhere(arr < 0)
  if len(low):
    r = low[0, 0]
    raise ValueError(f"{name}: negative object index in row {r}: {arr[r].tolist()}.")
  if n_objects is not None:
    high = np.argwhere(arr >= n_objects)
    if len(high):
      r = high[0, 0]
      hint = " (the file looks 1-based: subtract 1)" if arr.min() >= 1 and arr.max() == n_objects else ""
      raise ValueError(f"{name}: object index out of range in row {r}: {arr[r].tolist()}; indices must be "
                       f"0-based and < {n_objects}{hint}.")
  repeated = (arr[:, 0] == arr[:, 1]) | (arr[:, 0] == arr[:, 2]) | (arr[:, 1] == arr[:, 2])
  if repeated.any():
    r = int(np.flatnonzero(repeated)[0])
    raise ValueError(f"{name}: row {r} repeats an object: {arr[r].tolist()}; a triplet shows three distinct "
                     f"objects ({int(repeated.sum())} such rows).")
  return arr


SOFT_LABELS = "soft_labels.npz"  # In a `human` artifact: train/test triplets and their soft labels p*.


def read_soft_labels(human_url: str, n_objects: int | None = None) -> dict[str, np.ndarray]:
  """A human artifact's triplets and soft labels p* ({train,test}_{triplets,probs}), checked: valid triplets and
  one finite float row of 3 probabilities per triplet (a NaN p* makes a soft loss or KL silently NaN)."""
  art = artifacts.load(human_url, stage="human")
  name = art.path(SOFT_LABELS)
  with art.open(SOFT_LABELS) as f:
    labels = numeric_files.load_npz(f, name, what="soft labels .npz")
  keys = ("train_triplets", "train_probs", "test_triplets", "test_probs")
  missing = [k for k in keys if k not in labels]
  if missing:
    raise InputError(f"{name}: lacks arrays {missing}; is {human_url} a human artifact?")
  out = {k: labels[k] for k in keys}
  for side in ("train", "test"):
    out[f"{side}_triplets"] = validate_triplets(out[f"{side}_triplets"], n_objects, f"{name} {side}_triplets")
    probs = out[f"{side}_probs"]
    if probs.shape != out[f"{side}_triplets"].shape or probs.dtype.kind != "f":
      raise InputError(f"{name}: {side}_probs must be float (n, 3) like {side}_triplets "
                       f"{out[f'{side}_triplets'].shape}, got {probs.dtype} {probs.shape}.")
    require_finite(probs, f"{name} {side}_probs")
  return out


def read_triplet_file(url: str, n_objects: int | None = None) -> TripletFile:
  """Load and validate a triplet file (.npy or text; 3 columns, or 4 with a subject id)."""
  arr = numeric_files.read_array(url, what="triplet array (i, j, odd[, subject])")
  if arr.ndim == 2 and arr.shape[1] == 4 and arr.shape[0] > 0:
    subjects = arr[:, 3]
    if np.issubdtype(subjects.dtype, np.number) and not np.issubdtype(subjects.dtype, np.integer):
      bad = ~np.isfinite(subjects) | (subjects != np.round(subjects))
      if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{url}: subject ids (column 3) must be integers; row {r} is {arr[r].tolist()}.")
    return TripletFile(validate_triplets(arr[:, :3], n_objects, url), subjects.astype(np.int64))
  if arr.ndim == 2 and arr.shape[1] not in (3, 4) and arr.shape[0] > 0:
    raise ValueError(f"{url}: expected 3 columns (i, j, odd) or 4 (i, j, odd, subject), got {arr.shape[1]}.")
  return TripletFile(validate_triplets(arr, n_objects, url))


def load_triplets(url: str, n_objects: int | None = None) -> np.ndarray:
  """(n, 3) int64 triplets of a file (any subject column dropped)."""
  return read_triplet_file(url, n_objects).triplets


# ----------------------------------------------------------------------------------------------------------------
# The canonical concept table and the upload order.

N_THINGS = 1854  # THINGS object concepts.


@dataclasses.dataclass(frozen=True)
class Concepts:
  """The THINGS concepts in canonical order (the rows of unique_id.txt, alphabetical by uniqueID)."""
  unique_id: np.ndarray           # (C,) str, e.g. "aardvark", "bat1", "bat2".
  word: np.ndarray                # (C,) str, the concept's name ("bat" for both bats).
  wordnet_id: np.ndarray          # (C,) str, e.g. "n02082791"; "" where THINGS gives none (58 concepts).
  category_bottom_up: np.ndarray  # (C,) str, "Bottom-up Category (Human Raters)"; "" where none.
  category_top_down: np.ndarray   # (C,) str, "Top-down Category (WordNet)"; "" where none.

  def __len__(self) -> int:
    return len(self.unique_id)

  def index(self, unique_ids: Sequence[str]) -> np.ndarray:
    """Canonical indices of the given uniqueIDs (KeyError naming the first unknown one)."""
    lookup = {u: i for i, u in enumerate(self.unique_id)}
    missing = [u for u in unique_ids if u not in lookup]
    if missing:
      raise KeyError(f"Unknown THINGS uniqueID {missing[0]!r} ({len(missing)} unknown); see unique_id.txt.")
    return np.array([lookup[u] for u in unique_ids], np.int64)


def _read_text(url: str) -> str:
  fs, path = artifacts.url_to_fs(url)
  if not fs.isfile(path):
    raise FileNotFoundError(f"File not found: {url}")
  with fs.open(path, "rb") as f:
    return f.read().decode("utf-8")


def load_concepts(root: str) -> Concepts:
  """Read `unique_id.txt` and `things_concepts.tsv` from a THINGS data folder and check they agree row by row."""
  ids = [line.strip() for line in _read_text(artifacts.join(root, "unique_id.txt")).splitlines() if line.strip()]
  rows = list(csv.DictReader(io.StringIO(_read_text(artifacts.join(root, "things_concepts.tsv"))), delimiter="\t"))
  table = [r.get("uniqueID", "") for r in rows]
  if table != ids:
    bad = next((i for i, (a, b) in enumerate(zip(table, ids, strict=False)) if a != b),
               min(len(table), len(ids)))
    raise ValueError(f"{root}: things_concepts.tsv ({len(table)} rows) does not list the uniqueIDs of "
                     f"unique_id.txt ({len(ids)}) in the same order; first difference at row {bad}.")
  col = lambda name: np.array([(r.get(name) or "").strip() for r in rows], dtype=str)
  return Concepts(np.array(ids, dtype=str), col("Word"), col("WordNet ID"),
                  col("Bottom-up Category (Human Raters)"), col("Top-down Category (WordNet)"))


def load_sortindex(url: str, n_objects: int | None = None) -> np.ndarray:
  """The THINGS `sortindex` file: a permutation p with canonical embedding = upload embedding[p]."""
  p = numeric_files.read_array(url, what="sortindex (one integer per line)")
  p = p[:, 0] if p.ndim == 2 and p.shape[1] == 1 else p
  if p.ndim != 1 or not np.array_equal(np.sort(p), np.arange(len(p))):
    raise ValueError(f"{url}: not a 0-based permutation of {len(p)} indices, one per line; is it the THINGS "
                     "sortindex file?")
  p = p.astype(np.int64)
  if n_objects is not None and len(p) != n_objects:
    raise ValueError(f"{url}: has {len(p)} entries, the data has {n_objects} objects.")
  return p


def upload_to_canonical(triplets: np.ndarray, sortindex: np.ndarray) -> np.ndarray:
  """Convert upload-order (Hebart et al. 2020 / VICE) object indices to canonical ones: argsort(sortindex)[t]."""
  t = np.asarray(triplets, np.int64)
  if t.size and (t.min() < 0 or t.max() >= len(sortindex)):
    raise ValueError(f"Upload-order index out of range [0, {len(sortindex)}): {int(t.min())}..{int(t.max())}.")
  return np.argsort(sortindex)[t]


def embedding_to_canonical(embedding: np.ndarray, sortindex: np.ndarray) -> np.ndarray:
  """Reorder the rows of an upload-order (n_objects, d) embedding to canonical order: E[sortindex]."""
  e = np.asarray(embedding)
  if e.ndim != 2 or len(e) != len(sortindex):
    raise ValueError(f"Embedding of shape {e.shape} does not have one row per sortindex entry ({len(sortindex)}).")
  return e[sortindex]


# ----------------------------------------------------------------------------------------------------------------
# Identity of triplets, de-duplication and overlap.


def triplet_keys(triplets: np.ndarray) -> np.ndarray:
  """The identity of each triplet regardless of the response: its sorted index row, (n, 3)."""
  return np.sort(np.asarray(triplets, np.int64), axis=1)


def _encode(keys: np.ndarray, base: int) -> np.ndarray:
  if base ** 3 >= 2 ** 63:
    raise ValueError(f"Too many objects ({base}) to encode triplet keys in int64.")
  return (keys[:, 0] * base + keys[:, 1]) * base + keys[:, 2]


def unique_triplets(triplets: np.ndarray, by: str = "response") -> np.ndarray:
  """Sorted indices of the first occurrence of each triplet.

  Args:
    by: "response" keeps one row per identical (i, j, odd) response ((i, j) order ignored); "set" keeps one row
      per set of three objects, whatever the response.
  """
  t = np.asarray(triplets, np.int64)
  if by == "response":
    keys = np.concatenate([np.sort(t[:, :2], axis=1), t[:, 2:]], axis=1)
  elif by == "set":
    keys = triplet_keys(t)
  else:
    raise ValueError(f"Unknown de-duplication mode {by!r}; use 'response' or 'set'.")
  base = int(t.max()) + 1 if len(t) else 1
  _, first = np.unique(_encode(keys, base), return_index=True)
  return np.sort(first)


def in_set(triplets: np.ndarray, others: np.ndarray) -> np.ndarray:
  """Boolean mask: which rows of `triplets` show the same three objects as some row of `others`."""
  t, o = triplet_keys(triplets), triplet_keys(others)
  base = int(max(t.max(initial=0), o.max(initial=0))) + 1
  return np.isin(_encode(t, base), _encode(o, base))


def drop_overlap(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, int]:
  """Training rows whose object set never occurs in the test set; and how many rows were dropped."""
  keep = ~in_set(train, test)
  return np.asarray(train)[keep], int((~keep).sum())


def split_train_test(triplets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Split row indices into train/test so that no object set lies on both sides (sorted index arrays).

  Rows are grouped by key and whole groups are assigned, so repeated responses to one triplet stay together.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
  keys = triplet_keys(triplets)
  base = int(keys.max()) + 1
  _, group = np.unique(_encode(keys, base), return_inverse=True)
  n_groups = int(group.max()) + 1
  order = np.random.default_rng(seed).permutation(n_groups)
  is_test = np.zeros(n_groups, bool)
  is_test[order[:max(1, int(round(test_fraction * n_groups)))]] = True
  mask = is_test[group]
  return np.flatnonzero(~mask), np.flatnonzero(mask)


# ----------------------------------------------------------------------------------------------------------------
# Object folds for cross-validation.


def object_folds(n_objects: int, k: int, seed: int) -> np.ndarray:
  """Fold id (0..k-1) of each object: a seeded permutation dealt round-robin, so fold sizes differ by <= 1."""
  if k < 2 or k > n_objects:
    raise ValueError(f"Need 2 <= folds <= n_objects ({n_objects}), got {k}.")
  folds = np.empty(n_objects, np.int64)
  folds[np.random.default_rng(seed).permutation(n_objects)] = np.arange(n_objects) % k
  return folds


def fold_splits(triplets: np.ndarray, folds: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(fold, train rows, held-out rows) per object fold, as gLocal partitions THINGS.

  The held-out rows of fold f are the triplets whose three objects all lie in fold f; the training rows those
  whose three objects all lie outside f. Triplets that straddle the two sides are used in neither, so no object
  of a held-out triplet is ever seen in training.
  """
  f = np.asarray(folds)[np.asarray(triplets)]
  for fold in range(int(folds.max()) + 1):
    inside = f == fold
    yield fold, np.flatnonzero(~inside.any(1)), np.flatnonzero(inside.all(1))
