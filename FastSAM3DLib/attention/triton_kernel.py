"""Triton flash-attention forward kernel with the official 3D relative position bias fused in.

One program computes ``BLOCK_M`` queries of one (batch, head): it walks the key tiles with an online softmax
(running max ``m``, running sum ``l``, unnormalised output ``acc``, all float32, base-2 exponentials), and adds
the official bias to each ``BLOCK_M x BLOCK_N`` logit tile from the three small factors of :mod:`.rel_pos`::

    bias[p, key] = t_d[p, kw] + t_h[row(p), kd, kw] + t_w[row(p), kh, kw]

(cached gathers from ``O(N*S)`` tables; the ``N x N`` bias never exists). Options, all compile-time:

* ``HAS_PAD``: SAM-Med3D's padded keys enter as one virtual key, i.e. the softmax state starts at
  ``m = pad_logit, l = 1, acc = v_pad`` instead of ``-inf, 0, 0`` (closed form, see :mod:`.rel_pos`);
* ``SPARSE``: queries and keys are tiles of :mod:`.sparse_layout`; each program loads its tokens through the
  layout's ``order`` (so outputs land at their own grid positions) and visits only its ``kv_tiles``. A tile of
  ``tile_size`` tokens (a runtime argument) is covered by ``tile_size / BLOCK_M`` programs and read in
  ``tile_size / BLOCK_N`` key blocks, so large tiles use the dense block sizes and need no more shared memory.

:func:`launch_config` is the one place that chooses the compile-time constants, ``num_warps`` and
``num_stages`` of a launch; the launcher and the ahead-of-time compile test (:mod:`.aot`) both use it.

fp32 inputs use IEEE fp32 dot products (no TF32) so the result matches the reference to ~1e-6; fp16/bf16
inputs use tensor-core dots with float32 accumulation, as flash attention does.

This module imports Triton at import time; :mod:`FastSAM3DLib.attention` imports it only when the Triton
backend is used. Set ``TRITON_INTERPRET=1`` before the first import to run it on CPU tensors (tests).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .rel_pos import BiasFactors
from .sparse_layout import BlockLayout


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation; ``DOT_UPCAST`` computes it on float32 copies of the operands.

    The upcast is exact for 16-bit inputs (their products fit in float32) and is used only by the CPU
    interpreter, whose ``tl.dot`` multiplies the raw bit patterns of bfloat16 operands (triton#11584).
    """
    if DOT_UPCAST:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b, input_precision=DOT_PRECISION)
    return result


@triton.jit
def _attend_tile(acc, l_i, m_i, q, offs_m, row_m, mask_m, offs_n, mask_n, offs_d, mask_d, K, V, stride_kn,
                 stride_vn, TD, TH, TW, GD: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, qk_scale,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Fold one key tile into the online-softmax state of a query tile."""
    log2e: tl.constexpr = 1.4426950408889634
    k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=mask_d[:, None] & mask_n[None, :],
                  other=0.0)
    logits = _dot(q, k_t, DOT_PRECISION, DOT_UPCAST) * qk_scale
    kw = offs_n % GW
    kh = (offs_n // GW) % GH
    kd = offs_n // (GW * GH)
    pair = mask_m[:, None] & mask_n[None, :]
    bias = tl.load(TD + offs_m[:, None] * GW + kw[None, :], mask=pair, other=0.0)
    bias += tl.load(TH + row_m[:, None] * (GD * GW) + (kd * GW + kw)[None, :], mask=pair, other=0.0)
    bias += tl.load(TW + row_m[:, None] * (GH * GW) + (kh * GW + kw)[None, :], mask=pair, other=0.0)
    logits = tl.where(mask_n[None, :], logits + bias * log2e, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return acc, l_i, m_new


# Runtime integers that are not strides are never specialised (a head count of 1 or a neighbour count that is a
# multiple of 16 would otherwise compile a separate kernel); strides keep Triton's divisibility specialisation.
@triton.jit(do_not_specialize=["num_heads", "max_kv_tiles", "tile_size"])
def rel_pos_attention_kernel(
        Q, K, V, Out, TD, TH, TW, PAD_LOGIT, PAD_V, ORDER, KV_TILES, KV_COUNT,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        num_heads, max_kv_tiles, tile_size, qk_scale,
        GD: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, SPARSE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Grid ``(query tiles, batch * heads)``; see the module docstring. The token grid is compile-time."""
    log2e: tl.constexpr = 1.4426950408889634
    N: tl.constexpr = GD * GH * GW
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh
    rows = GD * GH
    TD += bh.to(tl.int64) * N * GW
    TH += bh.to(tl.int64) * rows * GD * GW
    TW += bh.to(tl.int64) * rows * GH * GW

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if SPARSE:
        offs_m = tl.load(ORDER + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    row_m = offs_m // GW
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)

    if HAS_PAD:
        m_i = tl.load(PAD_LOGIT + bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0) * log2e
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        v_pad = tl.load(PAD_V + h * HEAD_DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + v_pad[None, :]
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    qk_scale = qk_scale * log2e
    if SPARSE:
        q_tile = (pid_m * BLOCK_M) // tile_size  # BLOCK_M divides tile_size
        count = tl.load(KV_COUNT + q_tile)
        for j in range(0, count):
            tile = tl.load(KV_TILES + q_tile * max_kv_tiles + j)
            for start in range(0, tile_size, BLOCK_N):  # BLOCK_N divides tile_size
                offs_n = tl.load(ORDER + tile * tile_size + start + tl.arange(0, BLOCK_N))
                acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, offs_m, row_m, mask_m, offs_n, offs_n < N, offs_d,
                                             mask_d, K, V, stride_kn, stride_vn, TD, TH, TW, GD, GH, GW, qk_scale,
                                             DOT_PRECISION, DOT_UPCAST)
    else:
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, offs_m, row_m, mask_m, offs_n, offs_n < N, offs_d,
                                         mask_d, K, V, stride_kn, stride_vn, TD, TH, TW, GD, GH, GW, qk_scale,
                                         DOT_PRECISION, DOT_UPCAST)

    out = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """What one kernel launch fixes at compile time: the ``tl.constexpr`` arguments, ``num_warps``, ``num_stages``."""

    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    num_stages: int

    @property
    def block_m(self) -> int:
        """Queries per program."""
        return dict(self.constexprs)["BLOCK_M"]

    def kwargs(self) -> dict:
        """Keyword arguments of the kernel launch: the constexprs, ``num_warps``, ``num_stages``, and FMA
        contraction kept on (Triton's default until 3.9; 3.10 turns it off unless asked)."""
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)

    def programs(self, tokens: int, batch_heads: int) -> Tuple[int, int]:
        """The launch grid: ``(query blocks, batch * heads)``."""
        return (-(-tokens // self.block_m), batch_heads)


def _dense_blocks(block_d: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dense kernel.

    Untuned (no GPU was available to tune on), chosen so every variant compiles for sm_80/sm_86/sm_89/sm_90
    within 99 KiB of shared memory (the sm_86/sm_89 limit), checked for every variant the dispatch can launch by
    ``Testing/test_attention_aot.py``: float32 uses a single stage (its tiles are twice as large), and head dims
    above 64 use 32-key blocks (64 x 64 blocks in two stages need 104 KiB on sm_86 with head dim 128).
    """
    return (64, 32 if block_d > 64 else 64, 4, 1 if dtype == torch.float32 else 2)


def launch_config(grid: Tuple[int, int, int], head_dim: int, dtype: torch.dtype, has_pad: bool = False,
                  tile_volume: Optional[int] = None, interpret: bool = False, allow_tf32: bool = False) -> LaunchConfig:
    """The compile-time configuration of a launch on a token ``grid`` with ``head_dim`` channels in ``dtype``.

    ``has_pad``: SAM-Med3D's padded keys (one virtual key); ``tile_volume``: tokens per tile of the 3D sparse
    layout (a power of two >= 16), None for dense attention; ``interpret``: the kernel runs in Triton's CPU
    interpreter (``TRITON_INTERPRET=1``); ``allow_tf32``: fp32 dot products on TF32 tensor cores. A sparse
    tile smaller than the dense blocks shrinks the blocks to the tile (and the warps with them); a larger one is
    read in dense-sized blocks. Raises ``ValueError`` for an unsupported dtype or tile volume.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernel handles float32/float16/bfloat16, got {dtype}")
    block_d = max(16, triton.next_power_of_2(int(head_dim)))
    block_m, block_n, num_warps, num_stages = _dense_blocks(block_d, dtype)
    if tile_volume is not None:
        if tile_volume < 16 or tile_volume & (tile_volume - 1):
            raise ValueError(f"the Triton sparse kernel needs a tile volume that is a power of two >= 16, "
                             f"got {tile_volume}")
        small_m, block_n = min(block_m, tile_volume), min(block_n, tile_volume)
        num_warps = max(1, num_warps * small_m // block_m)  # the same rows per warp
        block_m = small_m
    # fp32: exact IEEE products unless TF32 is allowed; 16-bit: the target's default (tensor cores)
    precision = None if dtype != torch.float32 else ("tf32" if allow_tf32 else "ieee")
    d, h, w = (int(g) for g in grid)
    constexprs = dict(GD=d, GH=h, GW=w, HEAD_DIM=int(head_dim), BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                      HAS_PAD=bool(has_pad), SPARSE=tile_volume is not None, DOT_PRECISION=precision,
                      DOT_UPCAST=bool(interpret) and dtype == torch.bfloat16)  # the interpreter's bf16 dot is wrong
    return LaunchConfig(tuple(constexprs.items()), num_warps, num_stages)


#: What an older Triton interpreter (3.6 here) raises under NumPy >= 2.4 in the sparse mode: its scalars are
#: 1-element arrays, which NumPy no longer converts to the loop bound ``count``. Compiled kernels are unaffected.
_INTERPRETER_SCALAR_DEFECT = "only 0-dimensional arrays can be converted to Python scalars"


def interpreter_defect(exc: BaseException) -> Optional[str]:
    """Why ``exc``, raised by a launch, is a defect of this Triton's CPU interpreter rather than of the kernel
    (the kernel then cannot be checked under this interpreter, only compiled: ``Testing/test_attention_aot.py``),
    or None."""
    if not _interpreted() or _INTERPRETER_SCALAR_DEFECT not in repr(exc):
        return None
    import numpy

    return (f"Triton {triton.__version__}'s interpreter cannot use a loaded value as a loop bound under NumPy "
            f"{numpy.__version__} (a newer Triton's can); the compiled kernel is not affected")


def _interpreted() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rel_pos_attention_kernel, InterpretedFunction)


def rel_pos_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factors: BiasFactors, scale: float,
                             pad_logit: Optional[torch.Tensor] = None, pad_v: Optional[torch.Tensor] = None,
                             layout: Optional[BlockLayout] = None, allow_tf32: bool = False) -> torch.Tensor:
    """``softmax(scale * q k^T + bias) v`` with the bias read from ``factors``, in the dtype of ``q``.

    ``q, k, v (B, heads, N, C)`` on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``), last dim contiguous.
    ``pad_logit (B, heads, N)`` float32 and ``pad_v (heads, C)``: an extra virtual key per query (SAM-Med3D's
    padded keys in closed form). ``layout``: 3D block-sparse mode (tile volume a power of two >= 16).
    ``allow_tf32``: let fp32 inputs use TF32 tensor cores (faster on Ampere+, ~1e-3 relative error).
    """
    b, nh, n, c = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    d, h, w = factors.grid
    if d * h * w != n:
        raise ValueError(f"{n} tokens do not fill the grid {factors.grid}")
    if layout is not None and tuple(layout.grid) != (d, h, w):
        raise ValueError(f"sparse layout for grid {layout.grid} does not match the token grid {factors.grid}")
    has_pad = pad_logit is not None
    config = launch_config((d, h, w), c, q.dtype, has_pad, None if layout is None else layout.tile_volume,
                           interpret=_interpreted(), allow_tf32=allow_tf32)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    t_d, t_h, t_w = (t.float().contiguous() for t in (factors.t_d, factors.t_h, factors.t_w))
    out = torch.empty(b, nh, n, c, dtype=q.dtype, device=q.device)
    if has_pad:
        pad_logit = pad_logit.float().contiguous()
        pad_v = pad_v.contiguous()
    else:
        pad_logit, pad_v = t_d, t_d  # unused placeholders
    if layout is not None:
        order = layout.order.to(device=q.device, dtype=torch.int32)
        kv_tiles = layout.kv_tiles.to(device=q.device, dtype=torch.int32)
        kv_count = layout.kv_count.to(device=q.device, dtype=torch.int32)
        max_kv, tile_size = layout.max_kv_tiles, layout.tile_volume
    else:
        order = kv_tiles = kv_count = t_d  # unused placeholders
        max_kv, tile_size = 0, 0
    rel_pos_attention_kernel[config.programs(n, b * nh)](
        q, k, v, out, t_d, t_h, t_w, pad_logit, pad_v, order, kv_tiles, kv_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        nh, max_kv, tile_size, float(scale), **config.kwargs())
    return out


def padding_logit(q: torch.Tensor, k_pad: torch.Tensor, factors: BiasFactors, scale: float) -> torch.Tensor:
    """Logit of the virtual padded key, ``scale * q . k_pad + log M`` (float32, ``(B, heads, N)``)."""
    return scale * torch.einsum("bnqc,nc->bnq", q.float(), k_pad.float()) + factors.pad_log_mass
