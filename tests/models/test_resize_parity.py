"""The student's resize equals the released trainer's: `cv2.resize(uint8, (224, 224), cv2.INTER_CUBIC) / 255`.

OpenCV's C++ path is matched bit for bit; opencv-python wheels send large images through Intel IPP, which rounds
differently: there the bound is one intensity level (1/255), the issue's tolerance. Real photos: matplotlib's
sample photo (a dependency, always present) and any photos under ../shared/data.
"""
import pathlib

import numpy as np
import pytest

from alignet_data import models
from alignet_data.models import preprocessing

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the `test` extra) is needed for the parity check")
SIZE = 224


def _photo(path: pathlib.Path) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _opencv(image: np.ndarray, ipp: bool) -> np.ndarray:
  before = cv2.ipp.useIPP()
  cv2.ipp.setUseIPP(ipp)
  try:
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
  finally:
    cv2.ipp.setUseIPP(before)


def _check(images: dict[str, np.ndarray]) -> None:
  student = preprocessing.make_preprocess(SIZE, models.get_config("siglip-b/16")["preprocessing"])
  for name, image in images.items():
    ours = student(image)[0]
    assert ours.dtype == np.float32 and ours.shape == (SIZE, SIZE, 3)
    levels = np.rint(ours * 255).astype(int)
    np.testing.assert_allclose(ours, levels / 255.0, atol=1e-7, err_msg=name)  # uint8 before /255, as OpenCV's.
    np.testing.assert_array_equal(levels, _opencv(image, ipp=False), err_msg=name)
    with_ipp = _opencv(image, ipp=True).astype(int)  # What `cv2.resize` gives by default.
    assert np.abs(levels - with_ipp).max() <= 1, name
    assert np.mean(levels != with_ipp) < 0.1, name


def test_student_resize_matches_opencv_cubic_on_a_real_photo():
  import matplotlib.cbook
  photo = _photo(pathlib.Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
  assert photo.shape == (600, 512, 3)
  _check({"grace_hopper": photo, "face crop (upsampled)": photo[60:190, 170:290],
          "wide crop": photo[300:420, :], "odd crop": np.ascontiguousarray(photo[7:340, 11:268])})


def test_student_resize_matches_opencv_cubic_on_noise():
  """Noise is the worst case for rounding (every pixel an edge); odd sizes exercise the borders."""
  rng = np.random.default_rng(0)
  _check({f"{h}x{w}": rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(300, 257), (97, 1001), (5, 3)]})


def test_student_resize_matches_opencv_cubic_on_shared_photos(shared_data):
  paths = sorted(p for p in shared_data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:24]
  if not paths:
    pytest.skip(f"no photos under {shared_data} (SOURCES.md: THINGS and Levels images are not shipped there)")
  _check({str(p.relative_to(shared_data)): _photo(p) for p in paths})
