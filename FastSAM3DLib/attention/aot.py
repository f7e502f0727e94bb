"""Ahead-of-time compilation of the Triton attention kernel for NVIDIA GPUs, on a machine without one.

The kernel has to compile for every GPU a user may have, and GPU time to find out is scarce. Triton compiles to
a cubin for any target on the CPU (its bundled ``ptxas`` assembles the PTX), so a test can prove, without a GPU,
that each kernel variant the dispatch launches compiles for sm_80 (A100), sm_86 (RTX 30xx, A40), sm_89
(RTX 40xx, L4, L40) and sm_90 (H100, H200) and fits the target's shared memory.

:func:`bind` turns the arguments of a real launch (recorded, not run) into exactly what Triton's JIT would
compile on a GPU: the signature with its specialisations (16-byte aligned pointers, strides divisible by 16),
the constexprs and the options. It uses the JIT's own argument binder, which is internal to Triton; this module
is written against Triton 3.9 (``requirements-dev.txt``) and is the one place to adapt when the pin moves.
:func:`compile_jobs` compiles many such jobs in parallel processes. Nothing here runs at import time, and
Triton is imported only by these functions.
"""
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, which Triton's
# launcher opts into), per the CUDA C++ Programming Guide's table of compute capabilities: 163 KB on 8.0,
# 99 KB on 8.6 and 8.9, 227 KB on 9.0.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_MEMORY_LIMIT)


@dataclass
class CompileJob:
    """One kernel variant for one target, as Triton's JIT would compile it (picklable, no tensors)."""

    arch: int
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, object]
    labels: List[str] = field(default_factory=list)  # the launches that use this variant

    def key(self) -> tuple:
        """Identity of the compiled kernel: equal keys give the same cubin."""
        return (self.arch, tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())),
                tuple(sorted((k, str(v)) for k, v in self.options.items())))


@dataclass
class CompileResult:
    """What compiling one :class:`CompileJob` produced (``error`` is set instead when it failed)."""

    arch: int
    labels: List[str]
    constexprs: Dict[str, object]
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0
    cubin_bytes: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


def bind(kernel, args: tuple, kwargs: dict, arch: int, label: str = "") -> CompileJob:
    """The :class:`CompileJob` that launching ``kernel[grid](*args, **kwargs)`` on an sm_``arch`` GPU compiles.

    ``args`` may hold CPU tensors with the shapes, strides and alignment the launch would have on the GPU.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:  # the JIT's own binder: the same specialisation as a launch (Triton 3.9 internals)
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"FastSAM3DLib.attention.aot.bind is written against Triton 3.9's JIT internals and "
                           f"needs updating for Triton {triton.__version__}: {type(exc).__name__}: {exc}") from exc
    return CompileJob(arch, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__),
                      [label] if label else [])


def unique_jobs(jobs: Iterable[CompileJob]) -> List[CompileJob]:
    """Merge jobs that compile the same kernel (their labels are joined)."""
    merged: Dict[tuple, CompileJob] = {}
    for job in jobs:
        key = job.key()
        if key in merged:
            merged[key].labels.extend(label for label in job.labels if label not in merged[key].labels)
        else:
            merged[key] = CompileJob(job.arch, job.signature, job.constexprs, job.attrs, job.options, list(job.labels))
    return list(merged.values())


def compile_job(job: CompileJob) -> CompileResult:
    """Compile ``job`` to a cubin for its target (in this process); errors are returned, not raised."""
    import time

    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_kernel import rel_pos_attention_kernel

    names = rel_pos_attention_kernel.arg_names
    result = CompileResult(job.arch, job.labels, {names[k[0]]: v for k, v in job.constexprs.items()})
    start = time.perf_counter()
    try:
        kernel = triton_compile(ASTSource(rel_pos_attention_kernel, job.signature, job.constexprs, job.attrs),
                                target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # reported per variant by the caller
        result.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:2000]}"
    else:
        result.num_warps, result.num_stages = kernel.metadata.num_warps, kernel.metadata.num_stages
        result.shared, result.cubin_bytes = kernel.metadata.shared, len(kernel.asm.get("cubin") or b"")
    result.seconds = time.perf_counter() - start
    return result


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_jobs(jobs: List[CompileJob], workers: Optional[int] = None,
                 cache_dir: Optional[str] = None) -> List[CompileResult]:
    """Compile every job, ``workers`` processes at a time (default: one per CPU), in job order.

    ``cache_dir``: Triton's cache for the workers; by default a fresh temporary folder, so every variant is
    really compiled.
    """
    import multiprocessing

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with tempfile.TemporaryDirectory(prefix="fastsam3d-aot-") as fresh:
        # the slowest variants (float32 dot products on CUDA cores) first, so the workers finish together
        order = sorted(range(len(jobs)), key=lambda i: "fp32" not in job_dtype(jobs[i]))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(cache_dir or fresh,)) as pool:
            done = dict(zip(order, pool.map(compile_job, [jobs[i] for i in order])))
    return [done[i] for i in range(len(jobs))]


def job_dtype(job: CompileJob) -> str:
    """Triton's name of the query dtype of ``job`` (``fp32``, ``fp16``, ``bf16``)."""
    return job.signature["Q"].lstrip("*")


def ptxas_path() -> str:
    """Path of the ``ptxas`` Triton uses for sm_80-sm_90 (its bundled copy unless ``TRITON_PTXAS_PATH`` is set)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(80).path
