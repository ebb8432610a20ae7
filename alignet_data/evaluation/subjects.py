"""The models under evaluation: one `Subject` per model spec gives the vectors each analysis asks for.

A spec is an image model (anything `models.load_model` takes, "savedmodel:<dir>", or whatever loader the caller
passes: the evaluate stage adds "train:<artifact>"), or "embeddings:<embed artifact or (n, d) matrix file>",
optionally with an affine transform on top ({"model": spec, "transform": url}). A subject that cannot provide
some vectors (a bare matrix has no file names) raises `Unavailable`, so that part is skipped and said so.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, numeric_files
from alignet_data.checks import require_finite
from alignet_data.evaluation import levels

SAVEDMODEL_PREFIX = "savedmodel:"
EMBEDDINGS_PREFIX = "embeddings:"


class Unavailable(Exception):
  """A model cannot provide the vectors a metric needs (e.g. a .npy has no file names): the part is skipped."""


def split_spec(spec: str | dict[str, Any]) -> tuple[str, str | None]:
  """(model spec, transform URL or None) of a spec string or {"model", "transform"} dict."""
  if isinstance(spec, dict):
    if "model" not in spec:
      raise ValueError(f"Model spec {spec!r} needs a 'model' key (and optionally 'transform').")
    return spec["model"], spec.get("transform")
  return spec, None


def load_model(spec: str) -> Any:
  """A LoadedModel (or SavedModelEncoder) from an image-model spec string (see the module doc)."""
  if spec.startswith(SAVEDMODEL_PREFIX):
    from alignet_data.evaluation import savedmodel
    return savedmodel.load(spec[len(SAVEDMODEL_PREFIX):])
  from alignet_data import models
  return models.load_model(spec)


def embed_images(model: Any, images: np.ndarray, batch_size: int, bar: Any = None) -> np.ndarray:
  """uint8 images -> (n, dim) float32 representations; fixed-size batches so the model compiles once."""
  from alignet_data.models import batching
  return batching.embed_padded(model.embed_preprocessed, images, batch_size, prepare=model.preprocess,
                               dim=model.dim, progress=bar.update if bar is not None else None)


def embed_files(model: Any, urls: Sequence[str], batch_size: int, bar: Any = None) -> np.ndarray:
  """Image files of any size -> (n, dim): each is decoded and preprocessed on its own (the model's resize and
  value range), then embedded in fixed-size batches."""
  from alignet_data.models import batching
  from alignet_data.teacher import image_sources

  def prepare(chunk: Sequence[str]) -> np.ndarray:
    out = []
    for url in chunk:
      fs, path = artifacts.url_to_fs(url)
      with fs.open(path, "rb") as f:
        try:
          out.append(model.preprocess(image_sources.decode_image(f.read())))
        except ValueError as e:
          raise ValueError(f"{url}: {e}") from None
    return np.concatenate(out)
  return batching.embed_padded(model.embed_preprocessed, list(urls), batch_size, prepare=prepare, dim=model.dim,
                               progress=bar.update if bar is not None else None)


class Subject:
  """One model under evaluation: gives (transformed) vectors for THINGS concepts, world pool images, named
  images of an embeddings split, or a labelled split; caches what it computes."""

  def __init__(self, name: str, spec: str | dict[str, Any], world: Any, bar: Any, *, batch_size: int,
               things_split: str, images: str = "", load: Callable[[str], Any] = load_model):
    from alignet_data.teacher.transform import Transform
    self.name, self.spec, self.world, self.bar = name, spec, world, bar
    model, transform = split_spec(spec)
    self.transform = Transform.load(transform) if transform else None
    self.batch_size = int(batch_size)
    self.things_split = things_split
    self.images = images or ""
    self._cache: dict[Any, Any] = {}
    self.matrix = self.artifact = self.model = None
    if model.startswith(EMBEDDINGS_PREFIX):
      url = model[len(EMBEDDINGS_PREFIX):]
      if numeric_files.is_array_file(url):  # A bare matrix; finite, or NaN would score as a hit.
        self.matrix = numeric_files.read_matrix(url, npz_keys=("embeddings",), what="(n, d) embedding matrix")
        self.kind, self.dim = "npy", int(self.matrix.shape[1])
      else:
        from alignet_data.teacher import embeddings
        self.artifact = artifacts.load(url, stage="embed")
        info = embeddings.info(self.artifact)
        self.kind, self.dim = "embeddings", int(next(iter(info["splits"].values()))["dim"])
    else:
      self.model = load(model)
      self.kind, self.dim = "model", int(self.model.dim)

  def describe(self) -> dict[str, Any]:
    out = {"spec": self.spec, "kind": self.kind, "dim": self.dim}
    if self.model is not None:
      out["config"] = self.model.config.get("name")
    return out

  def _out(self, x: np.ndarray) -> np.ndarray:
    """Vectors as evaluated: with the transform, checked for overflow (inputs were checked where they entered)."""
    x = np.asarray(x, np.float32)
    if self.transform is None:
      return x
    return require_finite(self.transform.apply(x), f"{self.name}: vectors after its transform")

  def _split(self, split: str) -> Any:
    from alignet_data.teacher import embeddings
    if ("split", split) not in self._cache:
      try:
        self._cache[("split", split)] = embeddings.load(self.artifact, split)
      except KeyError as e:
        raise Unavailable(str(e).strip('"')) from None
    return self._cache[("split", split)]

  def _world_images(self, which: str) -> np.ndarray:
    if self.world is None:
      raise Unavailable(f"{self.name} is an image model: it needs the images (a demo world, or embed them with "
                        "`alignet embed` and evaluate the embeddings)")
    if which not in self._cache:
      images = self.world.things_images if which == "things" else self.world.pool_images
      self._cache[which] = require_finite(embed_images(self.model, images, self.batch_size, self.bar),
                                          f"{self.name}: the model's vectors of the world's {which} images")
    return self._cache[which]

  def things(self, n_objects: int | None = None, source: str = "the triplets") -> np.ndarray:
    """(n_objects, d) vectors of THINGS concepts 0..n-1 (the triplet files' indices; `source` names them)."""
    if self.kind == "npy":
      x = self.matrix
    elif self.kind == "embeddings":
      emb = self._split(self.things_split)
      n = n_objects if n_objects is not None else int(emb.ids.max()) + 1
      x = emb.take(np.arange(n))
    else:
      x = self._world_images("things")
    if n_objects is not None and len(x) < n_objects:
      raise ValueError(f"{self.name}: {len(x)} THINGS vectors, but {source} index {n_objects} objects "
                       f"(0..{n_objects - 1}).")
    return self._out(x)

  def pool(self) -> np.ndarray:
    """(N, d) vectors of every demo-world pool image (by pool index)."""
    if self.kind == "npy":
      raise Unavailable(f"{self.name} is a bare .npy matrix (no pool split)")
    if self.kind == "embeddings":
      emb = self._split("pool")
      return self._out(emb.take(np.arange(len(self.world.pool_images))))
    return self._out(self._world_images("pool"))

  def by_name(self, split: str, names: Sequence[str]) -> np.ndarray:
    """Vectors of images named by file (base name, no extension) in an embeddings split; a .npy by row number."""
    names = [str(n) for n in names]
    if self.kind == "npy":
      if all(n.strip().isdigit() for n in names):
        return self._out(self.matrix[np.array([int(n) for n in names])])
      raise Unavailable(f"{self.name} is a bare .npy matrix: it can only match stimuli given as row numbers")
    if self.kind == "model":
      return self._out(self._image_files(names))
    emb = self._split(split)
    if ("keys", split) not in self._cache:
      self._cache[("keys", split)] = {levels.image_key(f): i for i, f in enumerate(emb.file_names)}
    index = self._cache[("keys", split)]
    rows = [index.get(levels.image_key(n), -1) for n in names]
    missing = [n for n, r in zip(names, rows, strict=True) if r < 0]
    if missing:
      raise Unavailable(f"{len(missing)} of {len(names)} images are not in split {split!r} of {self.name} "
                        f"(e.g. {missing[:3]})")
    return self._out(emb.vectors[np.array(rows)])

  def _image_files(self, names: Sequence[str]) -> np.ndarray:
    if not self.images:
      raise Unavailable(f"{self.name} is an image model: give the folder of the images (--images), or embed them "
                        "with `alignet embed` and evaluate the embeddings artifact")
    key_of = levels.image_key
    if "files" not in self._cache:
      fs, root = artifacts.url_to_fs(self.images)
      if not fs.isdir(root):
        raise FileNotFoundError(f"Image folder not found: {self.images}")
      protocol = self.images.split("://", 1)[0] + "://" if "://" in self.images else ""
      self._cache["files"] = {key_of(p): protocol + p for p in sorted(fs.find(root))}
    files = self._cache["files"]
    missing = [n for n in names if key_of(n) not in files]
    if missing:
      raise Unavailable(f"{len(missing)} of {len(names)} images are not in {self.images} (e.g. {missing[:3]})")
    key = ("named", tuple(names))
    if key not in self._cache:
      self._cache[key] = require_finite(embed_files(self.model, [files[key_of(n)] for n in names], self.batch_size,
                                                    self.bar), f"{self.name}: the model's vectors of {self.images}")
    return self._cache[key]

  def labelled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) for probing: a labelled embeddings split, else the world pool's basic categories."""
    if split:
      if self.kind != "embeddings":
        raise Unavailable(f"{self.name} has no embeddings split {split!r} to probe")
      emb = self._split(split)
      return self._out(emb.vectors), emb.labels
    if self.world is None:
      raise Unavailable("no labelled data: give a demo world or probe.split of an embeddings artifact")
    return self.pool(), np.asarray(self.world.pool_labels)
