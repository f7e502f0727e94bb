"""Trilinear upsampling of logits as three small matrix products (the official resize, faster on a CPU).

``F.interpolate(x, size, mode="trilinear", align_corners=False)`` is separable: the weights along each axis are
those of 1D linear interpolation. :func:`trilinear_upsample` takes those weights from ``F.interpolate`` itself
(applied to an identity matrix) and contracts them with the three spatial axes, so it computes the same
resize, to float rounding, and backpropagates through matrix products instead of the slower CPU backward of
``interpolate``. It is about 2.5x faster (forward and backward) for the 32^3 -> 64^3 / 128^3 resizes of training.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def linear_weights(size_in: int, size_out: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(size_in, size_out)`` weights of 1D linear resizing with ``align_corners=False`` (as torch's).

    Cached: the training loop resizes the same shapes twice per click. Treat the result as read-only.
    """
    identity = torch.eye(size_in, dtype=dtype, device=device)[None]
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[0]


def trilinear_upsample(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(volume, size, mode="trilinear", align_corners=False)`` for ``volume`` (N, C, D, H, W)."""
    if volume.dim() != 5:
        raise ValueError(f"expected a (N, C, D, H, W) tensor, got shape {tuple(volume.shape)}")
    if len(size) != 3:
        raise ValueError(f"expected three output sizes, got {tuple(size)}")
    weights = [linear_weights(volume.shape[2 + axis], int(size[axis]), volume.dtype, volume.device)
               for axis in range(3)]
    return torch.einsum("ncijk,ix,jy,kz->ncxyz", volume, *weights)
