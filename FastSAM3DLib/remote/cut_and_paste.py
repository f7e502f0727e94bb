"""The client's geometry: the region's model input and the pasting back of the returned logits.

With PyTorch installed the library's own geometry runs (exactly as a local session on this computer); without
it, the SimpleITK reference path and a numpy copy of torch's x4 upsampling (bit for bit, fused multiply-adds
included) give the same masks.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Optional

import numpy as np

from .. import geometry
from ..geometry import RegionOfInterest, Volume


# ---------------------------------------------------------------------------------------------- geometry
def library_geometry() -> bool:
    """Whether the library's own geometry functions run here (they resample with PyTorch when it is installed).

    With them the client cuts and pastes exactly as a local session on this computer does. Without PyTorch
    the client uses the SimpleITK reference path below (the local session's ``FASTSAM3D_RESAMPLE=sitk``);
    the two give the same masks except for a voxel whose value ties the threshold within float rounding.
    """
    global _LIBRARY_GEOMETRY
    if _LIBRARY_GEOMETRY is None:
        try:
            import importlib

            importlib.import_module("..resample", __package__)
            _LIBRARY_GEOMETRY = True
        except Exception:  # no torch (or a broken one): the SimpleITK path needs none
            _LIBRARY_GEOMETRY = False
    return _LIBRARY_GEOMETRY


_LIBRARY_GEOMETRY: Optional[bool] = None


def model_input(volume: Volume, roi: RegionOfInterest) -> np.ndarray:
    """The float32 (x, y, z) model input of ``roi``: :func:`geometry.extract_model_input`, or its SimpleITK path."""
    if library_geometry():
        return geometry.extract_model_input(volume, roi)
    return geometry.sitk_model_input(volume, roi)


def paste_back(volume: Volume, roi: RegionOfInterest, low: np.ndarray):
    """``(region, mask)`` of the low-res logits ``low``: :func:`geometry.paste_back`, or its SimpleITK path fed
    with :func:`upsample_logits` (the official upsampling, bit for bit as torch computes it on a CPU)."""
    if library_geometry():
        return geometry.paste_back(volume, roi, low)
    return geometry.paste_field_sitk(volume, roi, upsample_logits(low, roi.size[0]))


def upsample_logits(low: np.ndarray, size: int, fused: Optional[bool] = None) -> np.ndarray:
    """``F.interpolate(low, size, mode="trilinear", align_corners=False)`` of a (n, n, n) float32 array, bit for
    bit as torch's CPU kernel computes it: W, then H, then D, each ``t0 * w0 + t1 * w1`` in float32, with the
    fused multiply-add of the AVX2/AVX-512 builds (``fused``; default :func:`torch_cpu_fuses`) emulated exactly."""
    fused = torch_cpu_fuses() if fused is None else fused
    out = np.asarray(low, dtype=np.float32)
    for axis in (2, 1, 0):
        out = _linear_axis(out, axis, size, fused)
    return out


def _linear_weights(n_in: int, n_out: int):
    """torch's linear resize indices and weights (align_corners=False), in float32 as its kernel computes them."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def _linear_axis(a: np.ndarray, axis: int, n_out: int, fused: bool) -> np.ndarray:
    i0, i1, w0, w1 = _linear_weights(a.shape[axis], n_out)
    shape = [1] * a.ndim
    shape[axis] = n_out
    t0, t1 = np.take(a, i0, axis=axis), np.take(a, i1, axis=axis)
    w0, w1 = w0.reshape(shape), w1.reshape(shape)
    if fused:
        return _fma32(t0, w0, t1 * w1)
    return t0 * w0 + t1 * w1


_MIDPOINT = np.uint64(1 << 28)
_LOW_29_BITS = np.uint64((1 << 29) - 1)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``fma(a, b, c)``, correctly rounded, for float32 ``a, c`` and weights ``b`` of a few bits.

    ``a * b`` is exact in float64, so the float64 sum ``s`` is off the exact sum by at most half a float64 ulp;
    rounding ``s`` to float32 is then correct unless ``s`` lies exactly halfway between two float32 numbers
    (or is tiny): only there the exact error (TwoSum) decides the direction.
    """
    p = a.astype(np.float64)
    p *= b
    s = p + c
    r = s.astype(np.float32)
    suspect = (s.view(np.uint64) & _LOW_29_BITS) == _MIDPOINT
    suspect |= (np.abs(s) < 2.0 ** -125) & (s != 0)
    idx = np.flatnonzero(suspect)
    if idx.size:
        ps, cs, ss = p.ravel()[idx], c.ravel()[idx].astype(np.float64), s.ravel()[idx]
        bb = ss - ps
        error = (ps - (ss - bb)) + (cs - bb)  # s + error == p + c exactly
        rv = r.ravel()[idx]
        lo = np.where(rv.astype(np.float64) <= ss, rv, np.nextafter(rv, np.float32(-np.inf)))
        hi = np.nextafter(lo, np.float32(np.inf))
        half = (lo.astype(np.float64) + hi.astype(np.float64)) / 2 == ss
        nudged = np.nextafter(ss, np.where(error > 0, np.inf, -np.inf))
        r.ravel()[idx] = np.where(half & (error != 0), nudged, ss).astype(np.float32)
    return r


def torch_cpu_fuses() -> bool:
    """Whether torch's CPU upsampling kernel on this computer uses fused multiply-adds (AVX2/AVX-512 builds).

    ``$FASTSAM3D_UPSAMPLE`` (``fma`` or ``plain``) overrides; then ``$ATEN_CPU_CAPABILITY``, an imported torch's
    own answer, the CPU's AVX2 flag on x86; other CPUs (ARM) are assumed to fuse, as their compilers do.
    """
    override = os.environ.get("FASTSAM3D_UPSAMPLE", "").strip().lower()
    if override in ("fma", "plain"):
        return override == "fma"
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if capability:
        return capability != "default"
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.backends.cpu.get_cpu_capability().lower() != "default"
        except Exception:
            pass
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        return _x86_has_avx2()
    return True


def _x86_has_avx2() -> bool:
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
                for line in info:
                    if line.startswith("flags"):
                        flags = line.split()
                        return "avx2" in flags and "fma" in flags
        elif sys.platform == "darwin":
            import subprocess
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.leaf7_features"], capture_output=True, text=True,
                                 timeout=5).stdout
            return "AVX2" in out.upper()
        elif sys.platform == "win32":
            import ctypes
            return bool(ctypes.windll.kernel32.IsProcessorFeaturePresent(40))  # PF_AVX2_INSTRUCTIONS_AVAILABLE
    except Exception:
        pass
    return True
