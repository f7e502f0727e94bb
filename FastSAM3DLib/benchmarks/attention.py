"""Latency of the image encoders per attention backend and precision, the attention ops alone, and the
effect of the 3D sparse mode on the output.

Everything returns plain JSON-serialisable dicts; nothing is asserted (speed is measured, never tested).
Timings are the median and spread of ``repeats`` runs after ``warmup`` runs, CUDA-synchronised on GPUs.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and, on the CPU, the peak of live tensor memory
during one extra run recorded by the PyTorch profiler (an estimate; allocator caches are not included).

    python -m FastSAM3DLib.benchmarks.attention [--quick] [--device cuda] [--threads 2] [--output FILE]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

# the sparse patterns measured by default: a few tiles of the 512-token grid, 4^3 tiles of larger grids
DEFAULT_SPARSE = {8: ((2, 2, 4), 1), 16: ((4, 4, 4), 1)}


# --------------------------------------------------------------------------------------------- measurement
def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` before a clock is read (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live tensor bytes allocated during ``fn()`` (profiler estimate, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def measure(fn: Callable[[], object], device, repeats: int = 5, warmup: int = 1,
            memory: bool = True) -> Dict[str, float]:
    """Time ``fn`` (inference mode): median/min/max/stdev in milliseconds, and peak memory in MiB."""
    device = torch.device(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync_device(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync_device(device)
            times.append((time.perf_counter() - start) * 1e3)
        result = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                  "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0, "repeats": repeats,
                  "times_ms": [round(t, 2) for t in times]}
        if memory:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fn()
                sync_device(device)
                result["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            elif device.type == "cpu":
                result["peak_mem_mib"] = cpu_peak_bytes(fn) / 2 ** 20
    return result


def environment(device, threads: Optional[int] = None) -> Dict[str, object]:
    """Device, library versions and thread count of this run."""
    device = torch.device(device)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "medim", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {"device": str(device), "platform": platform.platform(), "versions": versions,
            "threads": threads or torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        info["cpu"] = cpu_name()
    return info


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one), for naming result files and rows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _available_backends(device: torch.device) -> List[str]:
    from .. import attention

    names = ["torch", "eager"]
    if device.type == "cuda" and attention.triton_supported(device):
        names.insert(0, "triton")
    return names


# ------------------------------------------------------------------------------------------------ encoders
def benchmark_encoders(device=None, dtypes: Sequence[str] = ("float32",), backends: Optional[Iterable[str]] = None,
                       models: Sequence[str] = ("fastsam3d", "sam-med3d"), include_medim: bool = True,
                       include_sparse: bool = True, repeats: int = 5, warmup: int = 1,
                       threads: Optional[int] = None, memory: bool = True) -> Dict[str, object]:
    """Encoder latency for every (model, backend, dtype) on one ``(1, 1, 128, 128, 128)`` input.

    Backends default to the ones that run on ``device``: ``triton`` (CUDA), ``torch``, and ``eager``, the
    official per-block formula (materialised bias, softmax, matmul; for SAM-Med3D the 2744-token padded
    window). ``medim`` adds medim's own SAM-Med3D (the official code) and ``sparse`` adds FastSAM3D with the
    3D sparse mode. Ratios relative to the official-style baselines are in ``speedups``.
    """
    from .. import attention
    from ..registry import build_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    names = list(backends) if backends else _available_backends(device)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    rows = []

    def run(label, model_name, backend, dtype, module, sparse=None):
        dt = getattr(torch, dtype)
        inp = x.to(device=device, dtype=dt)
        try:
            row = measure(lambda: module(inp), device, repeats, warmup, memory)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            row = {"error": f"{type(exc).__name__}: {exc}"}
        row.update(label=label, model=model_name, backend=backend, dtype=dtype, sparse=sparse)
        rows.append(row)

    for dtype in dtypes:
        for model_name in models:
            model = build_model(model_name, seed=0).to(device=device, dtype=getattr(torch, dtype))
            enc = model.image_encoder
            for backend in names:
                enc.set_attention_backend(backend)
                run(f"{model_name}/{backend}", model_name, backend, dtype, enc)
            if include_sparse and model_name == "fastsam3d":
                tile, radius = DEFAULT_SPARSE[8]
                for backend in [b for b in names if b != "eager"]:
                    enc.set_attention_backend(backend, sparse=attention.SparseLayout(tile, radius))
                    run(f"{model_name}/{backend}/sparse", model_name, backend, dtype, enc,
                        {"tile": list(tile), "radius": radius})
                enc.set_attention_backend("auto")
            del model, enc
        if include_medim:
            try:
                import medim

                theirs = medim.create_model("SAM-Med3D", pretrained=False).eval().to(device=device,
                                                                                   dtype=getattr(torch, dtype))
                run("medim-sam-med3d", "medim:SAM-Med3D", "official", dtype, theirs.image_encoder)
                del theirs
            except ImportError as exc:
                rows.append({"label": "medim-sam-med3d", "error": f"medim unavailable: {exc}", "dtype": dtype})
    result = environment(device, threads)
    result.update(kind="encoders", input_shape=[1, 1, 128, 128, 128], dtypes=list(dtypes), results=rows,
                  speedups=_speedups(rows))
    return result


def _speedups(rows: List[dict]) -> Dict[str, float]:
    """Median-latency ratios against the official-style baselines, per dtype."""
    by = {(r.get("label"), r.get("dtype")): r.get("median_ms") for r in rows if "median_ms" in r}
    out = {}
    for (label, dtype), ms in by.items():
        for baseline in ("fastsam3d/eager", "sam-med3d/eager", "medim-sam-med3d"):
            base = by.get((baseline, dtype))
            same_model = label.split("/")[0] == baseline.split("/")[0] or (
                baseline == "medim-sam-med3d" and label.startswith("sam-med3d/"))
            if base and ms and label != baseline and same_model:
                out[f"{baseline} / {label} [{dtype}]"] = round(base / ms, 3)
    return out


# ------------------------------------------------------------------------------------------ attention ops
def benchmark_attention_ops(device=None, sides: Sequence[int] = (8, 16), dtypes: Sequence[str] = ("float32",),
                            heads: int = 6, head_dim: int = 128, repeats: int = 5, warmup: int = 1,
                            threads: Optional[int] = None, memory: bool = True) -> Dict[str, object]:
    """One attention call per backend: FastSAM3D-shaped global attention on ``side^3`` tokens (dense and
    sparse), and SAM-Med3D's padded window (12 heads x 64, 8^3 real tokens in a 14^3 window)."""
    from .. import attention

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    names = _available_backends(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in dtypes:
        dt = getattr(torch, dtype)
        for side in sides:
            n = side ** 3
            q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen).mul(0.3).to(device, dt) for _ in range(3))
            # the tables in the model's precision, as a bf16/fp16 model holds them (eager mixes no dtypes)
            tables = [torch.randn(2 * side - 1, head_dim, generator=gen).mul(0.02).to(device, dt) for _ in range(3)]
            tile, radius = DEFAULT_SPARSE.get(side, ((4, 4, 4), 1))
            layout = attention.SparseLayout(tile, radius).blocks((side,) * 3)
            for backend in names:
                for sparse in (None, layout):
                    if sparse is not None and backend == "eager":
                        continue
                    fn = (lambda b=backend, s=sparse: attention.rel_pos_attention(
                        q, k, v, *tables, (side,) * 3, head_dim ** -0.5, backend=b, sparse=s))
                    row = _measured(fn, device, repeats, warmup, memory)
                    row.update(op="global", tokens=n, heads=heads, head_dim=head_dim, backend=backend, dtype=dtype,
                               sparse=None if sparse is None else {"tile": list(tile), "radius": radius,
                                                                   "density": sparse.density})
                    rows.append(row)
        q, k, v = (torch.randn(1, 12, 512, 64, generator=gen).mul(0.3).to(device, dt) for _ in range(3))
        tables = [torch.randn(27, 64, generator=gen).mul(0.02).to(device, dt) for _ in range(3)]
        pad_qkv = torch.randn(3, 12, 64, generator=gen).mul(0.02).to(device, dt)
        for backend in names:
            fn = (lambda b=backend: attention.padded_window_attention(
                q, k, v, pad_qkv, *tables, (8, 8, 8), (14, 14, 14), 64 ** -0.5, backend=b))
            row = _measured(fn, device, repeats, warmup, memory)
            row.update(op="padded-window", tokens=512, window=14, heads=12, head_dim=64, backend=backend, dtype=dtype)
            rows.append(row)
    result = environment(device, threads)
    result.update(kind="attention-ops", results=rows)
    return result


def _measured(fn, device, repeats, warmup, memory) -> Dict[str, object]:
    """:func:`measure`, or ``{"error": ...}`` when the call fails (one failing row must not lose the others)."""
    try:
        return measure(fn, device, repeats, warmup, memory)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# -------------------------------------------------------------------------------------- sparse-mode effect
def sparse_mode_effect(reference_dir=None, layouts: Sequence = (((2, 2, 4), 1), ((2, 2, 2), 1), ((4, 4, 4), 0)),
                       backend: str = "torch") -> Dict[str, object]:
    """How much the 3D sparse mode changes FastSAM3D under the fixture weights and input.

    Per layout: relative L2 of the image embedding against dense attention, and agreement of the thresholded
    128^3 masks of the fixture's prompt steps (fraction of equal voxels, Dice, voxel counts). Needs the
    fixture (``shared/reference/fixtures/fastsam3d_public.npz``); returns ``{"skipped": reason}`` without it.
    """
    import numpy as np

    from .. import attention
    from ..parity import fill_like_fixture, fixture_input, relative_l2, run_prompt_steps
    from ..registry import build_model

    path = _fixture_path(reference_dir)
    if path is None:
        return {"skipped": "fixture fastsam3d_public.npz not found (set FASTSAM3D_SHARED or pass reference_dir)"}
    ref = np.load(path)
    model = build_model("fastsam3d", attention_backend=backend)
    fill_like_fixture(model, ref["plus_one_keys"])
    points, labels = torch.tensor(ref["points"]), torch.tensor(ref["labels"])
    x = fixture_input()

    def outputs(sparse):
        model.image_encoder.set_attention_backend(backend, sparse=sparse)
        with torch.no_grad():
            emb = model.image_encoder(x)
        return emb.numpy(), run_prompt_steps(model, emb, points, labels)

    dense_emb, dense_out = outputs(None)
    rows = [{"layout": "dense", "embedding_rel_l2_vs_fixture": relative_l2(dense_emb, ref["image_embedding"])}]
    for tile, radius in layouts:
        layout = attention.SparseLayout(tile, radius)
        emb, out = outputs(layout)
        row = {"layout": {"tile": list(tile), "radius": radius, "density": layout.blocks((8, 8, 8)).density},
               "embedding_rel_l2_vs_dense": relative_l2(emb, dense_emb)}
        for key in ("step1_mask128_uint8", "step2_mask128_uint8", "step1_zeromask_mask128_uint8"):
            a, b = dense_out[key].astype(bool), out[key].astype(bool)
            union = a.sum() + b.sum()
            row[key] = {"agreement": float((a == b).mean()), "dice": float(2 * (a & b).sum() / union) if union else 1.0,
                        "voxels_dense": int(a.sum()), "voxels_sparse": int(b.sum())}
        row["step1_low_res_rel_l2_vs_dense"] = relative_l2(out["step1_low_res_masks"], dense_out["step1_low_res_masks"])
        rows.append(row)
    return {"kind": "sparse-effect", "model": "fastsam3d", "weights": "fixture fill (crc32-seeded)",
            "backend": backend, "results": rows}


def _fixture_path(reference_dir=None):
    from pathlib import Path

    candidates = [Path(reference_dir)] if reference_dir else []
    shared = os.environ.get("FASTSAM3D_SHARED")
    if shared:
        candidates.append(Path(shared) / "reference")
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "reference")
    for base in candidates:
        path = base / "fixtures" / "fastsam3d_public.npz"
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------------------------------------- driver
def run(device=None, quick: bool = False, threads: Optional[int] = None, include_medim: bool = True,
        reference_dir=None) -> Dict[str, object]:
    """Everything above with sensible settings (``quick``: fewer repeats, no large grid); ``make bench --details``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = 3 if quick else (10 if device.type == "cuda" else 5)
    dtypes = ("float32", "float16", "bfloat16") if device.type == "cuda" else ("float32",)
    return {
        "encoders": benchmark_encoders(device, dtypes=dtypes, include_medim=include_medim, repeats=repeats,
                                       threads=threads),
        "attention_ops": benchmark_attention_ops(device, sides=(8,) if quick else (8, 16), dtypes=dtypes,
                                                 repeats=repeats, threads=threads),
        "sparse_effect": sparse_mode_effect(reference_dir),
    }


def main(argv=None) -> int:
    """Command line: print (or write) the JSON of :func:`run`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-medim", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    result = run(args.device, args.quick, args.threads, not args.no_medim)
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
