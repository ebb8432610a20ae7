"""Which files hold the training and validation triplets under `--shards`: one resolver for every layout.

Accepted, in this order:
* a triplets artifact or a published version (a manifest and `triplets.json`): its split keys `train_<sampling>`
  and `val_<sampling>` (older artifacts: `train` and `valid`), read from its Parquet, TFRecord or npz files;
* a folder with `alignet_train.npz` (and `alignet_valid.npz`);
* the released AligNet layout, as google-deepmind/alignet's bucket and `data.py` lay it out:
  `DIR/<transform>/{train,val}_<sampling>.npz` (also `valid_`), DIR being the data_dir or one transform folder
  (our own export's `npz/` folder is such a DIR).

`--transform` chooses the transform folder (default `uncertainty_distillation` when there is a choice) and
`--sampling` the training file (default `cluster_border_500` when present, else the only one). Every validation
file of the chosen transform becomes its own validation set, named by its sampling; having none is allowed (the
trainer warns). A choice that is ambiguous or absent is an error listing what there is.
"""
from __future__ import annotations

import dataclasses
import posixpath
import re

from alignet_data import artifacts
from alignet_data.checks import InputError

DEFAULT_TRANSFORM = "uncertainty_distillation"
DEFAULT_SAMPLING = "cluster_border_500"
LEGACY_NPZ = {"train": "alignet_train.npz", "valid": "alignet_valid.npz"}
_NPZ = re.compile(r"^(train|val|valid)_(.+)\.npz$")


@dataclasses.dataclass(frozen=True)
class Sources:
  """The chosen triplet files: what to train on and each validation set, by sampling name."""
  url: str
  artifact: artifacts.Artifact | None
  fmt: str                    # parquet | tfrecord | npz
  train: str                  # an artifact split key (parquet/tfrecord) or an npz path relative to `url`
  sampling: str               # the training file's sampling tag
  valid: dict[str, str]       # sampling -> split key or npz path, in name order
  transform: str | None = None

  def describe(self) -> str:
    where = f"{self.transform}/" if self.transform else ""
    val = ", ".join(self.valid) or "none"
    return f"train {where}{self.sampling} ({self.fmt}); validation sets: {val}"


def resolve(url: str, *, fmt: str = "auto", transform: str | None = None,
            sampling: str | None = None) -> Sources:
  """The train and validation files under `url` (see the module doc for the layouts and the choices)."""
  art = artifacts.try_load(url)
  if art is None:
    fs, path = artifacts.url_to_fs(url)
    if not fs.isdir(path):
      raise FileNotFoundError(f"No triplet shards at {url}: not a directory (give a triplets artifact, a published "
                              "version, or a folder of released <transform>/{train,val}_<sampling>.npz files).")
    enclosing = _enclosing_artifact(url)
    if enclosing is not None:  # E.g. X/npz of a triplets artifact X: its manifest checks the files, and its
      art, prefix = enclosing  # provenance says which images the indices index.
      names = [n for n in art.files if n.startswith(prefix + "/")]
      return _choose(url, art, "npz", _npz_folders(names), transform, sampling)
  if fmt == "auto":
    fmt = detect_format(art)
  if fmt != "npz" and art is None:
    raise FileNotFoundError(f"{url} has no manifest.json: {fmt} shards are read from a triplets artifact or a "
                            "published version (the released files are npz).")
  if art is not None:
    splits = _artifact_splits(art, fmt)
    if splits:
      return _choose(url, art, fmt, {"": splits}, transform, sampling)
  return _choose(url, art, "npz", _npz_folders(_names(art, url)), transform, sampling)


def _enclosing_artifact(url: str, levels: int = 3) -> tuple[artifacts.Artifact, str] | None:
  """(artifact, path of `url` inside it) for a folder inside an artifact, looking up to `levels` folders up."""
  path, prefix = url.rstrip("/"), ""
  for _ in range(levels):
    parent, base = posixpath.split(path)
    if not parent or not base or parent.endswith(":") or parent.endswith(":/"):
      return None
    prefix = f"{base}/{prefix}" if prefix else base
    art = artifacts.try_load(parent)
    if art is not None:
      return art, prefix
    path = parent
  return None


def detect_format(art: artifacts.Artifact | None) -> str:
  """parquet if an artifact has Parquet shards, else tfrecord, else npz (the released layout)."""
  if art is not None:
    for fmt in ("parquet", "tfrecord"):
      if art.glob(f"shards/*.{fmt}"):
        return fmt
  return "npz"


def _names(art: artifacts.Artifact | None, url: str) -> list[str]:
  if art is not None:
    return sorted(art.files)
  fs, root = artifacts.url_to_fs(url)
  root = root.rstrip("/")
  return sorted(p[len(root) + 1:] for p in fs.find(root))


_SHARD = re.compile(r"^shards/(.+)-\d{5}-of-\d{5}\.(parquet|tfrecord)$")


def _artifact_splits(art: artifacts.Artifact, fmt: str) -> dict[str, dict[str, str]]:
  """{"train": {sampling: key}, "val": {sampling: key}} of a triplets artifact or published version, from its
  `triplets.json` (else its shard names); the values are split keys, or npz paths for npz."""
  info = art.read_json("triplets.json") if "triplets.json" in art.files else {}
  npz = info.get("npz") or {}
  splits = info.get("splits") or {}
  if not splits and fmt != "npz":
    splits = {m.group(1): {} for m in map(_SHARD.match, art.files) if m and m.group(2) == fmt}
  out: dict[str, dict[str, str]] = {"train": {}, "val": {}}
  for key, entry in splits.items():
    if fmt == "npz":
      if key not in npz:
        continue
      target = npz[key]
    else:
      target = key
    kind, _, tag = key.partition("_")
    kind = {"valid": "val"}.get(kind, kind)
    if kind not in out:
      continue
    tag = (entry or {}).get("sampling") or tag or _tag_of(npz.get(key, "")) or key
    out[kind][tag] = target
  return out if out["train"] else {}


def _tag_of(path: str) -> str:
  m = _NPZ.match(posixpath.basename(path))
  return m.group(2) if m else ""


def _npz_folders(names: list[str]) -> dict[str, dict[str, dict[str, str]]]:
  """{folder: {"train"/"val": {sampling: path}}} of the npz files in released naming, by folder."""
  folders: dict[str, dict[str, dict[str, str]]] = {}
  for name in names:
    folder, base = posixpath.split(name)
    if name in LEGACY_NPZ.values() or name.startswith(".") or "/." in name:
      continue
    m = _NPZ.match(base)
    if not m:
      continue
    kind = "train" if m.group(1) == "train" else "val"
    entry = folders.setdefault(folder, {"train": {}, "val": {}})
    if kind == "val" and m.group(2) in entry["val"] and m.group(1) == "valid":
      continue  # val_<s> wins over the older valid_<s>.
    entry[kind][m.group(2)] = name
  if not folders and LEGACY_NPZ["train"] in names:
    val = {"valid": LEGACY_NPZ["valid"]} if LEGACY_NPZ["valid"] in names else {}
    folders[""] = {"train": {"train": LEGACY_NPZ["train"]}, "val": val}
  return {k: v for k, v in folders.items() if v["train"]}


def _choose(url: str, art: artifacts.Artifact | None, fmt: str, folders: dict[str, dict[str, dict[str, str]]],
            transform: str | None, sampling: str | None) -> Sources:
  if not folders:
    raise FileNotFoundError(f"No training triplets in {url}: expected a triplets artifact, alignet_train.npz, or "
                            "<transform>/train_<sampling>.npz files (the released AligNet layout).")
  by_name = {posixpath.basename(f) or "": f for f in folders}
  if transform:
    if transform not in by_name:
      raise InputError(f"{url} has no transform folder {transform!r} with training files; it has "
                       f"{sorted(n for n in by_name if n)} (--transform).")
    folder = by_name[transform]
  elif len(folders) == 1:
    folder = next(iter(folders))
  elif DEFAULT_TRANSFORM in by_name:
    folder = by_name[DEFAULT_TRANSFORM]
  else:
    raise InputError(f"{url} holds training files of several transforms {sorted(folders)}: choose one with "
                     "--transform NAME.")
  train, val = folders[folder]["train"], folders[folder]["val"]
  if sampling:
    if sampling not in train:
      raise InputError(f"{url}: no training file for sampling {sampling!r} in {folder or 'it'}; there are "
                       f"{sorted(train)} (--sampling).")
    chosen = sampling
  elif len(train) == 1:
    chosen = next(iter(train))
  elif DEFAULT_SAMPLING in train:
    chosen = DEFAULT_SAMPLING
  else:
    raise InputError(f"{url}: several training samplings {sorted(train)} in {folder or 'it'}: choose one with "
                     "--sampling NAME.")
  name = posixpath.basename(folder) or None
  return Sources(url, art, fmt, train[chosen], chosen, dict(sorted(val.items())), name)
