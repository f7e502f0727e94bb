"""Linear resampling between voxel grids in PyTorch, equal to SimpleITK's ``ResampleImageFilter``.

The geometry module resamples twice per click: the source volume onto the model's 128³ region of interest
(:func:`resample_linear`), and the model's logits back onto the source voxels (:func:`threshold_logits`).
Both were done with SimpleITK; this module does them in PyTorch (CPU, CUDA, and MPS where it has the ops), so
a machine without SimpleITK can run a session and a GPU session can keep the logits on the device.

It reproduces ITK's rules exactly (``itkResampleImageFilter``, ``itkLinearInterpolateImageFunction``):

* an output voxel whose continuous input index ``c`` lies outside ``[-0.5, n - 0.5)`` on any axis (the upper
  end open) gets the default value;
* inside, per axis ``base = max(floor(c), 0)`` and ``d = c - base``; where ``d <= 0`` or ``base + 1`` is past
  the end the axis is not interpolated (the edge voxel is used: a half-voxel clamp at the border), otherwise
  ``a + (b - a) * d`` in float64, along input axis i first, then j, then k;
* the float64 result is cast to the output pixel type as ITK's ``CastPixelWithBoundsChecking`` does: clamped
  to the type's range, truncated toward zero for integer types, rounded to nearest for float32.

When each input axis follows one output axis (any permutation, flip, scale and shift: always the case between
a volume and its own model grid, whatever its orientation) the interpolation is separable and done one axis at
a time in float64, block by block so that the work stays in the CPU cache. Other orientations take a general
gather path (ITK's nested expression per voxel, more memory traffic).

Where the two can differ: continuous indices are computed here from the two grids' matrices in float64 (and
snapped to the exact binary fractions they approximate); ITK derives them through an SVD inverse and scan-line
steps, with noise of ~1e-13 voxel. That changes a result only at exact ties: an integer-typed value that is
mathematically a whole number (ITK truncates 3.9999999999999 to 3, or gets 4), a float32 value exactly between
two float32 numbers, or a voxel centre exactly on the ``-0.5`` / ``n - 0.5`` face. Grids whose spacings have
simple ratios (0.75 mm to 1.5 mm) make such ties common: on an int16 MR 3 % of the model voxels differ from
ITK's by one unit. So the model input stays with SimpleITK by default when it is installed (:func:`backend`).
Thresholded logits are not affected: there the differences at ties are ~1e-16 of a logit, and which source
voxels on a face of the model grid are inside is decided by :func:`.grid_map.inside_field` on both paths.

The logits path (:func:`threshold_logits`) thresholds the official ×4 trilinear upsampling followed by this
linear resampling without forming the 128³ field: both steps are linear along each axis, so their composition
is three small matrices applied to the 32³ logits, evaluated in float64 (on the CPU, block by block while the
block is in the cache). The SimpleITK path rounds the upsampled field to float32 first, so the two masks can
differ only where a logit is within that rounding (~1e-7 relative) of the threshold.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from .devices import supported_device
from .grid_map import aligned_axes, axis_coordinates, index_map, inside_range, itk_taps

#: Environment variable choosing the resampling implementation: ``auto`` (default), ``torch`` or ``sitk``.
ENV_VAR = "FASTSAM3D_RESAMPLE"
BACKENDS = ("auto", "torch", "sitk")

# Output slices per band of the last (banded) product of the logits path.
_BAND = 16
# Elements per slab of the CPU paths (about 1 MB of float32: stays in the core's cache).
_CACHE_ELEMENTS = 1 << 18
# Destination voxels per chunk of the general (non-separable) gather path.
_GENERAL_CHUNK = 1 << 20


def sitk_available() -> bool:
    """Whether SimpleITK can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("SimpleITK") is not None
    except (ImportError, ValueError):
        return False


def backend(operation: str = "paste", requested: Optional[str] = None) -> str:
    """The implementation that resamples for ``operation``: ``"torch"`` or ``"sitk"``.

    ``operation``: ``"paste"`` (logits onto the source grid) or ``"input"`` (the source volume onto the model
    grid). ``requested`` (default ``$FASTSAM3D_RESAMPLE``, else ``"auto"``): ``"torch"`` or ``"sitk"`` for
    both; ``"auto"`` pastes back in PyTorch (the same masks as SimpleITK, several times faster) and cuts the
    model input with SimpleITK when it is installed (bit-identical to torchio, ties included), else in
    PyTorch. ValueError for an unknown name, or for ``"sitk"`` without SimpleITK.
    """
    if operation not in ("paste", "input"):
        raise ValueError(f"operation must be 'paste' or 'input', got {operation!r}")
    name = (requested or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown resampling backend {name!r} (from {'the argument' if requested else ENV_VAR}); "
                         f"choose one of {', '.join(BACKENDS)}")
    if name == "sitk" and not sitk_available():
        raise ValueError(f"resampling backend 'sitk' was requested ({ENV_VAR}) but SimpleITK is not installed: "
                         "pip install SimpleITK, or use 'torch'")
    if name == "auto":
        return "sitk" if operation == "input" and sitk_available() else "torch"
    return name


# ------------------------------------------------------------------------------------------------------
# index maps


def _cache_blocking(device: torch.device) -> bool:
    """Whether to work in cache-sized blocks (the CPU) rather than in a few large kernels (GPUs)."""
    return device.type == "cpu"


# ------------------------------------------------------------------------------------------------------
# image resampling


# numpy pixel types torch cannot index or convert everywhere, and the torch type that holds them exactly
_WIDER = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.float64}


def _output_dtype(dtype: np.dtype) -> np.dtype:
    """The pixel type ITK resamples into: the input's (bool as uint8, float16 as float32, like geometry does)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype.newbyteorder("=")


def _numpy_dtype(dtype) -> np.dtype:
    """A numpy or torch dtype as a numpy dtype (bfloat16 as float32)."""
    if isinstance(dtype, torch.dtype):
        return np.dtype(np.float32) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    return np.dtype(dtype)


def _torch_array(array: np.ndarray, device) -> torch.Tensor:
    """``array`` as a tensor: zero-copy where torch supports its type, else converted to a type holding it."""
    dtype = array.dtype.newbyteorder("=")
    if dtype in _WIDER or array.dtype != dtype:
        array = array.astype(_WIDER.get(dtype, dtype))
    if not array.flags.writeable:  # only read here; torch warns about read-only numpy memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor if device is None else tensor.to(device)


def itk_cast(values: torch.Tensor, dtype, clamp: bool = True) -> torch.Tensor:
    """ITK's ``CastPixelWithBoundsChecking`` of float64 ``values`` to the pixel type ``dtype`` (numpy or torch).

    Clamped to the type's range (``clamp=False`` when the values cannot leave it), then truncated toward zero
    (integers) or rounded to nearest (floats), in one pass into a new contiguous tensor. Types torch lacks
    (uint16, uint32, uint64) come back in a wider torch type holding the same values.
    """
    dtype = _numpy_dtype(dtype)
    target = np.dtype(_WIDER.get(dtype, dtype))
    if clamp and dtype != np.float64:
        limits = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
        values = values.clamp(float(limits.min), float(limits.max))
    if target.kind == "f" and dtype.kind != "f":  # uint64 held as float64
        values = torch.trunc(values)
    out = torch.empty(values.shape, dtype=torch.from_numpy(np.zeros(0, target)).dtype, device=values.device)
    return out.copy_(values)  # float -> int conversion truncates toward zero


def resample_linear(array, input_index_to_ras: np.ndarray, output_index_to_ras: np.ndarray,
                    output_size_ijk: Sequence[int], default: float = 0.0, output_dtype=None,
                    device=None, ijk_order: bool = False) -> torch.Tensor:
    """``sitk.Resample`` with a linear interpolator and ``default`` outside, as a (K, J, I) tensor.

    ``array``: the input voxels in (K, J, I) order (numpy or torch), ``input_index_to_ras`` its 4x4 voxel
    (i, j, k) -> RAS matrix; the output grid is ``output_index_to_ras`` with ``output_size_ijk`` voxels. The
    values are those of ITK's output pixel type ``output_dtype`` (numpy or torch; default the input's, bool as
    uint8, float16 as float32), with ITK's clamping and truncation, in that type or (uint16/32/64) a wider one.
    Runs on ``device`` (default: the array's; numpy arrays: the CPU). ``ijk_order``: return the contiguous
    (I, J, K) array instead (the model's (x, y, z) order when the output grid is a region of interest).
    """
    shape = tuple(array.shape) if isinstance(array, torch.Tensor) else np.shape(array)
    if not isinstance(array, torch.Tensor):
        array = np.asarray(array)
    if len(shape) != 3:
        raise ValueError(f"expected a 3D (K, J, I) array, got shape {shape}")
    in_dtype = _output_dtype(_numpy_dtype(array.dtype))
    out_dtype = in_dtype if output_dtype is None else _output_dtype(_numpy_dtype(output_dtype))
    size = [int(n) for n in output_size_ijk]
    mapping = index_map(input_index_to_ras, output_index_to_ras)
    axes = aligned_axes(mapping, size)
    if axes is None:
        source = array.to(device) if isinstance(array, torch.Tensor) else _torch_array(array, device)
        values = _resample_general(source, mapping, size, default)
    else:
        values = _resample_separable(array, mapping, axes, size, default, device)
    if ijk_order:
        values = values.permute(2, 1, 0)
    # interpolated values lie between input values, so only a narrower type or the default can need the clamp
    in_range = out_dtype == in_dtype and (out_dtype.kind == "f" or float(default) == int(default) and
                                          np.iinfo(out_dtype).min <= default <= np.iinfo(out_dtype).max)
    return itk_cast(values, out_dtype, clamp=not in_range)


def _resample_separable(array, mapping: np.ndarray, axes, size, default: float, device) -> torch.Tensor:
    """Axis-aligned maps: 1D interpolation along each input axis in turn, float64, (K, J, I) out."""
    n_in = tuple(array.shape)[::-1]
    if device is None:
        device = array.device if isinstance(array, torch.Tensor) else torch.device("cpu")
    taps, ranges = [], [None, None, None]
    for axis in range(3):
        o = axes[axis]
        inside, base, upper, d = itk_taps(axis_coordinates(mapping, axis, o, size[o]), n_in[axis])
        first, stop = inside_range(inside)
        if stop <= first:
            return torch.full(size[::-1], float(default), dtype=torch.float64, device=device)
        ranges[o] = (first, stop)
        taps.append((base[first:stop], upper[first:stop], d[first:stop]))
    # only the block of the input the taps touch (a view), converted to a tensor
    lows = [int(min(t[0].min(), t[1].min())) for t in taps]
    highs = [int(max(t[0].max(), t[1].max())) + 1 for t in taps]
    block = array[lows[2]:highs[2], lows[1]:highs[1], lows[0]:highs[0]]
    values = block.to(device) if isinstance(block, torch.Tensor) else _torch_array(block, device)
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    ti, tj, tk = [_Taps(b - low, u - low, d, device) for (b, u, d), low in zip(taps, lows)]
    # Along j and i the work goes K-slab by K-slab so that it stays in the CPU cache. Each step interpolates
    # along a dim whose slices are contiguous rows (cheap index_select): j is dim 1 of the slab; for i the slab
    # is transposed first. ITK nests i, then j, then k; in float64 the order changes nothing that survives the
    # cast to the output type (at exact ties every order is exact).
    nk, nj, ni = values.shape
    step = max(1, _CACHE_ELEMENTS // max(1, nj * ni)) if _cache_blocking(device) else nk
    slabs = None
    for k0 in range(0, nk, step):
        x = tj.apply(values[k0:k0 + step], 1)  # (c, j', i)
        x = ti.apply(x.permute(2, 0, 1).contiguous(), 0)  # (i', c, j')
        if slabs is None:
            slabs = torch.empty((nk, ti.count, tj.count), dtype=x.dtype, device=device)
        slabs[k0:k0 + step] = x.permute(1, 0, 2)  # (c, i', j')
    values = tk.apply(slabs, 0).to(torch.float64)  # (k', i', j')
    # tensor dims hold the output axes followed by input k, i, j: put them in output (k, j, i) order
    held = [axes[2], axes[0], axes[1]]  # output axis held by each tensor dim
    values = values.permute([held.index(2), held.index(1), held.index(0)])
    if all(ranges[o] == (0, size[o]) for o in range(3)):
        return values
    out = torch.full(size[::-1], float(default), dtype=torch.float64, device=device)
    out[tuple(slice(*ranges[o]) for o in (2, 1, 0))] = values
    return out


class _Taps:
    """ITK's linear taps along one axis as tensors: rows base and upper, weights d (float64)."""

    def __init__(self, base: np.ndarray, upper: np.ndarray, d: np.ndarray, device) -> None:
        self.count = int(base.size)
        self.gather_only = not np.any(d)  # e.g. slices 1.5 mm apart: every output slice is an input slice
        rows = base if self.gather_only else np.concatenate([base, upper])
        self.index = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        self.weight = torch.from_numpy(d).to(device)

    def apply(self, values: torch.Tensor, dim: int) -> torch.Tensor:
        """Interpolate ``values`` along ``dim``: ``a + (b - a) * d`` in float64 (ITK's expression)."""
        if self.gather_only:
            return values.index_select(dim, self.index)
        both = values.index_select(dim, self.index)
        if both.dtype != torch.float64:
            both = both.to(torch.float64)
        a, b = both.split(self.count, dim)
        shape = [1] * values.dim()
        shape[dim] = self.count
        return b.sub_(a).mul_(self.weight.view(shape)).add_(a)


def _resample_general(source: torch.Tensor, mapping: np.ndarray, size, default: float) -> torch.Tensor:
    """Any affine map: every output voxel's 8 neighbours gathered, ITK's nested interpolation, float64."""
    device = source.device
    nk, nj, ni = source.shape
    count = size[0] * size[1] * size[2]
    flat = source.reshape(-1)
    out = torch.empty(count, dtype=torch.float64, device=device)
    matrix = torch.from_numpy(mapping).to(device)
    limits = torch.tensor([ni, nj, nk], dtype=torch.float64, device=device)
    for start in range(0, count, _GENERAL_CHUNK):
        index = torch.arange(start, min(start + _GENERAL_CHUNK, count), device=device)
        ijk = torch.stack([index % size[0], (index // size[0]) % size[1], index // (size[0] * size[1])])
        c = matrix[:3, :3] @ ijk.to(torch.float64) + matrix[:3, 3:]
        inside = ((c >= -0.5) & (c < limits[:, None] - 0.5)).all(0)
        base = torch.floor(c).clamp_(min=0).minimum(limits[:, None] - 1)
        d = c - base
        upper = base + 1
        interpolate = (d > 0) & (upper <= limits[:, None] - 1)
        upper = torch.where(interpolate, upper, base)
        d = torch.where(interpolate, d, torch.zeros_like(d))
        base, upper = base.long(), upper.long()

        def at(i, j, k):
            return flat[(k * nj + j) * ni + i].to(torch.float64)

        i0, j0, k0 = base
        i1, j1, k1 = upper
        d0, d1, d2 = d

        def lerp(a, b, w):
            return a + (b - a) * w

        xx0 = lerp(lerp(at(i0, j0, k0), at(i1, j0, k0), d0), lerp(at(i0, j1, k0), at(i1, j1, k0), d0), d1)
        xx1 = lerp(lerp(at(i0, j0, k1), at(i1, j0, k1), d0), lerp(at(i0, j1, k1), at(i1, j1, k1), d0), d1)
        value = lerp(xx0, xx1, d2)
        out[index] = torch.where(inside, value, torch.full_like(value, float(default)))
    return out.reshape(size[::-1])


# ------------------------------------------------------------------------------------------------------
# logits -> thresholded mask on the source grid


def upsample_matrix(n_low: int, n_high: int) -> np.ndarray:
    """(n_high, n_low) float64 weights of torch's linear resize with ``align_corners=False``."""
    if n_low == n_high:
        return np.eye(n_high)
    from .upsample import linear_weights

    return linear_weights(n_low, n_high, torch.float64, "cpu").numpy().T


def threshold_logits(logits, field_to_ras: np.ndarray, field_size: Sequence[int], volume_index_to_ras: np.ndarray,
                     box_first: Sequence[int], box_size: Sequence[int], threshold: float = 0.0) -> torch.Tensor:
    """``resample(upsample(logits), source box) > threshold`` as a bool (K, J, I) tensor on the logits' device.

    ``logits``: (x, y, z) model-space logits on the field grid (``field_size``, voxel -> RAS ``field_to_ras``)
    or on its 4x smaller grid, which the official code upsamples trilinearly (``align_corners=False``) first.
    The output grid is the source volume's (``volume_index_to_ras``) box of ``box_size`` voxels (i, j, k)
    starting at voxel ``box_first``; voxels outside the field's extent are False (SimpleITK's default -inf).
    """
    tensor = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    tensor = tensor.detach()
    field_size = tuple(int(n) for n in field_size)
    shape = tuple(tensor.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    tensor = tensor.reshape(shape)
    if shape != field_size and shape != tuple(n // 4 for n in field_size):
        raise ValueError(f"logits of shape {tuple(logits.shape)} fit neither the grid {field_size} nor its quarter")
    device = supported_device(tensor.device)  # no float64 on MPS: the small logits go to the CPU
    tensor = tensor.to(device)
    box_size = [int(n) for n in box_size]
    box_to_ras = np.asarray(volume_index_to_ras, dtype=np.float64).copy()
    box_to_ras[:3, 3] = box_to_ras[:3, :3] @ np.asarray(box_first, dtype=np.float64) + box_to_ras[:3, 3]
    mapping = index_map(field_to_ras, box_to_ras)  # source box voxel -> continuous field index (x, y, z)
    axes = aligned_axes(mapping, box_size)
    mask = torch.zeros(box_size[::-1], dtype=torch.bool, device=device)
    if axes is None:  # not a grid of this volume: upsample, then the general exact resampling
        field = _upsampled_field(tensor, field_size)
        values = resample_linear(field.permute(2, 1, 0), field_to_ras, box_to_ras, box_size, float("-inf"),
                                 torch.float32)
        return values > threshold
    # per model axis m: the source axis it follows and the composite (count, n_low) weights of that source axis
    weights, ranges = {}, [None, None, None]
    for m in range(3):
        s = axes[m]
        inside, base, upper, d = itk_taps(axis_coordinates(mapping, m, s, box_size[s]), field_size[m])
        first, stop = inside_range(inside)
        if stop <= first:
            return mask
        ranges[s] = (first, stop)
        # row r: (1 - d) * upsample[base] + d * upsample[upper], composed from the two taps rather than by a
        # matrix product, which NumPy would hand to OpenBLAS threads that busy-wait on the other cores afterwards
        upsample = upsample_matrix(shape[m], field_size[m])
        fraction = d[first:stop, None]
        weights[s] = (1.0 - fraction) * upsample[base[first:stop]] + fraction * upsample[upper[first:stop]]
    # the low-res columns any weight touches, per model axis
    used = [np.flatnonzero(np.any(weights[axes[m]] != 0, axis=0)) for m in range(3)]
    lows = [int(u[0]) for u in used]
    highs = [int(u[-1]) + 1 for u in used]
    for m in range(3):
        weights[axes[m]] = weights[axes[m]][:, lows[m]:highs[m]]
    low = tensor[lows[0]:highs[0], lows[1]:highs[1], lows[2]:highs[2]]
    # model axes in source (k, j, i) order
    order = [axes.index(2), axes.index(1), axes.index(0)]
    low = low.permute(order)
    shifted = low.to(torch.float64) - threshold  # the weights sum to 1 along each axis: shift, then compare with 0
    wk, wj, wi = [torch.from_numpy(weights[s]).to(device) for s in (2, 1, 0)]
    # contract i, then j: one (nj * ni) row of the box per low-res k knot
    ck, cj, ci = shifted.shape
    t = (shifted.reshape(ck * cj, ci) @ wi.T).reshape(ck, cj, -1)  # (ck, cj, ni)
    planes = torch.matmul(wj, t).reshape(ck, -1)  # (ck, nj * ni)
    nk, nj, ni = wk.shape[0], wj.shape[0], wi.shape[0]
    inner = torch.empty((nk, nj * ni), dtype=torch.bool, device=device)
    if not _cache_blocking(device):
        torch.gt(wk @ planes, 0, out=inner)
    else:  # the sparse k weights band by band (few knots each), in column blocks that stay in the cache; each
        # block's product goes to one reused buffer and NumPy compares it (~5x faster than torch.gt on a
        # cache-resident block: 17 against 88 us for 16 x 8192 here), the same booleans
        width = max(1, _CACHE_ELEMENTS // (2 * _BAND))
        product = torch.empty((_BAND, min(width, planes.shape[1])), dtype=planes.dtype)
        inner_array = inner.numpy()
        for k0, k1, c0, c1 in _bands(weights[2], _BAND):
            for j0 in range(0, planes.shape[1], width):
                j1 = min(j0 + width, planes.shape[1])
                block = product[:k1 - k0, :j1 - j0]
                torch.matmul(wk[k0:k1, c0:c1], planes[c0:c1, j0:j1], out=block)
                np.greater(block.numpy(), 0, out=inner_array[k0:k1, j0:j1])
    mask[tuple(slice(*ranges[s]) for s in (2, 1, 0))] = inner.view(nk, nj, ni)
    return mask


def _bands(weights: np.ndarray, width: int):
    """(i0, i1, c0, c1): output rows i0..i1 of ``weights`` (outputs x inputs) use only inputs c0..c1."""
    bands = []
    for i0 in range(0, weights.shape[0], width):
        used = np.flatnonzero(np.any(weights[i0:i0 + width] != 0, axis=0))
        c0, c1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        bands.append((i0, min(i0 + width, weights.shape[0]), c0, c1))
    return bands


def _upsampled_field(tensor: torch.Tensor, size) -> torch.Tensor:
    """The (x, y, z) field of ``size``: as is, or upsampled 4x trilinearly like the official code (float32)."""
    if tuple(tensor.shape) == tuple(size):
        return tensor.float()
    import torch.nn.functional as F

    return F.interpolate(tensor.float()[None, None], size=tuple(size), mode="trilinear", align_corners=False)[0, 0]
