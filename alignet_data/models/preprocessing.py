"""Per-model image preprocessing conventions (numpy in, numpy out).

Getting these right matters: a SigLIP port fed [0, 1] values or centre crops lands at chance on Levels
(google-deepmind/alignet issue #10).
- "siglip": bilinear resize straight to image_size (no crop, aspect ratio not kept), values in [-1, 1]
  (big_vision `resize(size)|value_range(-1, 1)`).
- "student": cubic resize to image_size, values in [0, 1] (what the released student trainer feeds students).
Resizing follows tf.image.resize's defaults (half-pixel centres, no antialiasing), as big_vision's `resize` op
does; when the input already has the target size the pixels are passed through untouched.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

CONVENTIONS = {
    # name: (resize method, value range)
    "siglip": ("bilinear", (-1.0, 1.0)),
    "student": ("cubic", (0.0, 1.0)),
}


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 RGB in [0, 255], got dtype {images.dtype}; decode images first")
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3) or (H, W, 3) uint8 RGB, got shape {images.shape}")
  return images


@functools.lru_cache(maxsize=4096)
def weight_matrix(input_size: int, output_size: int, method: str) -> np.ndarray:
  """(output_size, input_size) float32 resampling weights: the same math as `jax.image.resize(..., antialias=False)`
  (half-pixel centres; triangle or Keys-cubic a=-0.5 kernel; weights normalised; samples off the image zeroed).

  Plain numpy, cached per size pair: decoded photos come in thousands of sizes, and an XLA resize would compile
  once per size on every worker.
  """
  if method not in ("bilinear", "linear", "cubic", "bicubic"):
    raise ValueError(f"Unsupported resize method {method!r}; expected 'bilinear' or 'cubic'")
  inv_scale = input_size / output_size
  sample = (np.arange(output_size, dtype=np.float64) + 0.5) * inv_scale - 0.5
  x = np.abs(sample[None, :] - np.arange(input_size, dtype=np.float64)[:, None])
  if method in ("bilinear", "linear"):
    w = np.maximum(0.0, 1.0 - x)
  else:
    w = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, ((1.5 * x - 2.5) * x) * x + 1.0)
    w = np.where(x >= 2.0, 0.0, w)
  total = w.sum(axis=0, keepdims=True)
  w = np.where(np.abs(total) > 1000.0 * float(np.finfo(np.float32).eps), w / np.where(total != 0, total, 1), 0.0)
  w = np.where(((sample >= -0.5) & (sample <= input_size - 0.5))[None, :], w, 0.0)
  w = np.ascontiguousarray(w.T.astype(np.float32))
  w.setflags(write=False)
  return w


def resize(images: np.ndarray, size: int, method: str) -> np.ndarray:
  """(B, H, W, C) float32 -> (B, size, size, C); identity when already that size (as tf.image.resize and
  big_vision's `resize` op: no crop, aspect ratio not kept, no antialiasing)."""
  b, h, w, c = images.shape
  out = np.asarray(images, np.float32)
  if h != size:
    out = np.einsum("oh,bhwc->bowc", weight_matrix(h, size, method), out, optimize=True)
  if w != size:
    out = np.einsum("ow,bhwc->bhoc", weight_matrix(w, size, method), out, optimize=True)
  return np.ascontiguousarray(out, np.float32)


def preprocess(images: np.ndarray, image_size: int, convention: str) -> np.ndarray:
  """uint8 (B, H, W, 3) or (H, W, 3) -> float32 (B, image_size, image_size, 3) in the convention's range."""
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown preprocessing convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
  method, (lo, hi) = CONVENTIONS[convention]
  x = _check_images(images).astype(np.float32) / 255.0
  x = resize(x, image_size, method)
  # Cubic resampling overshoots; clip so the model never sees values outside its training range.
  x = np.clip(x, 0.0, 1.0)
  return (x * (hi - lo) + lo).astype(np.float32)


def make_preprocess(image_size: int, convention: str) -> Callable[[np.ndarray], np.ndarray]:
  """A one-argument preprocess function bound to a model's size and convention (a picklable partial)."""
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown preprocessing convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
  return functools.partial(preprocess, image_size=image_size, convention=convention)
