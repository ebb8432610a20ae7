"""The embed stage's Beam-free parts: embedding a block of images with a compiled model, cutting embedded blocks
into shard pieces, writing a shard and the dead-letter file, and counting the rows written.

pipelines/embed_pipeline.py wires these into Beam. Every model call gets exactly batch_size rows
(`models.batching.embed_padded`), so a vector does not depend on how the images were cut into blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from alignet_data import artifacts
from alignet_data.models import batching
from alignet_data.teacher import embeddings, image_sources


@dataclasses.dataclass
class EmbeddedBlock:
  split: str
  ids: np.ndarray         # (n,) int64
  labels: np.ndarray      # (n,) int64
  file_names: np.ndarray  # (n,) str
  vectors: np.ndarray     # (n, dim) float32


def compile_embed(model: Any, compute_dtype: str = "auto") -> tuple[Callable, Any]:
  """(jitted fn(params, x) -> float32 vectors, params to call it with). bfloat16 casts the parameters once and
  each batch on the way in (the accelerator's fast path; accumulations stay as XLA does them); "auto" picks it
  where the default JAX backend is not the CPU."""
  import jax
  import jax.numpy as jnp
  if compute_dtype == "auto":
    compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if compute_dtype == "float32":
    return jax.jit(model.embed_fn), model.params
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), model.params)

  def fn(p: Any, x: Any) -> Any:
    return model.embed_fn(p, jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)
  return jax.jit(fn), params


@dataclasses.dataclass
class CompiledModel:
  """A model (`preprocess`, `embed_fn`, `params`) with its embed function compiled: made once per worker process."""
  model: Any
  fn: Callable
  params: Any

  @classmethod
  def compile(cls, model: Any, compute_dtype: str = "auto") -> CompiledModel:
    return cls(model, *compile_embed(model, compute_dtype))


def preprocess_block(model: Any, images: Any) -> np.ndarray:
  """uint8 images (stacked, or a list of different sizes) -> the model's float32 (n, s, s, 3) input."""
  if isinstance(images, np.ndarray):
    return model.preprocess(images)
  return np.concatenate([model.preprocess(im[None]) for im in images])


def embed_block(compiled: CompiledModel, block: image_sources.ImageBlock, batch_size: int) -> EmbeddedBlock:
  """A block's vectors, in calls of exactly batch_size rows (one compiled shape)."""
  x = preprocess_block(compiled.model, block.images)
  vectors = batching.embed_padded(functools.partial(compiled.fn, compiled.params), x, batch_size)
  vectors = vectors.astype(np.float32, copy=False)
  return EmbeddedBlock(block.split, block.ids, block.labels, block.file_names, vectors)


def split_by_shard(block: EmbeddedBlock, ids_per_shard: int) -> Iterable[tuple[tuple[str, int], EmbeddedBlock]]:
  shard = embeddings.shard_of(block.ids, ids_per_shard)
  for s in np.unique(shard):
    sel = shard == s
    yield (block.split, int(s)), EmbeddedBlock(block.split, block.ids[sel], block.labels[sel],
                                               block.file_names[sel], block.vectors[sel])


def write_shard(keyed: tuple[tuple[str, int], Iterable[EmbeddedBlock]], shard_dir: str, num_shards: dict[str, int],
                dtype: str) -> tuple[str, int, int, int]:
  """Write one shard from its pieces; -> (split, shard, rows, vector size)."""
  (split, shard), pieces = keyed
  pieces = list(pieces)
  dim = int(pieces[0].vectors.shape[1])
  rows = _write_shard(shard_dir, split, shard, num_shards[split], np.concatenate([p.ids for p in pieces]),
                      np.concatenate([p.labels for p in pieces]), np.concatenate([p.file_names for p in pieces]),
                      np.concatenate([p.vectors for p in pieces]), dim, dtype)
  return split, shard, rows, dim


def _write_shard(shard_dir: str, split: str, shard: int, count: int, ids: np.ndarray, labels: np.ndarray,
                 names: np.ndarray, vectors: np.ndarray, dim: int, dtype: str) -> int:
  name = embeddings.shard_name(split, shard, count).split("/", 1)[1]
  return embeddings.write_shard(artifacts.join(shard_dir, name), ids, labels, names, vectors, dim, dtype)


# Kinds of the elements the embed graph's last step gathers (`finish`), and of what a read task yields.
BLOCK, FAILED, SHARD, START = "block", "failed", "shard", "start"


def finish(gathered: tuple[Any, Iterable[tuple[str, Any]]], shard_dir: str, dead_letter_url: str,
           num_shards: dict[str, int], dtype: str) -> tuple[int, int]:
  """The graph's last step, over every (SHARD, write_shard's result) and (FAILED, DecodeFailure) (and the START
  marker that makes it run when there are neither): write the dead-letter file, and each shard no image went to,
  empty at the others' vector size. With no image decoded at all there is no size: no shard is written (the
  stage's finish then fails naming the dead letters). One step after all others, rather than side inputs, so that
  every runner computes it once and all else with it. -> (failures, empty shards written)."""
  _, items = gathered
  items = list(items)
  written = {(v[0], v[1]): v[3] for kind, v in items if kind == SHARD}  # (split, shard) -> vector size
  failures = write_dead_letter([v for kind, v in items if kind == FAILED], dead_letter_url)
  dim = max(written.values(), default=0)
  empty = [(split, i) for split in sorted(num_shards) for i in range(num_shards[split]) if (split, i) not in written]
  if dim == 0:
    return failures, 0
  for split, shard in empty:
    _write_shard(shard_dir, split, shard, num_shards[split], np.zeros(0, np.int64), np.zeros(0, np.int64),
                 np.zeros(0, str), np.zeros((0, dim), np.float32), dim, dtype)
  return failures, len(empty)


def write_dead_letter(failures: list[image_sources.DecodeFailure], url: str) -> int:
  """Decode failures as JSON lines sorted by (split, id), so the file's bytes do not depend on the runner."""
  fs, path = artifacts.url_to_fs(url)
  lines = [json.dumps(f.to_json(), sort_keys=True) + "\n" for f in sorted(failures, key=lambda f: (f.split, f.id))]
  with fs.open(path, "wb") as f:
    f.write("".join(lines).encode())
  return len(lines)


def written_rows(writer: artifacts.ArtifactWriter, split: str, num_shards: int) -> tuple[int, int]:
  """(rows, vector size) of a split's shards as written, from their Parquet metadata (the authority on any runner);
  shards not written (no image of any split decoded) count 0 rows."""
  rows, dim = 0, 0
  for i in range(num_shards):
    name = embeddings.shard_name(split, i, num_shards)
    if not writer.fs.exists(writer.local_path(name)):
      continue
    with writer.open(name, "rb") as f:
      meta = pq.ParquetFile(f).metadata
      rows += meta.num_rows
      dim = embeddings.vector_dim(meta.schema.to_arrow_schema().field("embedding"))
  return rows, dim
