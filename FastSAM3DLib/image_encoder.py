"""The 3D ViT image encoder of SAM-Med3D and FastSAM3D, one code path driven by :class:`EncoderConfig`.

The two official encoders differ in ways baked into their weights (see the project's ARCH notes):

* SAM-Med3D: 12 pre-norm blocks (``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``); blocks outside
  ``global_attn_indexes`` zero-pad the 8^3 token grid to a 14^3 window and attend over the padding unmasked.
* FastSAM3D: 6 blocks in its own form (``x + attn(norm1 x)``, then ``y = norm2 x; y + mlp(y)``); the first
  ``mlp_only_blocks`` have no attention at all; the rest are global.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import attention
from .layers import LayerNorm3d, MLPBlock
from .model_configs import EncoderConfig


class RelPosAttention(nn.Module):
    """Multi-head self-attention with decomposed 3D relative position bias (official parameter names).

    ``window`` > 0 reproduces SAM-Med3D's windowed blocks: the token grid is zero-padded at the end of each
    axis to ``window`` tokens per side (a single window for the official 8^3 grid).
    ``backend``/``sparse``: see :mod:`FastSAM3DLib.attention` (``sparse`` applies to global attention only).
    """

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int, int], window: int = 0,
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.grid = tuple(grid)
        self.window = (window,) * 3 if window else None
        if self.window and any(g > w for g, w in zip(self.grid, self.window)):
            raise ValueError(f"token grid {self.grid} is larger than the attention window {self.window}; "
                             "only single-window inputs (128^3 volumes) are supported")
        table = self.window or self.grid
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * table[0] - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * table[1] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * table[2] - 1, self.head_dim))
        self.backend = backend
        self.sparse = None  # None (dense, exact) or an attention.SparseLayout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the ``(B, D, H, W, C)`` token grid and project back."""
        b, d, h, w, c = x.shape
        if (d, h, w) != self.grid:
            raise ValueError(f"token grid {(d, h, w)} does not match the configured grid {self.grid}")
        qkv = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        if self.window:
            pad_qkv = self.qkv.bias.view(3, self.num_heads, self.head_dim)
            out = attention.padded_window_attention(q, k, v, pad_qkv, *tables, self.grid, self.window,
                                                    self.scale, backend=self.backend)
        else:
            out = attention.rel_pos_attention(q, k, v, *tables, self.grid, self.scale, backend=self.backend,
                                              sparse=self.sparse)
        out = out.permute(0, 2, 1, 3).reshape(b, d, h, w, c)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """One transformer block in either official form; ``attn is None`` for FastSAM3D's MLP-only blocks."""

    def __init__(self, cfg: EncoderConfig, index: int, backend: str) -> None:
        super().__init__()
        self.form = cfg.block_form
        has_attention = index >= cfg.mlp_only_blocks
        if has_attention:
            window = 0 if index in cfg.global_attn_indexes else cfg.window_size
            self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
            self.attn = RelPosAttention(cfg.embed_dim, cfg.num_heads, cfg.grid, window, backend)
        else:
            self.attn = None
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLPBlock(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``(B, D, H, W, C)`` tokens."""
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        if self.form == "fastsam3d":
            x = self.norm2(x)
            return x + self.mlp(x)
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches to channels-last tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B, X/p, Y/p, Z/p, embed_dim)``."""
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoder3D(nn.Module):
    """Volume ``(B, 1, 128, 128, 128)`` -> image embedding ``(B, 384, 8, 8, 8)``."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *cfg.grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(EncoderBlock(cfg, i, backend) for i in range(cfg.depth))
        self.neck = nn.Sequential(
            nn.Conv3d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm3d(cfg.out_chans),
            nn.Conv3d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(cfg.out_chans),
        )

    def set_attention_backend(self, backend: str, sparse=None) -> None:
        """Route every attention block through ``backend`` (see :mod:`FastSAM3DLib.attention`).

        ``sparse``: None for dense attention (exact, the default) or an ``attention.SparseLayout`` for the 3D
        block-sparse mode in the global-attention blocks (SAM-Med3D's padded windows stay dense).
        """
        attention.resolve_backend(backend)  # validates the name; "auto" is decided per call
        backend = backend or "auto"
        if sparse is not None and not isinstance(sparse, attention.SparseLayout):
            raise TypeError(f"sparse must be None or an attention.SparseLayout, got {type(sparse).__name__}")
        for block in self.blocks:
            if block.attn is not None:
                block.attn.backend = backend
                block.attn.sparse = sparse if block.attn.window is None else None

    def block_outputs(self, x: torch.Tensor, depth: Optional[int] = None) -> List[torch.Tensor]:
        """The tokens (B, D, H, W, C) after each of the first ``depth`` blocks (default: all), without the neck.

        Distillation stages that match only early blocks use it to skip the blocks after them.
        """
        expected = (self.cfg.in_chans,) + (self.img_size,) * 3
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"image encoder expects (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        depth = len(self.blocks) if depth is None else depth
        if not 1 <= depth <= len(self.blocks):
            raise ValueError(f"depth must be between 1 and {len(self.blocks)}, got {depth}")
        x = self.patch_embed(x) + self.pos_embed
        outputs: List[torch.Tensor] = []
        for block in self.blocks[:depth]:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, return_block_outputs: bool = False):
        """Encode a batch of volumes; optionally also return the tokens after every block (for distillation)."""
        outputs = self.block_outputs(x)
        embedding = self.neck(outputs[-1].permute(0, 4, 1, 2, 3))
        return (embedding, outputs) if return_block_outputs else embedding
