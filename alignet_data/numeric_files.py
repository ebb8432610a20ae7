"""Reading user-supplied `.npy` / `.npz` files: one-line `InputError`s that name the file.

numpy's own errors mislead a user: a 0-byte file is an `EOFError`, a corrupt zip a `BadZipFile`, and any other
bytes get the advice to pass ``allow_pickle=True`` (which would execute them). Every reader of a numeric file that a
user points a flag at goes through `load` so that all of these say "<file>: not a numeric array file ...".
"""
from __future__ import annotations

import zipfile
import zlib
from typing import IO

import numpy as np

from alignet_data import artifacts
from alignet_data.checks import InputError

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
