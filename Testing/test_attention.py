"""Attention ops on the CPU: bias factors, the closed-form padding, the 3D sparse layout, dispatch, plumbing,
and the dispatch's fallback when the Triton kernel fails at its first launch (no GPU needed).

The Triton kernel's tests (CPU interpreter and CUDA) are in ``test_attention_triton.py``.
"""
import importlib.util
import logging
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from FastSAM3DLib import attention, build_model
from FastSAM3DLib.attention import reference, sparse_layout, torch_ops
from FastSAM3DLib.attention.rel_pos import bias_factors, dense_bias


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def random_inputs(heads, n, dim, table_rows, seed=0, table_scale=0.1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    tables = [torch.randn(table_rows, dim, generator=gen) * table_scale for _ in range(3)]
    pad_qkv = torch.randn(3, heads, dim, generator=gen)
    return [t.to(dtype) for t in (q, k, v)], tables, pad_qkv


# ----------------------------------------------------------------------------------------------- bias factors
@pytest.mark.parametrize("side,window", [(8, None), (5, None), (8, 14), (4, 7), (6, 6)])
def test_bias_factors_rebuild_the_official_bias(side, window):
    grid = (side,) * 3
    box = window or side
    (q, _, _), tables, pad_qkv = random_inputs(2, side ** 3, 16, 2 * box - 1, table_scale=0.5)
    factors = bias_factors(q, *tables, grid, (box,) * 3 if window else None, pad_qkv[0])
    q_grid = reference.pad_window(q, grid, (box,) * 3, pad_qkv[0]) if window else reference.grid_view(q, grid)
    full = reference.official_bias(q_grid, *tables, grid).view(1, 2, side ** 3, box, box, box)
    real = full[..., :side, :side, :side].reshape(1, 2, side ** 3, side ** 3)
    torch.testing.assert_close(dense_bias(factors), real, rtol=1e-5, atol=1e-5)
    assert (factors.pad_log_mass is None) == (box == side)


@pytest.mark.parametrize("table_scale", [0.1, 3.0])
def test_padding_log_mass_equals_brute_force_sum(table_scale):
    """log sum_{padded keys} exp(bias), in float64 by brute force; 3.0 gives |bias| ~ 100 (overflows exp in fp32)."""
    grid, window = (8, 8, 8), (14, 14, 14)
    (q, _, _), tables, pad_qkv = random_inputs(2, 512, 16, 27, seed=1, table_scale=table_scale)
    factors = bias_factors(q, *tables, grid, window, pad_qkv[0])
    full = reference.official_bias(reference.pad_window(q, grid, window, pad_qkv[0]), *tables, grid).double()
    padded = torch.ones(window, dtype=torch.bool)
    padded[:8, :8, :8] = False
    expected = torch.logsumexp(full[..., padded.flatten()], dim=-1)
    assert full.abs().max() > (80 if table_scale > 1 else 0)
    assert torch.isfinite(factors.pad_log_mass).all()
    torch.testing.assert_close(factors.pad_log_mass.double(), expected, rtol=1e-6, atol=2e-5)


def test_bias_factors_reject_non_cubic_windows():
    (q, _, _), tables, pad_qkv = random_inputs(1, 8 * 8 * 4, 8, 15)
    with pytest.raises(ValueError, match="cubic"):
        bias_factors(q, *tables, (8, 8, 4))


# ------------------------------------------------------------------------------------ closed-form padded windows
@pytest.mark.parametrize("heads,dim,table_scale", [(2, 16, 0.1), (12, 64, 0.02), (2, 32, 1.0)])
def test_closed_form_padding_matches_padded_reference(heads, dim, table_scale):
    grid, window = (8, 8, 8), (14, 14, 14)
    (q, k, v), tables, pad_qkv = random_inputs(heads, 512, dim, 27, seed=2, table_scale=table_scale)
    expected = reference.padded_window_attention_eager(q, k, v, pad_qkv, *tables, grid, window, dim ** -0.5)
    ours = torch_ops.padded_window_attention_torch(q, k, v, pad_qkv, *tables, grid, window, dim ** -0.5)
    assert rel_l2(ours, expected) <= 5e-6


def test_closed_form_attends_to_one_virtual_key(monkeypatch):
    """The padded keys are never materialised: SDPA sees the 512 real keys plus one."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(k.shape[-2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch_ops.F, "scaled_dot_product_attention", spy)
    (q, k, v), tables, pad_qkv = random_inputs(2, 512, 16, 27)
    torch_ops.padded_window_attention_torch(q, k, v, pad_qkv, *tables, (8, 8, 8), (14, 14, 14), 0.25)
    assert seen == [513]


def test_padded_window_without_padding_is_plain_attention():
    (q, k, v), tables, pad_qkv = random_inputs(2, 216, 16, 11)
    expected = reference.padded_window_attention_eager(q, k, v, pad_qkv, *tables, (6, 6, 6), (6, 6, 6), 0.25)
    ours = torch_ops.padded_window_attention_torch(q, k, v, pad_qkv, *tables, (6, 6, 6), (6, 6, 6), 0.25)
    assert rel_l2(ours, expected) <= 5e-6


# ----------------------------------------------------------------------------------------- dense torch path
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("side", [8, 12])
def test_dense_torch_path_matches_eager_reference(side, dtype, tol):
    (q, k, v), tables, _ = random_inputs(2, side ** 3, 32, 2 * side - 1, seed=3)
    expected = reference.rel_pos_attention_eager(*(t.double() for t in (q, k, v)),
                                                 *(t.double() for t in tables), (side,) * 3, 32 ** -0.5)
    ours = torch_ops.rel_pos_attention_torch(q.to(dtype), k.to(dtype), v.to(dtype), *tables, (side,) * 3,
                                             32 ** -0.5)
    assert ours.dtype == dtype
    assert rel_l2(ours, expected) <= tol


# ---------------------------------------------------------------------------------------------- sparse layout
@pytest.mark.parametrize("grid,tile,radius", [((8, 8, 8), (2, 2, 4), 1), ((16, 16, 16), (4, 4, 4), 1),
                                              ((8, 8, 8), (4, 4, 4), 0), ((12, 8, 4), (4, 2, 2), 2)])
def test_block_layout_is_the_chebyshev_tile_neighbourhood(grid, tile, radius):
    layout = sparse_layout.block_layout(grid, tile, radius)
    n = grid[0] * grid[1] * grid[2]
    assert sorted(layout.order.tolist()) == list(range(n))
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    tiles_of_order = coords[layout.order].view(layout.num_tiles, layout.tile_volume, 3) // torch.tensor(tile)
    assert (tiles_of_order == tiles_of_order[:, :1]).all(), "every tile is one box of the grid"
    tile_coord = tiles_of_order[:, 0]
    for t in range(layout.num_tiles):
        expected = ((tile_coord - tile_coord[t]).abs().amax(1) <= radius).nonzero().flatten().tolist()
        assert layout.kv_tiles[t, : layout.kv_count[t]].tolist() == expected
        assert (layout.kv_tiles[t, layout.kv_count[t]:] == -1).all()
    mask = layout.token_mask()
    token_tile = (coords // torch.tensor(tile))
    brute = (token_tile[:, None, :] - token_tile[None, :, :]).abs().amax(-1) <= radius
    assert torch.equal(mask, brute)
    assert abs(layout.density - mask.float().mean().item()) < 1e-9


def test_block_layout_density_and_errors():
    assert sparse_layout.block_layout((16, 16, 16), (4, 4, 4), 1).density == pytest.approx(2.5 ** 3 / 64)
    assert sparse_layout.block_layout((8, 8, 8), (4, 4, 4), 1).density == 1.0
    with pytest.raises(ValueError, match="divide"):
        sparse_layout.block_layout((8, 8, 8), (3, 4, 4), 1)
    with pytest.raises(ValueError):
        attention.SparseLayout((4, 4), 1)
    with pytest.raises(ValueError):
        attention.SparseLayout((4, 4, 4), -1)


@pytest.mark.parametrize("grid,tile,radius", [((8, 8, 8), (2, 2, 4), 1), ((16, 16, 16), (4, 4, 4), 1),
                                              ((8, 8, 8), (2, 2, 2), 2), ((12, 8, 4), (4, 2, 2), 1)])
def test_box_groups_partition_queries_and_cover_their_keys(grid, tile, radius):
    layout = sparse_layout.block_layout(grid, tile, radius)
    mask = layout.token_mask()
    covered = torch.zeros(grid, dtype=torch.int64)
    kept = 0
    for group in sparse_layout.box_groups(layout):
        q_tok = sparse_layout._box_tokens(group.query, grid)
        k_tok = sparse_layout._box_tokens(group.keys, grid)
        covered.view(-1)[q_tok] += 1
        assert torch.equal(group.allowed, mask[q_tok[:, None], k_tok[None, :]])
        kept += int(group.allowed.sum())
    assert (covered == 1).all(), "every query in exactly one group"
    assert kept == int(mask.sum()), "no kept pair outside the key boxes"


@pytest.mark.parametrize("grid,tile,radius,dtype", [
    ((8, 8, 8), (2, 2, 4), 1, torch.float32), ((8, 8, 8), (4, 4, 4), 0, torch.float32),
    ((16, 16, 16), (4, 4, 4), 1, torch.float32), ((12, 12, 12), (4, 2, 6), 1, torch.float32),
    ((8, 8, 8), (2, 2, 4), 1, torch.bfloat16)])
def test_sparse_torch_path_matches_masked_reference(grid, tile, radius, dtype):
    n = grid[0] * grid[1] * grid[2]
    (q, k, v), tables, _ = random_inputs(2, n, 32, 2 * grid[0] - 1, seed=4)
    layout = attention.SparseLayout(tile, radius).blocks(grid)
    expected = reference.rel_pos_attention_masked_eager(q.double(), k.double(), v.double(),
                                                        *(t.double() for t in tables), grid, 32 ** -0.5,
                                                        layout.token_mask())
    ours = attention.rel_pos_attention(q.to(dtype), k.to(dtype), v.to(dtype), *tables, grid, 32 ** -0.5,
                                       backend="torch", sparse=layout)
    assert rel_l2(ours, expected) <= (5e-6 if dtype == torch.float32 else 1.6e-2)
    dense = reference.rel_pos_attention_eager(q, k, v, *tables, grid, 32 ** -0.5)
    assert rel_l2(ours, dense) > 1e-3 or layout.density == 1.0, "the sparse mode really drops keys"


def test_sparse_with_covering_radius_equals_dense():
    (q, k, v), tables, _ = random_inputs(2, 512, 16, 15, seed=5)
    dense = attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25, backend="torch")
    sparse = attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25, backend="torch",
                                         sparse=attention.SparseLayout((2, 2, 2), 3))
    assert rel_l2(sparse, dense) <= 5e-6


# ----------------------------------------------------------------------------------------------------- dispatch
@pytest.fixture
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(attention, "_WARNED", set())
    return monkeypatch


def test_resolve_backend_names_and_environment(clean_dispatch):
    assert attention.resolve_backend() == "auto"
    assert attention.resolve_backend(None, "cpu") == "torch"
    assert attention.resolve_backend("auto", "cpu") == "torch"
    assert attention.resolve_backend("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_backend("flash")
    clean_dispatch.setenv(attention.ENV_VAR, "eager")
    assert attention.resolve_backend() == "eager"
    assert attention.resolve_backend("auto", "cpu") == "eager"
    assert attention.resolve_backend("torch", "cpu") == "torch", "an explicit backend wins over the variable"
    clean_dispatch.setenv(attention.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=attention.ENV_VAR):
        attention.resolve_backend(None, "cpu")


def test_triton_on_cpu_falls_back_with_one_warning(clean_dispatch):
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert attention.resolve_backend("triton", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.resolve_backend("triton", "cpu") == "torch"  # no second warning
    assert not attention.triton_supported("cpu")


def test_environment_variable_routes_every_call(clean_dispatch):
    calls = []
    eager = reference.rel_pos_attention_eager
    clean_dispatch.setattr(attention, "rel_pos_attention_eager", lambda *a: calls.append(1) or eager(*a))
    model = build_model("tiny-test", seed=0)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = model.image_encoder(x)
        assert calls == []
        clean_dispatch.setenv(attention.ENV_VAR, "eager")
        via_env = model.image_encoder(x)
    assert len(calls) == 2  # tiny-test has two attention blocks
    assert rel_l2(via_env, default) <= 1e-5


def test_encoder_sparse_option_is_plumbed_and_explicit():
    model = build_model("tiny-test", seed=0, attention_backend="torch")
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    enc = model.image_encoder
    with torch.no_grad():
        dense = enc(x)
        enc.set_attention_backend("torch", sparse=attention.SparseLayout((4, 4, 4), 0))
        local = enc(x)
        enc.set_attention_backend("eager", sparse=attention.SparseLayout((4, 4, 4), 0))
        local_eager = enc(x)
        enc.set_attention_backend("torch")
        dense_again = enc(x)
    assert rel_l2(local, local_eager) <= 1e-5
    assert rel_l2(local, dense) > 1e-4
    assert torch.equal(dense_again, dense)
    with pytest.raises(TypeError):
        enc.set_attention_backend("torch", sparse=(4, 4, 4))
    with pytest.raises(ValueError):
        enc.set_attention_backend("cuda-magic")


def test_sam_med3d_windows_stay_dense_in_sparse_mode():
    model = build_model("sam-med3d", seed=0)
    model.image_encoder.set_attention_backend("auto", sparse=attention.SparseLayout((4, 4, 4), 0))
    modes = [(b.attn.window is None, b.attn.sparse is not None) for b in model.image_encoder.blocks]
    assert modes.count((True, True)) == 4 and all(s == g for g, s in modes)


def test_torch_path_is_differentiable():
    (q, k, v), tables, pad_qkv = random_inputs(2, 512, 16, 27)
    for t in (q, k, v, pad_qkv, *tables):
        t.requires_grad_(True)
    out = attention.padded_window_attention(q, k, v, pad_qkv, *tables, (8, 8, 8), (14, 14, 14), 0.25)
    ref = reference.padded_window_attention_eager(q, k, v, pad_qkv, *tables, (8, 8, 8), (14, 14, 14), 0.25)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, tables[0], pad_qkv))
    grads_ref = torch.autograd.grad((ref * weights).sum(), (q, tables[0], pad_qkv))
    for g, r in zip(grads, grads_ref):
        assert rel_l2(g, r) <= 1e-4


# ------------------------------------------------------------------- the Triton kernel fails at its first launch
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (Linux-only optional dependency)")


class FailingLaunch:
    """Stands in for the JIT kernel: each launch raises what Triton raises when it cannot build its C launcher
    (Slicer 5.10-5.12 ship no Python.h; clinical PCs often have no C compiler)."""

    def __init__(self, error=None):
        self.attempts = 0
        self.error = error or subprocess.CalledProcessError(
            1, ["/usr/bin/gcc", "/tmp/tmpab12/cuda_utils.c", "-O3", "-shared", "-I/opt/Slicer/include/python3.12"])

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.attempts += 1
            raise self.error
        return launch


@pytest.fixture
def failing_triton(clean_dispatch):
    """The dispatch on a "supported GPU" (CPU tensors stand in) whose Triton launches all fail."""
    from FastSAM3DLib.attention import triton_kernel  # imports triton

    fake = FailingLaunch()
    clean_dispatch.setattr(triton_kernel, "rel_pos_attention_kernel", fake)
    clean_dispatch.setattr(attention, "_triton_unusable_reason", lambda device: None)
    clean_dispatch.setattr(attention, "_auto_allows_triton", lambda device: True)  # "auto" picks Triton ...
    clean_dispatch.setattr(attention, "_triton_failure", None)  # ... until a launch fails (restored afterwards)
    return fake


def dispatch_logs(caplog):
    return [r for r in caplog.records if r.name == attention.__name__]


@needs_triton
def test_failed_first_launch_falls_back_to_torch_for_the_process(failing_triton, caplog):
    (q, k, v), tables, pad_qkv = random_inputs(2, 512, 16, 27, seed=6)
    globals_ = [t[:15] for t in tables]  # an 8^3 grid's tables; the 14^3 window's have 27 rows
    expected = attention.rel_pos_attention(q, k, v, *globals_, (8, 8, 8), 0.25, backend="torch")
    expected_window = attention.padded_window_attention(q, k, v, pad_qkv, *tables, (8, 8, 8), (14, 14, 14), 0.25,
                                                        backend="torch")
    assert attention.resolve_backend("auto", "cpu") == "triton" and failing_triton.attempts == 0
    with caplog.at_level(logging.DEBUG, logger=attention.__name__), warnings.catch_warnings():
        warnings.simplefilter("error")  # one log line, no warning
        first = attention.rel_pos_attention(q, k, v, *globals_, (8, 8, 8), 0.25)
        assert failing_triton.attempts == 1
        assert torch.equal(first, expected), "the call returns the PyTorch backend's result"
        assert attention.triton_failure().startswith("CalledProcessError")
        assert attention.resolve_backend("auto", "cpu") == "torch"
        assert not attention.triton_supported("cpu")
        again = attention.rel_pos_attention(q, k, v, *globals_, (8, 8, 8), 0.25)
        window = attention.padded_window_attention(q, k, v, pad_qkv, *tables, (8, 8, 8), (14, 14, 14), 0.25)
    assert failing_triton.attempts == 1, "Triton is not retried"
    assert torch.equal(again, expected) and torch.equal(window, expected_window)
    logs = dispatch_logs(caplog)
    assert len(logs) == 1 and logs[0].levelno == logging.WARNING
    message = logs[0].getMessage()
    assert "\n" not in message
    assert "Triton" in message and "CalledProcessError" in message and "PyTorch backend" in message
    assert f"{attention.ENV_VAR}=triton" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eager_accepts_half_precision_queries_with_float32_tables_as_torch_does(dtype):
    (q, k, v), tables, pad_qkv = random_inputs(1, 512, 16, 27, seed=9)
    low = [t.to(dtype) for t in (q, k, v)]
    globals_ = [t[:15] for t in tables]
    for backend in ("eager", "torch"):
        out = attention.rel_pos_attention(*low, *globals_, (8, 8, 8), 0.25, backend=backend)
        exact = attention.rel_pos_attention(q, k, v, *globals_, (8, 8, 8), 0.25, backend="eager")
        assert out.dtype == dtype and float((out.float() - exact).norm() / exact.norm()) < 0.05, backend
        window = attention.padded_window_attention(*low, pad_qkv.to(dtype), *tables, (8, 8, 8), (14, 14, 14), 0.25,
                                                   backend=backend)
        assert torch.isfinite(window).all() and window.dtype == dtype


@needs_triton
def test_a_callers_own_error_under_auto_leaves_triton_on(failing_triton, caplog):
    """Wrong inputs raise as they would with the PyTorch backend; they are no reason to give up the GPU kernel."""
    (q, k, v), tables, pad_qkv = random_inputs(2, 512, 16, 27, seed=8)
    globals_ = [t[:15] for t in tables]
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        with pytest.raises(ValueError):
            attention.rel_pos_attention(q[:, :, :500], k[:, :, :500], v[:, :, :500], *globals_, (8, 8, 8), 0.25)
        with pytest.raises(ValueError, match="dtype"):
            attention.rel_pos_attention(q, k.half(), v, *globals_, (8, 8, 8), 0.25)
        with pytest.raises(ValueError):
            attention.padded_window_attention(q[:, :, :500], k[:, :, :500], v[:, :, :500], pad_qkv, *tables,
                                              (8, 8, 8), (14, 14, 14), 0.25)
    assert failing_triton.attempts == 0 and attention.triton_failure() is None and not dispatch_logs(caplog)
    assert attention.resolve_backend("auto", "cpu") == "triton"


@needs_triton
def test_a_click_succeeds_with_the_torch_result_when_triton_fails(failing_triton, caplog):
    """The whole encoder with the default backend: same embedding as with the PyTorch backend."""
    model = build_model("tiny-test", seed=0)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=attention.__name__):
        via_auto = model.image_encoder(x)
        model.image_encoder.set_attention_backend("torch")
        via_torch = model.image_encoder(x)
    assert failing_triton.attempts == 1  # tiny-test has two attention blocks: the second never tried Triton
    assert torch.equal(via_auto, via_torch)
    assert len(dispatch_logs(caplog)) == 1


@needs_triton
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_explicit_triton_reports_the_launch_error(failing_triton, how, monkeypatch):
    (q, k, v), tables, _ = random_inputs(2, 512, 16, 15, seed=7)
    backend = "triton" if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv(attention.ENV_VAR, "triton")
    with pytest.raises(subprocess.CalledProcessError):
        attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25, backend=backend)
    assert attention.triton_failure() is None  # "auto" is not affected by an explicit request
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25)  # "auto" falls back ...
    assert attention.triton_failure() is not None
    if how == "environment":
        monkeypatch.setenv(attention.ENV_VAR, "triton")
    with pytest.raises(subprocess.CalledProcessError):  # ... and an explicit request still tries and raises
        attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25, backend=backend)
    assert failing_triton.attempts == 3


@needs_triton
@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # torch's allocator
    RuntimeError("Triton Error [CUDA]: out of memory"),  # Triton's launcher (gpuAssert in its driver.c)
], ids=["torch", "triton-driver"])
def test_cuda_out_of_memory_is_not_a_triton_failure(failing_triton, error):
    """Out of GPU memory propagates (the PyTorch path needs more memory) and Triton stays on."""
    failing_triton.error = error
    (q, k, v), tables, _ = random_inputs(2, 512, 16, 15)
    with pytest.raises(type(error)) as raised:
        attention.rel_pos_attention(q, k, v, *tables, (8, 8, 8), 0.25)
    assert raised.value is error
    assert attention.triton_failure() is None


# --------------------------------------------------------------------------------------- oldest supported Triton
@pytest.fixture
def fresh_triton_check(clean_dispatch):
    """A supported GPU at cuda:0 (no CUDA needed) and Triton's import check redone before and after the test."""
    clean_dispatch.setattr(attention, "_cuda_unsupported_reason", lambda index: None)
    attention._triton_import_error.cache_clear()
    yield clean_dispatch
    attention._triton_import_error.cache_clear()


def test_auto_uses_torch_below_the_oldest_supported_triton(fresh_triton_check, caplog):
    old = types.ModuleType("triton")
    old.__version__ = "3.1.0"
    fresh_triton_check.setitem(sys.modules, "triton", old)
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert attention.resolve_backend("auto", "cuda:0") == "torch"
        assert attention.resolve_backend("auto", "cuda:0") == "torch"
    logs = [r.getMessage() for r in dispatch_logs(caplog)]
    minimum = ".".join(map(str, attention.MIN_TRITON))
    assert len(logs) == 1 and f"Triton 3.1.0 is older than {minimum}" in logs[0], logs
    with pytest.warns(RuntimeWarning, match="older than"):
        assert attention.resolve_backend("triton", "cuda:0") == "torch"


@needs_triton
def test_auto_uses_triton_from_the_oldest_supported_version(fresh_triton_check):
    import triton

    fresh_triton_check.setattr(triton, "__version__", "{}.{}.0".format(*attention.MIN_TRITON))
    assert attention.resolve_backend("auto", "cuda:0") == "triton"


def test_triton_version_check():
    major, minor = attention.MIN_TRITON
    assert attention.MIN_TRITON >= (3, 0)
    assert attention.triton_version_problem(f"{major}.{minor}.0") is None
    assert attention.triton_version_problem(f"{major}.{minor + 7}.1+git0123abc") is None
    assert attention.triton_version_problem(f"{major + 1}.0.0") is None
    assert "older than" in attention.triton_version_problem(f"{major}.{minor - 1}.9" if minor else f"{major - 1}.9.9")
    assert "older than" in attention.triton_version_problem("2.3.1")
    assert "unknown" in attention.triton_version_problem("")
