"""Per-model image preprocessing conventions (numpy in, numpy out).

Getting these right matters: a SigLIP port fed [0, 1] values or centre crops lands at chance on Levels
(google-deepmind/alignet issue #10).
- "siglip": bilinear resize straight to image_size (no crop, aspect ratio not kept), values in [-1, 1]
  (big_vision `resize(size)|value_range(-1, 1)`).
- "student": cubic resize to image_size, values in [0, 1]: what the released student trainer feeds students
  (google-deepmind/alignet `preprocessing.ResizeImage`: `cv2.resize(uint8, INTER_CUBIC)`, then /255).
  `resize_uint8_opencv_cubic` replays OpenCV's arithmetic, so students see the pixels they were trained on:
  bit for bit with OpenCV's C++ path, within 1 level of opencv-python's default (IPP) path
  (tests/models/test_resize_parity.py checks both on real photos).
The bilinear resize follows tf.image.resize's defaults (half-pixel centres, no antialiasing), as big_vision's
`resize` op does; when the input already has the target size the pixels are passed through untouched.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

CONVENTIONS = {
    # name: (resize method, value range)
    "siglip": ("bilinear", (-1.0, 1.0)),
    "student": ("opencv_cubic", (0.0, 1.0)),
}

# OpenCV's INTER_CUBIC: Keys kernel with a = -0.75 (not tf/jax's -0.5), borders replicated; for uint8 images
# its coefficients are rounded to multiples of 1/2048 (INTER_RESIZE_COEF_BITS = 11).
_CV_CUBIC_A = -0.75
_CV_COEF_BITS = 11


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


@functools.lru_cache(maxsize=4096)
def opencv_cubic_taps(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
  """OpenCV's INTER_CUBIC taps along one axis: (output_size, 4) source indices (borders replicated) and
  (output_size, 4) int32 coefficients scaled by 2048, computed in float32 as OpenCV's `interpolateCubic` does.

  Four taps per output pixel (OpenCV does not antialias), cached per size pair like `weight_matrix`.
  """
  scale = input_size / output_size
  fx = ((np.arange(output_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
  sx = np.floor(fx)
  t = fx - sx
  a, one = np.float32(_CV_CUBIC_A), np.float32(1)
  c0 = ((a * (t + one) - 5 * a) * (t + one) + 8 * a) * (t + one) - 4 * a
  c1 = ((a + 2) * t - (a + 3)) * t * t + one
  c2 = ((a + 2) * (one - t) - (a + 3)) * (one - t) * (one - t) + one
  c3 = one - c0 - c1 - c2
  coef = np.rint(np.stack([c0, c1, c2, c3], axis=1) * np.float32(1 << _CV_COEF_BITS)).astype(np.int32)
  index = np.clip(sx.astype(np.int64)[:, None] + np.arange(-1, 3), 0, input_size - 1)
  index.setflags(write=False)
  coef.setflags(write=False)
  return index, coef


def resize_uint8_opencv_cubic(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (B, H, W, C) -> uint8 (B, size, size, C), as `cv2.resize(image, (size, size), cv2.INTER_CUBIC)`.

  Replays OpenCV's own arithmetic: an exact integer horizontal pass with the 2048-scaled taps, then the
  vertical pass in float32 as its SIMD kernel (`VResizeCubicVec_32s8u`: products with coefficient / 2^22 summed
  from the last tap, rounded half to even, saturated). That is bit-exact with OpenCV's C++ path; opencv-python
  wheels route large images through Intel IPP instead, which differs from it by at most 1 level on a few % of
  pixels. Identity when the image already has the size (OpenCV copies it too).
  """
  _, h, w, _ = images.shape
  if h == size and w == size:
    return images
  index, coef = opencv_cubic_taps(w, size)
  x = np.einsum("bhokc,ok->bhoc", np.asarray(images, np.int32)[:, :, index], coef)
  index, coef = opencv_cubic_taps(h, size)
  rows = x[:, index].astype(np.float32)  # (B, size, 4, size, C): exact (|x| < 2^24).
  beta = coef.astype(np.float32) * np.float32(2.0 ** (-2 * _CV_COEF_BITS))
  acc = rows[:, :, 3] * beta[None, :, 3, None, None]
  for k in (2, 1, 0):
    acc = rows[:, :, k] * beta[None, :, k, None, None] + acc
  return np.clip(np.rint(acc), 0, 255).astype(np.uint8)


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
  images = _check_images(images)
  if method == "opencv_cubic":  # Rounded to uint8 before scaling, as the released trainer's pipeline.
    x = resize_uint8_opencv_cubic(images, image_size).astype(np.float32) / 255.0
  else:
    x = np.clip(resize(images.astype(np.float32) / 255.0, image_size, method), 0.0, 1.0)
  return (x * (hi - lo) + lo).astype(np.float32)


def make_preprocess(image_size: int, convention: str) -> Callable[[np.ndarray], np.ndarray]:
  """A one-argument preprocess function bound to a model's size and convention (a picklable partial)."""
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown preprocessing convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
  return functools.partial(preprocess, image_size=image_size, convention=convention)
