"""Input checks shared by every stage: one rule for names that become paths, one for finite numbers.

A failed check raises `InputError` (a `ValueError`): the CLI prints it as one line,
``alignet <stage>: error: <what> (<which file>)``, and exits 1.
"""
from __future__ import annotations

import re

import numpy as np

# A name that becomes a path component: letters, digits, '.', '_', '-'; starts with a letter or digit (so never
# '.', '..' or a hidden name), at most 128 characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InputError(ValueError):
  """Bad input (a file, an array, a flag's value): the user can fix it; the message says what and where."""


def check_name(value: object, what: str) -> str:
  """`value` if it is safe as one path component (no '/', no '..', not hidden); else InputError naming `what`."""
  text = str(value)
  if not _NAME_RE.match(text) or ".." in text:
    raise InputError(f"Bad {what} {text!r}: a name may hold letters, digits, '.', '_' and '-', start with a "
                     "letter or digit, and contain no '..' (it becomes a file or folder name).")
  return text


def require_min(config: dict, stage: str, **minimums: float) -> None:
  """InputError unless each named option is a number >= its minimum (None = unset, allowed).

  Checked before any work, so a typo like `--niter 0` fails at once instead of after loading or compiling.
  """
  for key, low in minimums.items():
    value = config.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
      raise InputError(f"{stage} option {key} (--{key.replace('_', '-')}) must be a number >= {low}, got {value!r}.")


_ROW_BLOCK = 1 << 16  # Rows per check: ~300 MB of bool temporaries at d = 1152, not 1.5 GB for ImageNet.


def require_finite(x: np.ndarray, what: str, block: int = _ROW_BLOCK) -> np.ndarray:
  """`x` unchanged if every value is finite; else InputError naming `what` and the first bad row.

  Call it where numbers enter a stage (embeddings, transforms, similarity matrices, soft labels): NaN or inf
  would otherwise flow into argmax/tie logic and score as a hit, or crash deep inside faiss. Checked in row
  blocks: no whole-matrix temporary and no copy (memory-mapped matrices stay on disk).
  """
  arr = np.asarray(x)
  if arr.dtype.kind not in "fc":
    return x
  rows = arr.reshape(1, -1) if arr.ndim == 0 else arr
  with np.errstate(over="ignore", invalid="ignore"):
    if np.isfinite(rows.sum()):  # One pass, no temporary: NaN and inf propagate (an overflow only falls through).
      return x
  for start in range(0, len(rows), block):
    chunk = np.isfinite(rows[start:start + block])
    if not chunk.all():
      bad = np.flatnonzero(~chunk.reshape(len(chunk), -1).all(axis=1))
      raise InputError(f"{what} holds non-finite values (NaN or inf), first at row {start + int(bad[0])}: "
                       "numbers must be finite.")
  return x
