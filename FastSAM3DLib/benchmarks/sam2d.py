"""The paper's 2D baseline: a SAM ViT-B image encoder run slice by slice (1024² per slice).

``segment-anything`` (the official code) is used when it is installed. Where it is not (e.g. a bare GPU
machine), :class:`ViTImageEncoder` stands in: the same network written in plain PyTorch — 16x16 patches,
absolute position embedding, 12 blocks of width 768 with 12 heads, 14x14 windowed attention (zero-padded to
whole windows) except in blocks 2, 5, 8 and 11 (global), the decomposed relative position bias, the official
eager attention (scores, bias, softmax, matmul), and the 256-channel convolutional neck. Its parameters carry
the official names and shapes, so the official state dict loads into it and gives the same output
(``Testing/test_gpu_check.py`` checks this against ``segment-anything`` on a small configuration).
Only the image encoder is timed: it is >99 % of a 2D SAM click and the ratio is defined on encoders.
"""
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a SAM image encoder (defaults: ViT-B at 1024²)."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256


VIT_B = ViTConfig()
TINY = ViTConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
                 out_chans=16)


class _LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias[:, None, None]


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class _Attention(nn.Module):
    """Multi-head attention on an (B, H, W, C) token map with the decomposed relative position bias."""

    def __init__(self, dim: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, c // self.heads).unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        # relative position terms: query row/column index minus key row/column index, looked up per query
        ih, iw = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        rows = self.rel_pos_h[ih[:, None] - ih[None, :] + h - 1]  # (h, h, d)
        cols = self.rel_pos_w[iw[:, None] - iw[None, :] + w - 1]  # (w, w, d)
        q_map = q.reshape(b * self.heads, h, w, -1)
        bias_h = torch.einsum("nhwd,hkd->nhwk", q_map, rows.to(q.dtype))
        bias_w = torch.einsum("nhwd,wkd->nhwk", q_map, cols.to(q.dtype))
        scores = (scores.view(-1, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]).view(-1, h * w, h * w)
        out = scores.softmax(dim=-1) @ v
        out = out.view(b, self.heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)


class _Block(nn.Module):
    def __init__(self, config: ViTConfig, window: int) -> None:
        super().__init__()
        grid = config.img_size // config.patch_size
        dim = config.embed_dim
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, config.num_heads, window or grid)
        self.mlp = _MLP(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, x = x, self.norm1(x)
        if self.window:
            b, h, w, c = x.shape
            s = self.window
            ph, pw = -h % s, -w % s
            x = F.pad(x, (0, 0, 0, pw, 0, ph))  # zero tokens complete the last windows
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            x = self.attn(x)
            x = x.view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ViTImageEncoder(nn.Module):
    """SAM's ViT image encoder in plain PyTorch: (B, 3, S, S) -> (B, out_chans, S/16, S/16)."""

    def __init__(self, config: ViTConfig = VIT_B) -> None:
        super().__init__()
        grid = config.img_size // config.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            _Block(config, 0 if i in config.global_attn_indexes else config.window_size) for i in range(config.depth))
        self.neck = nn.Sequential(nn.Conv2d(config.embed_dim, config.out_chans, 1, bias=False),
                                  _LayerNorm2d(config.out_chans),
                                  nn.Conv2d(config.out_chans, config.out_chans, 3, padding=1, bias=False),
                                  _LayerNorm2d(config.out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def _segment_anything_module(name: str):
    """``segment_anything.<name>`` without the package ``__init__`` (its predictor needs torchvision)."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            raise ImportError("segment-anything is not installed (pip install segment-anything)")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    return importlib.import_module(f"segment_anything.{name}")


def official_encoder(config: ViTConfig = VIT_B) -> nn.Module:
    """segment-anything's own ``ImageEncoderViT`` with ``config`` (as ``build_sam_vit_b`` builds it)."""
    from functools import partial

    module = _segment_anything_module("modeling.image_encoder")
    return module.ImageEncoderViT(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
        out_chans=config.out_chans, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=config.window_size, global_attn_indexes=config.global_attn_indexes)


def build_encoder(config: ViTConfig = VIT_B, prefer_official: bool = True) -> Tuple[nn.Module, str]:
    """(encoder, implementation): segment-anything's when installed and preferred, else :class:`ViTImageEncoder`."""
    if prefer_official:
        try:
            return official_encoder(config), "segment-anything"
        except ImportError:
            pass
    return ViTImageEncoder(config), "torch-only ViT-B equivalent (segment-anything not installed)"


def image_input(config: ViTConfig, device, seed: int = 0) -> torch.Tensor:
    """A random (1, 3, S, S) slice."""
    return torch.randn(1, 3, config.img_size, config.img_size,
                       generator=torch.Generator().manual_seed(seed)).to(device)


def describe(config: ViTConfig) -> Dict[str, object]:
    """The configuration as a JSON-friendly dict."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}
