"""Int8 matrix products on the CPU, and which kernel pays off on this machine.

The ``fast`` precision (:mod:`.quantize`) multiplies int8 matrices with exact int32 sums. PyTorch offers two
kernels, and which one is fast depends on the CPU:

* ``int_mm`` (``torch._int_mm``, signed x signed): fast where the CPU has AVX-512 VNNI or AMX; on a CPU with
  AVX2 only it runs a slow fallback, ~35x *slower* than float32 (measured on an AVX2 AMD EPYC).
* ``onednn`` (oneDNN's quantized linear, unsigned x signed): fast on AVX2 too (2-2.6x faster than float32 on
  that EPYC). AVX2's unsigned x signed instruction saturates sums of two products at 16 bits, so activations
  are quantised asymmetrically to 0..128 (129 levels per row, with a zero point) where the sums stay exact.

Each kernel quantises the activations its own way: ``int_mm`` symmetrically per row (255 levels), ``onednn``
asymmetrically per row (129 levels, about 1.2-1.5x the rounding error on the same weights). The weights are the
same per-output-channel symmetric int8 in both. :func:`choose_kernel` checks each kernel's result on a small
product and times it against float32 once per process; ``$FASTSAM3D_INT8_KERNEL`` (``int_mm``/``onednn``)
forces one. When neither is faster than float32, the ``fast`` precision leaves the model exact and says why.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import SettingError

#: the int8 kernels, in the order preferred when they are equally fast
KERNELS = ("int_mm", "onednn")
#: Environment variable forcing one kernel (``int_mm`` or ``onednn``); unset or ``auto``: the fastest that pays off
ENV_VAR = "FASTSAM3D_INT8_KERNEL"
#: ``onednn`` activations take 0..ONEDNN_LEVELS so that AVX2's 16-bit pair sums cannot saturate (128 * 127 * 2 < 2^15)
ONEDNN_LEVELS = 128
#: a kernel is used only when it takes at most this fraction of the float32 product's time
PAYS_OFF = 0.9
#: rows of the raced product: FastSAM3D's 8^3 tokens, the rows of its encoder's products (with two threads a
#: 256-row product made oneDNN look slower than it is: 0.76-0.86 of float32 against 0.69-0.74 at 512 rows)
RACE_ROWS = 512


def quantize_rows_symmetric(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row of a 2D float tensor: (int8 values, float32 scales (rows, 1))."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(127.0)
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def quantize_activations(x: torch.Tensor, kernel: str) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Rows of ``x`` (2D float32) quantised for ``kernel``: (values, scales (rows, 1), zero points (rows, 1) or None).

    ``x ~ scale * (values - zero)``: int8 values and no zero point for ``int_mm``; uint8 values in 0..128 and
    an integer zero point per row (0 itself is represented exactly) for ``onednn``.
    """
    if kernel == "int_mm":
        values, scale = quantize_rows_symmetric(x)
        return values, scale, None
    low = x.amin(dim=1, keepdim=True).clamp_(max=0.0)
    high = x.amax(dim=1, keepdim=True).clamp_(min=0.0)
    scale = (high - low).clamp_min_(1e-30).div_(ONEDNN_LEVELS)
    zero = torch.round(-low / scale)
    values = torch.round(x / scale).add_(zero).clamp_(0, ONEDNN_LEVELS).to(torch.uint8)
    return values, scale, zero


class PackedWeights:
    """Per-layer cache of oneDNN's packed copies of int8 weights (opaque tensors: dropped, not copied, by deepcopy)."""

    def __init__(self) -> None:
        self._packed: Dict[int, torch.Tensor] = {}

    def get(self, key: int, weight_in_out: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight_in_out`` (in, out) int8, made on first use."""
        packed = self._packed.get(key)
        if packed is None:
            packed = self._packed[key] = torch.ops.onednn.qlinear_prepack(weight_in_out.t().contiguous(), None)
        return packed

    def __deepcopy__(self, memo) -> "PackedWeights":
        return PackedWeights()


def integer_product(values: torch.Tensor, weight_in_out: torch.Tensor, kernel: str,
                    packed: Optional[PackedWeights] = None, key: int = 0) -> torch.Tensor:
    """``values @ weight_in_out`` with exact integer sums, as float32 (rows, out); no scales, no zero points."""
    if kernel == "int_mm":
        return torch._int_mm(values, weight_in_out).float()
    packed_weight = (packed or PackedWeights()).get(key, weight_in_out)
    out = weight_in_out.shape[1]
    return torch.ops.onednn.qlinear_pointwise(values, 1.0, 0, packed_weight, torch.ones(out),
                                              torch.zeros(out, dtype=torch.int64), None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.lru_cache(maxsize=None)
def kernel_works(kernel: str) -> Tuple[bool, str]:
    """(True, "") when ``kernel`` runs here and gives exact integer sums on a small product, else (False, why);
    checked once per process."""
    if kernel == "int_mm" and getattr(torch, "_int_mm", None) is None:
        return False, f"torch {torch.__version__} has no torch._int_mm"
    if kernel == "onednn" and not (torch.backends.mkldnn.is_available()
                                   and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False, f"torch {torch.__version__} has no oneDNN quantized linear on this CPU"
    generator = torch.Generator().manual_seed(0)
    low = -127 if kernel == "int_mm" else 0
    high = 127 if kernel == "int_mm" else ONEDNN_LEVELS
    values = torch.randint(low, high + 1, (17, 64), generator=generator)
    weight = torch.randint(-127, 128, (64, 24), generator=generator)
    values[0] = high  # the extreme sums that saturate 16-bit arithmetic if anything does
    weight[:, 0] = 127
    try:
        result = integer_product(values.to(torch.uint8 if kernel == "onednn" else torch.int8),
                                 weight.to(torch.int8), kernel)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return False, f"{kernel} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if not torch.equal(result.double(), (values.double() @ weight.double())):
        return False, f"{kernel} gave wrong sums on this CPU"
    return True, ""


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def race(runs: Dict[str, Callable[[], object]], repeats: int = 5, reference: str = "float32",
         hopeless: float = 5.0) -> Dict[str, float]:
    """Fastest time of each run, measured in interleaved rounds after one warm-up each (so that a load
    change hits every contender alike); a run slower than ``hopeless`` x the reference's best so far leaves
    the race and keeps that time. Warm-ups are not judged: oneDNN's first call builds its kernel (it took
    ~10x float32's time once here)."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    running = dict(runs)
    for _ in range(repeats):
        for name, fn in list(running.items()):
            best[name] = min(best[name], _seconds(fn))
            if name != reference and best[name] > hopeless * best[reference]:
                del running[name]
    return best


def time_kernels(rows: int = RACE_ROWS, features: int = 768, repeats: int = 5) -> Dict[str, float]:
    """Seconds of one ``(rows, features) @ (features, features)`` product: float32 and each working kernel
    (activation quantisation and rescaling included), raced by :func:`race`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator)
    weight = torch.randn(features, features, generator=generator)
    weight_int8, _ = quantize_rows_symmetric(weight.t())
    weight_int8 = weight_int8.t().contiguous()
    runs: Dict[str, Callable[[], object]] = {"float32": lambda: x @ weight}
    for kernel in KERNELS:
        if kernel_works(kernel)[0]:
            def run(kernel=kernel, packed=PackedWeights()):
                values, scale, _ = quantize_activations(x, kernel)
                return integer_product(values, weight_int8, kernel, packed).mul_(scale)

            runs[kernel] = run
    with torch.inference_mode():
        return race(runs, repeats)


def _capability() -> str:
    getter = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return getter() if getter is not None else "unknown"


@functools.lru_cache(maxsize=None)
def choose_kernel(device_type: str = "cpu", requested: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(kernel, "") for the int8 kernel the fast precision uses on ``device_type``, or (None, why none is).

    ``requested`` (default ``$FASTSAM3D_INT8_KERNEL``, else ``auto``): a kernel name forces that kernel where it
    works; ``auto`` takes the fastest working kernel that needs at most :data:`PAYS_OFF` of float32's time.
    Decided once per process and device type (``cache_clear()`` decides again, e.g. after changing the variable).
    """
    if device_type != "cpu":
        return None, (f"int8 products are a CPU path; on {device_type} the encoder stays exact (use bf16 "
                      "autocast there for speed)")
    name = (requested or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in KERNELS + ("auto",):
        raise SettingError(f"unknown int8 kernel {name!r} (from {'the argument' if requested else ENV_VAR}); "
                           f"choose one of auto, {', '.join(KERNELS)}")
    if name != "auto":
        works, why = kernel_works(name)
        return (name, "") if works else (None, why)
    reasons = [why for works, why in map(kernel_works, KERNELS) if not works]
    if len(reasons) == len(KERNELS):
        return None, "; ".join(reasons)
    timings = time_kernels()
    fastest = min((k for k in KERNELS if k in timings), key=timings.get)
    if timings[fastest] <= PAYS_OFF * timings["float32"]:
        return fastest, ""
    measured = ", ".join(f"{k} {1e3 * t:.1f} ms" for k, t in timings.items())
    return None, (f"int8 products are not faster than float32 on this CPU ({_capability()}; one {RACE_ROWS}x768x768 "
                  f"product: {measured}), so the encoder stays exact")
