"""Timing helpers shared by the benchmarks: warm-up, repeats, CUDA synchronisation, peak memory."""
import platform
import resource
import statistics
import time
from typing import Callable, Dict

import torch


def synchronize(device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure(fn: Callable[[], object], device="cpu", repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs: median, min, max and spread in seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0, "repeats": repeats, "warmup": warmup}


def peak_memory(device="cpu") -> Dict[str, float]:
    """Peak resident memory of this process, and peak allocated GPU memory on CUDA, in MiB."""
    out = {"process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        out["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def machine_info(device="cpu") -> Dict[str, object]:
    """Machine, device, versions and thread settings for a results file."""
    import numpy

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import os

        info["cpu_count"] = os.cpu_count()
    except Exception:  # noqa: BLE001 - informational only
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
