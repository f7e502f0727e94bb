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


@pytest.fixture()
def one_torch_thread():
    """One torch thread for tiny models: on a shared machine more threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
