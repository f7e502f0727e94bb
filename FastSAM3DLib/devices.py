"""Where a computation can run: Apple's MPS device has no float64, so float64 work on MPS tensors goes to the CPU."""
from __future__ import annotations

import torch


def float64_device(device: torch.device) -> torch.device:
    """``device`` where it computes in float64 (the CPU, CUDA); the CPU for the others (MPS has no float64)."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")
