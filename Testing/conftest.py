"""Shared pytest fixtures: the shared data folder, deterministic torch settings."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The team's shared folder (../shared beside the checkout), overridable with FASTSAM3D_SHARED."""
    return Path(os.environ.get("FASTSAM3D_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test with a reason when it is absent (e.g. a user's clone)."""
    path = shared_dir() / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (it ships only beside the team's checkout)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Path of ../shared/reference; skips the test with a reason when it is absent."""
    path = shared_dir() / "reference"
    if not path.is_dir():
        pytest.skip(f"reference folder {path} is absent (it ships only beside the team's checkout)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Keep every test on 2 threads and restore torch's global RNG afterwards."""
    try:
        import torch
    except ImportError:  # packaging tests run without torch
        yield
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(autouse=True)
def _windows_file_rules(monkeypatch):
    """With ``FASTSAM3D_EMULATE_WINDOWS=1``, every test runs under Windows' rules for files this process has
    open (they cannot be deleted, renamed or replaced), for ``os.open`` (``O_BINARY``) and for the lock file's
    probes (no ``flock``, no ``/proc``): see windows_files.py."""
    if os.environ.get("FASTSAM3D_EMULATE_WINDOWS") != "1":
        yield
        return
    from windows_files import windows_lock_probes, windows_sharing, windows_text_mode

    windows_sharing(monkeypatch)
    windows_lock_probes(monkeypatch)
    text_mode = windows_text_mode(monkeypatch)
    yield
    assert [call for call in text_mode if not call[1]] == [], "os.open without O_BINARY (text mode on Windows)"


@pytest.fixture()
def one_torch_thread():
    """One torch thread for tiny models: on a shared machine more threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def int8_kernel(monkeypatch):
    """The fast precision applies whatever this CPU's timings say: ``$FASTSAM3D_INT8_KERNEL`` names a kernel
    that works here (oneDNN's where it runs: fast on AVX2 and newer). The choice by speed itself is tested in
    test_int8_products.py with given timings."""
    from FastSAM3DLib import int8_products

    working = [k for k in int8_products.KERNELS if int8_products.kernel_works(k)[0]]
    if not working:
        pytest.skip(f"no int8 kernel runs here: {int8_products.choose_kernel('cpu')[1]}")
    kernel = "onednn" if "onednn" in working else working[0]
    monkeypatch.setenv(int8_products.ENV_VAR, kernel)
    int8_products.choose_kernel.cache_clear()
    yield kernel
    int8_products.choose_kernel.cache_clear()


@pytest.fixture
def harness(monkeypatch, tmp_path):
    """The Segment Editor effect in a Slicer-like harness (Testing/effect_harness.py), closed after the test
    (which fails it when Slicer would have logged a critical error). Needs slicer-core."""
    pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")
    from effect_harness import EffectHarness

    h = EffectHarness(monkeypatch, tmp_path / "slicer-cache")
    yield h
    h.close()
