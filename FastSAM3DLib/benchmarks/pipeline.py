"""Latency and memory of the interactive pipeline, one model, device and precision at a time.

* image encoder alone (optionally replayed from a CUDA graph), prompt encoder + mask decoder alone;
* first and next click through :class:`InteractiveSession` on a CT-sized synthetic volume made in numpy (ROI
  resampling, encoder, decoder, paste-back), and the peak memory of one session;
* the references: medim's SAM-Med3D encoder (the official code, when installed) and the 2D SAM ViT-B encoder
  slice by slice (:mod:`.sam2d`).

Precisions: ``fp32`` is the exact network; ``bf16`` and ``fp16`` run under ``torch.autocast`` (the session feeds
float32 images); ``int8`` is the ``fast`` precision of :mod:`FastSAM3DLib.quantize` (the image encoder's matrix
products in int8, CPU only), measured on an int8 copy of the same model. Nothing here imports SimpleITK, and
neither does the session: it resamples in PyTorch (:mod:`FastSAM3DLib.resample`).
"""
import contextlib
import weakref
from typing import Callable, Dict

import numpy as np
import torch

from ..geometry import Volume
from .attention import cpu_peak_bytes, measure, sync_device

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
#: the precision measured on the int8-encoder copy of a model (FastSAM3DLib.quantize), float32 elsewhere
INT8 = "int8"
_INT8_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class MissingDependency(RuntimeError):
    """A benchmark needs a package that is not installed (reported as a skip, not an error)."""


def autocast(device, precision: str):
    """The context a precision runs in: nothing for fp32, ``torch.autocast`` otherwise."""
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def model_for(model, precision: str):
    """The model a precision runs: ``model`` itself, or for ``int8`` its int8-encoder copy (made once per model,
    following the model's attention backend). :class:`MissingDependency` where int8 products cannot run."""
    if precision != INT8:
        return model
    from ..quantize import int8_support
    from .precision import fast_copy

    supported, why = int8_support(next(model.parameters()).device.type)
    if not supported:
        raise MissingDependency(why)
    fast = _INT8_COPIES.get(model)
    if fast is None:
        fast = _INT8_COPIES[model] = fast_copy(model)
    for mine, theirs in zip(fast.image_encoder.blocks, model.image_encoder.blocks):
        if mine.attn is not None:
            mine.attn.backend, mine.attn.sparse = theirs.attn.backend, theirs.attn.sparse
    return fast


def ct_sized_volume(shape=(300, 512, 512), spacing=(0.8, 0.8, 1.5)) -> Volume:
    """A float32 CT-like volume (K, J, I) (air, body, a bright organ) with an offset, flipped geometry."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    nk, nj, ni = shape
    body = ((j - nj / 2) / (0.39 * nj)) ** 2 + ((i - ni / 2) / (0.45 * ni)) ** 2 < 1
    organ = (((k - 0.5 * nk) / (0.13 * nk)) ** 2 + ((j - 0.47 * nj) / (0.1 * nj)) ** 2
             + ((i - 0.59 * ni) / (0.12 * ni)) ** 2 < 1)
    array = np.where(body, 40.0, -1000.0).astype(np.float32) + np.where(organ, 120.0, 0.0).astype(np.float32)
    ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    ijk_to_ras[:3, 3] = (200.0, 180.0, -300.0)
    return Volume(array, ijk_to_ras)


def click_centre(volume: Volume) -> np.ndarray:
    """RAS position of the organ centre of :func:`ct_sized_volume`."""
    nk, nj, ni = volume.shape
    return (volume.ijk_to_ras @ np.array([0.59 * ni, 0.47 * nj, 0.5 * nk, 1.0]))[:3]


def _param_mib(module: torch.nn.Module) -> float:
    """Weights in MiB: parameters and buffers (the int8 encoder keeps its weights as buffers)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cuda_graph_time(fn: Callable[[], torch.Tensor], device, repeats: int) -> Dict[str, object]:
    """Capture ``fn()`` (returning a tensor) in a CUDA graph and time its replays (CUDA only).

    Also returns the relative difference between the replayed output and an eager run.
    """
    device = torch.device(device)
    with torch.inference_mode():
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as graph capture requires
                expected = fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn()
        graph.replay()
        sync_device(device)
        diff = _rel_diff(static_out, expected)
    timing = measure(graph.replay, device, repeats, warmup=1, memory=False)
    del graph, static_out
    return {"timing": timing, "rel_diff_vs_eager": diff}


def encoder_input(model, device) -> torch.Tensor:
    """A random (1, 1, S, S, S) float32 model input."""
    size = model.config.image_size
    return torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def bench_encoder(model, device, precision: str = "fp32", repeats: int = 5, warmup: int = 1) -> Dict[str, object]:
    """The image encoder on one 128³ input, in the model's current attention backend."""
    model = model_for(model, precision)
    x = encoder_input(model, device)

    def run():
        with autocast(device, precision):
            return model.image_encoder(x)

    return measure(run, device, repeats, warmup, memory=False)


def bench_encoder_cuda_graph(model, device, precision: str = "fp32", repeats: int = 10) -> Dict[str, object]:
    """The image encoder replayed from a CUDA graph."""
    x = encoder_input(model, device)

    def run():
        with autocast(device, precision):
            return model.image_encoder(x)

    return cuda_graph_time(run, device, repeats)


def bench_decoder(model, device, precision: str = "fp32", repeats: int = 10) -> Dict[str, object]:
    """One click's prompt encoder + mask decoder on a fixed embedding (no resampling, no paste-back)."""
    model = model_for(model, precision)
    size = model.config.image_size
    x = encoder_input(model, device)
    with torch.inference_mode(), autocast(device, precision):
        embedding = model.image_encoder(x)
    coords = torch.tensor([[[size / 2, size / 2 - 4, size / 2 + 6]]], device=device)
    labels = torch.tensor([[1]], device=device)
    previous = torch.zeros(1, 1, size // 4, size // 4, size // 4, device=device)

    def click():
        with autocast(device, precision):
            sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=previous)
            return model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)

    return measure(click, device, repeats, warmup=1, memory=False)


def bench_session(model, volume: Volume, device, precision: str = "fp32", repeats: int = 3,
                  memory_clicks: int = 3) -> Dict[str, object]:
    """First and next click through :class:`InteractiveSession`, and the peak memory of one session.

    Memory: one session (first click and ``memory_clicks`` more), weights included: the allocator's peak on
    CUDA; on the CPU the weights plus the profiler's peak of live tensors (numpy buffers are not counted).
    Resampling: the session's default (``$FASTSAM3D_RESAMPLE``, PyTorch unless set to ``sitk``).
    """
    from ..session import InteractiveSession

    model = model_for(model, precision)

    device = torch.device(device)
    centre = click_centre(volume)
    offsets = iter(np.random.default_rng(0).uniform(-10, 10, (100_000, 3)))

    def one_session(clicks: int):
        with autocast(device, precision):
            session = InteractiveSession(model, volume)
            session.add_click(centre)
            for _ in range(clicks):
                session.add_click(centre + next(offsets))
        return session

    with torch.inference_mode():  # the memory run doubles as the warm-up of the first click
        if device.type == "cuda":
            sync_device(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / 2 ** 20
            one_session(memory_clicks)
            sync_device(device)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
            method = "torch.cuda.max_memory_allocated (weights included)"
        else:
            base = _param_mib(model)
            peak = base + cpu_peak_bytes(lambda: one_session(memory_clicks)) / 2 ** 20
            method = "weights + profiler peak of live CPU tensors"
    first = measure(lambda: one_session(0), device, repeats, warmup=0, memory=False)
    with torch.inference_mode():
        session = one_session(0)
    breakdown = []

    def next_click():
        with autocast(device, precision):
            breakdown.append(session.add_click(centre + next(offsets)).timings)

    later = measure(next_click, device, 2 * repeats, warmup=1, memory=False)
    return {"first_click": first, "next_click": later, "peak_memory_mib": peak, "weights_mib": base,
            "memory_method": method, "volume_shape_kji": list(volume.shape),
            "next_click_paste_median_ms": 1e3 * float(np.median([b["paste"] for b in breakdown])),
            "next_click_decode_median_ms": 1e3 * float(np.median([b["decode"] for b in breakdown]))}


def bench_medim(device, precision: str = "fp32", repeats: int = 3, warmup: int = 1) -> Dict[str, object]:
    """medim's SAM-Med3D image encoder (the official model code) on one 128³ input."""
    try:
        import medim
    except ImportError as exc:
        raise MissingDependency(f"medim is not installed ({exc})") from exc
    model = medim.create_model("SAM-Med3D", pretrained=False).eval().to(device)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        with autocast(device, precision):
            return model.image_encoder(x)

    return measure(run, device, repeats, warmup, memory=False)


def bench_sam2d(device, precision: str = "fp32", slices: int = 2, config=None,
                volume_slices: int = 128) -> Dict[str, object]:
    """The 2D SAM ViT-B image encoder slice by slice: ``slices`` timed, scaled to ``volume_slices``."""
    from . import sam2d

    config = config or sam2d.VIT_B
    device = torch.device(device)
    encoder, implementation = sam2d.build_encoder(config)
    encoder = encoder.to(device).eval()
    x = sam2d.image_input(config, device)

    def one_slice():
        with autocast(device, precision):
            return encoder(x)

    # a 1024² ViT-B slice takes ~15-30 s on a 2-core CPU: no separate warm-up there
    per_slice = measure(one_slice, device, repeats=slices, warmup=1 if device.type == "cuda" else 0, memory=False)
    return {"implementation": implementation, "config": sam2d.describe(config), "per_slice": per_slice,
            "slices_timed": slices, "volume_slices": volume_slices,
            "volume_estimate_ms": per_slice["median_ms"] * volume_slices}


def volume_label(volume: Volume) -> str:
    """'512x512x300' for a (300, 512, 512) array."""
    return "x".join(map(str, volume.shape[::-1]))

