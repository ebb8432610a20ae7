"""Input pipeline of the trainer: triplet shards -> deterministic Grain batches -> preprocessed image triplets.

Reads a split of triplets from any fsspec URL: the Parquet or TFRecord shards of a triplets artifact or a
published version (after checking the shards' schema version and every file's sha256 against the manifest),
or the released AligNet npz layout (`alignet_<split>.npz`, or `<transform>/<split>_<sampling>.npz`, with arrays
`indices`/`similarities`/`filenames`). Only the two columns the loss needs (`indices`, `similarities`) stay in
memory. Batches are a Grain `MapDataset` with random access by step, so the order is a pure function of
(seed, step) and a run resumed at step s reads exactly the batches a straight run would (`train_rows`). Each
host loads only its slice of the global batch. Indices are joined to images through an image source (the demo
world, an image folder, or a TFDS data source such as `imagenet2012`, by record index, which is what the
released `indices` point into) and preprocessed with the student's own `preprocess` (its resize and value
range) on Grain's worker threads (optionally processes), ahead of the accelerator and in order.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import grain
import numpy as np
import pyarrow.parquet as pq

from alignet_data import artifacts
from trainer import triplet_sources

FORMATS = ("auto", "parquet", "tfrecord", "npz")


@dataclasses.dataclass(frozen=True)
class Triplets:
  """The columns of one split that training needs; rows in shard order."""
  indices: np.ndarray       # (n, 3) int64 image ids
  similarities: np.ndarray  # (n, 3) float32 teacher similarities [s01, s02, s12]

  def __len__(self) -> int:
    return len(self.indices)


class ImageSource(Protocol):
  """Random access to uint8 RGB images by id; `get` runs on Grain's worker threads (so must be thread-safe) and
  the source is pickled into worker processes when there are any."""

  def __len__(self) -> int: ...

  def get(self, ids: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ArrayImages:
  """Images held in one uint8 (N, H, W, 3) array; id = row (the demo world's pool and THINGS-like images)."""
  images: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def get(self, ids: np.ndarray) -> np.ndarray:
    return self.images[np.asarray(ids)]


def _stack_or_list(images: list[np.ndarray]) -> Any:
  if images and all(im.shape == images[0].shape for im in images):
    return np.stack(images)
  return images


@dataclasses.dataclass(frozen=True)
class DemoImages(ArrayImages):
  """A demo world's images; `world_url` lets the validation hooks find its Levels-/THINGS-like judgements."""
  world_url: str = ""
  split: str = "pool"


def demo_world_images(world_url: str, split: str = "pool") -> DemoImages:
  """The demo world's images of an embeddings split: 'pool' (ImageNet-like) or 'things' (THINGS-like)."""
  from alignet_data import demo_world
  world = demo_world.load(world_url)
  fields = {"pool": "pool_images", "things": "things_images"}
  if split not in fields:
    raise ValueError(f"Unknown demo world split {split!r}; the demo world has {sorted(fields)}.")
  return DemoImages(np.asarray(getattr(world, fields[split])), world_url, split)


class FileImages:
  """Image files of a files:/things: source, id = position in the source's own path order (as the embed stage
  numbers them)."""

  def __init__(self, source: Any):
    self.pattern = source.pattern
    self.paths = list(source.paths)

  def __len__(self) -> int:
    return len(self.paths)

  def get(self, ids: np.ndarray) -> Any:
    from alignet_data.teacher import image_sources
    fs, _ = artifacts.url_to_fs(self.pattern)
    out = []
    for i in np.asarray(ids).tolist():
      with fs.open(self.paths[i], "rb") as f:
        try:
          out.append(image_sources.decode_image(f.read()))
        except ValueError as e:
          raise ValueError(f"Image id {i} ({self.paths[i]}) cannot be decoded: {e}") from e
    return _stack_or_list(out)


class TfdsImages:
  """A TFDS image dataset through `tfds.data_source` (random access by record index: the released `indices`).

  Reads one record at a time (batch reads fail under `tfds.testing.mock_data`). Grain's worker threads share
  one opened source (array_record reads are thread-safe; the lazy open is locked); worker processes each open
  their own, as pickling drops it.
  """

  def __init__(self, name: str, split: str, version: str | None = None, data_dir: str | None = None):
    self.name, self.split, self.version, self.data_dir = name, split, version, data_dir
    self._ds = None
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in ("_ds", "_lock")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _ds=None, _lock=threading.Lock())

  def _source(self) -> Any:
    with self._lock:
      if self._ds is None:
        self._ds = self._open()
    return self._ds

  def _open(self) -> Any:
    import tensorflow_datasets as tfds  # Lazy: seconds to import.
    name = f"{self.name}:{self.version}" if self.version else self.name
    try:
      return tfds.data_source(name, split=self.split, data_dir=self.data_dir, download=False)
    except Exception as e:
      raise OSError(f"Cannot open TFDS {name!r} split {self.split!r} (data_dir={self.data_dir!r}): {e}. Prepare it "
                    "first (array_record format) or pass --tfds-data-dir.") from e

  def __len__(self) -> int:
    return len(self._source())

  def get(self, ids: np.ndarray) -> Any:
    from alignet_data.teacher import image_sources
    ds = self._source()
    return _stack_or_list([image_sources.to_rgb(np.asarray(ds[int(i)]["image"])) for i in np.asarray(ids).tolist()])


def open_images(spec: str, tfds_data_dir: str | None = None) -> ImageSource:
  """An image source with random access by id from a spec: 'demo:<world>:pool|things', 'files:<glob>',
  'tfds:<name>[:<version>]:<split>' (the embed stage's specs, so a triplets artifact's ids mean the same)."""
  from alignet_data.teacher import image_sources
  source = image_sources.parse(spec, tfds_data_dir=tfds_data_dir)
  if isinstance(source, image_sources.DemoSource):
    return demo_world_images(source.world_url, source.split)
  if isinstance(source, image_sources.FilesSource):  # files:<glob> and its subclasses (things:<root>)
    return FileImages(source)
  return TfdsImages(source.name, source.split, source.version, tfds_data_dir)


# The released dataset's indices point into this data source (google-deepmind/alignet README).
RELEASED_IMAGES = "tfds:imagenet2012:train"


def image_spec(config: Mapping[str, Any], artifact: artifacts.Artifact | None) -> str:
  """Which images the shards' indices point into: config `images`, else the demo `world`, else the provenance
  recorded in the shards' manifest (triplets config -> embeddings artifact -> its source spec for the split),
  else, for the released npz files (no manifest), TFDS imagenet2012/train."""
  if config.get("images"):
    return str(config["images"])
  if config.get("world"):
    return f"demo:{config['world']}:{config.get('image_split') or 'pool'}"
  if artifact is None:
    return RELEASED_IMAGES
  cfg = artifact.config
  emb_url, split = cfg.get("embeddings"), cfg.get("split")
  hint = "pass --images SPEC (e.g. demo:<world>:pool, files:<glob>, tfds:imagenet2012:train)"
  if not emb_url or not split:
    raise ValueError(f"{artifact.url}: its manifest names no embeddings artifact/split to find the images; {hint}.")
  try:
    sources = artifacts.load(emb_url).config.get("sources", {})
  except (OSError, ValueError) as e:
    raise ValueError(f"{artifact.url} was made from embeddings {emb_url}, which cannot be read ({e}); {hint}.") from e
  if split not in sources:
    raise ValueError(f"Embeddings {emb_url} have no source for split {split!r} (has {sorted(sources)}); {hint}.")
  return str(sources[split])


def shard_names(artifact: artifacts.Artifact, split: str, fmt: str = "parquet") -> list[str]:
  """Sorted Parquet/TFRecord shard names of an artifact's split; a clear error when there are none."""
  names = artifact.glob(f"shards/{split}-*.{fmt}")
  if not names:
    raise FileNotFoundError(
        f"No {'Parquet' if fmt == 'parquet' else fmt} shards for split {split!r} in {artifact.url} (expected "
        f"shards/{split}-*-of-*.{fmt}; is it a triplets or publish artifact?)")
  return names


def _list_column(table: Any, name: str, dtype: Any) -> np.ndarray:
  column = table.column(name).combine_chunks()
  values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
  if len(values) != 3 * table.num_rows:
    raise ValueError(f"Column {name!r} must hold exactly 3 values per row; got {len(values)} for "
                     f"{table.num_rows} rows.")
  return values.reshape(-1, 3)


def read_triplets(source: triplet_sources.Sources | artifacts.Artifact | str, split: str = "train",
                  verify: bool = True, fmt: str = "auto") -> Triplets:
  """All triplets of one set in shard order: "train", a validation set by sampling name, or "valid" (the only
  validation set). `source` is resolved by `triplet_sources.resolve` unless it already is.

  With a manifest, every file's sha256 is checked against it and Parquet/TFRecord shards against the triplet
  schema (version included) before anything is used; a plain directory (the released npz) has nothing to verify.
  """
  from alignet_data.dataset import shards
  if not isinstance(source, triplet_sources.Sources):
    source = triplet_sources.resolve(source.url if isinstance(source, artifacts.Artifact) else source, fmt=fmt)
  art, url, fmt = source.artifact, source.url, source.fmt
  if split == "train":
    target = source.train
  elif split in source.valid:
    target = source.valid[split]
  elif split == "valid" and len(source.valid) == 1:
    target = next(iter(source.valid.values()))
  else:
    raise FileNotFoundError(f"No triplet set {split!r} in {url}: it has train ({source.sampling}) and validation "
                            f"sets {sorted(source.valid)}.")
  names = shard_names(art, target, fmt) if fmt != "npz" else [target]
  if verify and art is not None:
    art.verify(names)
  indices, sims = [], []
  for name in names:
    path = art.path(name) if art is not None else artifacts.join(url, name)
    if fmt == "parquet":
      shards.check_parquet(path)  # Schema and its version, from the footer.
      fs, p = artifacts.url_to_fs(path)
      with fs.open(p, "rb") as f:
        table = pq.read_table(f, columns=["indices", "similarities"])
      indices.append(_list_column(table, "indices", np.int64))
      sims.append(_list_column(table, "similarities", np.float32))
    elif fmt == "tfrecord":
      columns = shards.read_tfrecord(path)  # Checks each record's crc32c and features.
      indices.append(columns["indices"].astype(np.int64))
      sims.append(columns["similarities"].astype(np.float32))
    else:
      fs, p = artifacts.url_to_fs(path)
      with fs.open(p, "rb") as f, np.load(f, allow_pickle=False) as z:
        missing = {"indices", "similarities"} - set(z.files)
        if missing:
          raise ValueError(f"{path} lacks arrays {sorted(missing)} (has {z.files}): not the released AligNet layout.")
        indices.append(np.asarray(z["indices"], np.int64).reshape(-1, 3))
        sims.append(np.asarray(z["similarities"], np.float32).reshape(-1, 3))
  return Triplets(np.concatenate(indices), np.concatenate(sims))


def check_indices(triplets: Triplets, images: ImageSource, what: str) -> None:
  """Fail before training, naming the problem, if a triplet points outside the image source."""
  if len(triplets) == 0:
    raise ValueError(f"{what}: no triplets.")
  lo, hi = int(triplets.indices.min()), int(triplets.indices.max())
  if lo < 0 or hi >= len(images):
    raise ValueError(f"{what}: triplet indices span [{lo}, {hi}] but the image source has {len(images)} images; "
                     "the shards were made from another image set (check the `world`/split config).")


def triplet_images(indices: np.ndarray, images: ImageSource,
                   preprocess: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """(B, 3) ids -> (B, 3, H, W, C) float32 preprocessed images (the student's own resize and value range)."""
  b = len(indices)
  raw = images.get(indices.reshape(-1))
  if isinstance(raw, list):  # Differently sized images (files, TFDS): the student's resize makes them one size.
    x = np.concatenate([np.asarray(preprocess(im[None]), dtype=np.float32) for im in raw])
  else:
    x = np.asarray(preprocess(raw), dtype=np.float32)
  return x.reshape((b, 3) + x.shape[1:])


def host_slice(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This host's contiguous part of a global batch (each host loads only its images)."""
  if len(rows) % process_count:
    raise ValueError(f"Batch of {len(rows)} does not split over {process_count} hosts; make batch_size a multiple.")
  per = len(rows) // process_count
  return rows[process_index * per:(process_index + 1) * per]


# ---------------------------------------------------------------------------------------- batches (Grain)

SEED_RANGE = (0, 2**32 - 1)  # Grain's shuffle seeds are uint32 (it raises on anything else).


def check_seed(seed: int) -> int:
  """The data-order seed, checked up front so that a bad one fails before the data and the model are loaded."""
  if not isinstance(seed, int | np.integer) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
    raise ValueError(f"seed must be an integer in [0, 2**32 - 1] (Grain's shuffle seed range), got {seed!r}.")
  return int(seed)


def train_rows(n: int, batch_size: int, seed: int) -> grain.MapDataset:
  """Row numbers of every training batch, forever, by random access: `ds[step]` holds the (batch_size,) int64
  rows of step `step` (0-based), a pure function of (seed, step).

  Grain's shuffle is a stateless permutation of indices (no buffer, no state to checkpoint); past the first epoch
  it shuffles with its seed + epoch, so each epoch is a fresh permutation of all n rows, whose last partial batch
  `drop_remainder` drops. Its seed is a hash of ours: given seed s itself, seeds s and s + 1 would see the same
  epoch orders one epoch apart.
  """
  if batch_size <= 0 or n // batch_size == 0:
    raise ValueError(f"batch_size {batch_size} must be in [1, {n}] (the number of training triplets).")
  shuffle_seed = int(np.random.SeedSequence(check_seed(seed)).generate_state(1, np.uint32)[0])
  return (grain.MapDataset.range(n).shuffle(seed=shuffle_seed).batch(batch_size, drop_remainder=True).repeat())


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity hash, no elementwise array comparison.
class LoadBatch(grain.transforms.Map):
  """Rows of a global batch -> this host's slice, joined to preprocessed images.

  Runs on Grain's workers, so it must be thread-safe and picklable. Row -1 marks padding (the last validation
  batch): it loads row 0 and gets mask 0. Each element carries the seconds spent making it, so the input
  pipeline's own speed is measured in whichever thread or process made it.
  """
  data: Triplets
  images: ImageSource
  preprocess: Callable[[np.ndarray], np.ndarray]
  process_index: int = 0
  process_count: int = 1

  def map(self, element: np.ndarray) -> dict[str, Any]:
    start = time.perf_counter()
    rows = host_slice(np.asarray(element), self.process_index, self.process_count)
    valid = rows >= 0
    rows = np.where(valid, rows, 0)
    return {"images": triplet_images(self.data.indices[rows], self.images, self.preprocess),
            "similarities": self.data.similarities[rows], "mask": valid.astype(np.float32),
            "seconds": time.perf_counter() - start}


def _read(ds: grain.MapDataset, threads: int, prefetch: int, processes: int = 0) -> grain.IterDataset:
  """Grain's readers: `threads` workers keep up to `prefetch` batches made ahead of the consumer, in order; with
  `processes`, each of that many worker processes does so for every processes-th batch (still in order)."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=int(prefetch)))
  if processes:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # Grain 0.2.18's mp_prefetch reads an absl flag, which raises unless flags were parsed (google/grain#1355,
      # fixed upstream by #1362); our CLI is argparse, so take absl's defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(processes)))
  return it


def train_dataset(data: Triplets, images: ImageSource, preprocess: Callable[[np.ndarray], np.ndarray], *,
                  batch_size: int, seed: int, start_step: int = 0, stop_step: int | None = None, threads: int = 0,
                  prefetch: int = 2, processes: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The batches of steps start_step .. stop_step - 1 (forever if None), as `LoadBatch` dicts: `images`
  (B/hosts, 3, H, W, C) float32, `similarities` (B/hosts, 3), `mask`, `seconds`.

  Slicing the random-access rows at the start step is the resume: nothing before it is read or made.
  """
  rows = train_rows(len(data), batch_size, seed)[start_step:stop_step]
  load = LoadBatch(data, images, preprocess, process_index, process_count)
  return _read(rows.map(load), threads, prefetch, processes)


def _pad_rows(rows: np.ndarray, n: int) -> np.ndarray:
  return np.where(rows < n, rows, -1)


def eval_dataset(data: Triplets, images: ImageSource, preprocess: Callable[[np.ndarray], np.ndarray], *,
                 batch_size: int, threads: int = 0, prefetch: int = 2, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Every triplet once, in order, as fixed-size batches (one compiled shape); the last one padded, `mask` 0.

  Threads only: worker processes would be started anew for every validation pass.
  """
  n = len(data)
  rows = grain.MapDataset.range(-(-n // batch_size) * batch_size).batch(batch_size)
  rows = rows.map(functools.partial(_pad_rows, n=n))
  return _read(rows.map(LoadBatch(data, images, preprocess, process_index, process_count)), threads, prefetch)
