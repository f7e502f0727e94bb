"""The 3D mask decoder: a two-way transformer between prompt tokens and the image embedding."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, LayerNorm3d, MLPBlock


class TokenAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections and an optional internal downsampling."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.internal_dim = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(c)) v`` over ``(B, N, C)`` token sets."""
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayBlock(nn.Module):
    """Token self-attention, token-to-image, MLP, image-to-token (each followed by a LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        """Update prompt tokens ``queries`` and image tokens ``keys``."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe  # the image tokens do not change until the last step: one sum serves both attentions
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """``depth`` two-way blocks and a final token-to-image attention."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(embedding_dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        """Return the processed prompt tokens and image tokens ``(B, N, C)``."""
        # tokens made contiguous once: sums of a transposed view and a contiguous tensor, and norms of a
        # transposed view, are several times slower on a CPU, and every layer adds the positional encoding
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder3D(nn.Module):
    """SAM-compatible ``forward(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
    multimask_output)`` returning low-res mask logits ``(B, M, 32, 32, 32)`` and IoU predictions ``(B, M)``."""

    def __init__(self, transformer_dim: int, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, transformer_depth: int = 2, transformer_heads: int = 8,
                 transformer_mlp_dim: int = 2048) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer3D(transformer_depth, transformer_dim, transformer_heads,
                                               transformer_mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predict masks; ``multimask_output=False`` (every official 3D call) returns the first mask token only."""
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]

    def _upscaled_masks(self, tokens: torch.Tensor, grid: Tuple[int, int, int],
                        hyper_in: torch.Tensor) -> torch.Tensor:
        """``hyper_in @ output_upscaling(tokens as a volume)``: the masks ``(B, M, 4x, 4y, 4z)``.

        ``tokens`` ``(B, x*y*z, C)`` are the image tokens in grid order, ``hyper_in`` ``(B, M, C // 8)``. Each
        stride-2 transposed convolution is one matrix product per input voxel (its 2x2x2 outputs side by side),
        so the upscaled voxels stay in that blocked order, channels last, until the small masks are put in grid
        order at the end: the same sums as the modules in another order, equal to float rounding (about 10 %
        faster than the modules with channels-last input on one CPU thread, paired; one path for every device;
        ``Testing/test_model_parity.py`` checks it against the modules).
        """
        first, norm, first_act, second, second_act = self.output_upscaling
        b, n, c = tokens.shape
        k1, k2 = first.kernel_size[0], second.kernel_size[0]
        rows = second_act(_transposed_conv_rows(first_act(norm.normalize_last(_transposed_conv_rows(
            tokens.reshape(b * n, c), first))), second))  # (B * n * k1^3 * k2^3, C // 8): voxel, k1^3, k2^3
        masks = rows.reshape(b, -1, rows.shape[-1]) @ hyper_in.transpose(1, 2)  # (B, voxels in that order, M)
        x, y, z = grid
        blocked = masks.reshape(b, x, y, z, k1, k1, k1, k2, k2, k2, -1)
        size = (k1 * k2 * x, k1 * k2 * y, k1 * k2 * z)
        return blocked.permute(0, 10, 1, 4, 7, 2, 5, 8, 3, 6, 9).reshape(b, -1, *size)

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
        """All mask tokens' logits ``(B, 4, 32, 32, 32)`` and IoU predictions ``(B, 4)``."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)
        n = tokens.shape[0]
        src = image_embeddings if image_embeddings.shape[0] == n else image_embeddings.repeat_interleave(n, 0)
        src = src + dense_prompt_embeddings
        pos = image_pe if image_pe.shape[0] == n else image_pe.repeat_interleave(n, 0)
        grid = tuple(src.shape[2:])
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        masks = self._upscaled_masks(src, grid, hyper_in)
        return masks, self.iou_prediction_head(iou_token_out)


def _transposed_conv_rows(rows: torch.Tensor, conv: nn.ConvTranspose3d) -> torch.Tensor:
    """``conv`` (kernel = stride, no padding) on voxels given as rows ``(V, C_in)``: ``(V * k^3, C_out)``, each
    voxel's k x k x k outputs in a row after another (the blocked order of :meth:`MaskDecoder3D._upscaled_masks`)."""
    k = conv.kernel_size[0]
    if conv.kernel_size != (k, k, k) or conv.stride != (k, k, k) or conv.padding != (0, 0, 0) or \
            conv.output_padding != (0, 0, 0) or conv.dilation != (1, 1, 1) or conv.groups != 1:
        raise ValueError(f"{conv} is not a patch-wise transposed convolution (kernel = stride, no padding)")
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(c_in, k ** 3 * c_out)  # (C_in, k, k, k, C_out)
    out = (rows @ weight).reshape(-1, c_out)
    return out if conv.bias is None else out.add_(conv.bias)
