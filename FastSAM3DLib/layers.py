"""Small building blocks shared by the encoder, prompt encoder and decoder (official parameter names)."""
from typing import Type

import torch
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a ``(B, C, D, H, W)`` tensor (biased variance, like the official one)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each voxel's channel vector."""
        return self.weight[:, None, None, None] * self._standardized(x, 1) + self.bias[:, None, None, None]

    def normalize_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation with the channels on the last axis (``(..., C)``, e.g. voxels as rows)."""
        return self.weight * self._standardized(x, -1) + self.bias

    def _standardized(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps)`` over ``dim`` (the official formula, biased variance)."""
        mean = x.mean(dim, keepdim=True)
        var = (x - mean).pow(2).mean(dim, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


class MLPBlock(nn.Module):
    """Two-layer feed-forward block ``lin2(act(lin1(x)))``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to the last axis."""
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's hypernetwork and IoU heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers with ReLU after all but the last."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
