"""Training augmentation on model-space crops: random flips (as the official ``RandomFlip(axes=(0, 1, 2))``)
and a random intensity scale and shift of the normalised image.

Parameters are drawn first (:func:`draw_augmentation`) and applied second (:func:`apply_augmentation`), so a
sample is fully described by plain values (its cache key) and runs are reproducible from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """What may change: each axis flipped with ``flip_probability``; image * U(scale) + U(shift)."""

    enabled: bool = True
    flip_probability: float = 0.5
    scale: Tuple[float, float] = (0.9, 1.1)
    shift: Tuple[float, float] = (-0.1, 0.1)


@dataclass(frozen=True)
class Augmentation:
    """The drawn parameters of one sample's augmentation."""

    flips: Tuple[bool, bool, bool] = (False, False, False)
    scale: float = 1.0
    shift: float = 0.0

    def key(self) -> str:
        """A short text that identifies these parameters (for caches)."""
        return "f" + "".join("1" if f else "0" for f in self.flips) + f"s{self.scale:.6f}b{self.shift:.6f}"


def draw_augmentation(rng: np.random.Generator, config: AugmentConfig) -> Augmentation:
    """Draw one sample's augmentation (the identity when ``config.enabled`` is False)."""
    if not config.enabled:
        return Augmentation()
    flips = tuple(bool(rng.random() < config.flip_probability) for _ in range(3))
    return Augmentation(flips, float(rng.uniform(*config.scale)), float(rng.uniform(*config.shift)))


def apply_augmentation(image: np.ndarray, label: np.ndarray, aug: Augmentation):
    """Apply ``aug`` to a normalised (x, y, z) image and its label; returns new contiguous arrays."""
    axes = tuple(a for a, f in enumerate(aug.flips) if f)
    if axes:
        image, label = np.flip(image, axes), np.flip(label, axes)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if aug.scale != 1.0 or aug.shift != 0.0:
        image = image * np.float32(aug.scale) + np.float32(aug.shift)
    return image, np.ascontiguousarray(label)
