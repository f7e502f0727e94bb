"""The benchmark suite shared by ``make bench`` and ``make gpu-check``: a :class:`Plan` in, measurements out.

:func:`run` measures, per model and precision, the encoder (and its CUDA-graph replay on a GPU), the prompt
encoder + decoder, first and next click through the session with the session's peak memory, and the encoder
with the official eager attention; then the references (medim's SAM-Med3D, 2D SAM ViT-B slice by slice) and
the ratios. Each unit that fails or cannot run is recorded as a skipped measurement with its reason; a unit
that raises is also listed in ``problems``. Nothing is asserted.
"""
import datetime
import importlib.util
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import report, steadiness
from .attention import cpu_name

# the model a dry run uses in place of each official model (same code paths, seconds on a CPU)
DRY_RUN_MODELS = {"fastsam3d": "tiny-test", "sam-med3d": "tiny-test-teacher"}

def extra_benchmarks() -> Tuple[Callable[["Plan", str], List[dict]], ...]:
    """More measurements for both `make bench` and `make gpu-check`: functions ``f(plan, device_name)`` returning
    a list of report.measurement(...) dicts. Each runs like the built-in units: against the deadline, and an
    exception becomes a reported problem, not a crash. (Plan.skip["host"] skips the host ones.)"""
    from . import growth, host, int8_kernels, memory, server, session_memory

    return (host.slicer_loop, host.click_write_memory, host.refining_write, int8_kernels.bench_rows,
            session_memory.bench_rows, growth.bench_rows, server.measure, memory.measure)


@dataclass
class Plan:
    """What to measure, where, how often, and by when (``deadline``: a ``time.monotonic()`` value)."""

    device: str = "cpu"
    precisions: Tuple[str, ...] = ("fp32",)
    models: Tuple[str, ...] = ("fastsam3d", "sam-med3d")
    volume_shape: Tuple[int, int, int] = (300, 512, 512)
    repeats: int = 3
    memory_clicks: int = 3  # clicks after the first in the session whose peak memory is measured
    eager_reference: bool = True
    # the fp32 clicks again with SimpleITK resampling both ways (the path before resample.py), on a CPU
    sitk_reference: bool = True
    cuda_graphs: bool = True
    sam2d_slices: int = 2
    sam2d_config: Optional[object] = None  # a sam2d.ViTConfig; None: ViT-B at 1024²
    deadline: Optional[float] = None
    # unit -> reason it is not run: "session", "medim", "sam2d", e.g. {"medim": "dry run"}
    skip: Dict[str, str] = field(default_factory=dict)

    def time_left(self) -> float:
        """Seconds until the deadline (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device, threads: Optional[int] = None) -> Dict[str, object]:
    """Machine, device, library versions, threads and optional packages of this run."""
    device = torch.device(device)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "numpy", "SimpleITK", "medim", "segment-anything", "pytest"):
        versions[package] = _version(package)
    info = {"machine": socket.gethostname(), "platform": platform.platform(), "device": device.type,
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "versions": versions, "cuda": torch.version.cuda,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cpu":  # the int8 products' speed depends on the instruction set (int8_products)
        from ..int8_products import choose_kernel

        capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
        kernel, why = choose_kernel("cpu")
        info.update(cpu_capability=capability() if capability else None, int8_kernel=kernel or f"none: {why}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    gpu_memory_mib=round(props.total_memory / 2 ** 20), driver=_nvidia_driver())
    return info


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_label(env: Dict[str, object]) -> str:
    """'NVIDIA H200' or 'AMD EPYC (AVX2), 1 thread': the device column of the tables (the instruction set
    where recorded: int8 speed depends on it)."""
    if env.get("gpu"):
        return str(env["gpu"])
    threads = env.get("threads")
    capability = f" ({env['cpu_capability']})" if env.get("cpu_capability") else ""
    return f"{env.get('cpu') or 'CPU'}{capability}, {threads} thread{'s' if threads != 1 else ''}"


def now() -> str:
    """UTC time stamp of a result."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Recorder:
    """Runs units against the plan's deadline and collects measurements, details and problems."""

    def __init__(self, plan: Plan, device_name: str, log: Callable[[str], None],
                 after_unit: Optional[Callable[[List[dict], Dict[str, dict], List[str]], None]] = None) -> None:
        self.plan, self.device_name, self.log, self.after_unit = plan, device_name, log, after_unit
        self.measurements: List[dict] = []
        self.details: Dict[str, dict] = {}
        self.problems: List[str] = []
        self.steadiness = steadiness.Steadiness()

    def unit(self, title: str, fn: Callable[[], dict], skip_key: Optional[str] = None, optional: bool = False):
        """(result, None) or (None, reason): run ``fn`` unless skipped, out of time, or failing."""
        from .pipeline import MissingDependency

        if skip_key and skip_key in self.plan.skip:
            return None, self.plan.skip[skip_key]
        if self.plan.time_left() <= 0:
            return None, "time budget spent"
        self.log(f"  {title} ...")
        self.steadiness.sample(title)
        start = time.perf_counter()
        try:
            result = fn()
        except MissingDependency as exc:
            return None, str(exc)
        except Exception as exc:  # reported, never fatal: the other numbers are still worth having
            reason = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
            if not optional:
                self.problems.append(f"{title}: {reason}")
            return None, reason
        finally:
            if torch.device(self.plan.device).type == "cuda":
                torch.cuda.empty_cache()
            if self.after_unit is not None:  # e.g. gpu-check saves what it has, in case the run is cut off
                self.after_unit(self.measurements, self.details, self.problems)
        if isinstance(result, dict) and "seconds" not in result:
            result["seconds"] = round(time.perf_counter() - start, 2)
        return result, None

    def add(self, name: str, value, model: str, precision: str, variant: str = "", skipped=None, **extra):
        self.measurements.append(report.measurement(name, value, model=model, device=self.device_name,
                                                    precision=precision, variant=variant, skipped=skipped, **extra))


def _median(result: Optional[dict], key: str = "median_ms"):
    return None if result is None else result[key]


def run(plan: Plan, env: Dict[str, object], log: Callable[[str], None] = print,
        model_names: Optional[Dict[str, str]] = None,
        after_unit: Optional[Callable[[List[dict], Dict[str, dict], List[str]], None]] = None
        ) -> Tuple[List[dict], Dict[str, dict], List[str]]:
    """Measure everything in ``plan``; returns (measurements, details, problems).

    ``model_names`` maps each planned model to the registry model actually built (a dry run builds tiny ones).
    ``after_unit(measurements, details, problems)`` is called after every unit with what there is so far.
    """
    from ..registry import build_model
    from . import pipeline

    device = torch.device(plan.device)
    rec = _Recorder(plan, device_label(env), log, after_unit)
    volume = pipeline.ct_sized_volume(plan.volume_shape)
    rec.details["volume"] = pipeline.volume_label(volume)
    graph_failed = None
    for role in plan.models:
        name = (model_names or {}).get(role, role)
        log(f"{name} on {rec.device_name}")
        model = build_model(name, seed=0, device=device)
        for precision in plan.precisions:
            detail = rec.details.setdefault(f"{name}/{precision}", {})
            session, why = rec.unit("session: first and next click, memory", lambda: pipeline.bench_session(
                model, volume, device, precision, plan.repeats, plan.memory_clicks), "session")
            detail["session"] = session or why
            for key, column in (("first_click", "first_click_ms"), ("next_click", "next_click_ms")):
                rec.add(column, _median(session and session[key]), name, precision, skipped=why)
            rec.add("peak_memory_mib", session and session["peak_memory_mib"], name, precision, skipped=why)
            if plan.sitk_reference and precision == "fp32" and device.type == "cpu":
                _sitk_clicks(rec, plan, model, volume, device, name, detail)
            encoder, why = rec.unit("encoder", lambda: pipeline.bench_encoder(model, device, precision,
                                                                              plan.repeats))
            detail["encoder"] = encoder or why
            rec.add("encoder_ms", _median(encoder), name, precision, skipped=why)
            if device.type == "cuda" and plan.cuda_graphs:
                graph, why = (None, graph_failed) if graph_failed else rec.unit(
                    "encoder as a CUDA graph", lambda: pipeline.bench_encoder_cuda_graph(
                        model, device, precision, max(plan.repeats, 10)), optional=True)
                if why and why.startswith("error"):  # a failed capture is not retried for the other models
                    graph_failed = f"not tried after a failed capture ({why})"
                detail["encoder_cuda_graph"] = graph or why
                rec.add("encoder_cuda_graph_ms", _median(graph and graph["timing"]), name, precision, skipped=why)
            decoder, why = rec.unit("prompt encoder + decoder", lambda: pipeline.bench_decoder(
                model, device, precision, 2 * plan.repeats))
            detail["decoder"] = decoder or why
            rec.add("decoder_ms", _median(decoder), name, precision, skipped=why)
            if plan.eager_reference:
                model.image_encoder.set_attention_backend("eager")
                try:
                    eager, why = rec.unit("encoder, official eager attention", lambda: pipeline.bench_encoder(
                        model, device, precision, plan.repeats))
                finally:
                    model.image_encoder.set_attention_backend("auto")
                detail["encoder_eager"] = eager or why
                rec.add("encoder_ms", _median(eager), name, precision, variant=report.EAGER_VARIANT, skipped=why)
        model = None  # free it before the next model is built
    float_precisions = [p for p in plan.precisions if p != pipeline.INT8]  # the references have no int8 copy
    for precision in float_precisions:
        # about 15 s per run on one CPU thread: no warm-up and two runs there
        medim, why = rec.unit(f"medim SAM-Med3D encoder ({precision})", lambda: pipeline.bench_medim(
            device, precision, plan.repeats if device.type == "cuda" else min(plan.repeats, 2),
            warmup=int(device.type == "cuda")), "medim")
        rec.details[f"medim/{precision}"] = medim or why
        rec.add("encoder_ms", _median(medim), report.MEDIM_MODEL, precision, skipped=why)
    for precision in float_precisions:
        sam, why = rec.unit(f"2D SAM ViT-B, {plan.sam2d_slices} slices ({precision})", lambda: pipeline.bench_sam2d(
            device, precision, plan.sam2d_slices, plan.sam2d_config), "sam2d")
        rec.details[f"sam2d/{precision}"] = sam or why
        note = None if sam is None else (
            f"{sam['implementation']}; {report.format_value(sam['per_slice']['median_ms'], 'ms')} per slice "
            f"x {sam['volume_slices']} ({sam['slices_timed']} slices timed)")
        rec.add("encoder_ms", sam and sam["volume_estimate_ms"], report.SAM2D_MODEL, precision,
                variant=report.SAM2D_VARIANT, skipped=why, note=note)
    for extra in extra_benchmarks():
        rows, why = rec.unit(getattr(extra, "__name__", "extra benchmark"), lambda: extra(plan, rec.device_name))
        rec.measurements += rows or []
    rec.measurements += report.derive_ratios(rec.measurements)
    rec.measurements.append(rec.steadiness.measurement(rec.device_name))
    rec.details["steadiness"] = rec.steadiness.details()
    return rec.measurements, rec.details, rec.problems


def _sitk_clicks(rec: "_Recorder", plan: Plan, model, volume, device, name: str, detail: dict) -> None:
    """First and next click with ``FASTSAM3D_RESAMPLE=sitk`` (SimpleITK both ways), variant SITK_VARIANT."""
    from . import pipeline

    saved = os.environ.get("FASTSAM3D_RESAMPLE")
    os.environ["FASTSAM3D_RESAMPLE"] = "sitk"
    try:
        session, why = rec.unit("session with SimpleITK resampling", lambda: pipeline.bench_session(
            model, volume, device, "fp32", plan.repeats, 0), "session") if has_module("SimpleITK") else (
            None, "SimpleITK is not installed")
    finally:
        if saved is None:
            os.environ.pop("FASTSAM3D_RESAMPLE", None)
        else:
            os.environ["FASTSAM3D_RESAMPLE"] = saved
    detail["session_sitk"] = session or why
    for key, column in (("first_click", "first_click_ms"), ("next_click", "next_click_ms")):
        rec.add(column, _median(session and session[key]), name, "fp32", variant=report.SITK_VARIANT, skipped=why)


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
