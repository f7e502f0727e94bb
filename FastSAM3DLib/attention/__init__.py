"""Attention ops of the image encoder: one entry point per attention kind, dispatching to a backend per call.

Entry points: :func:`rel_pos_attention` (global attention, optionally 3D block-sparse) and
:func:`padded_window_attention` (SAM-Med3D's zero-padded windows). Both take ``q, k, v (B, heads, N, C)`` and
return ``(B, heads, N, C)``.

Backends:

* ``"torch"``: PyTorch ``scaled_dot_product_attention`` with the bias built from small factors; padded windows
  in closed form (one virtual key instead of 2232 padded ones). Every device (CPU, CUDA, MPS).
* ``"triton"``: the fused flash-attention kernel of :mod:`.triton_kernel` (CUDA; CPU tensors only under
  ``TRITON_INTERPRET=1``, for tests). Forward only.
* ``"eager"``: the official formula (materialised bias, softmax, matmul): the reference.
* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton >= :data:`MIN_TRITON` imports, the GPU is
  supported (compute capability >= 8.0, or ROCm), no gradient is needed and no Triton launch has failed in this
  process; ``"torch"`` otherwise (CPU, MPS, Windows, macOS, older Triton or GPU).

**Fallback.** Triton compiles the kernel and a small C launcher at the first launch of each variant; that needs a
C compiler and ``Python.h``, which Slicer 5.10-5.12 and many workstations lack. When a Triton launch chosen by
``"auto"`` raises (compile error, missing compiler or headers, unsupported GPU, out of resources; out of
GPU memory excepted, torch's or the CUDA driver's under Triton, which the PyTorch path would not cure), the call
returns the PyTorch backend's result and ``"auto"`` uses PyTorch for the rest of the process, after one ``WARNING``
on the ``FastSAM3DLib.attention`` logger. An explicit ``"triton"`` (argument or environment variable) raises the
error instead.

The environment variable ``FASTSAM3D_ATTENTION`` (``auto|torch|triton|eager``) sets the backend wherever none
is requested explicitly (``None`` or ``"auto"``). A backend that cannot run on the given tensors (e.g.
``"triton"`` on the CPU, with gradients, or with Triton missing or older than :data:`MIN_TRITON`) falls back to
``"torch"`` with one ``RuntimeWarning`` per process and reason.

Dense attention is the default and exact for the released weights; the 3D sparse mode is explicit
(``sparse=SparseLayout(tile, radius)``, see :mod:`.sparse_layout`) and changes the result.
Nothing is imported from Triton until the Triton backend is considered for a CUDA tensor (or requested).
:mod:`.aot` compiles every kernel variant the dispatch can launch for sm_80-sm_90 without a GPU.
"""
import logging
import os
import re
import threading
import warnings
from functools import lru_cache
from typing import Optional, Tuple, Union

import torch

from ..devices import is_out_of_memory
from .reference import padded_window_attention_eager, rel_pos_attention_eager, rel_pos_attention_masked_eager
from .sparse_layout import BlockLayout, SparseLayout, block_layout

BACKENDS = ("torch", "triton", "eager")
ENV_VAR = "FASTSAM3D_ATTENTION"
# Oldest Triton every kernel variant compiles cleanly with for sm_80-sm_90 (checked ahead of time against 3.0,
# 3.1 and 3.2: the software pipeliner of 3.0 and 3.1 reports errors on the sparse mode's nested loop; 3.6, the
# lent GPU machines' version, 3.7, which PyPI's CUDA build of torch 2.13 installs, and the pinned 3.9 compile
# every variant too).
MIN_TRITON = (3, 2)
_WARNED = set()
_log = logging.getLogger(__name__)
_triton_failure: Optional[str] = None  # why a failed launch turned Triton off for "auto" in this process
_failure_lock = threading.Lock()

__all__ = ["BACKENDS", "ENV_VAR", "MIN_TRITON", "SparseLayout", "BlockLayout", "block_layout", "resolve_backend",
           "triton_supported", "triton_failure", "rel_pos_attention", "padded_window_attention"]


def _requested(backend: Optional[str]) -> str:
    """The validated backend request: explicit name, else the environment variable, else ``"auto"``."""
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "attention backend"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown {source} {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return backend


def resolve_backend(backend: Optional[str] = None, device=None) -> str:
    """The backend to run on ``device``: ``backend`` if given, else ``$FASTSAM3D_ATTENTION``, else ``"auto"``.

    With a ``device``, ``"auto"`` becomes ``"triton"`` on a supported CUDA GPU (until a Triton launch fails, see
    the module docstring) and ``"torch"`` everywhere else, and an explicit ``"triton"`` that cannot run there
    falls back to ``"torch"`` with one warning. Without a device (e.g. when a model is built before it is
    moved), the validated request is returned and ``"auto"`` is decided per call from the tensors' device.
    Raises ``ValueError`` for unknown names.
    """
    name = _requested(backend)
    if device is None:
        return name
    device = torch.device(device)
    if name == "auto":
        return "triton" if _triton_failure is None and _auto_allows_triton(device) else "torch"
    if name == "triton":
        reason = _triton_unusable_reason(device)
        if reason:
            _warn_once(("triton", reason), f"FastSAM3D attention: the Triton backend is unavailable ({reason}); "
                                           "using the PyTorch backend instead.")
            return "torch"
    return name


def triton_supported(device) -> bool:
    """Whether the Triton kernel can run on ``device`` (CUDA with Triton; CPU only under TRITON_INTERPRET=1).

    False after a Triton launch failed in this process (see :func:`triton_failure`).
    """
    return _triton_failure is None and _triton_unusable_reason(torch.device(device)) is None


def triton_failure() -> Optional[str]:
    """Why ``"auto"`` stopped using Triton in this process (a failed launch), or None."""
    return _triton_failure


def _auto_allows_triton(device: torch.device) -> bool:
    """Whether ``"auto"`` picks Triton for tensors on ``device``; says once (INFO) why not on a CUDA device."""
    if device.type != "cuda":
        return False
    reason = _triton_unusable_reason(device)
    if reason and ("auto", reason) not in _WARNED:
        _WARNED.add(("auto", reason))
        _log.info("FastSAM3D attention: using the PyTorch backend on %s (%s)", device, reason)
    return reason is None


def _triton_unusable_reason(device: torch.device) -> Optional[str]:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"no Triton support for {device.type} tensors"
    else:
        reason = _cuda_unsupported_reason(device.index if device.index is not None else torch.cuda.current_device())
        if reason:
            return reason
    return _triton_import_error()


@lru_cache(maxsize=None)
def _cuda_unsupported_reason(index: int) -> Optional[str]:
    capability = torch.cuda.get_device_capability(index)
    if torch.version.hip is None and capability < (8, 0):
        return f"GPU compute capability {capability} < 8.0"
    return None


@lru_cache(maxsize=1)
def _triton_import_error() -> Optional[str]:
    """Why Triton cannot be used at all (missing, broken, or older than MIN_TRITON), or None."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken Triton/driver installation
        return f"cannot import Triton: {type(exc).__name__}: {exc}"
    problem = triton_version_problem(getattr(triton, "__version__", ""))
    if problem:
        return problem
    try:
        from . import triton_kernel  # noqa: F401
    except Exception as exc:
        return f"cannot import the Triton kernel: {type(exc).__name__}: {exc}"
    return None


def triton_version_problem(version: str) -> Optional[str]:
    """Why Triton ``version`` (e.g. ``"3.9.0"``) is not supported, or None when it is >= :data:`MIN_TRITON`."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    minimum = ".".join(map(str, MIN_TRITON))
    if not match:
        return f"unknown Triton version {version!r} (the kernel needs Triton >= {minimum})"
    if (int(match.group(1)), int(match.group(2))) < MIN_TRITON:
        return f"Triton {version} is older than {minimum}, the oldest version the kernel supports"
    return None


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _backend_for_call(backend: Optional[str], q: torch.Tensor, *tensors: torch.Tensor) -> str:
    """Resolve per call: the Triton kernel is forward-only and handles float32/float16/bfloat16."""
    name = resolve_backend(backend, q.device)
    if name == "triton":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q,) + tensors)
        reason = ("gradients are required and the kernel is forward-only" if needs_grad else
                  f"{q.dtype} is not supported" if q.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                  else None)
        if reason:
            if _requested(backend) == "triton":
                _warn_once(("triton", reason), f"FastSAM3D attention: the Triton backend cannot run here ({reason}); "
                                               "using the PyTorch backend instead.")
            return "torch"
    return name


def _run_triton(backend: Optional[str], launch, fallback):
    """``launch()``; if Triton was chosen by ``"auto"`` and the launch raises, turn Triton off and run ``fallback()``.

    An explicit ``"triton"`` request re-raises. Out of memory always propagates, torch's or the CUDA driver's
    under Triton's launcher: the PyTorch path needs more memory, not less, so falling back would only hide the
    real problem and turn the kernel off for good.
    """
    try:
        return launch()
    except Exception as exc:
        if _requested(backend) == "triton" or is_out_of_memory(exc):
            raise
        _disable_triton(exc)
    return fallback()


def _check_qkv(q, k, v) -> None:
    """ValueError unless q, k, v share one shape and one floating dtype (checked before Triton is tried)."""
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _disable_triton(exc: BaseException) -> None:
    """Record the failure of a Triton launch and log it once; ``"auto"`` uses PyTorch from now on."""
    global _triton_failure
    detail = " ".join(str(exc).split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    with _failure_lock:
        if _triton_failure is not None:
            return
        _triton_failure = reason
    _log.warning("FastSAM3D attention: the Triton GPU kernel failed to launch (%s); using the PyTorch backend for "
                 "the rest of this session. Set %s=torch to skip Triton, or %s=triton to raise this error.",
                 reason, ENV_VAR, ENV_VAR)


def _layout_for(sparse: Union[None, SparseLayout, BlockLayout], grid) -> Optional[BlockLayout]:
    if sparse is None or isinstance(sparse, BlockLayout):
        if sparse is not None and tuple(sparse.grid) != tuple(grid):
            raise ValueError(f"sparse layout for grid {sparse.grid} does not match the token grid {tuple(grid)}")
        return sparse
    if isinstance(sparse, SparseLayout):
        return sparse.blocks(tuple(grid))
    raise TypeError(f"sparse must be None, a SparseLayout or a BlockLayout, got {type(sparse).__name__}")


def rel_pos_attention(q, k, v, rel_d, rel_h, rel_w, grid: Tuple[int, int, int], scale: float,
                      backend: Optional[str] = "auto", sparse: Union[None, SparseLayout, BlockLayout] = None):
    """Global attention with the official decomposed relative position bias over a ``grid`` of tokens.

    ``sparse``: None (dense, exact) or the 3D block-sparse layout to use (see :mod:`.sparse_layout`).
    """
    layout = _layout_for(sparse, grid)
    name = _backend_for_call(backend, q, k, v, rel_d, rel_h, rel_w)
    if name == "triton" and layout is not None and (layout.tile_volume < 16
                                                     or layout.tile_volume & (layout.tile_volume - 1)):
        _warn_once(("triton-tile", layout.tile), f"FastSAM3D attention: the Triton sparse kernel needs a tile volume "
                                                 f"that is a power of two >= 16, got tile {layout.tile}; using the "
                                                 "PyTorch backend instead.")
        name = "torch"
    if name == "eager":
        if layout is None:
            return rel_pos_attention_eager(q, k, v, rel_d, rel_h, rel_w, grid, scale)
        return rel_pos_attention_masked_eager(q, k, v, rel_d, rel_h, rel_w, grid, scale, layout.token_mask())
    if name == "triton":
        from .rel_pos import bias_factors

        _check_qkv(q, k, v)  # the caller's errors are raised as such, never taken for a failing kernel
        factors = bias_factors(q, rel_d, rel_h, rel_w, grid)

        def launch():
            from .triton_kernel import rel_pos_attention_triton

            return rel_pos_attention_triton(q, k, v, factors, scale, layout=layout)

        return _run_triton(backend, launch, lambda: rel_pos_attention(q, k, v, rel_d, rel_h, rel_w, grid, scale,
                                                                      "torch", layout))
    from .torch_ops import rel_pos_attention_torch

    return rel_pos_attention_torch(q, k, v, rel_d, rel_h, rel_w, grid, scale, layout=layout)


def padded_window_attention(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid: Tuple[int, int, int],
                            window: Tuple[int, int, int], scale: float, backend: Optional[str] = "auto"):
    """SAM-Med3D's zero-padded window attention for the real tokens of ``grid`` inside ``window``.

    ``pad_qkv (3, heads, C)``: query, key and value of a padded token (the qkv biases). The torch and Triton
    backends handle the padded keys in closed form; ``"eager"`` materialises them.
    """
    name = _backend_for_call(backend, q, k, v, pad_qkv, rel_d, rel_h, rel_w)
    if name == "eager":
        return padded_window_attention_eager(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid, window, scale)
    if name == "triton":
        from .rel_pos import bias_factors

        _check_qkv(q, k, v)  # the caller's errors are raised as such, never taken for a failing kernel
        factors = bias_factors(q, rel_d, rel_h, rel_w, grid, window, pad_qkv[0])

        def launch():
            from .triton_kernel import padding_logit, rel_pos_attention_triton

            if factors.pad_log_mass is None:
                return rel_pos_attention_triton(q, k, v, factors, scale)
            return rel_pos_attention_triton(q, k, v, factors, scale, padding_logit(q, pad_qkv[1], factors, scale),
                                            pad_qkv[2].to(v.dtype))

        return _run_triton(backend, launch, lambda: padded_window_attention(q, k, v, pad_qkv, rel_d, rel_h, rel_w,
                                                                            grid, window, scale, "torch"))
    from .torch_ops import padded_window_attention_torch

    return padded_window_attention_torch(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid, window, scale)
