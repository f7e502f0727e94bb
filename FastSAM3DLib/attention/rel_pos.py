"""The official relative position bias as small factors, and the closed form of SAM-Med3D's padded keys.

For a cubic ``S^3`` window holding a real ``(D, H, W)`` grid at its start (``S == D == H == W`` for global
attention), the official bias of real query ``p = (qd, qh, qw)`` (query row ``r = qd*H + qh``) and real key
``(kd, kh, kw)`` is (see :mod:`.reference`)::

    bias = t_d[p, kw] + t_h[r, kd, kw] + t_w[r, kh, kw]

so three tables of ``O(N*S)`` entries replace the ``N x N`` bias. Both the PyTorch path and the Triton kernel
read the bias from these factors.

SAM-Med3D's windowed blocks add ``S^3 - D*H*W`` padded keys that all carry the same key and value (the qkv
biases) and differ only through the bias. Their softmax contribution to query ``p`` is therefore one virtual key
with value ``v_pad`` and logit ``scale * q.k_pad + log M(p)``, where ``M(p)`` is the sum of ``exp(bias)`` over the
padded keys. Because the bias is a sum of per-axis terms, ``M`` is a sum of products of per-axis sums. The padded
set is split into three disjoint parts (no subtraction, so no cancellation)::

    {kw >= W}  U  {kw < W, kd >= D}  U  {kw < W, kd < D, kh >= H}

and every sum is taken in log space (log-sum-exp, i.e. with a max shift).
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .reference import relative_table

Grid = Tuple[int, int, int]


@dataclass
class BiasFactors:
    """Factors of the official bias for real queries and real keys, float32.

    * ``t_d (B, heads, N, W)``: ``t_d[p, kw]``
    * ``t_h (B, heads, D*H, D, W)``: ``t_h[r, kd, kw]``
    * ``t_w (B, heads, D*H, H, W)``: ``t_w[r, kh, kw]``
    * ``pad_log_mass (B, heads, N)`` or None: ``log sum_{padded keys} exp(bias[p, key])`` (windowed blocks only)
    """

    grid: Grid
    t_d: torch.Tensor
    t_h: torch.Tensor
    t_w: torch.Tensor
    pad_log_mass: Optional[torch.Tensor] = None


def _cube_side(grid: Grid, window: Optional[Grid]) -> int:
    box = tuple(window) if window else tuple(grid)
    if len(set(box)) != 1 or len(set(grid)) != 1:
        raise ValueError(f"the official relative position bias is defined for cubic grids, got {tuple(grid)}"
                         + (f" in window {box}" if window else ""))
    if grid[0] > box[0]:
        raise ValueError(f"token grid {tuple(grid)} does not fit in the window {box}")
    return box[0]


def bias_factors(q: torch.Tensor, rel_d: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, grid: Grid,
                 window: Optional[Grid] = None, q_pad: Optional[torch.Tensor] = None) -> BiasFactors:
    """Compute :class:`BiasFactors` from the unscaled queries ``q (B, heads, N, C)`` of the real cubic ``grid``.

    ``window``: SAM-Med3D's cubic window the grid is zero-padded into (None for global attention); then
    ``q_pad (heads, C)`` is the query of a padded token (the q bias) and ``pad_log_mass`` is filled in.
    """
    b, nh, n, c = q.shape
    d, h, w = grid
    if n != d * h * w:
        raise ValueError(f"{n} queries do not fill the token grid {tuple(grid)}")
    s = _cube_side(grid, window)
    qg = q.float().reshape(b, nh, d, h, w, c)
    # The per-row terms read the queries of the whole (qd, qh) row of the window: ``t_h[r, kd, kw]`` uses the
    # query at w-position kd, ``t_w[r, kh, kw]`` the one at w-position kh. For real keys (kd, kh < W) these
    # are real queries; padded positions only enter the padding mass below.
    t_d = torch.einsum("bndhwc,dkc->bndhwk", qg, relative_table(s, s, rel_d)[:d].float())  # [qd,qh,qw, kw<S]
    t_h = torch.einsum("bndhjc,hkc->bndhjk", qg, relative_table(s, s, rel_h)[:h].float())  # [qd,qh, kd<W, kw<S]
    t_w = torch.einsum("bndhjc,jkc->bndhjk", qg, relative_table(s, s, rel_w)[:w].float())  # [qd,qh, kh<W, kw<S]
    factors = BiasFactors(tuple(grid), t_d[..., :w].reshape(b, nh, n, w), t_h[..., :w].reshape(b, nh, d * h, d, w),
                          t_w[..., :w].reshape(b, nh, d * h, h, w))
    if s > w:
        if q_pad is None:
            raise ValueError("a padded window needs q_pad, the query of a padded token")
        factors.pad_log_mass = _padding_log_mass(t_d, t_h, t_w, q_pad, rel_h, rel_w, s).reshape(b, nh, n)
    return factors


def _padding_log_mass(t_d, t_h, t_w, q_pad, rel_h, rel_w, s: int) -> torch.Tensor:
    """``log sum exp(bias)`` over the padded keys, ``(B, n, D, H, W)``, from real-row factors over all kw < S.

    On a cubic grid a padded key index kd >= W (resp. kh >= W) reads the padded query, so those terms do not
    depend on the query: ``q_pad . Rh[qh, kw]`` (the same for all S - W padded kd) and ``q_pad . Rw[kh, kw]``.
    """
    w = t_h.shape[-2]
    q_pad = q_pad.float()
    h_pad = torch.einsum("nc,hkc->nhk", q_pad, relative_table(s, s, rel_h)[: t_h.shape[3]].float())  # (n, H, S)
    h_hi = (h_pad + math.log(s - w))[None, :, None]  # lse over kd >= W: (1, n, 1, H, S)
    w_pad = torch.einsum("nc,jkc->njk", q_pad, relative_table(s, s, rel_w)[w:].float())  # (n, S-W, S)
    w_hi = torch.logsumexp(w_pad, dim=1)[None, :, None, None]  # lse over kh >= W: (1, n, 1, 1, S)
    h_lo, w_lo = torch.logsumexp(t_h, dim=-2), torch.logsumexp(t_w, dim=-2)  # over real kd / kh: (B, n, D, H, S)
    w_all = torch.logaddexp(w_lo, w_hi)
    # per (row, kw), the padded keys' mass without the t_d term:
    #   kw >= W: every (kd, kh);  kw < W: kd padded (any kh), or kd real and kh padded
    per_kw = torch.logaddexp(h_hi + w_all, h_lo + w_hi)
    per_kw[..., w:] = torch.logaddexp(h_lo, h_hi)[..., w:] + w_all[..., w:]
    return torch.logsumexp(t_d + per_kw[:, :, :, :, None, :], dim=-1)


def dense_bias(factors: BiasFactors, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Materialise ``(B, heads, N, N)`` bias from the factors (for the PyTorch path and for tests).

    ``out``: optional ``(B, heads, N, N)`` view (any strides, e.g. the leading columns of a wider buffer).
    """
    d, h, w = factors.grid
    b, nh, n, _ = factors.t_d.shape
    t_d = factors.t_d.view(b, nh, d, h, w, 1, 1, w)
    t_h = factors.t_h.view(b, nh, d, h, 1, d, 1, w)
    t_w = factors.t_w.view(b, nh, d, h, 1, 1, h, w)
    if out is None:
        out = torch.empty(b, nh, n, n, dtype=torch.float32, device=factors.t_d.device)
    view = out.view(b, nh, d, h, w, d, h, w)
    add_into(view, t_d, t_h)
    view.add_(t_w)
    return out


def add_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a + b`` (broadcast), without a temporary unless autograd needs one (``out=`` is not
    differentiable)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out.copy_(a + b)
    else:
        torch.add(a.expand(out.shape), b, out=out)
