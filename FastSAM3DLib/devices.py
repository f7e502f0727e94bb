"""Where a step can run: Apple's MPS device lacks some of what this library uses, so those steps run on the CPU.

MPS has no float64 (PyTorch's ``aten/src/ATen/mps/EmptyTensor.cpp``), and no ``max_pool3d`` or ``avg_pool3d``
kernel before torch 2.9 (``native_functions.yaml`` of 2.4-2.8 lists CPU and CUDA only): growth's mask steps, the
regions' blending, paste-back and the memory descriptor work on small tensors, so they move to the CPU there.
"""
from __future__ import annotations

import torch


def supported_device(device: torch.device) -> torch.device:
    """``device`` where every op of this library runs on it (the CPU, CUDA); the CPU for the others (MPS)."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")
