"""Image sources for the embed stage: numbered records read in ranges, decoded to uint8 RGB blocks.

A source spec is a string:
  demo:<world_url>:<split>         the demo world's `things` (one image per concept) or `pool` images
  files:<glob>                     image files on any fsspec filesystem (`**` recurses), label = parent folder
  tfds:<name>[:<version>]:<split>  a TFDS dataset through `tfds.data_source` (array_record, random access)

Every record has an id: its index in the source (the world's image index, the position in the sorted file list,
the `tfds.data_source` record index, which is what the released AligNet `indices` point into). A source splits
into `ReadTask`s (id ranges, small and picklable, carrying what a worker needs) so Beam can read in parallel;
`read(task)` returns the decoded images as one block plus a `DecodeFailure` per record that could not be decoded
(corrupt, truncated, empty, not an image): those are dead-lettered, never fatal.
"""
from __future__ import annotations

import dataclasses
import io
import posixpath
import re
from typing import Any

import numpy as np

from alignet_data import artifacts

DEMO_SPLITS = ("things", "pool")
SPEC_HELP = ("Source specs: 'demo:<world_url>:things|pool', 'files:<glob>' (e.g. 'files:/data/imgs/**/*.jpg'), "
             "'tfds:<name>[:<version>]:<split>' (e.g. 'tfds:imagenet2012:train').")


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
  """Records [start, stop) of one source; `items` carries per-record data a worker needs (file paths)."""
  split: str
  start: int
  stop: int
  items: tuple = ()


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

  def tasks(self, split: str, images_per_task: int) -> list[ReadTask]:
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


class FilesSource(ImageSource):
  """Image files matching a glob, sorted by path; label = index of the parent folder name among all of them."""
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
    self.label_names = sorted(set(parents))
    index = {name: i for i, name in enumerate(self.label_names)}
    self.labels = np.array([index[p] for p in parents], np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def file_name(self, path: str) -> str:
    return posixpath.relpath(path, self.root) if self.root else path

  def tasks(self, split: str, images_per_task: int) -> list[ReadTask]:
    # Each task carries its own paths and labels, so workers never re-list (or receive) the whole folder.
    return [dataclasses.replace(t, items=tuple(zip(self.paths[t.start:t.stop], self.labels[t.start:t.stop].tolist(),
                                                   strict=True)))
            for t in super().tasks(split, images_per_task)]

  def __getstate__(self) -> dict[str, Any]:
    state = super().__getstate__()
    state["paths"], state["labels"] = None, None  # Tasks carry them; keep the pickled DoFn small.
    return state

  def read(self, task: ReadTask) -> tuple[ImageBlock, list[DecodeFailure]]:
    fs, _ = artifacts.url_to_fs(self.pattern)
    ids, labels, names, images, failures = [], [], [], [], []
    for i, (path, label) in zip(range(task.start, task.stop), task.items, strict=True):
      name = self.file_name(path)
      try:
        with fs.open(path, "rb") as f:
          image = decode_image(f.read())
      except (ValueError, OSError) as e:
        failures.append(DecodeFailure(task.split, i, name, str(e)))
        continue
      ids.append(i)
      labels.append(label)
      names.append(name)
      images.append(image)
    block = ImageBlock(task.split, np.array(ids, np.int64), np.array(labels, np.int64),
                       np.array(names, dtype=str), _stack_or_list(images))
    return block, failures

  def metadata(self) -> dict[str, Any]:
    return {"label_names": self.label_names}


_TFDS_RE = re.compile(r"^(?P<name>[\w/]+?)(?::(?P<version>\d+\.\d+\.\d+))?:(?P<split>.+)$")


class TfdsSource(ImageSource):
  """A TFDS image dataset via `tfds.data_source` (random access by record index, as AligNet's indices need).

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
        raise RuntimeError(
            f"Cannot open TFDS {name!r} split {self.split!r} (data_dir={self.data_dir!r}): {e}. Prepare it first "
            "(`tfds build` or download_and_prepare, array_record format) or pass --tfds-data-dir.") from e
    return self._cache_ds

  def __len__(self) -> int:
    if self._cache_len is None:
      self._cache_len = len(self._ds())
    return self._cache_len

  def _record(self, ds: Any, i: int, split: str) -> tuple[int, str, np.ndarray]:
    record = ds[i]
    name = record.get("file_name", f"{self.name}/{self.split}/{i}")
    name = name.decode() if isinstance(name, bytes) else str(name)
    label = record.get("label")
    label = int(label) if label is not None and np.ndim(label) == 0 else -1
    if "image" not in record:
      raise ValueError(f"TFDS {self.name!r} records have no 'image' feature (keys: {sorted(record)})")
    return label, name, to_rgb(record["image"])

  def read(self, task: ReadTask) -> tuple[ImageBlock, list[DecodeFailure]]:
    ds = self._ds()
    ids, labels, names, images, failures = [], [], [], [], []
    for i in range(task.start, task.stop):
      try:
        label, name, image = self._record(ds, i, task.split)
      except (ValueError, OSError) as e:
        failures.append(DecodeFailure(task.split, i, f"{self.name}/{self.split}/{i}", str(e)))
        continue
      ids.append(i)
      labels.append(label)
      names.append(name)
      images.append(image)
    block = ImageBlock(task.split, np.array(ids, np.int64), np.array(labels, np.int64),
                       np.array(names, dtype=str), _stack_or_list(images))
    return block, failures


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
  return None
