"""Synthetic labelled phantoms: random ellipsoids, deformed blobs and curved tubes in a textured, noisy body.

Each phantom is a :class:`~FastSAM3DLib.geometry.Volume` pair (image, integer label) with a random voxel size
(0.7-3 mm, often anisotropic) and a random orientation (axis permutation, flips and an oblique tilt), so the
training data goes through exactly the geometry the model sees at inference (resampling to 1.5 mm, RAS order,
128^3 regions). Images look like either CT (air -1000 HU outside the body, int16) or MR (0 outside, float32),
which matters because the official normalisation uses statistics over voxels > 0.

Only numpy and torch are used; every function takes a ``numpy.random.Generator`` (seeded, reproducible).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from ..geometry import Volume

SHAPES = ("ellipsoid", "blob", "tube")


@dataclass
class Phantom:
    """A synthetic image, its label volume (0 background, 1..K objects) and the objects' names."""

    image: Volume
    label: Volume
    names: Dict[int, str] = field(default_factory=dict)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def random_orientation(rng: np.random.Generator, max_tilt_deg: float = 25.0) -> np.ndarray:
    """A direction matrix: random axis permutation and flips, tilted obliquely (half the time) up to
    ``max_tilt_deg``."""
    perm = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)
    if rng.random() < 0.5:
        return perm
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tilt @ perm


def smooth_noise(rng: np.random.Generator, shape_kji: Tuple[int, int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field on ``shape_kji``: ``cells``^3 random values upsampled trilinearly."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.normal(size=(1, 1, cells, cells, cells)).astype(np.float32))
    field_ = F.interpolate(coarse, size=tuple(int(n) for n in shape_kji), mode="trilinear", align_corners=False)
    field_ = field_[0, 0].numpy()
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _blur(array: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Separable Gaussian blur (partial-volume effect) with torch; ``sigma_voxels`` <= 0 returns the input."""
    if sigma_voxels <= 0:
        return array
    import torch
    import torch.nn.functional as F

    radius = max(1, int(round(2.5 * sigma_voxels)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma_voxels) ** 2)
    kernel = torch.from_numpy(kernel / kernel.sum())
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        padding = [0, 0, 0]
        padding[axis] = radius
        t = F.conv3d(F.pad(t, [p for a in reversed(padding) for p in (a, a)], mode="replicate"), kernel.view(shape))
    return t[0, 0].numpy()


class _Grid:
    """World (RAS, mm) coordinates of the voxel centres of a (K, J, I) grid, relative to its centre, on demand."""

    def __init__(self, shape_kji, ijk_to_ras: np.ndarray):
        self.shape = tuple(shape_kji)
        self.matrix = ijk_to_ras
        self.inverse = np.linalg.inv(ijk_to_ras)

    def box(self, centre: np.ndarray, radius: float):
        """(K, J, I) slices of the voxels within ``radius`` mm (a cube) of the world point ``centre``."""
        corners = centre + radius * np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64) * 2 - radius
        ijk = (np.c_[corners, np.ones(8)] @ self.inverse.T)[:, :3]
        low = np.clip(np.floor(ijk.min(0)).astype(int), 0, None)
        high = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, self.shape[::-1])
        if np.any(high <= low):
            return None
        return tuple(slice(int(low[a]), int(high[a])) for a in (2, 1, 0))

    def points(self, box) -> np.ndarray:
        """World coordinates (k, j, i, 3) of the voxels in ``box``."""
        k, j, i = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float32) for s in box), indexing="ij")
        m = self.matrix.astype(np.float32)
        return np.stack([m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)], axis=-1)


def _object_mask(rng: np.random.Generator, kind: str, local: np.ndarray, size_mm: float) -> np.ndarray:
    """Inside test for one object, given voxel coordinates ``local`` (..., 3) in the object's own frame."""
    if kind == "tube":
        # a curved centreline: quadratic Bezier from -L/2 to +L/2 along x, bent in y/z
        length = size_mm * rng.uniform(2.0, 4.0)
        radius = rng.uniform(0.12, 0.3) * size_mm
        bend = rng.normal(size=2) * 0.35 * length
        t = np.linspace(0.0, 1.0, 24, dtype=np.float32)
        start, mid, end = np.array([-length / 2, 0, 0]), np.array([0, *bend]), np.array([length / 2, 0, 0])
        line = ((1 - t) ** 2)[:, None] * start + (2 * (1 - t) * t)[:, None] * mid + (t ** 2)[:, None] * end
        best = np.full(local.shape[:-1], np.inf, dtype=np.float32)
        for a, b in zip(line[:-1].astype(np.float32), line[1:].astype(np.float32)):
            ab = b - a
            u = np.clip(((local - a) @ ab) / float(ab @ ab), 0.0, 1.0)
            d = np.sum((local - a - u[..., None] * ab) ** 2, axis=-1)
            np.minimum(best, d, out=best)
        wobble = 1.0 + 0.15 * np.sin(local[..., 0] / max(radius, 1.0) * rng.uniform(0.2, 0.6))
        return best <= (radius * wobble) ** 2
    axes = size_mm * rng.uniform(0.45, 1.0, size=3)
    r2 = np.sum((local / axes.astype(np.float32)) ** 2, axis=-1)
    if kind == "blob":
        norm = np.sqrt(np.sum(local ** 2, axis=-1)) + 1e-3
        direction = local / norm[..., None]
        modulation = np.ones(local.shape[:-1], dtype=np.float32)
        for _ in range(3):
            k = rng.normal(size=3).astype(np.float32) * rng.uniform(1.0, 3.0)
            modulation += rng.uniform(0.05, 0.2) * np.sin(direction @ k + rng.uniform(0, 2 * np.pi))
        return r2 <= modulation ** 2
    return r2 <= 1.0


def make_phantom(rng: np.random.Generator, modality: Optional[str] = None, max_objects: int = 12,
                 max_voxels: int = 2_500_000) -> Phantom:
    """One random labelled phantom (see the module docstring).

    ``modality``: ``"ct"``, ``"mr"`` or None (random). ``max_objects``: at most this many labelled objects
    (at least 3). ``max_voxels`` bounds the grid size (the voxel size grows to respect it).
    """
    modality = modality or ("ct" if rng.random() < 0.5 else "mr")
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    extent = rng.uniform(110.0, 260.0, size=3)
    spacing = np.full(3, rng.uniform(0.7, 2.0))
    if rng.random() < 0.5:
        axis = rng.integers(3)
        spacing[axis] = min(spacing[axis] * rng.uniform(1.5, 3.0), 5.0)
    size = np.clip(np.round(extent / spacing), 24, None)
    while np.prod(size) > max_voxels:
        spacing *= 1.1
        size = np.clip(np.round(extent / spacing), 24, None)
    size = size.astype(int)
    direction = random_orientation(rng)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * spacing
    centre_world = rng.uniform(-100, 100, size=3)
    ijk_to_ras[:3, 3] = centre_world - ijk_to_ras[:3, :3] @ ((size - 1) / 2.0)
    shape = (int(size[2]), int(size[1]), int(size[0]))
    grid = _Grid(shape, ijk_to_ras)

    # body: a large ellipsoid with low-frequency texture
    body_axes = extent * rng.uniform(0.3, 0.48, size=3)
    body_rot = random_rotation(rng)
    everything = tuple(slice(0, n) for n in shape)
    world = grid.points(everything) - centre_world.astype(np.float32)
    body = np.sum(((world @ body_rot.astype(np.float32)) / body_axes.astype(np.float32)) ** 2, axis=-1) <= 1.0
    del world
    texture = 0.6 * smooth_noise(rng, shape, 6) + 0.4 * smooth_noise(rng, shape, int(rng.integers(12, 24)))
    tissue = np.where(body, 1.0 + rng.uniform(0.02, 0.2) * texture, 0.0).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    names: Dict[int, str] = {}

    n_objects = int(rng.integers(3, max(3, max_objects) + 1))
    for value in range(1, n_objects + 1):
        kind = SHAPES[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
        size_mm = rng.uniform(8.0, 45.0) if kind != "tube" else rng.uniform(12.0, 35.0)
        offset = (rng.uniform(-0.65, 0.65, size=3) * body_axes) @ body_rot.T
        centre = centre_world + offset
        reach = size_mm * (4.5 if kind == "tube" else 1.4)
        box = grid.box(centre, reach)
        if box is None:
            continue
        rotation = random_rotation(rng).astype(np.float32)
        local = (grid.points(box) - centre.astype(np.float32)) @ rotation
        inside = _object_mask(rng, kind, local, size_mm) & body[box]
        if inside.sum() < 50:
            continue
        contrast = rng.choice([-1.0, 1.0], p=[0.3, 0.7]) * rng.uniform(0.06, 0.9)
        own_texture = rng.uniform(0.0, 0.08) * smooth_noise(rng, inside.shape, int(rng.integers(4, 12)))
        values = (1.0 + contrast) * (1.0 + own_texture)
        if rng.random() < 0.25:  # an inner core of another intensity (e.g. kidney cortex vs medulla)
            core = np.sum((local / (0.55 * size_mm)) ** 2, axis=-1) <= 1.0
            values = np.where(core, values * (1.0 + rng.uniform(-0.4, 0.4)), values)
        region = tissue[box]
        region[inside] = values[inside]
        label[box][inside] = value
        names[value] = f"{kind}_{value}"

    noise_level = rng.uniform(0.01, 0.08)
    image = _blur(tissue, rng.uniform(0.0, 1.0))
    bias = 1.0 + rng.uniform(0.0, 0.15) * smooth_noise(rng, shape, 3)
    image = image * bias + noise_level * rng.standard_normal(shape).astype(np.float32)
    if modality == "ct":
        level, scale = rng.uniform(-60.0, 70.0), rng.uniform(80.0, 250.0)
        air = image < 0.5
        hu = level + (image - 1.0) * scale
        hu = np.where(air, -1000.0 + 20.0 * rng.standard_normal(shape), hu)
        array = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    else:
        scale = rng.uniform(100.0, 600.0)
        array = np.abs(image * scale).astype(np.float32)
    present = {v: n for v, n in names.items() if np.any(label == v)}
    return Phantom(Volume(array, ijk_to_ras), Volume(label, ijk_to_ras), present)
