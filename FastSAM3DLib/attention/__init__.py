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
* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton imports and the GPU is supported (compute
  capability >= 8.0, or ROCm) and no gradient is needed; ``"torch"`` otherwise (CPU, MPS, Windows, macOS).

The environment variable ``FASTSAM3D_ATTENTION`` (``auto|torch|triton|eager``) sets the backend wherever none
is requested explicitly (``None`` or ``"auto"``). A backend that cannot run on the given tensors falls back to
``"torch"`` with one warning per process and reason.

Dense attention is the default and exact for the released weights; the 3D sparse mode is explicit
(``sparse=SparseLayout(tile, radius)``, see :mod:`.sparse_layout`) and changes the result.
Nothing is imported from Triton until the Triton backend is used.
"""
import os
import warnings
from functools import lru_cache
from typing import Optional, Tuple, Union

import torch

from .reference import padded_window_attention_eager, rel_pos_attention_eager, rel_pos_attention_masked_eager
from .sparse_layout import BlockLayout, SparseLayout, block_layout

BACKENDS = ("torch", "triton", "eager")
ENV_VAR = "FASTSAM3D_ATTENTION"
_WARNED = set()

__all__ = ["BACKENDS", "ENV_VAR", "SparseLayout", "BlockLayout", "block_layout", "resolve_backend",
           "triton_supported", "rel_pos_attention", "padded_window_attention"]


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

    With a ``device``, ``"auto"`` becomes ``"triton"`` on a supported CUDA GPU and ``"torch"`` everywhere else,
    and an explicit ``"triton"`` that cannot run there falls back to ``"torch"`` with one warning. Without a
    device (e.g. when a model is built before it is moved), the validated request is returned and ``"auto"``
    is decided per call from the tensors' device. Raises ``ValueError`` for unknown names.
    """
    name = _requested(backend)
    if device is None:
        return name
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_supported(device) else "torch"
    if name == "triton":
        reason = _triton_unusable_reason(device)
        if reason:
            _warn_once(("triton", reason), f"FastSAM3D attention: the Triton backend is unavailable ({reason}); "
                                           "using the PyTorch backend instead.")
            return "torch"
    return name


def triton_supported(device) -> bool:
    """Whether the Triton kernel can run on ``device`` (CUDA with Triton; CPU only under TRITON_INTERPRET=1)."""
    return _triton_unusable_reason(torch.device(device)) is None


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
    try:
        from . import triton_kernel  # noqa: F401  (imports triton)
    except Exception as exc:  # ImportError, or a broken Triton/driver installation
        return f"cannot import Triton: {type(exc).__name__}: {exc}"
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
        from .triton_kernel import rel_pos_attention_triton

        factors = bias_factors(q, rel_d, rel_h, rel_w, grid)
        return rel_pos_attention_triton(q, k, v, factors, scale, layout=layout)
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
        from .triton_kernel import padding_logit, rel_pos_attention_triton

        factors = bias_factors(q, rel_d, rel_h, rel_w, grid, window, pad_qkv[0])
        if factors.pad_log_mass is None:
            return rel_pos_attention_triton(q, k, v, factors, scale)
        return rel_pos_attention_triton(q, k, v, factors, scale, padding_logit(q, pad_qkv[1], factors, scale),
                                        pad_qkv[2].to(v.dtype))
    from .torch_ops import padded_window_attention_torch

    return padded_window_attention_torch(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid, window, scale)
