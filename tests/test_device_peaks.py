"""The benchmarks' MFU denominator: a device's dense peak, found from JAX's device kind for the dtype."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "bench"))

import device_peaks  # noqa: E402


def test_peaks_come_from_the_device_kind_and_the_dtype():
  assert device_peaks.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
  assert device_peaks.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0  # Not the SXM part's figure.
  assert device_peaks.peak_tflops("NVIDIA L40S", "bfloat16") == 362.1  # Not the L4's.
  assert device_peaks.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
  assert device_peaks.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert device_peaks.peak_tflops("TPU v4", "float32") is None  # No figure rather than a wrong one.
  assert device_peaks.peak_tflops("cpu", "float32") is None
