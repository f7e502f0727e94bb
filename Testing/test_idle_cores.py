"""A click leaves the other CPU cores idle for the next one.

NumPy hands large matrix products to OpenBLAS threads (Slicer's NumPy is the same pip build), and after each
such product those threads busy-wait on the other cores for ~0.1 s. PyTorch's threads then share those cores
with them, so the work that follows a product runs 2-3x slower with two threads (measured: a 512x384x192
product 0.64 -> 1.3-2.8 ms for the next 50 runs). The paste-back ran one such product per click, and growth's
clipping another per region; both now compose their few weights without BLAS.

Measured by the CPU time of the process beyond the calling thread's, with PyTorch on one thread: busy-waiting
threads consume it, idle ones do not. The control (one plain NumPy product of the same size) shows that this
machine has the constraint; where it does not (one core, OPENBLAS_NUM_THREADS=1, another BLAS) the tests skip
and say so.
"""
import time

import numpy as np
import pytest
import torch

from FastSAM3DLib import geometry, regions
from FastSAM3DLib.geometry import Volume

WINDOW_S = 0.15  # the sleep after the action, long enough for busy-waiting threads to show


def cpu_of_other_threads_ms(action) -> float:
    """CPU milliseconds used by threads other than the calling one during ``action`` and a WINDOW_S sleep after
    it (fewest of three runs): the process's CPU time minus this thread's, with PyTorch on one thread so that
    its own workers add nothing."""
    used = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            process, mine = time.process_time(), time.thread_time()
            action()
            time.sleep(WINDOW_S)
            used.append(1e3 * ((time.process_time() - process) - (time.thread_time() - mine)))
    finally:
        torch.set_num_threads(threads)
    return min(used)


@pytest.fixture(scope="module")
def busy_wait_after_blas():
    """Skip unless a NumPy product like the one the paste-back used to make leaves threads busy-waiting here."""
    weights, upsample = np.random.rand(240, 128), np.random.rand(128, 32)
    control = cpu_of_other_threads_ms(lambda: weights @ upsample)
    if control < 0.3 * WINDOW_S * 1e3:
        pytest.skip(f"NumPy's BLAS does not busy-wait on another core here ({control:.0f} ms of CPU while idle): "
                    "one core, OPENBLAS_NUM_THREADS=1 or a BLAS without spinning threads")
    return control


def ct_like_volume() -> Volume:
    """A 0.8 x 0.8 x 1.5 mm volume whose 192 mm model region spans 240 x 240 x 128 source voxels."""
    spacing = np.diag([0.8, 0.8, 1.5, 1.0])
    return Volume(np.zeros((160, 300, 300), dtype=np.int16), spacing)


def centre(volume: Volume) -> np.ndarray:
    """RAS of the volume's central voxel, as (1, 3)."""
    return geometry.apply_affine(volume.ijk_to_ras, np.array([[150.0, 150.0, 80.0]]))


def test_paste_back_leaves_no_core_busy(busy_wait_after_blas):
    volume = ct_like_volume()
    roi = geometry.roi_around(volume, centre(volume), 128, 1.5)
    logits = torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    region, mask = geometry.paste_back(volume, roi, logits)
    assert mask.shape == (128, 240, 240) and 0.2 < mask.mean() < 0.9  # the whole box was thresholded
    used = cpu_of_other_threads_ms(lambda: geometry.paste_back(volume, roi, logits))
    assert used < 0.15 * WINDOW_S * 1e3, (
        f"other threads used {used:.0f} ms of CPU during a paste-back and {1e3 * WINDOW_S:.0f} ms of sleep "
        f"(after a plain NumPy product: {busy_wait_after_blas:.0f} ms): something handed work to BLAS threads")


def test_growth_clipping_leaves_no_core_busy(busy_wait_after_blas):
    volume = ct_like_volume()
    roi = geometry.roi_around(volume, centre(volume), 128, 1.5)
    region, mask = geometry.paste_back(volume, roi, torch.ones(32, 32, 32))
    covered = np.zeros((32, 32, 32), dtype=bool)
    covered[:16] = True  # half the cells belong to no region: their voxels are cleared point by point
    field = np.ones((32, 32, 32), dtype=np.float32)

    def clear():
        cleared = mask.copy()
        regions._clear_uncovered(volume, roi, covered, field, region, cleared)
        return cleared

    cleared = clear()
    assert 0.3 < cleared.mean() < 0.7 and cleared.sum() < mask.sum()
    used = cpu_of_other_threads_ms(clear)
    assert used < 0.15 * WINDOW_S * 1e3, (
        f"other threads used {used:.0f} ms of CPU while uncovered cells were cleared and {1e3 * WINDOW_S:.0f} ms "
        f"after (after a plain NumPy product: {busy_wait_after_blas:.0f} ms)")


def test_affine_rows_is_the_matrix_product():
    rng = np.random.default_rng(0)
    matrix = np.eye(4)
    matrix[:3] = rng.normal(size=(3, 4))
    points = rng.normal(size=(1000, 3)) * 100
    np.testing.assert_allclose(geometry.affine_rows(points, matrix), points @ matrix[:3, :3].T + matrix[:3, 3],
                               rtol=1e-13, atol=1e-11)
