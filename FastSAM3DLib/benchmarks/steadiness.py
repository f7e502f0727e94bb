"""How steady the machine was during a benchmark run: one fixed reference product, timed before every unit.

On a shared virtual machine a neighbour's load can slow a whole run by tens of percent, and nothing in the
numbers themselves shows it. The benchmark recorder calls :meth:`Steadiness.sample` before each unit: it times
a fixed float32 matrix product (:data:`PROBE_SHAPE`, in PyTorch on the CPU with the run's threads, best of
:data:`PROBE_REPEATS`). The result then carries the *host steadiness*, the slowest probe over the fastest
(1.0: the machine ran at one speed throughout), and each probe in its details, so a reader can tell a slow
run from a slow change. Each probe costs ~10-30 ms on a 2-core CPU.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Tuple

from . import report

#: (rows, inner, columns) of the reference product: FastSAM3D's encoder shape, half its tokens
PROBE_SHAPE = (256, 768, 768)
#: timed runs per probe (the fastest counts: a probe measures what the machine can still do)
PROBE_REPEATS = 3
#: a spread above this is called out when the run is printed
UNSTEADY = 1.3
MEASUREMENT = "host_steadiness"


class Steadiness:
    """The probes of one run: :meth:`sample` before each unit, :meth:`measurement` at the end."""

    def __init__(self, repeats: int = PROBE_REPEATS) -> None:
        import torch

        generator = torch.Generator().manual_seed(0)
        rows, inner, columns = PROBE_SHAPE
        self._a = torch.randn(rows, inner, generator=generator)
        self._b = torch.randn(inner, columns, generator=generator)
        self._out = torch.empty(rows, columns)
        self.repeats = repeats
        self.samples: List[Tuple[str, float]] = []
        torch.matmul(self._a, self._b, out=self._out)  # warm-up: the first product sets up the kernel

    def sample(self, before: str) -> float:
        """Time the reference product now (ms, the best of ``repeats``), recorded as taken before ``before``."""
        import torch

        best = float("inf")
        with torch.inference_mode():
            for _ in range(self.repeats):
                start = time.perf_counter()
                torch.matmul(self._a, self._b, out=self._out)
                best = min(best, time.perf_counter() - start)
        self.samples.append((before, 1e3 * best))
        return 1e3 * best

    def spread(self) -> Optional[float]:
        """Slowest probe / fastest probe, or None before two probes."""
        times = [ms for _, ms in self.samples]
        return max(times) / min(times) if len(times) >= 2 and min(times) > 0 else None

    def summary(self) -> str:
        """One line for the printed run, e.g. ``reference product 4.1-7.9 ms (median 4.6) over 31 probes``."""
        times = [ms for _, ms in self.samples]
        if not times:
            return "no probes"
        rows, inner, columns = PROBE_SHAPE
        return (f"reference {rows}x{inner}x{columns} float32 product {min(times):.1f}-{max(times):.1f} ms "
                f"(median {statistics.median(times):.1f}) over {len(times)} probes before the units")

    def measurement(self, device: str) -> Dict[str, object]:
        """The run's ``host_steadiness`` measurement (slowest / fastest probe, or skipped with the reason)."""
        spread = self.spread()
        return report.measurement(MEASUREMENT, spread, model="host", device=device, precision="fp32", unit="x",
                                  label="host steadiness (slowest / fastest reference product)",
                                  note=self.summary() if spread is not None else None,
                                  skipped=None if spread is not None else "fewer than two probes")

    def details(self) -> Dict[str, object]:
        """Every probe, in order: ``{"shape": ..., "probes": [[unit, ms], ...]}``."""
        return {"shape": list(PROBE_SHAPE), "repeats": self.repeats,
                "probes": [[title, round(ms, 3)] for title, ms in self.samples]}

    def warning(self) -> Optional[str]:
        """A line to print when the machine was unsteady (spread above :data:`UNSTEADY`), else None."""
        return _warning(self.spread())


def warning(measurements) -> Optional[str]:
    """The unsteadiness line for a result's measurements (see :meth:`Steadiness.warning`), else None."""
    spreads = [m["value"] for m in measurements if m["name"] == MEASUREMENT and m["value"] is not None]
    return _warning(max(spreads)) if spreads else None


def _warning(spread: Optional[float]) -> Optional[str]:
    if spread is None or spread <= UNSTEADY:
        return None
    return (f"host steadiness {spread:.2f}x: the reference product's time varied that much during the run, so "
            "other load on this machine slowed some units; compare ranges of runs, not single numbers")
