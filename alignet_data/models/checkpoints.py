"""big_vision-style flat `.npz` checkpoints: one array per parameter, keys are tree paths joined with "/".

Read and written through fsspec, so `gs://...`, `memory://...` and local paths all work. Saving is
byte-deterministic (uncompressed npz, fixed zip dates, sorted keys).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import jax
import numpy as np

from alignet_data import numeric_files

# Prefixes under which a ViT image tower sits in other big_vision checkpoints (SigLIP two-towers: params/img/).
IMAGE_TOWER_PREFIXES = ("", "params/", "img/", "params/img/")
# Unexpected parameters that mean a config field is wrong, and which one to change.
_UNEXPECTED_HINTS = {"MAPHead_0/": "pool_type='map' (the checkpoint has a MAP head)",
                     "cls": "pool_type='tok' (the checkpoint has a class token)",
                     "pre_logits/": "rep_size (the checkpoint has a pre-logits layer)",
                     "head/": "num_classes=None (the checkpoint has a classification head)"}


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model config: lists what is missing, unexpected, mis-shaped."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """{"a": {"b": x}} -> {"a/b": x} (numpy arrays)."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = np.asarray(jax.device_get(value))
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_checkpoint(path_or_url: str, params: Mapping[str, Any]) -> None:
  """Writes `params` as a flat npz; the same params give the same bytes."""
  flat = flatten(params)
  buf = io.BytesIO()
  np.savez(buf, **{k: flat[k] for k in sorted(flat)})
  with fsspec.open(path_or_url, "wb") as f:
    f.write(buf.getvalue())


def load_flat(path_or_url: str) -> dict[str, np.ndarray]:
  """All arrays of a flat npz checkpoint, keyed by their "/"-joined names; a missing, empty, corrupt or non-npz
  file is an InputError naming it (never numpy's "allow_pickle" advice)."""
  return numeric_files.load_npz(path_or_url, what="checkpoint (.npz of parameter arrays)")


def load_checkpoint(path_or_url: str, prefix: str = "") -> dict[str, Any]:
  """The parameter pytree of a flat npz checkpoint; with `prefix`, only that subtree (e.g. "params/img/")."""
  flat = load_flat(path_or_url)
  if prefix:
    flat = select_tower(flat, prefix, f"Checkpoint {path_or_url}")
    if not flat:
      raise CheckpointMismatchError(f"No parameters under prefix {prefix!r} in {path_or_url}")
  return unflatten(flat)


def select_tower(flat: Mapping[str, Any], prefix: str, source: str, sep: str = "/") -> dict[str, Any]:
  """The arrays under `prefix`, prefix stripped. What lies outside (a SigLIP checkpoint's text tower `params/txt/`
  and logit scale/bias `params/t`, `params/b`) is left out whole, and an INFO line names every group left out:
  a checkpoint's parameters are never dropped silently (inside the tower, `match_params` refuses extras)."""
  inside = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  outside = [k for k in flat if not k.startswith(prefix)]
  if outside:
    logging.info("%s: loading the image tower %r; ignoring %d arrays outside it: %s", source, prefix or "(root)",
                 len(outside), describe_groups(outside, depth=prefix.count(sep) or 1, sep=sep))
  return inside


def describe_groups(names: Iterable[str], depth: int = 1, sep: str = "/") -> str:
  """"params/txt/ (120 arrays), params/t": names grouped by their first `depth` components."""
  groups: dict[str, int] = {}
  for name in names:
    parts = name.split(sep)
    key = sep.join(parts[:depth]) + (sep if len(parts) > depth else "")
    groups[key] = groups.get(key, 0) + 1
  return ", ".join(f"{k} ({n} arrays)" if n > 1 or k.endswith(sep) else k for k, n in sorted(groups.items()))


def find_image_tower(flat: Mapping[str, Any]) -> str:
  """The prefix under which a ViT sits ("" for a plain ViT checkpoint, "params/img/" for SigLIP)."""
  for prefix in IMAGE_TOWER_PREFIXES:
    if f"{prefix}embedding/kernel" in flat:
      return prefix
  sample = ", ".join(sorted(flat)[:8])
  raise CheckpointMismatchError(
      f"No ViT found: expected 'embedding/kernel' under one of the prefixes {IMAGE_TOWER_PREFIXES}; "
      f"the checkpoint's first keys are: {sample}")


def match_params(expected: Mapping[str, Any], loaded: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
  """Checks `loaded` against `expected` (a pytree of arrays or ShapeDtypeStructs) and returns it as float arrays.

  Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped parameter, so a wrong config
  (say, patch 16 for a /14 checkpoint) is diagnosed in one go instead of failing deep inside `apply`. An
  unexpected parameter is an error too: loading it into a config without it (a MAP head into a GAP model) would
  silently drop it.
  """
  want = flatten_shapes(expected)
  got = flatten(loaded)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  misshaped = sorted(k for k in set(want) & set(got) if tuple(got[k].shape) != want[k])
  if missing or unexpected or misshaped:
    lines = [f"{source} does not fit the model config:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20])
                   + (" ..." if len(unexpected) > 20 else ""))
    for k in misshaped[:20]:
      lines.append(f"  mis-shaped: {k}: checkpoint {tuple(got[k].shape)} vs config {want[k]}")
    if len(misshaped) > 20:
      lines.append(f"  ... and {len(misshaped) - 20} more mis-shaped")
    hints = sorted({hint for k in unexpected for p, hint in _UNEXPECTED_HINTS.items() if k.startswith(p)})
    lines.append("Fix: choose the config the checkpoint was trained with (width, depth, mlp_dim, patch_size, "
                 "image_size, pool_type, num_classes)" + (": set " + "; ".join(hints) if hints else "") + ".")
    raise CheckpointMismatchError("\n".join(lines))
  return unflatten({k: got[k].astype(np.float32) if got[k].dtype != np.float32 else got[k] for k in want})


def flatten_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in _flatten_any(tree).items()}


def _flatten_any(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten_any(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def unscan(flat: Mapping[str, Any]) -> dict[str, Any]:
  """big_vision's scanned layout (`Transformer/encoderblock/...` with a leading depth axis, written when the
  model ran with `scan=True`) -> the per-layer layout (`Transformer/encoderblock_{i}/...`); others unchanged."""
  scanned = "Transformer/encoderblock/"
  out = {k: v for k, v in flat.items() if not k.startswith(scanned)}
  stacked = {k[len(scanned):]: np.asarray(v) for k, v in flat.items() if k.startswith(scanned)}
  depths = {v.shape[0] for v in stacked.values()}
  if len(depths) > 1:
    raise CheckpointMismatchError(f"Scanned checkpoint has layers stacked to different depths {sorted(depths)}")
  for rest, v in stacked.items():
    for i in range(v.shape[0]):
      out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
  return out


def resample_posemb(old: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
  """big_vision's `resample_posemb`: a square grid of learned position embeddings (1, g*g, w), bilinearly zoomed
  (scipy.ndimage.zoom, order=1) to a new grid, so a checkpoint runs at another resolution (224 -> 384 px)."""
  import scipy.ndimage
  old = np.asarray(old)
  if tuple(old.shape) == tuple(new_shape):
    return old
  gs_old, gs_new = int(np.sqrt(old.shape[1])), int(np.sqrt(new_shape[1]))
  if (old.ndim != 3 or len(new_shape) != 3 or gs_old ** 2 != old.shape[1] or gs_new ** 2 != new_shape[1]
      or old.shape[2] != new_shape[2] or old.shape[0] != 1):
    raise CheckpointMismatchError(f"Cannot resample pos_embedding {tuple(old.shape)} to {tuple(new_shape)}: "
                                  "both must be (1, square grid, same width)")
  grid = old.reshape(gs_old, gs_old, -1)
  grid = scipy.ndimage.zoom(grid, (gs_new / gs_old, gs_new / gs_old, 1), order=1)
  return grid.reshape(1, gs_new * gs_new, -1).astype(old.dtype)
