"""The Triton attention kernel against the eager reference: on the CPU interpreter (CI) and on CUDA (GPU machines).

``TRITON_INTERPRET=1`` must be set before Triton compiles anything, so the interpreter cases run in one child
process (this file with ``--worker``) that sets it, runs every case and reports JSON; the environment of the
test session is never touched. The CUDA tests run in-process and skip cleanly without a GPU.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (Linux-only optional dependency)")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")

# id: (kind, grid side, heads, head dim, dtype, sparse tile, sparse radius)
CASES = {
    "dense-512-fp32-d64": ("dense", 8, 2, 64, "float32", None, None),
    "dense-512-fp32-d128": ("dense", 8, 1, 128, "float32", None, None),
    "dense-512-fp32-d24": ("dense", 8, 1, 24, "float32", None, None),  # tiny-test's head dim (not a power of 2)
    "dense-512-fp16-d64": ("dense", 8, 1, 64, "float16", None, None),
    "dense-512-fp16-d128": ("dense", 8, 1, 128, "float16", None, None),
    "dense-512-bf16-d128": ("dense", 8, 1, 128, "bfloat16", None, None),
    "dense-1728-fp32-d64": ("dense", 12, 1, 64, "float32", None, None),
    "sparse-512-fp32-d64-t2x2x4-r1": ("sparse", 8, 1, 64, "float32", (2, 2, 4), 1),
    "sparse-512-fp16-d128-t4x4x4-r0": ("sparse", 8, 1, 128, "float16", (4, 4, 4), 0),
    "sparse-512-bf16-d64-t2x4x4-r1": ("sparse", 8, 1, 64, "bfloat16", (2, 4, 4), 1),
    "sparse-4096-fp32-d64-t4x4x4-r1": ("sparse", 16, 1, 64, "float32", (4, 4, 4), 1),
    # tiles larger than the blocks: several programs per query tile, several key blocks per key tile
    "sparse-512-fp32-d128-t4x4x8-r0": ("sparse", 8, 2, 128, "float32", (4, 4, 8), 0),
    "sparse-512-bf16-d64-t4x8x8-r0": ("sparse", 8, 1, 64, "bfloat16", (4, 8, 8), 0),
    "padded-512-fp32-d64": ("padded", 8, 2, 64, "float32", None, None),
    "padded-512-fp16-d64": ("padded", 8, 1, 64, "float16", None, None),
    "padded-512-bf16-d128": ("padded", 8, 1, 128, "bfloat16", None, None),
}
# relative L2 error against a float64 reference computed from the same (float32) inputs
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


# ------------------------------------------------------------------------------------------- shared helpers
def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def make_case(kind, side, heads, dim, seed=0, device="cpu"):
    """Random q, k, v, tables and padded-token qkv for one case (float32)."""
    gen = torch.Generator().manual_seed(seed)
    n = side ** 3
    box = 14 if kind == "padded" else side
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    tables = [torch.randn(2 * box - 1, dim, generator=gen) * 0.1 for _ in range(3)]
    pad_qkv = torch.randn(3, heads, dim, generator=gen)
    return [t.to(device) for t in (q, k, v)], [t.to(device) for t in tables], pad_qkv.to(device)


def run_case(kind, side, heads, dim, dtype, tile, radius, backend, device="cpu"):
    """(ours, float64 reference, same-dtype torch result) for one case through the public entry points."""
    from FastSAM3DLib import attention
    from FastSAM3DLib.attention import reference

    (q, k, v), tables, pad_qkv = make_case(kind, side, heads, dim, device=device)
    dt = getattr(torch, dtype)
    grid, scale = (side,) * 3, dim ** -0.5
    d64 = [t.double() for t in (q, k, v)] + [t.double() for t in tables]
    low = [t.to(dt) for t in (q, k, v)]
    if kind == "padded":
        window = (14, 14, 14)
        ref = reference.padded_window_attention_eager(*d64[:3], pad_qkv.double(), *d64[3:], grid, window, scale)

        def run(backend):
            return attention.padded_window_attention(*low, pad_qkv, *tables, grid, window, scale, backend=backend)
    else:
        layout = attention.SparseLayout(tile, radius).blocks(grid) if kind == "sparse" else None
        if layout is None:
            ref = reference.rel_pos_attention_eager(*d64, grid, scale)
        else:
            ref = reference.rel_pos_attention_masked_eager(*d64, grid, scale, layout.token_mask())

        def run(backend):
            return attention.rel_pos_attention(*low, *tables, grid, scale, backend=backend, sparse=layout)
    return run(backend), ref, run("torch")


# ------------------------------------------------------------------------------------- the interpreter worker
def _worker(which: str, reference_dir: str) -> dict:
    """Runs inside the child process, where TRITON_INTERPRET=1 is set before Triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    import warnings

    from FastSAM3DLib import attention
    from FastSAM3DLib.attention import triton_kernel

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    launches = []
    kernel = triton_kernel.rel_pos_attention_triton

    def counting(*args, **kwargs):
        launches.append(1)
        return kernel(*args, **kwargs)

    triton_kernel.rel_pos_attention_triton = counting
    results = {}
    if which == "kernels":
        for case_id, (kind, side, heads, dim, dtype, tile, radius) in CASES.items():
            start, launches[:] = time.perf_counter(), []
            try:
                ours, ref, same_dtype_torch = run_case(kind, side, heads, dim, dtype, tile, radius, "triton")
                results[case_id] = {"rel_l2": rel_l2(ours, ref), "torch_rel_l2": rel_l2(same_dtype_torch, ref),
                                    "dtype": str(ours.dtype), "launches": len(launches),
                                    "seconds": time.perf_counter() - start}
            except Exception as exc:  # reported per case by the parent
                defect = triton_kernel.interpreter_defect(exc)
                results[case_id] = {"not_run": defect} if defect else {"error": f"{type(exc).__name__}: {exc}"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            launches[:] = []
            (q, k, v), tables, _ = make_case("dense", 8, 1, 16)
            attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25, backend="triton",
                                        sparse=attention.SparseLayout((2, 2, 2), 1))
        results["dispatch"] = {
            "triton_on_cpu": attention.resolve_backend("triton", "cpu"),
            "auto_on_cpu": attention.resolve_backend("auto", "cpu"),
            "small_tile_launches": len(launches),
            "small_tile_warnings": [str(w.message) for w in caught],
            # only the older interpreter's scalar defect counts as "not run", not any error of a launch
            "defect_recognised": [bool(triton_kernel.interpreter_defect(exc)) for exc in (
                RuntimeError("TypeError('only 0-dimensional arrays can be converted to Python scalars')"),
                RuntimeError("TypeError('unsupported operand type(s)')"))],
        }
    else:  # the whole FastSAM3D encoder on the fixture
        import numpy as np

        from FastSAM3DLib import build_model
        from FastSAM3DLib.parity import fill_like_fixture, fixture_input, relative_l2

        ref = np.load(Path(reference_dir) / "fixtures" / "fastsam3d_public.npz")
        model = build_model("fastsam3d", attention_backend="triton")
        fill_like_fixture(model, ref["plus_one_keys"])
        start, launches[:] = time.perf_counter(), []
        with torch.no_grad():
            embedding = model.image_encoder(fixture_input())
        results["encoder"] = {"rel_l2": relative_l2(embedding.numpy(), ref["image_embedding"]),
                              "launches": len(launches), "seconds": time.perf_counter() - start}
    return results


def _run_worker(which: str, reference_dir="") -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", which, str(reference_dir)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreter_results():
    """Every interpreter case, run once per session in a child process (about a minute on 2 cores)."""
    return _run_worker("kernels")


# ----------------------------------------------------------------------------------------- interpreter tests
@needs_triton
@pytest.mark.parametrize("case_id", sorted(CASES))
def test_triton_kernel_matches_reference_in_interpreter(case_id, interpreter_results):
    result = interpreter_results[case_id]
    if "not_run" in result:  # an older Triton's interpreter (e.g. 3.6 under NumPy 2.4); the pinned one runs it
        pytest.skip(result["not_run"])
    assert "error" not in result, result.get("error")
    dtype = CASES[case_id][4]
    assert result["dtype"] == f"torch.{dtype}"
    assert result["launches"] == 1, "the Triton kernel really ran (no silent fallback)"
    assert result["rel_l2"] <= TOLERANCE[dtype], result
    # no worse than the PyTorch path in the same dtype, up to float32 rounding
    assert result["rel_l2"] <= 2 * result["torch_rel_l2"] + 2e-6, result


@needs_triton
def test_interpreter_dispatch_and_small_tile_fallback(interpreter_results):
    result = interpreter_results["dispatch"]
    assert result["triton_on_cpu"] == "triton"  # allowed under TRITON_INTERPRET=1 ...
    assert result["auto_on_cpu"] == "torch"  # ... but never chosen automatically for CPU tensors
    assert result["small_tile_launches"] == 0
    assert len(result["small_tile_warnings"]) == 1 and "power of two" in result["small_tile_warnings"][0]
    assert result["defect_recognised"] == [True, False]


def test_interpreter_defects_are_recognised_only_under_the_interpreter():
    pytest.importorskip("triton")
    from FastSAM3DLib.attention import triton_kernel

    exc = RuntimeError("TypeError('only 0-dimensional arrays can be converted to Python scalars')")
    assert triton_kernel.interpreter_defect(exc) is None  # this process compiles (no TRITON_INTERPRET)


@needs_triton
@pytest.mark.slow
def test_triton_encoder_reproduces_fastsam3d_fixture(reference_dir):
    """The whole FastSAM3D encoder with the Triton backend (interpreter): 4 attention blocks x 6 heads."""
    result = _run_worker("encoder", reference_dir)["encoder"]
    assert result["launches"] == 4
    assert result["rel_l2"] <= 5e-5, result


# ------------------------------------------------------------------------------------------------ CUDA tests
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case_id", sorted(CASES))
def test_triton_kernel_matches_reference_on_cuda(case_id):
    kind, side, heads, dim, dtype, tile, radius = CASES[case_id]
    ours, ref, same_dtype_torch = run_case(kind, side, max(heads, 2), dim, dtype, tile, radius, "triton", "cuda")
    assert ours.is_cuda and ours.dtype == getattr(torch, dtype)
    assert rel_l2(ours, ref) <= TOLERANCE[dtype]
    assert rel_l2(ours, ref) <= 2 * rel_l2(same_dtype_torch, ref) + 2e-6


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dim", [64, 128])
def test_triton_large_grid_on_cuda(dtype, dim):
    ours, ref, _ = run_case("dense", 16, 6, dim, dtype, None, None, "triton", "cuda")
    assert rel_l2(ours, ref) <= TOLERANCE[dtype]
    ours, ref, _ = run_case("sparse", 16, 6, dim, dtype, (4, 4, 4), 1, "triton", "cuda")
    assert rel_l2(ours, ref) <= TOLERANCE[dtype]


@pytest.mark.cuda
@needs_cuda
def test_auto_picks_triton_on_cuda(monkeypatch):
    from FastSAM3DLib import attention

    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    expected = "triton" if attention.triton_supported("cuda") else "torch"
    assert attention.resolve_backend("auto", "cuda") == expected


@pytest.mark.cuda
@needs_cuda
def test_cuda_models_match_fixture_and_medim_with_triton(reference_dir):
    import numpy as np

    from FastSAM3DLib import build_model
    from FastSAM3DLib.parity import fill_like_fixture, fixture_input, relative_l2

    ref = np.load(reference_dir / "fixtures" / "fastsam3d_public.npz")
    model = build_model("fastsam3d", attention_backend="triton")
    fill_like_fixture(model, ref["plus_one_keys"])
    with torch.no_grad():
        emb = model.to("cuda").image_encoder(fixture_input().cuda())
    assert relative_l2(emb.cpu().numpy(), ref["image_embedding"]) <= 5e-5
    ref = np.load(reference_dir / "fixtures" / "sammed3d_public.npz")
    model = build_model("sam-med3d", attention_backend="triton")
    fill_like_fixture(model, ref["plus_one_keys"])
    with torch.no_grad():
        emb = model.to("cuda").image_encoder(fixture_input().cuda())
    assert relative_l2(emb.cpu().numpy(), ref["image_embedding"]) <= 5e-5


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(_worker(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")))
