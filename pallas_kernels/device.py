"""Which GPU the kernels run on: the Mosaic GPU kernels use Hopper's wgmma and TMA."""

from __future__ import annotations

import jax


def hopper_gpu() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.0: H100, H200)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"
