"""The affine transform of teacher embeddings into the human similarity space.

Stored as ``transform.npz`` with ``weights`` (p, p'), ``bias`` (p',), ``mean`` and ``std`` (scalars): the layout
gLocal releases, so released gLocal transforms load here and ours load in their tools. gLocal transforms fitted
without a bias term have no ``bias`` array: they load with a zero bias. It is applied as
``x' = ((x - mean) / std) @ weights + bias``: features are z-scored with ONE scalar mean and std computed over
the whole THINGS feature matrix (as gLocal does), never per dimension.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from alignet_data import artifacts, numeric_files
from alignet_data.checks import InputError, require_finite

if TYPE_CHECKING:
  from alignet_data.teacher.embeddings import Embeddings

FILE_NAME = "transform.npz"


@dataclasses.dataclass(frozen=True)
class Transform:
  weights: np.ndarray
  bias: np.ndarray
  mean: float = 0.0
  std: float = 1.0

  def __post_init__(self):
    if self.weights.ndim != 2 or self.bias.shape != (self.weights.shape[1],):
      raise ValueError(f"Transform shapes do not fit: weights {self.weights.shape}, bias {self.bias.shape}.")
    if not np.isfinite(self.std) or self.std <= 0:
      raise ValueError(f"Transform std must be a positive number, got {self.std}.")

  @property
  def in_dim(self) -> int:
    return self.weights.shape[0]

  @classmethod
  def identity(cls, dim: int) -> Transform:
    return cls(np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32))

  def apply(self, x: np.ndarray) -> np.ndarray:
    """Transform (..., p) features; float32 out."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != self.in_dim:
      raise ValueError(f"Features have dimension {x.shape[-1]}, the transform expects {self.in_dim}.")
    w = self.weights.astype(np.float32)
    return ((x - np.float32(self.mean)) / np.float32(self.std)) @ w + self.bias.astype(np.float32)

  def arrays(self) -> dict[str, np.ndarray]:
    return {"weights": np.asarray(self.weights, np.float32), "bias": np.asarray(self.bias, np.float32),
            "mean": np.asarray(self.mean, np.float32), "std": np.asarray(self.std, np.float32)}

  def save(self, writer: artifacts.ArtifactWriter, name: str = FILE_NAME) -> None:
    writer.write_npz(name, **self.arrays())

  @classmethod
  def from_arrays(cls, data: dict[str, np.ndarray], source: str = "transform") -> Transform:
    """From gLocal's arrays; `source` names the file in errors. NaN/inf is refused here, where a transform enters
    a stage: it would otherwise turn every embedding into NaN, which k-means and the label checks choke on."""
    if "weights" not in data:
      raise InputError(f"{source}: a transform file needs arrays 'weights' and 'bias' (a missing 'bias' is zero, as "
                       f"in gLocal's transforms fitted without one); it has {sorted(data)}.")
    arrays = {k: np.asarray(data[k]) for k in ("weights", "bias", "mean", "std") if k in data}
    for name, value in arrays.items():
      if value.dtype.kind not in "iuf":
        raise InputError(f"{source}: transform array {name!r} is not numeric (dtype {value.dtype}).")
      if name in ("mean", "std") and value.size != 1:
        raise InputError(f"{source}: transform {name!r} must be one number (gLocal's layout), got shape "
                         f"{value.shape}.")
      require_finite(value, f"{source}: transform array {name!r}")
    try:
      scalar = lambda k, default: float(arrays[k].reshape(-1)[0]) if k in arrays else default
      weights = arrays["weights"]
      bias = arrays["bias"].reshape(-1) if "bias" in arrays else np.zeros(weights.shape[-1:] or (0,), np.float32)
      return cls(weights, bias, scalar("mean", 0.0), scalar("std", 1.0))
    except ValueError as e:
      raise InputError(f"{source}: {e}") from None

  @classmethod
  def load(cls, source: str | artifacts.Artifact) -> Transform:
    """From an align artifact (its ``transform.npz``) or a path/URL of an ``.npz`` file."""
    what = "transform .npz (weights, bias, mean, std)"
    art = source if isinstance(source, artifacts.Artifact) else (
        artifacts.try_load(source) if not source.endswith(".npz") else None)
    if art is not None:
      with art.open(FILE_NAME) as f:
        return cls.from_arrays(numeric_files.load_npz(f, art.path(FILE_NAME), what=what), art.path(FILE_NAME))
    return cls.from_arrays(numeric_files.load_npz(source, what=what), source)


def apply_to_embeddings(embeddings_source: str | artifacts.Artifact, split: str,
                        transform: Transform | str | artifacts.Artifact | None) -> Embeddings:
  """One split of an embed artifact with its vectors mapped by a transform (None: unchanged), as an
  `embeddings.Embeddings` (same ids, labels and file names). What `cluster` and `triplets` label with.

  Args:
    embeddings_source: embed artifact (or its URL).
    split: the split to read (e.g. "pool").
    transform: a Transform, an align artifact / its URL, or a transform .npz URL (gLocal's files load too).
  """
  from alignet_data.teacher import embeddings  # pyarrow: only for callers that read embeddings.

  emb = embeddings.load(embeddings_source, split)
  if transform is None:
    return emb
  t = transform if isinstance(transform, Transform) else Transform.load(transform)
  return dataclasses.replace(emb, vectors=t.apply(emb.vectors))
