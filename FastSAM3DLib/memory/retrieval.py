"""Retrieval: a descriptor of the encoder's input, and the exact k nearest bank entries (squared L2).

Descriptors are computed from the tensor the image encoder receives (the 128^3 crop after the masked
z-normalisation), in the bank builder and at inference alike, so both sides are described identically:

* ``"pooled32"`` (default): the input average-pooled 4x to 32^3, flattened (32,768 numbers). Recommended by the
  spec (section 6.3): cheap, and not dominated by single voxels.
* ``"pooled16"``: pooled 8x to 16^3 (4,096 numbers).
* ``"voxels"``: the whole 128^3 input (2,097,152 numbers, 8 MiB per bank entry): the released code's
  descriptor in shape. **Deviation:** the released code compares *raw* (HU) crops, before normalisation; the
  encoder never sees those, and the raw-HU distances (10^10-10^11) are what overflows the released weighting
  into NaN (spec 1.5), so this library always describes the normalised input.

:func:`knn` is exact brute force (what faiss ``IndexFlatL2`` does): squared L2 distances accumulated in float64
(float32 on MPS), ascending, ties broken by the lower bank row, entries of excluded patients or cases never
returned. No faiss dependency; a bank of thousands of entries is a few milliseconds.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..devices import supported_device
from .settings import DESCRIPTOR_NAMES

DESCRIPTORS: Dict[str, Tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {}


def _register(name: str, dim_for_128: int):
    if name not in DESCRIPTOR_NAMES:  # the command line offers settings.DESCRIPTOR_NAMES without PyTorch
        raise ValueError(f"descriptor {name!r} is not listed in memory.settings.DESCRIPTOR_NAMES")

    def wrap(fn):
        DESCRIPTORS[name] = (dim_for_128, fn)
        return fn
    return wrap


@_register("pooled32", 32 ** 3)
def pooled32(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S, S) -> (B, (S/4)^3)."""
    return F.avg_pool3d(x.float(), 4).flatten(1)


@_register("pooled16", 16 ** 3)
def pooled16(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S, S) -> (B, (S/8)^3)."""
    return F.avg_pool3d(x.float(), 8).flatten(1)


@_register("voxels", 128 ** 3)
def voxels(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S, S) -> (B, S^3): every voxel."""
    return x.float().flatten(1)


def describe(x: torch.Tensor, name: str) -> torch.Tensor:
    """The ``name`` descriptor of a batch of encoder inputs ``(B, 1, S, S, S)``: ``(B, D)`` float32."""
    if name not in DESCRIPTORS:
        raise ValueError(f"unknown memory descriptor {name!r}; choose one of {', '.join(DESCRIPTORS)}")
    device = supported_device(x.device)  # avg_pool3d: none on MPS before torch 2.9
    return DESCRIPTORS[name][1](x.to(device)).contiguous().to(x.device)


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def squared_distances(query: torch.Tensor, bank: torch.Tensor, dtype: Optional[torch.dtype] = None,
                      chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Squared L2 distances ``(B, N)`` between ``query (B, D)`` and ``bank (N, D)``, accumulated in ``dtype``
    (default float64, float32 on MPS: exact enough to rank).

    Differences are formed explicitly (not ``|a|^2 - 2ab + |b|^2``, which cancels badly), so an entry equal to
    the query is at distance exactly 0. Computed in chunks of bank rows of about ``chunk_bytes``.
    """
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"descriptor shapes {tuple(query.shape)} and {tuple(bank.shape)} do not match")
    acc = dtype or _exact_dtype(bank.device)
    query = query.to(bank.device)
    out = torch.empty(query.shape[0], bank.shape[0], dtype=acc, device=bank.device)
    rows = max(1, int(chunk_bytes // max(1, bank.shape[1] * torch.finfo(acc).bits // 8)))
    for b in range(query.shape[0]):
        q = query[b].to(acc)
        for start in range(0, bank.shape[0], rows):
            block = bank[start:start + rows].to(acc)
            out[b, start:start + rows] = (block - q).square().sum(dim=1)
    return out


# float32 sums of D squares are within ~(2 + log2 D) * 2^-24 relative of the exact value (pairwise summation);
# every row within this factor of the k-th float32 distance is re-ranked exactly.
_RERANK_WINDOW = 1e-3


def knn(query: torch.Tensor, bank: torch.Tensor, k: int, allowed: Optional[torch.Tensor] = None
        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of each query: ``(distances (B, k'), indices (B, k'))``, nearest first.

    ``allowed``: (N,) or (B, N) boolean mask of rows that may be returned (False = excluded: same patient,
    same case). ``k' = min(k, allowed rows)`` (the smallest over the batch). Ties go to the lower row index.
    A float32 pass over the whole bank finds the candidates (10x faster than float64 on a CPU); those within
    :data:`_RERANK_WINDOW` of the k-th distance are re-ranked with exact (float64) distances, which are returned.
    """
    query = query.to(bank.device)
    coarse = squared_distances(query, bank, torch.float32)
    if allowed is not None:
        allowed = allowed.to(coarse.device)
        if allowed.dim() == 1:
            allowed = allowed[None].expand_as(coarse)
        coarse = coarse.masked_fill(~allowed, float("inf"))
        available = int(allowed.sum(dim=1).min()) if allowed.numel() else 0
    else:
        available = coarse.shape[1]
    k = max(0, min(int(k), available))
    exact_dtype = _exact_dtype(bank.device)
    if k == 0:
        empty = torch.empty(query.shape[0], 0, device=bank.device)
        return empty.to(exact_dtype), empty.to(torch.int64)
    kth = torch.sort(coarse, dim=1, stable=True).values[:, k - 1:k]
    distances, indices = [], []
    for b in range(query.shape[0]):
        near = coarse[b] <= kth[b] * (1 + _RERANK_WINDOW)
        if allowed is not None:
            near &= allowed[b]
        rows = torch.nonzero(near).flatten()  # ascending row order
        exact = squared_distances(query[b:b + 1], bank[rows], exact_dtype)[0]
        order = torch.sort(exact, stable=True)  # ties keep the ascending row order
        distances.append(order.values[:k])
        indices.append(rows[order.indices[:k]])
    return torch.stack(distances), torch.stack(indices)


def random_rows(batch: int, allowed: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, k')`` distinct random allowed rows (the "random retrieval" control)."""
    allowed = allowed.to("cpu")
    rows = torch.nonzero(allowed if allowed.dim() == 1 else allowed.all(0)).flatten()
    k = min(int(k), rows.numel())
    picks = [rows[torch.randperm(rows.numel(), generator=generator)[:k]] for _ in range(batch)]
    return torch.stack(picks) if picks else torch.empty(0, k, dtype=torch.int64)


def allowed_rows(row_patients: Sequence[str], row_cases: Sequence[str], exclude_patients=(), exclude_cases=()
                 ) -> torch.Tensor:
    """(N,) boolean: rows whose patient and case are not excluded."""
    patients, cases = {str(p) for p in exclude_patients}, {str(c) for c in exclude_cases}
    return torch.tensor([p not in patients and c not in cases for p, c in zip(row_patients, row_cases)],
                        dtype=torch.bool)
