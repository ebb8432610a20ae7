"""Input pipeline of the trainer: triplet shards -> deterministic batches -> preprocessed image triplets.

Reads the Parquet shards of a triplets (or published) artifact with pyarrow through fsspec, keeps only the two
columns the loss needs (`indices`, `similarities`) in memory, and serves batches in an order that is a pure
function of (seed, step): epoch e is a permutation drawn from an RNG keyed by (seed, e), so a run resumed at
step s sees exactly the batches a straight run would. Indices are joined to images through an `ImageSource`
(for the demo world: rows of `world.pool_images`, which are the embeddings' ids) and preprocessed with the
student's own `preprocess` (its resize and value range).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq

from alignet_data import artifacts

SPLITS = ("train", "valid")


@dataclasses.dataclass(frozen=True)
class Triplets:
  """The columns of one split that training needs; rows in shard order."""
  indices: np.ndarray       # (n, 3) int64 image ids
  similarities: np.ndarray  # (n, 3) float32 teacher similarities [s01, s02, s12]

  def __len__(self) -> int:
    return len(self.indices)


class ImageSource(Protocol):
  """Random access to uint8 RGB images by id."""

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


def demo_world_images(world_url: str, split: str = "pool") -> ArrayImages:
  """The demo world's images of an embeddings split: 'pool' (ImageNet-like) or 'things' (THINGS-like)."""
  from alignet_data import demo_world
  world = demo_world.load(world_url)
  fields = {"pool": "pool_images", "things": "things_images"}
  if split not in fields:
    raise ValueError(f"Unknown demo world split {split!r}; the demo world has {sorted(fields)}.")
  return ArrayImages(np.asarray(getattr(world, fields[split])))


def shard_names(artifact: artifacts.Artifact, split: str) -> list[str]:
  """Sorted Parquet shard names of a split; a clear error when there are none."""
  names = artifact.glob(f"shards/{split}-*.parquet")
  if not names:
    raise FileNotFoundError(
        f"No Parquet shards for split {split!r} in {artifact.url} (expected shards/{split}-*-of-*.parquet; "
        f"is it a triplets or publish artifact?)")
  return names


def _list_column(table: Any, name: str, dtype: Any) -> np.ndarray:
  column = table.column(name).combine_chunks()
  values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
  if len(values) != 3 * table.num_rows:
    raise ValueError(f"Column {name!r} must hold exactly 3 values per row; got {len(values)} for "
                     f"{table.num_rows} rows.")
  return values.reshape(-1, 3)


def read_triplets(artifact: artifacts.Artifact, split: str, verify: bool = True) -> Triplets:
  """All triplets of a split (indices, similarities), verifying each shard's sha256 against the manifest."""
  names = shard_names(artifact, split)
  if verify:
    artifact.verify(names)
  indices, sims = [], []
  for name in names:
    with artifact.open(name) as f:
      table = pq.read_table(f, columns=["indices", "similarities"])
    indices.append(_list_column(table, "indices", np.int64))
    sims.append(_list_column(table, "similarities", np.float32))
  return Triplets(np.concatenate(indices), np.concatenate(sims))


def check_indices(triplets: Triplets, images: ImageSource, what: str) -> None:
  """Fail before training, naming the problem, if a triplet points outside the image source."""
  if len(triplets) == 0:
    raise ValueError(f"{what}: no triplets.")
  lo, hi = int(triplets.indices.min()), int(triplets.indices.max())
  if lo < 0 or hi >= len(images):
    raise ValueError(f"{what}: triplet indices span [{lo}, {hi}] but the image source has {len(images)} images; "
                     "the shards were made from another image set (check the `world`/split config).")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: an RNG keyed by (seed, epoch), independent of how many steps came before."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Row numbers of training batch `step` (0-based). Epochs drop their last partial batch."""
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} is larger than the {n} training triplets; lower batch_size.")
  epoch, offset = divmod(step, per_epoch)
  return epoch_permutation(n, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


def train_batches(data: Triplets, batch_size: int, seed: int, start_step: int = 0,
                  num_steps: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices (B, 3), similarities (B, 3)) for steps start_step, start_step + 1, ... (forever if num_steps None)."""
  step = start_step
  perm, perm_epoch = None, -1
  per_epoch = len(data) // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} is larger than the {len(data)} training triplets; lower batch_size.")
  while num_steps is None or step < start_step + num_steps:
    epoch, offset = divmod(step, per_epoch)
    if epoch != perm_epoch:  # Same rows as batch_rows(), without redrawing the permutation every step.
      perm, perm_epoch = epoch_permutation(len(data), seed, epoch), epoch
    rows = perm[offset * batch_size:(offset + 1) * batch_size]
    yield data.indices[rows], data.similarities[rows]
    step += 1


def eval_batches(data: Triplets, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every triplet once, in order, as fixed-size batches (one compiled shape) with a 0/1 mask for padding."""
  for start in range(0, len(data), batch_size):
    idx = data.indices[start:start + batch_size]
    sims = data.similarities[start:start + batch_size]
    pad = batch_size - len(idx)
    mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
    if pad:
      idx = np.concatenate([idx, np.repeat(idx[-1:], pad, axis=0)])
      sims = np.concatenate([sims, np.repeat(sims[-1:], pad, axis=0)])
    yield idx, sims, mask


def triplet_images(indices: np.ndarray, images: ImageSource,
                   preprocess: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """(B, 3) ids -> (B, 3, H, W, C) float32 preprocessed images (the student's own resize and value range)."""
  b = len(indices)
  x = np.asarray(preprocess(images.get(indices.reshape(-1))), dtype=np.float32)
  return x.reshape((b, 3) + x.shape[1:])


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
  """Produce the next `size` items on a background thread while the accelerator runs the current step."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(sentinel)
    except BaseException as e:  # Re-raised in the consumer, so a bad shard fails the run loudly.
      q.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is sentinel:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
