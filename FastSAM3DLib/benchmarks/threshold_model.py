"""A stand-in model that segments one region well, to test and measure growth where the demo model cannot.

The bundled demo model answers a click with a ~40 mm blob whatever the image (see its model card), so it never
segments the part of a long object inside one region and cannot show whether growth recovers the rest.
:func:`threshold_model` has the models' interface (image encoder, prompt encoder, mask decoder; the session
cannot tell it apart) and segments, at the 32³ low-res resolution, the bright connected structure (normalised
intensity above ``level``) that holds an include point or the dense prompt's positive cells; exclude points
remove the part connected to them. Its predicted IoU is 0.9 for a non-empty mask. ``fill`` (a number) makes it
answer that logit everywhere: an over-segmenting model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

LOGIT = 4.0


@dataclass(frozen=True)
class _Config:
    name: str = "threshold-stand-in"
    image_size: int = 128
    spacing_mm: float = 1.5
    default_prompt_mode: str = "newest"


class _Encoder(nn.Module):
    def forward(self, image):
        return F.avg_pool3d(image, 4)  # (1, 1, 32, 32, 32): the "embedding" is the low-res image


class _Prompts(nn.Module):
    def forward(self, points, boxes=None, masks=None):
        coords, labels = points
        return torch.cat([coords, labels[..., None].to(coords.dtype)], dim=-1), masks

    def get_dense_pe(self):
        return torch.zeros(1)


def _connected(seeds: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Cells of ``allowed`` connected (26-neighbourhood) to ``seeds``, as bool."""
    grown = (seeds & allowed).float()[None, None]
    allowed_f = allowed.float()[None, None]
    while True:
        step = F.max_pool3d(grown, 3, stride=1, padding=1) * allowed_f
        if torch.equal(step, grown):
            return grown[0, 0] > 0
        grown = step


class _Decoder(nn.Module):
    def __init__(self, level: float, fill: Optional[float]) -> None:
        super().__init__()
        self.level, self.fill = level, fill
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output=False):
        image = image_embeddings[0, 0]
        low = image.shape[-1]
        if self.fill is not None:
            return torch.full((1, 1, low, low, low), float(self.fill), device=image.device), \
                torch.full((1, 1), 0.9, device=image.device)
        bright = image > self.level
        seeds = torch.zeros_like(bright)
        removed = torch.zeros_like(bright)
        for x, y, z, label in sparse_prompt_embeddings[0].tolist():
            cell = tuple(min(max(int(v // 4), 0), low - 1) for v in (x, y, z))
            (seeds if label > 0 else removed)[cell] = True
        if dense_prompt_embeddings is not None:
            seeds |= dense_prompt_embeddings[0, 0] > 0
        mask = _connected(seeds, bright)
        if removed.any():
            mask &= ~_connected(removed, bright)
        logits = torch.where(mask, torch.tensor(LOGIT), torch.tensor(-LOGIT)).to(image.device)[None, None]
        return logits, torch.full((1, 1), 0.9 if bool(mask.any()) else 0.0, device=image.device)


class ThresholdModel(nn.Module):
    """See the module doc."""

    def __init__(self, level: float = 1.0, fill: Optional[float] = None, prompt_mode: str = "newest") -> None:
        super().__init__()
        self.config = _Config(default_prompt_mode=prompt_mode)
        self.image_encoder = _Encoder()
        self.prompt_encoder = _Prompts()
        self.mask_decoder = _Decoder(level, fill)


def threshold_model(level: float = 1.0, fill: Optional[float] = None, prompt_mode: str = "newest") -> ThresholdModel:
    """The stand-in model (see the module doc) in evaluation mode."""
    return ThresholdModel(level, fill, prompt_mode).eval()
