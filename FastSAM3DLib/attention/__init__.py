"""Attention ops of the image encoder: one entry point per attention kind, dispatching to a backend.

Backends: ``"torch"`` (PyTorch ``scaled_dot_product_attention`` with the bias, every device) and
``"eager"`` (the official formula, for tests). ``None`` picks the best available one.
"""
from .reference import (padded_window_attention_eager, rel_pos_attention_eager, rel_pos_attention_sdpa)

BACKENDS = ("torch", "eager")


def resolve_backend(backend=None) -> str:
    """Return the backend to use: ``backend`` if given and known, otherwise the default."""
    if backend is None or backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return backend


def rel_pos_attention(q, k, v, rel_d, rel_h, rel_w, grid, scale, backend="torch"):
    """Global attention with decomposed relative position bias over a ``grid`` of tokens."""
    if backend == "eager":
        return rel_pos_attention_eager(q, k, v, rel_d, rel_h, rel_w, grid, scale)
    return rel_pos_attention_sdpa(q, k, v, rel_d, rel_h, rel_w, grid, scale)


def padded_window_attention(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid, window, scale, backend="torch"):
    """SAM-Med3D's zero-padded window attention for the real tokens of ``grid`` inside ``window``."""
    return padded_window_attention_eager(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid, window, scale)
