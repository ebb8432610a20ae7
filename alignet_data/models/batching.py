"""Embedding many images in fixed-size batches: the one place that pads the last batch.

A jitted model compiles once per input shape, so every call gets exactly `batch_size` rows: the last batch is
filled up by repeating its last row (a real input, never out of the model's range) and the extra outputs are
dropped. Rows of a ViT are independent, so a row's vector does not depend on the rows that share its batch: the
output is the same for any batch size and any way of cutting the rows into blocks (the embed stage's
runner-independence rests on this).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def embed_padded(embed: Callable[[np.ndarray], Any], items: np.ndarray | Sequence[Any], batch_size: int, *,
                 prepare: Callable[[Any], np.ndarray] | None = None, dim: int = 0,
                 progress: Callable[[int], Any] | None = None) -> np.ndarray:
  """`embed(batch)` over `items` in batches of exactly `batch_size` rows; (n, dim) vectors in item order.

  Args:
    embed: model input (batch_size, ...) -> (batch_size, dim) vectors (numpy or JAX).
    items: model inputs, or anything `prepare` turns into them a slice at a time (uint8 images, file URLs).
    batch_size: rows per call.
    prepare: slice of `items` -> model input rows (e.g. the model's preprocessing); applied before padding.
    dim: the vector size, for the (0, dim) result of no items.
    progress: called with the number of real rows after each batch (e.g. a tqdm bar's `update`).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  outs = []
  for start in range(0, len(items), batch_size):
    x = items[start:start + batch_size]
    x = prepare(x) if prepare is not None else np.asarray(x)
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    outs.append(np.asarray(embed(x))[:n])
    if progress is not None:
      progress(n)
  return np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)
