"""The PyTorch attention path (every device): ``scaled_dot_product_attention`` with the official bias.

* dense global attention: the bias is built from the small factors of :mod:`.rel_pos` and passed to SDPA;
* SAM-Med3D's padded windows: the 2232 padded keys collapse into one virtual key (closed form, see
  :mod:`.rel_pos`), so each block attends over ``N + 1`` keys instead of ``S^3``;
* the 3D sparse mode: boxes of query tiles attend to the box of their neighbour tiles, with the pairs the
  layout drops masked (:mod:`.sparse_layout`).

Precision: the bias is computed in float32 and cast to the query dtype (as the eager reference does). Shapes:
``q, k, v`` are ``(B, heads, N, C)``; outputs ``(B, heads, N, C)`` in the query dtype.
"""
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .rel_pos import BiasFactors, add_into, bias_factors, dense_bias
from .sparse_layout import BlockLayout, box_groups

Grid = Tuple[int, int, int]
_ALIGN = 16  # row stride of the bias buffers (aligned rows keep SDPA's fused kernels usable on every device)


def rel_pos_attention_torch(q, k, v, rel_d, rel_h, rel_w, grid: Grid, scale: float,
                            layout: Optional[BlockLayout] = None) -> torch.Tensor:
    """Global attention with the official bias; ``layout`` selects the 3D block-sparse mode."""
    factors = bias_factors(q, rel_d, rel_h, rel_w, grid)
    if layout is not None:
        return sparse_attention_torch(q, k, v, factors, scale, layout)
    b, nh, n, _ = q.shape
    bias = _bias_buffer(b, nh, n, n, q)
    dense_bias(factors, out=bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def padded_window_attention_torch(q, k, v, pad_qkv, rel_d, rel_h, rel_w, grid: Grid, window: Grid,
                                  scale: float) -> torch.Tensor:
    """SAM-Med3D's zero-padded window attention with the padded keys in closed form (one virtual key).

    Equal to :func:`.reference.padded_window_attention_eager` up to rounding. ``pad_qkv``: ``(3, heads, C)``
    query, key and value of a padded token (the qkv biases).
    """
    b, nh, n, c = q.shape
    factors = bias_factors(q, rel_d, rel_h, rel_w, grid, window, pad_qkv[0])
    if factors.pad_log_mass is None:  # the grid fills the window: nothing is padded
        bias = _bias_buffer(b, nh, n, n, q)
        dense_bias(factors, out=bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    bias = _bias_buffer(b, nh, n, n + 1, q)
    dense_bias(factors, out=bias[..., :n])
    bias[..., n] = factors.pad_log_mass
    k_pad = pad_qkv[1].to(k.dtype).view(1, nh, 1, c).expand(b, nh, 1, c)
    v_pad = pad_qkv[2].to(v.dtype).view(1, nh, 1, c).expand(b, nh, 1, c)
    return F.scaled_dot_product_attention(q, torch.cat([k, k_pad], 2), torch.cat([v, v_pad], 2),
                                          attn_mask=bias, scale=scale)


def _bias_buffer(b: int, nh: int, n_q: int, n_k: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(b, nh, n_q, n_k)`` bias whose rows are padded to an aligned stride."""
    width = -(-n_k // _ALIGN) * _ALIGN
    return torch.empty(b, nh, n_q, width, dtype=like.dtype, device=like.device)[..., :n_k]


def sparse_attention_torch(q, k, v, factors: BiasFactors, scale: float, layout: BlockLayout) -> torch.Tensor:
    """Block-sparse attention with the exact bias inside each neighbourhood (see :mod:`.sparse_layout`).

    Query tiles are processed in :func:`.sparse_layout.box_groups`: each group's queries and its key box are
    slices of the token grid, and its bias is a broadcast sum of slices of the factors, so nothing is gathered
    token by token; pairs of the key box that the layout drops are masked.
    """
    b, nh, n, c = q.shape
    d, h, w = factors.grid
    if tuple(layout.grid) != tuple(factors.grid) or layout.order.numel() != n:
        raise ValueError(f"sparse layout for grid {layout.grid} does not match the token grid {factors.grid}")
    grids = [t.reshape(b, nh, d, h, w, c) for t in (q, k, v)]
    t_d = factors.t_d.view(b, nh, d, h, w, w)
    t_h = factors.t_h.view(b, nh, d, h, d, w)
    t_w = factors.t_w.view(b, nh, d, h, h, w)
    out = torch.empty_like(grids[0])
    for group in box_groups(layout):
        (qd, qh, qw), (kd, kh, kw) = ([slice(*r) for r in box] for box in (group.query, group.keys))
        nq, nk = group.allowed.shape
        q_box = grids[0][:, :, qd, qh, qw].reshape(b, nh, nq, c)
        k_box, v_box = (t[:, :, kd, kh, kw].reshape(b, nh, nk, c) for t in grids[1:])
        sq = tuple(r.stop - r.start for r in (qd, qh, qw))
        sk = tuple(r.stop - r.start for r in (kd, kh, kw))
        bias = torch.empty(b, nh, nq, -(-nk // _ALIGN) * _ALIGN, dtype=torch.float32, device=q.device)[..., :nk]
        view = bias.view(b, nh, *sq, *sk)
        add_into(view, t_d[:, :, qd, qh, qw, kw].reshape(b, nh, *sq, 1, 1, sk[2]),
                 t_h[:, :, qd, qh, kd, kw].reshape(b, nh, sq[0], sq[1], 1, sk[0], 1, sk[2]))
        view.add_(t_w[:, :, qd, qh, kh, kw].reshape(b, nh, sq[0], sq[1], 1, 1, sk[1], sk[2]))
        allowed = _on_device(group.allowed, q.device)
        bias = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        res = F.scaled_dot_product_attention(q_box, k_box, v_box, attn_mask=bias, scale=scale)
        out[:, :, qd, qh, qw] = res.view(b, nh, *sq, c)
    return out.view(b, nh, n, c)


@lru_cache(maxsize=64)
def _on_device(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A cached copy of a (cached, immutable) layout tensor on ``device``."""
    return mask.to(device)
