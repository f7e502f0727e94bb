"""Where a step can run: Apple's MPS device lacks some of what this library uses, so those steps run on the CPU.

MPS has no float64 (PyTorch's ``aten/src/ATen/mps/EmptyTensor.cpp``), and no ``max_pool3d`` or ``avg_pool3d``
kernel before torch 2.9 (``native_functions.yaml`` of 2.4-2.8 lists CPU and CUDA only): growth's mask steps, the
regions' blending, paste-back and the memory descriptor work on small tensors, so they move to the CPU there.

Out of memory looks different on each device and in each layer (torch's allocator, the CPU's ``MemoryError``,
Triton's CUDA driver calls): :func:`is_out_of_memory` recognises them all.
"""
from __future__ import annotations

import torch


def supported_device(device: torch.device) -> torch.device:
    """``device`` where every op of this library runs on it (the CPU, CUDA); the CPU for the others (MPS)."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for out-of-memory errors on any device: torch's, the CPU allocator's, and Triton's CUDA driver's
    (``RuntimeError("Triton Error [CUDA]: out of memory")`` from its launcher's ``gpuAssert``)."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
