"""Reading user-supplied numeric files: the one reader of a matrix or a triplet array at a URL.

One rule for every file a user points a flag at (`read_array`, `read_matrix`), by suffix:
* ``.npy``: its array;
* ``.npz``: the first of the caller's preferred keys it holds, else its only array (several arrays and none of
  those keys is an error listing them: taking "the first" silently could read the wrong one);
* anything else (``.txt``, ``.csv``, ``.tsv``...): text, one row per line, numbers separated by whitespace or
  commas, ``#`` starting a comment.
Errors are one-line `InputError`s (or FileNotFoundError) that start with the file's URL. numpy's own errors
mislead a user: a 0-byte file is an `EOFError`, a corrupt zip a `BadZipFile`, and any other bytes get the advice to
pass ``allow_pickle=True`` (which would execute them); `load` turns all of these into "<file>: not a ...".
"""
from __future__ import annotations

import io
import zipfile
import zlib
from typing import IO

import numpy as np

from alignet_data import artifacts
from alignet_data.checks import InputError, require_finite

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # A zip with members; an empty zip.
# What numpy and zipfile raise on truncated or corrupt bytes.
_READ_ERRORS = (ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load(source: str | IO[bytes], url: str | None = None, *,
         what: str = "numeric array file (.npy or .npz)") -> np.ndarray | dict[str, np.ndarray]:
  """The array of an .npy, or every array of an .npz as a dict, from a URL or an open binary file.

  Never unpickles. Raises InputError naming `url` for a missing, empty, non-numpy, corrupt or truncated file.

  Args:
    source: a path / fsspec URL, or a seekable binary file object.
    url: how to name the file in errors (defaults to `source` when it is a URL).
    what: what the file should have been, for the message (e.g. "checkpoint (.npz of parameter arrays)").
  """
  if isinstance(source, str):
    fs, path = artifacts.url_to_fs(source)
    if not fs.isfile(path):
      raise FileNotFoundError(f"File not found: {source}")
    with fs.open(path, "rb") as f:
      return load(f, url or source, what=what)
  name = _name(source, url)
  head = source.read(len(NPY_MAGIC))
  source.seek(0)
  if not head:
    raise InputError(f"{name}: is empty (0 bytes); expected a {what}.")
  if not head.startswith(NPY_MAGIC) and not head.startswith(ZIP_MAGICS):
    raise InputError(f"{name}: not a {what}: it starts with {head!r}, not numpy's or zip's signature.")
  try:
    loaded = np.load(source, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
      out: np.ndarray | dict[str, np.ndarray] = loaded
    else:
      with loaded as z:
        out = {k: z[k] for k in z.files}
  except _READ_ERRORS as e:
    reason = ("it holds Python objects, not numbers" if "allow_pickle" in str(e)
              else f"corrupt or truncated ({type(e).__name__}: {e})")
    raise InputError(f"{name}: not a readable {what}: {reason}.") from None
  return out


def load_npy(source: str | IO[bytes], url: str | None = None, *,
             what: str = "numeric .npy array") -> np.ndarray:
  """`load` that insists on one array (an .npz is refused, naming its arrays)."""
  out = load(source, url, what=what)
  if isinstance(out, dict):
    raise InputError(f"{_name(source, url)}: is an .npz holding {sorted(out)}; expected a {what}.")
  return out


def load_npz(source: str | IO[bytes], url: str | None = None, *,
             what: str = "numeric .npz file") -> dict[str, np.ndarray]:
  """`load` that insists on named arrays (a bare .npy is refused)."""
  out = load(source, url, what=what)
  if not isinstance(out, dict):
    raise InputError(f"{_name(source, url)}: holds one bare array of shape {out.shape} (an .npy); expected a {what}.")
  return out


def _name(source: str | IO[bytes], url: str | None) -> str:
  if url:
    return url
  return source if isinstance(source, str) else str(getattr(source, "path", None) or getattr(source, "name", "file"))


BINARY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".txt", ".csv", ".tsv")  # For `is_array_file`; any other suffix also reads as text.


def read_array(url: str, *, npz_keys: tuple[str, ...] = (), what: str = "numeric array") -> np.ndarray:
  """The numeric array in the file at `url`, by the module's rule (.npy, .npz with `npz_keys`, else text)."""
  what = what if what.startswith("numeric") else f"numeric {what}"
  fs, path = artifacts.url_to_fs(url)
  if not fs.isfile(path):
    raise FileNotFoundError(f"File not found: {url}")
  with fs.open(path, "rb") as f:  # Binary files are read from the stream: a large matrix is not held twice.
    if path.endswith(".npy"):
      return load_npy(f, url, what=f"{what} (.npy)")
    if path.endswith(".npz"):
      arrays = load_npz(f, url, what=f"{what} (.npz)")
      key = next((k for k in npz_keys if k in arrays), None)
      if key is None and len(arrays) != 1:
        wanted = f"none of {list(npz_keys)} and " if npz_keys else ""
        raise InputError(f"{url}: holds {wanted}{len(arrays)} arrays {sorted(arrays)}; expected one {what}.")
      return arrays[key if key is not None else next(iter(arrays))]
    text = f.read().decode("utf-8", errors="replace")
  rows = [line.split("#", 1)[0] for line in text.splitlines()]
  rows = [r for r in rows if r.strip()]
  if not rows:
    raise InputError(f"{url}: is empty; expected a {what} as text rows (give at least one row).")
  try:  # Commas separate numbers when the first row (its comment left out) has one.
    return np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2, comments="#",
                      delimiter="," if "," in rows[0] else None)
  except ValueError as e:
    raise InputError(f"{url}: cannot parse as a {what} (text: numbers separated by whitespace or commas): {e}"
                     ) from None


def is_array_file(url: str) -> bool:
  """Whether a flag's value names a numeric file (by the suffixes above) rather than an artifact folder."""
  return url.rstrip("/").lower().endswith(BINARY_SUFFIXES + TEXT_SUFFIXES)


def read_matrix(url: str, *, npz_keys: tuple[str, ...] = (), what: str = "(n, d) matrix",
                finite: bool = True) -> np.ndarray:
  """`read_array` checked to be a non-empty numeric 2-D array (and finite unless `finite=False`)."""
  m = read_array(url, npz_keys=npz_keys, what=what)
  if m.ndim != 2 or 0 in m.shape or m.dtype.kind not in "iuf":
    raise InputError(f"{url}: expected a non-empty numeric {what}, got shape {m.shape}, dtype {m.dtype}.")
  if finite:
    require_finite(m, url)
  return m
