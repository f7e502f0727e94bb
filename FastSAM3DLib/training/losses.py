"""Losses: the segmentation loss of the official recipe and the feature losses of distillation.

:class:`DiceCELoss` reproduces ``monai.losses.DiceCELoss(sigmoid=True, squared_pred=True)`` with its defaults
(Dice per sample and channel with ``smooth_nr = smooth_dr = 1e-5``, averaged; binary cross-entropy on the
logits, averaged; the two added with weight 1), without depending on MONAI.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    """Soft Dice (sigmoid, squared denominators) + binary cross-entropy, both on logits ``(B, C, ...)``."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, squared_pred: bool = True) -> None:
        super().__init__()
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
        self.squared_pred = squared_pred

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over samples and channels of ``1 - (2 sum(p g) + nr) / (sum(p^2) + sum(g^2) + dr)``."""
        prob = torch.sigmoid(logits.float())
        target = target.float()
        dims = tuple(range(2, logits.dim()))
        intersection = (prob * target).sum(dims)
        if self.squared_pred:
            denominator = (prob * prob).sum(dims) + (target * target).sum(dims)
        else:
            denominator = prob.sum(dims) + target.sum(dims)
        return (1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)).mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the Dice and cross-entropy terms (a scalar)."""
        ce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * ce


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


FEATURE_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda s, t: F.mse_loss(s.float(), t.float()),
    "l1": lambda s, t: F.l1_loss(s.float(), t.float()),
    "smooth_l1": lambda s, t: F.smooth_l1_loss(s.float(), t.float()),
    "cosine": _cosine,  # 1 - cosine similarity of the channel vectors (channels last)
}


def feature_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The feature-matching loss called ``name``: one of :data:`FEATURE_LOSSES` (``mse`` as the official code)."""
    try:
        return FEATURE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown feature loss {name!r}; choose one of {', '.join(FEATURE_LOSSES)}") from None
