"""Every Triton kernel variant the attention dispatch can launch compiles for sm_80, sm_86, sm_89 and sm_90, on the CPU.

The variants are not listed by hand. Every distinct attention block of every registry model (FastSAM3D, SAM-Med3D
and -turbo, the demo models and their teacher, tiny-test) is built with random weights and run through the real
dispatch with ``backend="triton"`` in each dtype, dense and in the 3D sparse mode with every tile volume the
dispatch sends to Triton, while the kernel launch is recorded instead of run. Each recorded launch is bound by
Triton's own JIT binder for each target (:func:`FastSAM3DLib.attention.aot.bind`), identical kernels are
compiled once, and each is compiled to a cubin with Triton's bundled ``ptxas`` in parallel processes.
Checked: it compiles, its shared memory fits the target, and the block sizes, warps and stages compiled are the
ones :func:`~FastSAM3DLib.attention.triton_kernel.launch_config` chooses for that case.

What ``auto`` launches for the official models and the bundled demo (9 variants x 4 targets) is compiled in the
quick run (about 30 s on 2 cores); the rest (the 3D sparse mode, the teachers' and tiny-test's head dims:
45 variants x 4 targets, about 160 s on 2 cores) is marked ``slow``. Both cover all four targets.
"""
import importlib.util
import math
import os
import subprocess
import time
from pathlib import Path
from typing import List, NamedTuple, Tuple

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs triton (Linux-only optional dependency), not in interpreter mode")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CORE_MODELS = {"fastsam3d", "sam-med3d", "sam-med3d-turbo", "fastsam3d-demo"}  # compiled in the quick run


def sparse_tiles(grid):
    """One tile per tile volume the dispatch sends to the Triton kernel on ``grid`` (powers of two >= 16 whose
    sides divide the grid); the launch configuration depends on the volume only."""
    divisors = [[t for t in range(1, g + 1) if g % t == 0] for g in grid]
    by_volume = {}
    for a in divisors[0]:
        for b in divisors[1]:
            for c in divisors[2]:
                volume = a * b * c
                if volume >= 16 and volume & (volume - 1) == 0:
                    by_volume.setdefault(volume, (a, b, c))
    return [by_volume[v] for v in sorted(by_volume)]


class Projection(torch.nn.Module):
    """Stands in for an attention block's ``qkv`` or ``proj`` linear layer: returns a fixed random output of the
    layer's shape and dtype (the launch depends on shapes, strides and dtypes only; a 768-wide float16 matmul
    costs 0.15 s on a CPU) and keeps the layer's ``bias``, which SAM-Med3D's padded keys read."""

    def __init__(self, linear: torch.nn.Linear, gen: torch.Generator):
        super().__init__()
        self.out_features = linear.out_features
        self.bias = torch.nn.Parameter(torch.randn(linear.out_features, generator=gen) * 0.05)
        self.gen = gen

    def forward(self, x):
        out = torch.randn(*x.shape[:-1], self.out_features, generator=self.gen) * 0.3
        return out.to(device=x.device, dtype=x.dtype)


def attention_blocks():
    """{(dim, heads, grid, window): (attention module, [model names])} for every distinct attention block of the
    registry's models, built by the real encoder (on the meta device), with random tables and projections."""
    from FastSAM3DLib.image_encoder import ImageEncoder3D
    from FastSAM3DLib.registry import get_model_config, list_models

    blocks = {}
    gen = torch.Generator().manual_seed(0)
    for name in list_models():
        with torch.device("meta"):  # the real encoder's blocks, without allocating its weights
            encoder = ImageEncoder3D(get_model_config(name).encoder, backend="triton")
        for block in encoder.blocks:
            attn = block.attn
            if attn is None:
                continue
            key = (attn.qkv.in_features, attn.num_heads, attn.grid, attn.window)
            if key not in blocks:
                attn.qkv, attn.proj = Projection(attn.qkv, gen), Projection(attn.proj, gen)
                attn = attn.to_empty(device="cpu")
                with torch.no_grad():
                    for param in attn.parameters():
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
                blocks[key] = (attn, [])
            if name not in blocks[key][1]:
                blocks[key][1].append(name)
    return blocks


class LaunchRecorder:
    """Stands in for the JIT kernel: ``kernel[grid](*args, **kwargs)`` is recorded, nothing runs."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class Launch(NamedTuple):
    """One recorded launch of the kernel by the dispatch."""

    label: str
    models: Tuple[str, ...]
    case: tuple  # the arguments of launch_config: (token grid, head dim, dtype, padded keys?, sparse tile volume)
    programs: tuple
    args: tuple
    kwargs: dict


def record_launches() -> List[Launch]:
    """Every launch the dispatch makes for the registry's attention blocks, in each dtype and mode."""
    from FastSAM3DLib import attention
    from FastSAM3DLib.attention import triton_kernel

    recorder = LaunchRecorder()
    records = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(triton_kernel, "rel_pos_attention_kernel", recorder)
        mp.setattr(attention, "_triton_unusable_reason", lambda device: None)  # CPU tensors stand in for CUDA ones
        mp.delenv(attention.ENV_VAR, raising=False)
        for (dim, heads, grid, window), (module, models) in attention_blocks().items():
            modes = [None] if window else [None] + sparse_tiles(grid)  # the windows stay dense in sparse mode
            for dtype in DTYPES:
                block = module.to(dtype)
                x = torch.randn(1, *grid, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
                for tile in modes:
                    block.sparse = None if tile is None else attention.SparseLayout(tile, 1)
                    before = len(recorder.launches)
                    block(x)
                    assert len(recorder.launches) == before + 1, "the dispatch launched the Triton kernel once"
                    mode = "dense" if tile is None else "sparse " + "x".join(map(str, tile))
                    label = f"{'/'.join(models)} {'window' if window else 'global'} {str(dtype)[6:]} {mode}"
                    case = (grid, dim // heads, dtype, bool(window) and tuple(window) != tuple(grid),
                            None if tile is None else math.prod(tile))
                    records.append(Launch(label, tuple(models), case, *recorder.launches[-1]))
                block.sparse = None
    return records


def is_core(launch: Launch) -> bool:
    """What ``auto`` launches for the official models and the bundled demo: dense, every dtype."""
    return launch.case[4] is None and bool(set(launch.models) & CORE_MODELS)


def compile_launches(launches: List[Launch], skip=()) -> List:
    """Bind each launch for every target, merge identical kernels, compile the ones not in ``skip``; prints time."""
    from FastSAM3DLib.attention import aot, triton_kernel

    kernel = triton_kernel.rel_pos_attention_kernel
    jobs = [job for job in aot.unique_jobs(aot.bind(kernel, launch.args, launch.kwargs, arch, launch.label)
                                           for arch in aot.ARCHS for launch in launches) if job.key() not in skip]
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    results = aot.compile_jobs(jobs, workers)
    print(f"\nAOT: {len(jobs)} kernels ({len(jobs) // len(aot.ARCHS)} variants x {len(aot.ARCHS)} targets) compiled "
          f"in {time.perf_counter() - start:.1f} s with {workers} worker processes")
    return jobs, results


@pytest.fixture(scope="module")
def launches():
    return record_launches()


@pytest.fixture(scope="module")
def compiled_core(launches):
    """The default path's variants (see :func:`is_core`) compiled for every target: (jobs, results)."""
    return compile_launches([launch for launch in launches if is_core(launch)])


@pytest.fixture(scope="module")
def compiled_rest(launches, compiled_core):
    """Every other variant (sparse mode, the teachers' and tiny-test's head dims) for every target."""
    return compile_launches(launches, skip={job.key() for job in compiled_core[0]})


def check_results(results, arch, launches):
    """Each kernel compiled to a cubin within the target's shared memory, with its launch configuration."""
    from FastSAM3DLib.attention.aot import SHARED_MEMORY_LIMIT
    from FastSAM3DLib.attention.triton_kernel import launch_config

    configs = {launch.label: launch_config(*launch.case) for launch in launches}
    results = [r for r in results if r.arch == arch]
    assert results
    failures = [f"{r.labels}: {r.error}" for r in results if r.error]
    assert not failures, "\n".join(failures)
    for r in results:
        assert r.cubin_bytes > 0, r.labels
        assert r.shared <= SHARED_MEMORY_LIMIT[arch], (r.labels, r.shared, SHARED_MEMORY_LIMIT[arch])
        for label in r.labels:
            config = configs[label]
            assert (r.num_warps, r.num_stages) == (config.num_warps, config.num_stages), label
            assert r.constexprs == dict(config.constexprs), label
    return {label for r in results for label in r.labels}


def test_the_launcher_uses_launch_config(launches):
    """Each recorded launch passes exactly the launch configuration of its case (block sizes, warps, stages,
    constexprs) and the program grid it implies, so compiling the recorded launches compiles what the
    dispatch chooses."""
    from FastSAM3DLib.attention.triton_kernel import launch_config

    assert launches
    for launch in launches:
        grid, head_dim, dtype = launch.case[:3]
        config = launch_config(*launch.case)
        assert launch.kwargs == config.kwargs(), launch.label
        assert launch.programs == config.programs(math.prod(grid), launch.args[0].shape[1]), launch.label
        assert launch.args[0].dtype == dtype and launch.args[0].shape[-1] == head_dim, launch.label


def test_launches_cover_every_dtype_head_dim_and_mode(launches):
    """The recorded launches span the registry: each dtype, each head dim, padded and unpadded windows,
    dense and sparse, and sparse tiles both smaller and larger than the dense blocks."""
    from FastSAM3DLib.registry import get_model_config, list_models

    cases = {launch.case for launch in launches}
    head_dims = {get_model_config(n).encoder.embed_dim // get_model_config(n).encoder.num_heads for n in list_models()}
    assert head_dims >= {128, 64, 32, 24}  # FastSAM3D, SAM-Med3D and fastsam3d-demo, the teachers, tiny-test
    for dtype in DTYPES:
        for dim in head_dims:
            assert any(c[1] == dim and c[2] == dtype and c[4] is None and not c[3] for c in cases), (dim, dtype)
            assert any(c[1] == dim and c[2] == dtype and c[4] for c in cases), (dim, dtype)
        assert {c[1] for c in cases if c[2] == dtype and c[3]} == {64, 32}  # SAM-Med3D's and the teachers' windows
    assert {c[4] for c in cases} >= {None, 16, 32, 64, 512}
    core = {launch.case[1:4] for launch in launches if is_core(launch)}
    assert core == {(dim, dtype, pad) for dtype in DTYPES for dim, pad in ((128, False), (64, False), (64, True))}


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_default_path_variants_compile_for_each_gpu(arch, compiled_core, launches):
    """FastSAM3D, SAM-Med3D(-turbo) and the demo model, dense and padded, float32/float16/bfloat16."""
    compiled = check_results(compiled_core[1], arch, launches)
    assert compiled >= {launch.label for launch in launches if is_core(launch)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_every_other_variant_compiles_for_each_gpu(arch, compiled_core, compiled_rest, launches):
    """The 3D sparse mode (every tile volume), the teachers' and tiny-test's head dims: with the default path,
    every launch the dispatch can make."""
    compiled = check_results(compiled_rest[1], arch, launches) | check_results(compiled_core[1], arch, launches)
    assert compiled == {launch.label for launch in launches}


def test_shared_memory_limits_are_the_cuda_guide_values():
    """Opt-in dynamic shared memory per block: 163 KB (8.0), 99 KB (8.6, 8.9), 227 KB (9.0)."""
    from FastSAM3DLib.attention.aot import ARCHS, SHARED_MEMORY_LIMIT

    assert ARCHS == (80, 86, 89, 90)
    assert SHARED_MEMORY_LIMIT == {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def test_ptxas_comes_with_triton():
    """The cubin step needs no CUDA toolkit and no network: Triton's wheel ships ptxas."""
    import triton

    from FastSAM3DLib.attention.aot import ptxas_path

    if os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("TRITON_PTXAS_PATH points Triton at another ptxas")
    path = Path(ptxas_path())
    assert path.is_file() and os.access(path, os.X_OK)
    assert Path(triton.__file__).parent in path.parents
    assert "Cuda compilation tools" in subprocess.run([str(path), "--version"], capture_output=True, text=True,
                                                      timeout=60).stdout


def test_sparse_blocks_follow_the_tile():
    """Small tiles shrink the blocks (and warps) to the tile; large tiles keep the dense blocks."""
    from FastSAM3DLib.attention.triton_kernel import launch_config

    for dtype in DTYPES:
        for head_dim in (24, 32, 64, 128):
            dense = dict(launch_config((8, 8, 8), head_dim, dtype).constexprs)
            for volume in (16, 32, 64, 128, 512):
                config = launch_config((8, 8, 8), head_dim, dtype, tile_volume=volume)
                c = dict(config.constexprs)
                assert c["BLOCK_M"] == min(volume, dense["BLOCK_M"]) and c["BLOCK_N"] == min(volume, dense["BLOCK_N"])
                assert volume % c["BLOCK_M"] == 0 and volume % c["BLOCK_N"] == 0
                assert config.programs(512, 1) == (512 // c["BLOCK_M"], 1)
    for volume in (8, 24, 48):
        with pytest.raises(ValueError, match="power of two"):
            launch_config((8, 8, 8), 64, torch.float32, tile_volume=volume)
