"""Memory and click time of an interactive session whose clicks move the region of interest back and forth.

A user who works on two distant parts of one structure (both kidneys, say) makes every click move the model's
128^3 region of interest to the other side. The session must stay bounded: what it keeps per click (for undo)
is one compact 32^3 logit grid, and its per-region cache holds at most
:data:`FastSAM3DLib.session.MAX_CACHED_REGIONS` regions. This measures, on a synthetic 300 x 60 x 40 mm volume
(1 mm voxels) with clicks alternating between x = 40 mm and x = 260 mm (each a little jittered, so no two clicks
are at the same point):

* ``retained_mb``: the bytes of every tensor storage and NumPy array the session holds after the clicks (undo
  history, caches, current embedding), counted once each, and the same per click;
* ``rss_growth_mb``: how far the process's resident memory rose during the clicks (Linux; None elsewhere);
* ``first_clicks_ms`` / ``last_clicks_ms``: median wall time of the first and the last ten region moves.

Run: ``python -m FastSAM3DLib.benchmarks.session_memory [MODEL] [CLICKS]`` (prints JSON; default the bundled
demo model if present, else ``tiny-test``, and 100 clicks).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Optional


def _rss_mb() -> Optional[float]:
    """Resident memory of this process in MB (Linux), or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def retained_bytes(session) -> int:
    """Bytes of the distinct tensor storages and NumPy arrays (their buffers) reachable from ``session``'s
    attributes (not the model's, not the volume's)."""
    import numpy as np
    import torch

    seen, total, stack, visited = set(), 0, [vars(session)], set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited or obj is session.model or obj is session.volume:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), obj.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            while isinstance(obj.base, np.ndarray):  # a view: count the array that owns the buffer
                obj = obj.base
            if ("numpy", id(obj)) not in seen:
                seen.add(("numpy", id(obj)))
                total += obj.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return total


def measure(model_name: Optional[str] = None, clicks: int = 100, threads: int = 1, device: str = "cpu") -> dict:
    """Run ``clicks`` alternating region moves with ``model_name`` and return the figures (see the module doc)."""
    import numpy as np
    import torch

    from .. import build_model
    from ..geometry import Volume
    from ..session import InteractiveSession
    from ..weights.catalog import bundled_model, bundled_path

    torch.set_num_threads(threads)
    if model_name is None:
        demo = bundled_model("fastsam3d-demo")
        model_name = "fastsam3d-demo" if demo is not None and bundled_path(demo).is_file() else "tiny-test"
    checkpoint = "cached" if model_name == "fastsam3d-demo" else None
    model = build_model(model_name, checkpoint=checkpoint, device=device, seed=0)
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, (40, 60, 300)).astype(np.float32)
    array[10:30, 15:45, 20:60] += 300  # an object on each side
    array[10:30, 15:45, 240:280] += 300
    volume = Volume(array, np.eye(4))
    session = InteractiveSession(model, volume)
    session.add_click([40.0, 30.0, 20.0])  # warm-up: first allocations are not growth
    session.reset()
    rss_before = _rss_mb()
    times, moves = [], 0
    for n in range(clicks):
        x = 40.0 if n % 2 == 0 else 260.0
        point = [x + rng.uniform(-2, 2), 30.0 + rng.uniform(-2, 2), 20.0 + rng.uniform(-2, 2)]
        start = time.perf_counter()
        result = session.add_click(point)
        times.append(time.perf_counter() - start)
        moves += bool(result.encoded)
    rss_after = _rss_mb()
    retained = retained_bytes(session)
    return {
        "model": model_name, "device": device, "threads": threads, "clicks": clicks, "region_moves": moves,
        "retained_mb": round(retained / 1e6, 2), "retained_kb_per_click": round(retained / 1e3 / clicks, 1),
        "rss_growth_mb": None if rss_before is None else round(rss_after - rss_before, 1),
        "first_clicks_ms": round(1e3 * statistics.median(times[1:11]), 1),
        "last_clicks_ms": round(1e3 * statistics.median(times[-10:]), 1),
    }


def bench_rows(plan, device_name: str) -> list:
    """``make bench`` rows: memory kept and click time over 100 alternating region moves (CPU, demo model)."""
    from . import report

    common = dict(model="session, 100 alternating region moves", device=device_name, precision="fp32")
    labels = (("session_retained_mb", "retained memory after the clicks", "MB"),
              ("session_move_click_ms", "click time, last ten of the moves", "ms"))
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "measured by make bench on the CPU")
    if skipped:
        return [report.measurement(name, None, label=label, unit=unit, skipped=skipped, **common)
                for name, label, unit in labels]
    import torch

    threads = torch.get_num_threads()
    try:
        figures = measure(threads=threads)
    finally:
        torch.set_num_threads(threads)
    note = (f"{figures['model']}; {figures['retained_kb_per_click']} kB per click (one 32^3 logit grid for undo); "
            f"resident memory +{figures['rss_growth_mb']} MB")
    return [
        report.measurement("session_retained_mb", figures["retained_mb"], label=labels[0][1], unit="MB",
                           note=note, **common),
        report.measurement("session_move_click_ms", figures["last_clicks_ms"], label=labels[1][1], unit="ms",
                           note=f"first ten {figures['first_clicks_ms']} ms, last ten {figures['last_clicks_ms']} "
                                f"ms (medians)", **common),
    ]


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1] if len(sys.argv) > 1 else None,
                             int(sys.argv[2]) if len(sys.argv) > 2 else 100), indent=2))
