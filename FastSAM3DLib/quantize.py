"""The ``fast`` precision: the image encoder's matrix products in int8 on the CPU (dynamic quantization).

``exact`` (the default) runs the official float32 network. ``fast`` replaces, in the image encoder only, every
linear layer (attention qkv and projection, MLPs), the patch embedding and the neck's convolutions by int8
matrix products: each weight row is quantised once with its own scale (per output channel), each input row
(token, patch, or 3x3x3 neighbourhood) at run time with its own scale (per token), the products accumulate
exactly in int32 and are rescaled to float32. Attention itself, the norms and the prompt encoder and mask
decoder stay float32. The int8 kernel (``torch._int_mm`` where the CPU has AVX-512 VNNI or AMX, oneDNN's on
AVX2) is chosen per machine by :mod:`.int8_products`, which also decides how input rows are quantised.

On official-size FastSAM3D this makes the encoder about 2-3x faster on a CPU at an embedding error of ~1e-2
(relative L2, random weights). Whether that is close enough is measured, not assumed: ``Testing/test_fast_path.py``
compares the thresholded masks of both precisions, and the README's Speed options give the agreement on real
data. Choose it with ``build_model(..., precision="fast")`` or ``FASTSAM3D_PRECISION=fast``; the exact path is
always one setting away. Where int8 products are unavailable, slower than float32 on this CPU, or pointless
(CUDA, MPS: use bf16 there), ``fast`` leaves the model exact and says why in ``model.precision_note``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import int8_products
from .errors import SettingError

#: Environment variable choosing the default precision of :func:`FastSAM3DLib.registry.build_model`.
ENV_VAR = "FASTSAM3D_PRECISION"
PRECISIONS = ("exact", "fast")


def resolve_precision(requested: Optional[str] = None) -> str:
    """``requested``, else ``$FASTSAM3D_PRECISION``, else ``"exact"``; SettingError (a ValueError) for an unknown
    name."""
    name = (requested or os.environ.get(ENV_VAR) or "exact").strip().lower()
    if name not in PRECISIONS:
        source = "" if requested else f" (from the environment variable {ENV_VAR})"
        raise SettingError(f"unknown precision {name!r}{source}: choose one of {', '.join(PRECISIONS)}")
    return name


def int8_support(device_type: str = "cpu") -> Tuple[bool, str]:
    """(True, "") where the fast precision applies on this device type: an int8 kernel works and is faster than
    float32 (:func:`.int8_products.choose_kernel`); else (False, why not)."""
    kernel, why = int8_products.choose_kernel(device_type)
    return kernel is not None, why


def _default_kernel(kernel: Optional[str]) -> str:
    """``kernel``, else the one chosen for this CPU, else (layers built directly although no kernel pays off)
    oneDNN's where it works, as it is never far slower than float32."""
    chosen = kernel or int8_products.choose_kernel("cpu")[0]
    if chosen:
        return chosen
    return "onednn" if int8_products.kernel_works("onednn")[0] else "int_mm"


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W quantised per output channel and x per row (token) at run time, int32 sums.

    ``weight`` is (out, in) like ``nn.Linear``'s; ``bias`` stays a float32 tensor (the SAM-Med3D padded-window
    attention reads ``qkv.bias``). ``kernel``: the int8 kernel (:mod:`.int8_products`; default: the one chosen
    for this CPU), which also decides how the rows are quantised.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel: Optional[str] = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        quantized, scale = int8_products.quantize_rows_symmetric(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.int8_kernel = _default_kernel(kernel)
        self.register_buffer("weight_int8", quantized.t().contiguous())  # (in, out) for x @ W^T
        self.register_buffer("weight_scale", scale.reshape(-1))
        self.register_buffer("weight_sum", quantized.sum(dim=1, dtype=torch.float32))  # zero-point correction
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = int8_products.PackedWeights()

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Optional[str] = None) -> "Int8Linear":
        """The int8 copy of ``linear``."""
        return cls(linear.weight, linear.bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("The fast (int8) precision is for inference only: build the model with "
                               "precision='exact' (unset FASTSAM3D_PRECISION) to train it.")
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        quantized, scale, zero = int8_products.quantize_activations(rows, self.int8_kernel)
        out = int8_products.integer_product(quantized, self.weight_int8, self.int8_kernel, self._packed)
        if zero is not None:
            out.addcmul_(zero, self.weight_sum, value=-1.0)
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({self.int8_kernel})"


class Int8Conv3d(nn.Module):
    """A cubic-kernel ``nn.Conv3d`` (no groups, no dilation, zero padding) with int8 products.

    A patchifying convolution (stride = kernel, no padding, like the patch embedding) is one
    :class:`Int8Linear` over the patches, each patch quantised with its own scale. A stride-1 convolution
    (the neck's 3x3x3) is a sum over the kernel offsets of shifted ``(voxels, C) @ (C, out)`` int8 products:
    each voxel's channel vector is quantised once with its own scale, so no im2col copy is made.
    ``channels_last``: return ``(B, D, H, W, C)`` (what the patch embedding hands on) instead of
    ``(B, C, D, H, W)`` (a permuted view).
    """

    def __init__(self, conv: nn.Conv3d, channels_last: bool = False, kernel: Optional[str] = None) -> None:
        super().__init__()
        kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
        if conv.groups != 1 or set(conv.dilation) != {1} or len({*kernel}) != 1 or len({*stride}) != 1 or \
                isinstance(padding, str) or len({*padding}) != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"Int8Conv3d needs a cubic, ungrouped, undilated, zero-padded convolution, got {conv}")
        self.kernel, self.stride, self.padding = kernel[0], stride[0], padding[0]
        self.patchify = self.stride == self.kernel and self.padding == 0
        if not self.patchify and self.stride != 1:
            raise ValueError(f"Int8Conv3d supports stride 1 or stride = kernel (patches), got {conv}")
        self.channels_last = channels_last
        self.out_channels = conv.out_channels
        self.int8_kernel = _default_kernel(kernel)
        if self.patchify:
            self.linear = Int8Linear(conv.weight.reshape(conv.out_channels, -1), conv.bias, self.int8_kernel)
        else:  # one (in, out) int8 matrix per kernel offset, all with the same per-output-channel scale
            weight = conv.weight.detach().float()  # (out, in, k, k, k)
            quantized, scale = int8_products.quantize_rows_symmetric(weight.reshape(conv.out_channels, -1))
            taps = quantized.reshape(weight.shape).permute(2, 3, 4, 1, 0)  # (k, k, k, in, out)
            self.register_buffer("weight_int8", taps.reshape(-1, weight.shape[1], conv.out_channels).contiguous())
            self.register_buffer("weight_sum", self.weight_int8.sum(dim=1, dtype=torch.float32))  # (taps, out)
            self.register_buffer("weight_scale", scale.reshape(-1))
            self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
            self._packed = int8_products.PackedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patchify:
            b, k = x.shape[0], self.kernel
            patches = x.unfold(2, k, k).unfold(3, k, k).unfold(4, k, k).permute(0, 2, 3, 4, 1, 5, 6, 7)
            d, h, w = patches.shape[1:4]  # (B, D', H', W', C, k, k, k): the weight's (C, kd, kh, kw) order
            out = self.linear(patches.reshape(b * d * h * w, -1)).reshape(b, d, h, w, -1)
        else:
            out = self._shifted_products(x)
        return out if self.channels_last else out.permute(0, 4, 1, 2, 3)

    def _shifted_products(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("The fast (int8) precision is for inference only: build the model with "
                               "precision='exact' (unset FASTSAM3D_PRECISION) to train it.")
        b, c, d, h, w = x.shape
        k, p = self.kernel, self.padding
        kernel = self.int8_kernel
        quantized, scale, zero = int8_products.quantize_activations(
            x.permute(0, 2, 3, 4, 1).reshape(-1, c).float(), kernel)
        padding = (0, 0, p, p, p, p, p, p)  # padding voxels: value, scale and zero point 0 contribute nothing
        quantized = F.pad(quantized.reshape(b, d, h, w, c), padding)
        scale = F.pad(scale.reshape(b, d, h, w, 1), padding)
        zero = None if zero is None else F.pad(zero.reshape(b, d, h, w, 1), padding)
        od, oh, ow = d + 2 * p - k + 1, h + 2 * p - k + 1, w + 2 * p - k + 1
        out = torch.zeros((b * od * oh * ow, self.out_channels), dtype=torch.float32, device=x.device)
        tap = 0
        for i in range(k):
            for j in range(k):
                for m in range(k):
                    window = (slice(None), slice(i, i + od), slice(j, j + oh), slice(m, m + ow))
                    rows = quantized[window].reshape(-1, c)
                    product = int8_products.integer_product(rows, self.weight_int8[tap], kernel, self._packed, tap)
                    if zero is not None:
                        product.addcmul_(zero[window].reshape(-1, 1), self.weight_sum[tap], value=-1.0)
                    out.addcmul_(product, scale[window].reshape(-1, 1))
                    tap += 1
        out.mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(b, od, oh, ow, self.out_channels)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, int8 ({self.int8_kernel})"


class _Int8PatchEmbed(nn.Module):
    """:class:`~FastSAM3DLib.image_encoder.PatchEmbed3D` with its convolution in int8 (same output layout)."""

    def __init__(self, patch_embed: nn.Module, kernel: Optional[str] = None) -> None:
        super().__init__()
        self.proj = Int8Conv3d(patch_embed.proj, channels_last=True, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def quantize_encoder(encoder: nn.Module, kernel: Optional[str] = None) -> int:
    """Replace, in place, the encoder's linear layers, patch embedding and neck convolutions by int8 ones.

    Returns the number of layers replaced. The encoder must be in eval mode on the CPU; its float weights are
    dropped (build a new model for the exact path). ``kernel``: the int8 kernel (default: the one chosen for
    this CPU by :func:`.int8_products.choose_kernel`).
    """
    kernel = _default_kernel(kernel)
    count = 0
    for block in encoder.blocks:
        for module in [block.mlp] + ([block.attn] if block.attn is not None else []):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int8Linear.from_linear(child, kernel))
                    count += 1
    encoder.patch_embed = _Int8PatchEmbed(encoder.patch_embed, kernel)
    count += 1
    for index, layer in enumerate(encoder.neck):
        if isinstance(layer, nn.Conv3d):
            encoder.neck[index] = Int8Conv3d(layer, kernel=kernel)
            count += 1
    return count
