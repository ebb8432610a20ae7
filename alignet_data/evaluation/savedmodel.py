"""Released AligNet models in TensorFlow SavedModel form, as image encoders for evaluation.

The released signature: `serving_default`, input `images` float32 [B, 224, 224, 3] with values in [0, 1],
output `pre_logits` [B, d] (the representation the paper evaluates). Images are prepared the way the released
student trainer feeds students: cubic resize straight to 224 (no crop) and values in [0, 1]
(`preprocessing`'s "student" convention). TensorFlow is imported only when a SavedModel is loaded.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from alignet_data.models import batching, preprocessing

SIGNATURE = "serving_default"
INPUT = "images"
OUTPUT = "pre_logits"
IMAGE_SIZE = 224


class SavedModelEncoder:
  """A SavedModel with the released signature; `embed(uint8 images)` -> (B, dim) float32 pre-logits."""

  def __init__(self, path: str, image_size: int = IMAGE_SIZE):
    import tensorflow as tf

    try:
      loaded = tf.saved_model.load(path)
    except (OSError, ValueError) as e:
      raise OSError(f"Cannot load a TF SavedModel from {path}: {e}") from e
    if SIGNATURE not in loaded.signatures:
      raise ValueError(f"SavedModel {path} has no {SIGNATURE!r} signature (it has {sorted(loaded.signatures)}); "
                       "released AligNet models are exported with serving_default.")
    fn = loaded.signatures[SIGNATURE]
    inputs = fn.structured_input_signature[1]
    if INPUT not in inputs:
      raise ValueError(f"SavedModel {path}: {SIGNATURE} takes {sorted(inputs)}, expected an input {INPUT!r} "
                       f"(float32 [B, {image_size}, {image_size}, 3] in [0, 1]).")
    spec = inputs[INPUT]
    if spec.dtype != tf.float32 or list(spec.shape)[1:] not in ([image_size, image_size, 3], [None, None, 3]):
      raise ValueError(f"SavedModel {path}: input {INPUT!r} is {spec.dtype.name}{list(spec.shape)}, expected "
                       f"float32[B, {image_size}, {image_size}, 3].")
    if OUTPUT not in fn.structured_outputs:
      raise ValueError(f"SavedModel {path}: {SIGNATURE} returns {sorted(fn.structured_outputs)}, expected "
                       f"{OUTPUT!r}.")
    self._tf, self._loaded, self._fn = tf, loaded, fn
    self.path = path
    self.image_size = image_size
    self.dim = int(fn.structured_outputs[OUTPUT].shape[-1])
    self.config: dict[str, Any] = {"name": "savedmodel", "path": path, "signature": SIGNATURE,
                                   "output": OUTPUT, "image_size": image_size}

  def preprocess(self, images_uint8: np.ndarray) -> np.ndarray:
    return preprocessing.preprocess(images_uint8, self.image_size, "student")

  def embed_preprocessed(self, x: np.ndarray) -> np.ndarray:
    out = self._fn(**{INPUT: self._tf.constant(np.asarray(x, np.float32))})[OUTPUT]
    return np.asarray(out.numpy(), np.float32).reshape(len(x), -1)

  def embed(self, images_uint8: np.ndarray, batch_size: int = 64,
            progress: Callable[[int], Any] | None = None) -> np.ndarray:
    return batching.embed_padded(self.embed_preprocessed, images_uint8, min(batch_size, max(len(images_uint8), 1)),
                                 prepare=self.preprocess, dim=self.dim, progress=progress)


def load(path: str) -> SavedModelEncoder:
  return SavedModelEncoder(path)
