"""The 3D-local block-sparse attention layout: one pure definition shared by the PyTorch and Triton paths.

The ``(D, H, W)`` token grid is cut into equal ``tile`` boxes. A query tile attends to every key tile whose
tile coordinates lie within ``radius`` of its own (Chebyshev distance, in tiles), itself included. Attention
stays exact *within* that neighbourhood (same relative position bias, same softmax); keys outside it are
simply absent. With a radius at least as large as the tile grid the layout is dense.

This is an explicit, measured option. The released weights were trained with dense attention, so dense stays
the default; the sparse mode trades accuracy for speed on large token grids.

Everything here is a pure function of integers (cached), returning CPU tensors that callers must not modify.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import torch

Grid = Tuple[int, int, int]


@dataclass(frozen=True)
class SparseLayout:
    """The user-facing choice of the sparse mode: tile shape (tokens per axis) and neighbourhood radius (tiles)."""

    tile: Grid = (4, 4, 4)
    radius: int = 1

    def __post_init__(self):
        tile = tuple(int(t) for t in self.tile)
        if len(tile) != 3 or min(tile) < 1:
            raise ValueError(f"sparse tile must be three positive sizes, got {self.tile!r}")
        if int(self.radius) < 0:
            raise ValueError(f"sparse radius must be >= 0, got {self.radius!r}")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "radius", int(self.radius))

    def blocks(self, grid: Grid) -> "BlockLayout":
        """The layout of this pattern on ``grid`` (see :func:`block_layout`)."""
        return block_layout(grid, self.tile, self.radius)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A sparse pattern laid out on one token grid.

    * ``order (N,)`` int64: token indices (row-major on the grid) in tile-major order; tile ``t`` owns
      ``order[t*T:(t+1)*T]``, ``T = tile_volume``.
    * ``kv_tiles (num_tiles, max_kv_tiles)`` int32: the key tiles of each query tile, ascending, padded with -1.
    * ``kv_count (num_tiles,)`` int32: how many entries of each row of ``kv_tiles`` are real.
    """

    grid: Grid
    tile: Grid
    radius: int
    order: torch.Tensor
    kv_tiles: torch.Tensor
    kv_count: torch.Tensor

    @property
    def tile_volume(self) -> int:
        """Tokens per tile."""
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def num_tiles(self) -> int:
        """Tiles in the grid."""
        return int(self.kv_count.shape[0])

    @property
    def max_kv_tiles(self) -> int:
        """Largest number of key tiles of any query tile."""
        return int(self.kv_tiles.shape[1])

    @property
    def density(self) -> float:
        """Fraction of the dense query-key pairs that the layout keeps."""
        return float(self.kv_count.sum()) / float(self.num_tiles) ** 2

    def token_mask(self) -> torch.Tensor:
        """``(N, N)`` bool: ``mask[p, k]`` is True when query token ``p`` attends to key token ``k`` (grid order)."""
        return _token_mask(self.grid, self.tile, self.radius)


def block_layout(grid: Grid, tile: Grid = (4, 4, 4), radius: int = 1) -> BlockLayout:
    """Tile ``grid`` into ``tile`` boxes and list, for every query tile, the key tiles within ``radius``.

    ``grid`` must be divisible by ``tile`` along every axis. The result is cached; its tensors live on the CPU.
    """
    grid = tuple(int(g) for g in grid)
    tile = tuple(int(t) for t in tile)
    if len(grid) != 3 or len(tile) != 3:
        raise ValueError(f"grid and tile must have three sizes, got {grid} and {tile}")
    if any(t < 1 or g % t for g, t in zip(grid, tile)):
        raise ValueError(f"sparse tile {tile} does not divide the token grid {grid}")
    if radius < 0:
        raise ValueError(f"sparse radius must be >= 0, got {radius}")
    return _block_layout(grid, tile, int(radius))


@lru_cache(maxsize=64)
def _block_layout(grid: Grid, tile: Grid, radius: int) -> BlockLayout:
    counts = [g // t for g, t in zip(grid, tile)]
    tiles = torch.stack(torch.meshgrid(*(torch.arange(c) for c in counts), indexing="ij"), -1).reshape(-1, 3)
    inner = torch.stack(torch.meshgrid(*(torch.arange(t) for t in tile), indexing="ij"), -1).reshape(-1, 3)
    coords = tiles[:, None, :] * torch.tensor(tile) + inner[None, :, :]  # (num_tiles, T, 3)
    order = ((coords[..., 0] * grid[1] + coords[..., 1]) * grid[2] + coords[..., 2]).reshape(-1)
    near = (tiles[:, None, :] - tiles[None, :, :]).abs().amax(-1) <= radius  # (num_tiles, num_tiles)
    kv_count = near.sum(1).to(torch.int32)
    width = int(kv_count.max())
    kv_tiles = torch.full((len(tiles), width), -1, dtype=torch.int32)
    for t in range(len(tiles)):
        neighbours = near[t].nonzero().flatten()
        kv_tiles[t, : len(neighbours)] = neighbours.to(torch.int32)
    return BlockLayout(grid, tile, radius, order, kv_tiles, kv_count)


@lru_cache(maxsize=8)
def _token_mask(grid: Grid, tile: Grid, radius: int) -> torch.Tensor:
    layout = _block_layout(grid, tile, radius)
    n, size = layout.order.numel(), layout.tile_volume
    tile_of = torch.empty(n, dtype=torch.long)
    tile_of[layout.order] = torch.arange(n) // size
    allowed = torch.zeros(layout.num_tiles, layout.num_tiles, dtype=torch.bool)
    for t in range(layout.num_tiles):
        allowed[t, layout.kv_tiles[t, : layout.kv_count[t]].long()] = True
    return allowed[tile_of[:, None], tile_of[None, :]]


@dataclass(frozen=True, eq=False)
class BoxGroup:
    """Query tiles that share one box of candidate keys (for batched execution of a :class:`BlockLayout`).

    ``query``/``keys``: ``((d0, d1), (h0, h1), (w0, w1))`` token ranges of the query box and the key box;
    ``allowed (Nq, Nk)`` bool: which pairs of the two boxes (row-major within each box) the layout keeps.
    """

    query: Tuple[Tuple[int, int], ...]
    keys: Tuple[Tuple[int, int], ...]
    allowed: torch.Tensor


def box_groups(layout: BlockLayout) -> Tuple[BoxGroup, ...]:
    """Partition the query tiles of ``layout`` into boxes whose key tiles fit in a common, small key box.

    Along each axis, consecutive tiles are merged while the union of their key-tile ranges stays no wider than
    the widest single range, so every group attends to one contiguous key box (its bounding box) and the pairs
    inside it that the layout drops are given by ``allowed`` (derived from :meth:`BlockLayout.token_mask`).
    Cached; the result depends only on the layout.
    """
    return _box_groups(layout.grid, layout.tile, layout.radius)


@lru_cache(maxsize=16)
def _box_groups(grid: Grid, tile: Grid, radius: int) -> Tuple[BoxGroup, ...]:
    layout = _block_layout(grid, tile, radius)
    counts = [g // t for g, t in zip(grid, tile)]
    coords = torch.stack(torch.meshgrid(*(torch.arange(c) for c in counts), indexing="ij"), -1).reshape(-1, 3)
    lo = torch.full((layout.num_tiles, 3), 1 << 30)
    hi = torch.full((layout.num_tiles, 3), -1)
    for t in range(layout.num_tiles):
        kv = coords[layout.kv_tiles[t, : layout.kv_count[t]].long()]
        lo[t], hi[t] = kv.min(0).values, kv.max(0).values
    axis_groups = []
    for axis in range(3):
        # key-tile range of each tile index along this axis (the widest over the other axes)
        ranges = [(int(lo[coords[:, axis] == i, axis].min()), int(hi[coords[:, axis] == i, axis].max()))
                  for i in range(counts[axis])]
        widest = max(b - a for a, b in ranges)
        groups, start = [], 0
        for i in range(1, counts[axis] + 1):
            span = ranges[start:i + 1]
            if i == counts[axis] or max(b for _, b in span) - min(a for a, _ in span) > widest:
                span = ranges[start:i]
                groups.append(((start, i), (min(a for a, _ in span), max(b for _, b in span) + 1)))
                start = i
        axis_groups.append(groups)
    mask = _token_mask(grid, tile, radius)
    result = []
    for gd in axis_groups[0]:
        for gh in axis_groups[1]:
            for gw in axis_groups[2]:
                q_box = tuple((a * t, b * t) for (a, b), t in zip((gd[0], gh[0], gw[0]), tile))
                k_box = tuple((a * t, b * t) for (a, b), t in zip((gd[1], gh[1], gw[1]), tile))
                allowed = mask[_box_tokens(q_box, grid)[:, None], _box_tokens(k_box, grid)[None, :]]
                result.append(BoxGroup(q_box, k_box, allowed))
    return tuple(result)


def _box_tokens(box, grid: Grid) -> torch.Tensor:
    """Row-major token indices of the tokens in a box of the grid, in the box's own row-major order."""
    (d0, d1), (h0, h1), (w0, w1) = box
    d, h, w = torch.meshgrid(torch.arange(d0, d1), torch.arange(h0, h1), torch.arange(w0, w1), indexing="ij")
    return ((d * grid[1] + h) * grid[2] + w).reshape(-1)
