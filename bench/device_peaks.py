"""Dense peak FLOP/s per device, looked up from JAX's `device_kind`: the denominator of model FLOP utilisation.

Vendor figures without sparsity, per JAX device (a TPU v4+ chip, one GPU). Matched in order by a lowercase
substring of the device kind, so "NVIDIA H100 PCIe" is found before "H100". `--peak-tflops` on the benchmarks
overrides the table (a device not listed, or another clock).
"""
from __future__ import annotations

# (substring of device_kind, {dtype: peak TFLOP/s}); bfloat16/float16 on tensor cores / the MXU, float32 without TF32.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("h100 pcie", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("h100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("h200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("a100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("l40s", {"bfloat16": 362.1, "float16": 362.1, "float32": 91.6}),
    ("l4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("v100", {"float16": 125.0, "float32": 15.7}),
    ("tpu v6 lite", {"bfloat16": 918.0}),
    ("tpu v5p", {"bfloat16": 459.0}),
    ("tpu v5 lite", {"bfloat16": 197.0}),
    ("tpu v5", {"bfloat16": 459.0}),
    ("tpu v4", {"bfloat16": 275.0}),
]


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak in TFLOP/s for `dtype` ("bfloat16", "float16", "float32"), or None if unknown (a CPU,
  or a device not in the table)."""
  kind = device_kind.lower()
  for key, peaks in PEAKS:
    if key in kind:
      return peaks.get(dtype)
  return None
