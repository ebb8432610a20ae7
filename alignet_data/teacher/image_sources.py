"""Image sources for the embed stage: numbered records read in ranges, decoded to uint8 RGB blocks.

A source spec is a string:
  demo:<world_url>:<split>         the demo world's `things` (one image per concept) or `pool` images
  files:<glob>                     image files on any fsspec filesystem (`**` recurses), label = parent folder
                                   (ImageNet synset folders `n01440764/` -> the standard class ids 0..999)
  things:<folder>[:one|all]        the THINGS image folder (`<folder>/<uniqueID>/<uniqueID>_01b.jpg`): `one`
                                   (default) = the first image of each concept, id = concept index (THINGS'
                                   canonical, alphabetical order); `all` = every image, label = concept index
  tfds:<name>[:<version>]:<split>  a TFDS dataset through `tfds.data_source` (array_record, random access)

Every record has an id: its index in the source (the world's image index, the position in the sorted file list,
the `tfds.data_source` record index, which is what the released AligNet `indices` point into). A source splits
into `ReadTask`s (id ranges, small and picklable, carrying what a worker needs) so Beam can read in parallel;
`read(task)` returns the decoded images as one block plus a `DecodeFailure` per record that could not be decoded
(corrupt, truncated, empty, not an image): those are dead-lettered, never fatal.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from alignet_data import artifacts

DEMO_SPLITS = ("things", "pool")
SPEC_HELP = ("Source specs: 'demo:<world_url>:things|pool', 'files:<glob>' (e.g. 'files:/data/imgs/**/*.jpg'), "
             "'things:<folder>[:one|all]', 'tfds:<name>[:<version>]:<split>' (e.g. 'tfds:imagenet2012:train').")
THINGS_MODES = ("one", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass
class ImageBlock:
  """Decoded images of consecutive records. `images` is (n, h, w, 3) uint8, or a list of (h_i, w_i, 3) uint8
  arrays when sizes differ (files, TFDS): resizing is the model's preprocessing, not the source's."""
  split: str
  ids: np.ndarray         # (n,) int64
  labels: np.ndarray      # (n,) int64, -1 = unknown
  file_names: np.ndarray  # (n,) str
  images: Any

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, start: int, stop: int) -> ImageBlock:
    return ImageBlock(self.split, self.ids[start:stop], self.labels[start:stop], self.file_names[start:stop],
                      self.images[start:stop])


@dataclasses.dataclass(frozen=True)
class DecodeFailure:
  split: str
  id: int
  file_name: str
  reason: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReadTask:
  """Records [start, stop) of one source, and the per-record data a worker needs (file paths, labels): either in
  `items`, or as `listing` = (url, first byte, end byte) of the task's lines in a staged listing file, so that a
  pipeline's task list stays small (1.28M ImageNet paths in the graph are ~77 MB; Dataflow caps it at 10 MB)."""
  split: str
  start: int
  stop: int
  items: tuple = ()
  listing: tuple[str, int, int] | None = None


def gather(split: str, records: Iterable[tuple[int, str, Callable[[], tuple[int, str, np.ndarray]]]]
           ) -> tuple[ImageBlock, list[DecodeFailure]]:
  """An ImageBlock of the records that load, and a DecodeFailure (dead letter) for each that raises ValueError or
  OSError. `records` yields (id, name to report on failure, load() -> (label, file name, image))."""
  ids, labels, names, images, failures = [], [], [], [], []
  for i, failure_name, load in records:
    try:
      label, name, image = load()
    except (ValueError, OSError) as e:
      failures.append(DecodeFailure(split, i, failure_name, str(e)))
      continue
    ids.append(i)
    labels.append(label)
    names.append(name)
    images.append(image)
  block = ImageBlock(split, np.array(ids, np.int64), np.array(labels, np.int64), np.array(names, dtype=str),
                     _stack_or_list(images))
  return block, failures


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) -> (h, w, 3): gray repeated, alpha dropped."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (h, w, c) image with c in 1, 3, 4; got shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def decode_image(data: bytes) -> np.ndarray:
  """Encoded bytes (JPEG, PNG, WebP, ...) -> (h, w, 3) uint8 RGB; raises ValueError with the reason."""
  from PIL import Image
  if not data:
    raise ValueError("empty file (0 bytes)")
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Decodes fully: a truncated JPEG raises here ("image file is truncated"), not later.
      if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale PNG: scale, don't clip, to 8 bit.
        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
        return to_rgb(np.round(np.clip(wide, 0, top) * (255.0 / top)).astype(np.uint8))
      # CMYK (JPEG), palette, gray+alpha, RGBA: PIL's conversion to RGB (alpha dropped, as TF's decoders do).
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Image.UnidentifiedImageError as e:
    raise ValueError("cannot decode image: not a known image format (PIL cannot identify it)") from e
  except Exception as e:  # Any decoder error on bad data is a dead letter, never a crashed job.
    # No object reprs ("<... at 0x7f...>") in reasons: the dead-letter file must be byte-identical across runs.
    raise ValueError(f"cannot decode image: {type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))}") from e


def _stack_or_list(images: list[np.ndarray]) -> Any:
  if images and all(im.shape == images[0].shape for im in images):
    return np.stack(images)
  return images


class ImageSource:
  """Base: `len(source)` records, `tasks()` to split them, `read(task)` to decode a range."""
  spec: str
  split: str  # The default split name (the one a bare `--source SPEC` gets).

  def __len__(self) -> int:
    raise NotImplementedError

  def tasks(self, split: str, images_per_task: int, staging: str | None = None) -> list[ReadTask]:
    """Read tasks of `images_per_task` records; sources with per-record data stage it under the `staging` URL
    (when given, e.g. by a pipeline) instead of carrying it in the tasks."""
    if images_per_task < 1:
      raise ValueError(f"images_per_range must be >= 1, got {images_per_task}")
    n = len(self)
    return [ReadTask(split, s, min(s + images_per_task, n)) for s in range(0, n, images_per_task)]

  def read(self, task: ReadTask) -> tuple[ImageBlock, list[DecodeFailure]]:
    raise NotImplementedError

  def metadata(self) -> dict[str, Any]:
    """JSON-able facts about the source for the artifact's index (label names, sizes)."""
    return {}

  def __getstate__(self) -> dict[str, Any]:
    # Caches (`_cache_*`: a loaded world, an open data source) are per process: rebuilt lazily after unpickling
    # (the class attributes give None).
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache")}


class DemoSource(ImageSource):
  """The demo world's images; ids index `things_images` / `pool_images`."""
  _cache_arrays = None

  def __init__(self, world_url: str, split: str):
    if split not in DEMO_SPLITS:
      raise ValueError(f"Demo source split must be one of {DEMO_SPLITS}, got {split!r} (spec 'demo:URL:SPLIT').")
    self.world_url = world_url
    self.split = split
    self.spec = f"demo:{world_url}:{split}"

  def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if self._cache_arrays is None:
      from alignet_data import demo_world
      w = demo_world.load(self.world_url)
      if self.split == "things":
        names = np.array([f"things/{c}.png" for c in w.concept_ids])
        self._cache_arrays = (w.things_images, w.concept_basic.astype(np.int64), names)
      else:
        self._cache_arrays = (w.pool_images, w.pool_labels.astype(np.int64), w.pool_file_names.astype(str))
    return self._cache_arrays

  def __len__(self) -> int:
    return len(self._arrays()[0])

  def read(self, task: ReadTask) -> tuple[ImageBlock, list[DecodeFailure]]:
    images, labels, names = self._arrays()
    sl = slice(task.start, task.stop)
    ids = np.arange(task.start, task.stop, dtype=np.int64)
    return ImageBlock(task.split, ids, labels[sl], names[sl], np.ascontiguousarray(images[sl])), []


def _glob_root(pattern: str) -> str:
  """The directory part of a glob before its first wildcard (file names are reported relative to it)."""
  magic = re.search(r"[*?\[]", pattern)
  static = pattern if magic is None else pattern[:magic.start()]
  return static.rsplit("/", 1)[0] if "/" in static else ""


_SYNSET_RE = re.compile(r"^n\d{8}$")


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
  """The 1000 ILSVRC-2012 synset ids (`n01440764`, ...) in standard class-id order (sorted; as TFDS `imagenet2012`
  labels, torchvision and big_vision number them). Read from the label file that ships inside
  tensorflow_datasets, found without importing it (importing TFDS costs seconds per worker)."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "datasets", "imagenet2012", "labels.txt")
    if os.path.exists(path):
      with open(path) as f:
        synsets = tuple(line.strip() for line in f if line.strip())
      if len(synsets) != 1000 or not all(_SYNSET_RE.match(x) for x in synsets):
        raise ValueError(f"{path} does not hold 1000 ImageNet synset ids")
      return synsets
  raise FileNotFoundError("tensorflow_datasets (datasets/imagenet2012/labels.txt) is needed for the ImageNet "
                          "synset -> class id map; install tensorflow-datasets")


def folder_labels(folders: list[str]) -> tuple[str, list[str], np.ndarray]:
  """Parent folder names -> (scheme, label names, label ids). ImageNet synset folders (`n01440764`) get the
  standard class ids ("imagenet2012"), so any subset of ImageNet keeps its labels; other folder names are
  numbered in sorted order ("folders")."""
  names = sorted(set(folders))
  if names and all(_SYNSET_RE.match(n) for n in names):
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    unknown = [n for n in names if n not in index]
    if not unknown:
      return "imagenet2012", list(imagenet_synsets()), np.array([index[f] for f in folders], np.int64)
  index = {name: i for i, name in enumerate(names)}
  return "folders", names, np.array([index[f] for f in folders], np.int64)


class FilesSource(ImageSource):
  """Image files matching a glob, sorted by path; label from the parent folder name (`folder_labels`)."""
  split = "train"

  def __init__(self, pattern: str):
    self.spec = f"files:{pattern}"
    self.pattern = pattern
    fs, path = artifacts.url_to_fs(pattern)
    self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    self.root = _glob_root(path)
    listing = fs.glob(path, detail=True) if any(c in path for c in "*?[") else {path: fs.info(path)}
    self.paths = sorted(p for p, meta in listing.items() if meta.get("type") == "file")
    if not self.paths:
      raise FileNotFoundError(f"No files match {pattern!r} (source {self.spec!r}).")
    parents = [posixpath.basename(posixpath.dirname(p)) for p in self.paths]
    self.label_scheme, self.label_names, self.labels = folder_labels(parents)

  def __len__(self) -> int:
    return len(self.paths)

  def file_name(self, path: str) -> str:
    return posixpath.relpath(path, self.root) if self.root else path

  def tasks(self, split: str, images_per_task: int, staging: str | None = None) -> list[ReadTask]:
    # Workers never re-list the folder: each task carries its (label, path) pairs, or with `staging` the byte
    # range of its lines in one JSON-lines listing written there (one ranged read per task on any filesystem).
    tasks = super().tasks(split, images_per_task)
    pairs = list(zip(self.labels.tolist(), self.paths, strict=True))
    if staging is None:
      return [dataclasses.replace(t, items=tuple(pairs[t.start:t.stop])) for t in tasks]
    lines = [(json.dumps(pair) + "\n").encode() for pair in pairs]
    offsets = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).tolist()
    url = artifacts.join(staging, f"{split}.listing.jsonl")
    artifacts.write_bytes(url, b"".join(lines))
    return [dataclasses.replace(t, listing=(url, offsets[t.start], offsets[t.stop])) for t in tasks]

  @staticmethod
  def _items(task: ReadTask) -> list[tuple[int, str]]:
    if task.listing is None:
      return list(task.items)
    url, lo, hi = task.listing
    fs, path = artifacts.url_to_fs(url)
    with fs.open(path, "rb") as f:
      f.seek(lo)
      data = f.read(hi - lo)
    items = [tuple(json.loads(line)) for line in data.decode().splitlines()]
    if len(items) != task.stop - task.start:
      raise RuntimeError(f"Listing {url} bytes [{lo}, {hi}) hold {len(items)} records, expected "
                         f"{task.stop - task.start}: the staged listing changed under the pipeline.")
    return items

  def __getstate__(self) -> dict[str, Any]:
    state = super().__getstate__()
    state["paths"], state["labels"] = None, None  # Tasks carry them; keep the pickled DoFn small.
    return state

  def read(self, task: ReadTask) -> tuple[ImageBlock, list[DecodeFailure]]:
    fs, _ = artifacts.url_to_fs(self.pattern)

    def load(label: int, path: str) -> tuple[int, str, np.ndarray]:
      with fs.open(path, "rb") as f:
        return label, self.file_name(path), decode_image(f.read())

    items = zip(range(task.start, task.stop), self._items(task), strict=True)
    return gather(task.split, ((i, self.file_name(path), functools.partial(load, label, path))
                               for i, (label, path) in items))

  def metadata(self) -> dict[str, Any]:
    return {"label_scheme": self.label_scheme, "label_names": self.label_names}


def things_sort_key(concept: str) -> str:
  """THINGS' canonical order sorts uniqueIDs with '_' as a space: `camera_lens` before `camera1`."""
  return concept.replace("_", " ")


class ThingsSource(FilesSource):
  """The THINGS object-image folder: `<root>/<uniqueID>/<image>` (e.g. `aardvark/aardvark_01b.jpg`).

  Concepts are the sub-folder names in THINGS' sort order (`things_sort_key`), which for the full folder is the
  canonical order (`unique_id.txt`, the row order of THINGS triplets and embeddings). Mode `one`: the first
  image (sorted by name, `_01b`) of each concept, id = label = concept index, so the embeddings index like the
  THINGS triplets.
  Mode `all`: every image, id = position in the sorted file list, label = concept index.
  """

  def __init__(self, root: str, mode: str = "one"):
    if mode not in THINGS_MODES:
      raise ValueError(f"THINGS source mode must be one of {THINGS_MODES}, got {mode!r} (spec 'things:DIR[:one|all]')")
    root = root.rstrip("/")
    self.spec, self.pattern, self.mode, self.split = f"things:{root}:{mode}", f"{root}/*/*", mode, "things"
    fs, path = artifacts.url_to_fs(self.pattern)
    self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    self.root = _glob_root(path)
    files = sorted(p for p, meta in fs.glob(path, detail=True).items()
                   if meta.get("type") == "file" and p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"No images in {root}/<concept>/ (source {self.spec!r}): expected the THINGS "
                              "object_images folder, one sub-folder per concept uniqueID.")
    concepts = [posixpath.basename(posixpath.dirname(p)) for p in files]
    self.label_names = sorted(set(concepts), key=things_sort_key)
    self.label_scheme = "things"
    index = {c: i for i, c in enumerate(self.label_names)}
    if mode == "one":
      first: dict[str, str] = {}
      for p, c in zip(files, concepts, strict=True):
        first.setdefault(c, p)
      files = [first[c] for c in self.label_names]
      concepts = list(self.label_names)
    self.paths = files
    self.labels = np.array([index[c] for c in concepts], np.int64)


_TFDS_RE = re.compile(r"^(?P<name>[\w/]+?)(?::(?P<version>\d+\.\d+\.\d+))?:(?P<split>.+)$")


class TfrecordRecords:
  """Range reads over a TFDS split prepared in TFRecord format (no random access): `read(start, stop)` reads
  records [start, stop) of the split through TFDS split slicing (`train[start:stop]` as absolute
  ReadInstructions, files in order, `shuffle_files=False`), so the ids are the positions in the split, which are
  the `tfds.data_source` record indices when both formats were prepared by the same TFDS version."""

  def __init__(self, builder: Any, split: str):
    import tensorflow_datasets as tfds
    self.builder = builder
    splits = builder.info.splits
    # Absolute instructions leave from_/to None for "from the start" / "to the end".
    self.parts = [(a.splitname, a.from_ or 0, splits[a.splitname].num_examples if a.to is None else a.to)
                  for a in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)]

  def __len__(self) -> int:
    return sum(to - from_ for _, from_, to in self.parts)

  def read(self, start: int, stop: int) -> list[dict[str, Any]]:
    import tensorflow_datasets as tfds
    out, offset = [], 0
    for name, from_, to in self.parts:
      lo, hi = max(start - offset, 0) + from_, min(stop - offset, to - from_) + from_
      if lo < hi:
        ri = tfds.core.ReadInstruction(name, from_=lo, to=hi, unit="abs")
        out.extend(tfds.as_numpy(self.builder.as_dataset(split=ri, shuffle_files=False)))
      offset += to - from_
    return out


# TensorFlow's errors for a record whose image cannot be decoded (TFDS decodes on read): dead letters, not crashes.
_TF_DECODE_ERRORS = ("InvalidArgumentError", "DataLossError")


class TfdsSource(ImageSource):
  """A TFDS image dataset via `tfds.data_source` (random access by record index, as AligNet's indices need),
  falling back to the TFRecord builder (`TfrecordRecords`) where the dataset was prepared as TFRecords.

  Records are read one index at a time: batch reads (`__getitems__`) fail under `tfds.testing.mock_data`.
  """
  _cache_ds = None
  _cache_len = None

  def __init__(self, name: str, split: str, version: str | None = None, data_dir: str | None = None):
    self.name, self.version, self.split, self.data_dir = name, version, split, data_dir
    self.spec = f"tfds:{name}{':' + version if version else ''}:{split}"

  def _ds(self) -> Any:
    if self._cache_ds is None:
      import tensorflow_datasets as tfds  # Lazy: importing TFDS costs seconds per process.
      name = f"{self.name}:{self.version}" if self.version else self.name
      try:
        self._cache_ds = tfds.data_source(name, split=self.split, data_dir=self.data_dir, download=False)
      except Exception as e:
        try:
          self._cache_ds = TfrecordRecords(tfds.builder(name, data_dir=self.data_dir), self.split)
          logging.info("TFDS %s has no random-access (array_record) files (%s); reading its TFRecords", name, e)
        except Exception as e2:
          raise RuntimeError(
              f"Cannot open TFDS {name!r} split {self.split!r} (data_dir={self.data_dir!r}): {e}; TFRecord "
              f"fallback: {e2}. Prepare it first (`tfds build`, array_record format preferred) or pass "
              "--tfds-data-dir.") from e
    return self._cache_ds

  def __len__(self) -> int:
    if self._cache_len is None:
      self._cache_len = len(self._ds())
    return self._cache_len

  def _parse(self, record: dict[str, Any], i: int) -> tuple[int, str, np.ndarray]:
    name = record.get("file_name", f"{self.name}/{self.split}/{i}")
    name = name.decode() if isinstance(name, bytes) else str(name)
    label = record.get("label")
    label = int(label) if label is not None and np.ndim(label) == 0 else -1
    if "image" not in record:
      raise ValueError(f"TFDS {self.name!r} records have no 'image' feature (keys: {sorted(record)})")
    return label, name, to_rgb(record["image"])

  def _records(self, ds: Any, task: ReadTask) -> Any:
    """(index, record or the exception that reading it raised) for each index of the task."""
    if isinstance(ds, TfrecordRecords):
      records = ds.read(task.start, task.stop)
      if len(records) != task.stop - task.start:
        raise RuntimeError(f"TFDS {self.spec}: read {len(records)} records for [{task.start}, {task.stop})")
      yield from zip(range(task.start, task.stop), records, strict=True)
      return
    for i in range(task.start, task.stop):
      try:
        yield i, ds[i]
      except Exception as e:
        if type(e).__name__ not in _TF_DECODE_ERRORS:
          raise
        yield i, ValueError(f"cannot decode image: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

  def read(self, task: ReadTask) -> tuple[ImageBlock, list[DecodeFailure]]:
    def load(record: Any, i: int) -> tuple[int, str, np.ndarray]:
      if isinstance(record, Exception):
        raise record
      return self._parse(record, i)

    return gather(task.split, ((i, f"{self.name}/{self.split}/{i}", functools.partial(load, record, i))
                               for i, record in self._records(self._ds(), task)))


def parse(spec: str, *, tfds_data_dir: str | None = None) -> ImageSource:
  """Build a source from its spec string (see the module docstring)."""
  kind, sep, rest = spec.partition(":")
  if not sep or not rest:
    raise ValueError(f"Bad image source {spec!r}. {SPEC_HELP}")
  if kind == "demo":
    url, sep, split = rest.rpartition(":")
    if not sep or not url:
      raise ValueError(f"Bad demo source {spec!r}: expected 'demo:<world_url>:things|pool'.")
    return DemoSource(url, split)
  if kind == "files":
    return FilesSource(rest)
  if kind == "things":
    root, _, mode = rest.rpartition(":")
    if mode in THINGS_MODES and root:
      return ThingsSource(root, mode)
    return ThingsSource(rest)
  if kind == "tfds":
    m = _TFDS_RE.match(rest)
    if not m:
      raise ValueError(f"Bad TFDS source {spec!r}: expected 'tfds:<name>[:<version>]:<split>', "
                       "e.g. 'tfds:imagenet2012:train'.")
    return TfdsSource(m["name"], m["split"], m["version"], tfds_data_dir)
  raise ValueError(f"Unknown image source kind {kind!r} in {spec!r}. {SPEC_HELP}")


def input_url(spec: str) -> str | None:
  """URL of the input a source reads, for the manifest's input digests (None for TFDS: versioned by name)."""
  kind, _, rest = spec.partition(":")
  if kind == "demo":
    return rest.rpartition(":")[0]
  if kind == "files":
    root = _glob_root(rest)
    return root or None
  if kind == "things":
    root, _, mode = rest.rpartition(":")
    return root if mode in THINGS_MODES and root else rest
  return None
