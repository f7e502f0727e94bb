"""Eager reference attention with the official 3D relative position bias, exactly as the released weights need.

Shapes: ``q, k, v`` are ``(B, heads, N, head_dim)`` with ``N = D*H*W`` tokens of a cubic ``(S, S, S)`` grid in
row-major order; the relative position tables ``rel_d, rel_h, rel_w`` have ``2*S-1`` rows.

**The official bias is not the textbook decomposed bias.** The official ``add_decomposed_rel_pos`` (3D port of
SAM's 2D code) broadcasts its three per-axis terms with one index too few, so for query ``(qd, qh, qw)`` and key
``(kd, kh, kw)`` it adds (``q(p)`` = the unscaled query of token ``p``, ``R*[i, j] = table[i - j + S - 1]``)::

    q(qd, qh, qw) . Rd[qd, kw]  +  q(qd, qh, kd) . Rh[qh, kw]  +  q(qd, qh, kh) . Rw[kh, kw]

The second and third terms use the queries of *other* tokens of the same (qd, qh) row. The weights were trained
with it (verified bit-exact against ``medim`` and the fixtures), so it is reproduced here, never "fixed".
"""
from typing import Tuple

import torch
import torch.nn.functional as F

Grid = Tuple[int, int, int]


def relative_table(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Gather ``table[q - k + k_size - 1]`` for all query/key positions along one axis: ``(q_size, k_size, C)``."""
    if table.shape[0] != 2 * max(q_size, k_size) - 1:
        raise ValueError(f"relative position table has {table.shape[0]} rows, expected {2 * max(q_size, k_size) - 1}")
    q_idx = torch.arange(q_size, device=table.device)[:, None]
    k_idx = torch.arange(k_size, device=table.device)[None, :]
    return table[q_idx - k_idx + (k_size - 1)]


def bias_terms(q_grid: torch.Tensor, rel_d, rel_h, rel_w, real: Grid):
    """The three factors of the official bias for the real queries of a (possibly padded) cubic grid.

    ``q_grid``: ``(B, heads, S, S, S, C)`` queries of the whole grid (padding included). ``real``: the leading
    ``(D, H, W)`` sub-grid whose queries are wanted. Returns

    * ``t_d (B, h, D, H, W, S)``: ``t_d[qd, qh, qw, kw]``,
    * ``t_h (B, h, D, H, S, S)``: ``t_h[qd, qh, kd, kw]``,
    * ``t_w (B, h, D, H, S, S)``: ``t_w[qd, qh, kh, kw]``.
    """
    s = q_grid.shape[2]
    if q_grid.shape[2:5] != (s, s, s):
        raise ValueError(f"the official relative position bias is defined for cubic grids, got "
                         f"{tuple(q_grid.shape[2:5])}")
    d, h, w = real
    # the tables in the queries' dtype (a bf16/fp16 model holds both so; the torch backend accepts the mix too)
    rd = relative_table(s, s, rel_d.to(q_grid.dtype))[:d]
    rh = relative_table(s, s, rel_h.to(q_grid.dtype))[:h]
    rw = relative_table(s, s, rel_w.to(q_grid.dtype))
    rows = q_grid[:, :, :d, :h]
    t_d = torch.einsum("bndhwc,dkc->bndhwk", rows[:, :, :, :, :w], rd)
    t_h = torch.einsum("bndhwc,hkc->bndhwk", rows, rh)
    t_w = torch.einsum("bndhwc,wkc->bndhwk", rows, rw)
    return t_d, t_h, t_w


def official_bias(q_grid: torch.Tensor, rel_d, rel_h, rel_w, real: Grid) -> torch.Tensor:
    """Materialise the official bias ``(B, heads, D*H*W, S^3)`` for the real queries of ``q_grid``."""
    t_d, t_h, t_w = bias_terms(q_grid, rel_d, rel_h, rel_w, real)
    bias = (t_d[:, :, :, :, :, None, None, :] + t_h[:, :, :, :, None, :, None, :]
            + t_w[:, :, :, :, None, None, :, :])
    b, n = q_grid.shape[:2]
    return bias.reshape(b, n, real[0] * real[1] * real[2], -1)


def grid_view(t: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(B, heads, N, C)`` tokens as ``(B, heads, D, H, W, C)``."""
    return t.reshape(t.shape[0], t.shape[1], *grid, t.shape[-1])


def rel_pos_attention_eager(q, k, v, rel_d, rel_h, rel_w, grid: Grid, scale: float) -> torch.Tensor:
    """Global attention over one grid, the official way: ``softmax((q*scale) k^T + bias) v``."""
    logits = (q * scale) @ k.transpose(-2, -1) + official_bias(grid_view(q, grid), rel_d, rel_h, rel_w, grid)
    return logits.softmax(dim=-1) @ v


def rel_pos_attention_sdpa(q, k, v, rel_d, rel_h, rel_w, grid: Grid, scale: float) -> torch.Tensor:
    """The same as :func:`rel_pos_attention_eager` through ``scaled_dot_product_attention``."""
    bias = official_bias(grid_view(q, grid), rel_d, rel_h, rel_w, grid).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def pad_window(t: torch.Tensor, grid: Grid, window: Grid, fill: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, C)`` tokens of ``grid`` at the start of a ``(B, heads, *window, C)`` grid filled with
    ``fill``."""
    b, h, _, c = t.shape
    out = fill.to(t.dtype).view(1, h, 1, 1, 1, c).expand(b, h, *window, c).clone()
    out[:, :, : grid[0], : grid[1], : grid[2]] = grid_view(t, grid)
    return out


def padded_window_attention_eager(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid: Grid, window: Grid,
                                  scale: float) -> torch.Tensor:
    """SAM-Med3D's windowed attention: the grid zero-padded at the end of each axis to ``window`` tokens.

    Padded tokens are zero vectors after the block's first norm, so their queries, keys and values are the
    qkv biases ``pad_qkv = (q_bias, k_bias, v_bias)``, each ``(heads, C)``; they are not masked. Only the real
    queries are computed (the official code crops the padded ones away), but the official bias reads padded
    queries too, so they enter through :func:`official_bias`.
    """
    q_grid = pad_window(q, grid, window, pad_qkv[0])
    k_full = pad_window(k, grid, window, pad_qkv[1]).flatten(2, 4)
    v_full = pad_window(v, grid, window, pad_qkv[2]).flatten(2, 4)
    bias = official_bias(q_grid, rel_d, rel_h, rel_w, grid).to(q.dtype)
    return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=bias, scale=scale)


def rel_pos_attention_masked_eager(q, k, v, rel_d, rel_h, rel_w, grid: Grid, scale: float,
                                   allowed: torch.Tensor) -> torch.Tensor:
    """:func:`rel_pos_attention_eager` restricted to the query-key pairs where ``allowed (N, N)`` is True.

    The reference of the 3D sparse mode: the official logits, with dropped pairs set to ``-inf``.
    """
    logits = (q * scale) @ k.transpose(-2, -1) + official_bias(grid_view(q, grid), rel_d, rel_h, rel_w, grid)
    return logits.masked_fill(~allowed.to(q.device), float("-inf")).softmax(dim=-1) @ v
