"""transform.npz files: gLocal's layout, with or without a `bias` array."""
import numpy as np
import pytest

from alignet_data.checks import InputError
from alignet_data.teacher.transform import Transform


def test_a_glocal_transform_without_bias_loads_with_a_zero_bias(tmp_path):
  w = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  np.savez(tmp_path / "transform.npz", weights=w, mean=np.float32(0.5), std=np.float32(2.0))
  t = Transform.load(str(tmp_path / "transform.npz"))
  np.testing.assert_array_equal(t.bias, np.zeros(3, np.float32))
  assert (t.mean, t.std) == (0.5, 2.0)
  x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_allclose(t.apply(x), ((x - 0.5) / 2.0) @ w, rtol=1e-6)


def test_a_wrong_shaped_bias_or_no_weights_is_still_an_error(tmp_path):
  w = np.ones((5, 3), np.float32)
  np.savez(tmp_path / "t.npz", weights=w, bias=np.zeros(4, np.float32), mean=np.float32(0), std=np.float32(1))
  with pytest.raises(InputError, match=r"t\.npz: Transform shapes do not fit: weights \(5, 3\), bias \(4,\)"):
    Transform.load(str(tmp_path / "t.npz"))
  np.savez(tmp_path / "t.npz", bias=np.zeros(3, np.float32))
  with pytest.raises(InputError, match=r"t\.npz: a transform file needs arrays 'weights' and 'bias'.*has \['bias'\]"):
    Transform.load(str(tmp_path / "t.npz"))
  with pytest.raises(InputError, match="Transform shapes do not fit"):
    Transform.from_arrays({"weights": np.float32(1.0)}, "scalar.npz")
