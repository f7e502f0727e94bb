"""The 3D prompt encoder: point clicks and previous low-res logits to sparse and dense embeddings.

Two official quirks are reproduced on purpose because the weights were trained with them: the Fourier
features are ``[sin, cos, sin]``, and the dense positional encoding treats point coordinate 0 as grid
axis 1 and coordinate 1 as grid axis 0. Points are voxel indices in the input tensor's own axis order.
"""
import math
from typing import Optional, Tuple

import torch
from torch import nn

from .layers import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier-feature positional encoding of normalised 3D coordinates."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``(..., 3)`` coordinates in [0, 1] as ``(..., 3 * num_pos_feats)`` features."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def dense(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """Encoding of every cell centre of a grid, ``(C, D0, D1, D2)``, with the official axis swap."""
        device = self.positional_encoding_gaussian_matrix.device
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in size]
        a0, a1, a2 = torch.meshgrid(*axes, indexing="ij")
        return self.encode(torch.stack([a1, a0, a2], dim=-1)).permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: Tuple[int, int, int]) -> torch.Tensor:
        """Encode ``(B, N, 3)`` voxel coordinates of an image of ``image_size``."""
        scale = torch.tensor(image_size, dtype=torch.float32, device=coords.device)
        return self.encode(coords.to(torch.float32) / scale)


class PromptEncoder3D(nn.Module):
    """SAM-compatible ``forward(points=(coords, labels), boxes=None, masks=...)``."""

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int, int],
                 input_image_size: Tuple[int, int, int], mask_in_chans: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, ``(1, C, 8, 8, 8)``."""
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embed clicks (label 1 include, 0 exclude) plus the padding point the official code appends."""
        b = coords.shape[0]
        coords = torch.cat([coords.to(torch.float32) + 0.5,
                            torch.zeros((b, 1, 3), device=coords.device)], dim=1)
        labels = torch.cat([labels, -torch.ones((b, 1), device=labels.device, dtype=labels.dtype)], dim=1)
        emb = self.pe_layer.points(coords, self.input_image_size)
        pad = (labels == -1).unsqueeze(-1)
        emb = torch.where(pad, self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + (labels == 0).unsqueeze(-1) * self.point_embeddings[0].weight
        emb = emb + (labels == 1).unsqueeze(-1) * self.point_embeddings[1].weight
        return emb

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return sparse ``(B, N+1, C)`` and dense ``(B, C, 8, 8, 8)`` embeddings."""
        if boxes is not None:
            raise ValueError("box prompts are not supported by the 3D models (their checkpoints have no box "
                             "embeddings)")
        if points is not None:
            bs = points[0].shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        if points is not None:
            sparse = self.embed_points(*points)
        else:
            sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
