"""Throughput accounting: FLOPs of a compiled step (XLA cost analysis) and model FLOPs
utilisation (MFU) against the device's peak.

MFU = (FLOPs per step per device) / (seconds per step) / (peak FLOP/s per device). The FLOPs are
XLA's count for the per-device partitioned program of the actual train step (forward, backward,
optimizer, prototype machinery), not an analytic model count. Peaks are dense bf16 (tensor-core /
MXU) numbers from vendor data sheets; devices not in the table get no MFU.
"""

from __future__ import annotations

from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (chip), matched as a substring of `device.device_kind`,
# most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM.
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 (no bf16 on V100).
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e.
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),  # Trillium (v6e).
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None if unknown (e.g. CPU)."""
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled (per-device) XLA program, or None if XLA gives none."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def mfu(flops_per_step: float | None, seconds_per_step: float,
        device: jax.Device | None = None) -> float | None:
  """Model FLOPs utilisation of one device, or None (unknown peak or FLOPs)."""
  device = device or jax.local_devices()[0]
  peak = peak_flops(device.device_kind)
  if peak is None or flops_per_step is None or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / peak
