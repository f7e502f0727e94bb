"""Benchmarks of what Slicer imposes on the effect: its GIL-holding event loop, and one click's write.

* ``slicer_loop_*_ratio``: a click (import, model load, first and next click with the bundled demo model on
  the bundled CT) and a 256 MB local download run on the effect's worker, once with the main thread idle and
  once under ``Testing/slicer_event_loop.py`` (the GIL held in C between the effect's timer ticks, as in
  Slicer). The ratio is Slicer-like time / free time (goal: at most 1.2). Needs the repository's Testing/.
  ``slicer_loop_remote_grow_ratio``: the same for a click that grows over several regions through a server in
  another process (one request per region; needs the server extra).
* ``click_write_peak_mib``: how far the resident memory rises while one click's result is written into a
  512 x 512 x 300 segmentation of 10 segments (see :mod:`.scene_memory`), with the library's box rollback,
  with the whole-segmentation snapshot it replaced, and inside a series of points that gives voxels back to
  other segments. Needs ``slicer-core``.
* ``refine_write_ms``: a refining click's write (its result differs from the segment in one place), cut to the
  box of what changes as the library does, and over the whole region as before; for one region and for a
  segment grown over the whole 512 x 512 x 300 volume (see :func:`.scene_memory.measure_refine`).

Both run on the CPU host only (they measure the workstation, not the GPU), each job in a fresh process.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import List

from . import report
from .suite import has_module

HARNESS = report.REPO_ROOT / "Testing" / "slicer_event_loop.py"


def _loop_run(job: str, mode: str) -> dict:
    import torch

    threads = ["--threads", str(torch.get_num_threads())]  # this run's torch threads (make bench --threads)
    out = subprocess.run([sys.executable, str(HARNESS), job, "--mode", mode, *threads, "--json"], check=True,
                         capture_output=True, text=True, cwd=str(report.REPO_ROOT), timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def slicer_loop(plan, device_name: str) -> List[dict]:
    """Slicer-like / free-running time of a click and a download on the effect's worker."""
    common = dict(model="fastsam3d-demo", device=device_name, precision="fp32")
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "measured by make bench on the CPU") \
        or (None if HARNESS.is_file() else f"{HARNESS} is not in this installation")
    names = [("slicer_loop_first_click_ratio", "first click, Slicer loop / free"),
             ("slicer_loop_next_click_ratio", "next click, Slicer loop / free"),
             ("slicer_loop_load_ratio", "import + model load, Slicer loop / free"),
             ("slicer_loop_download_ratio", "download, Slicer loop / free")]
    if skipped:
        return [report.measurement(name, None, unit="x", label=label, skipped=skipped, **common)
                for name, label in names]
    free, slicer = _loop_run("click", "free"), _loop_run("click", "slicer")
    free_dl, slicer_dl = _loop_run("download", "free"), _loop_run("download", "slicer")
    values = [slicer["first_click_s"] / free["first_click_s"], slicer["next_click_s"] / free["next_click_s"],
              slicer["load_s"] / free["load_s"], slicer_dl["download_s"] / free_dl["download_s"]]
    note = (f"free {free['first_click_s'] * 1e3:.0f} / {free['next_click_s'] * 1e3:.0f} ms, Slicer loop "
            f"{slicer['first_click_s'] * 1e3:.0f} / {slicer['next_click_s'] * 1e3:.0f} ms (first / next); download "
            f"{free_dl['download_MBps']:.0f} vs {slicer_dl['download_MBps']:.0f} MB/s")
    rows = [report.measurement(name, value, unit="x", label=label, note=note, **common)
            for (name, label), value in zip(names, values)]
    return rows + [_remote_growth_row(device_name)]


def _remote_growth_row(device_name: str) -> dict:
    """A click that grows over 3 regions of a 450 mm tube through a server in another process (the threshold
    stand-in, so the model costs nothing), Slicer-like / free-running."""
    common = dict(model="threshold stand-in via server", device=device_name, precision="fp32", unit="x",
                  label="growing click through a server, Slicer loop / free")
    if not (has_module("uvicorn") and has_module("starlette")):
        return report.measurement("slicer_loop_remote_grow_ratio", None, skipped="the server extra is not "
                                  "installed", **common)
    free, slicer = _loop_run("remote-grow", "free"), _loop_run("remote-grow", "slicer")
    note = (f"{free['regions']} regions; free {free['first_click_s'] * 1e3:.0f} / {free['next_click_s'] * 1e3:.0f} "
            f"ms, Slicer loop {slicer['first_click_s'] * 1e3:.0f} / {slicer['next_click_s'] * 1e3:.0f} ms (first / "
            f"refining click, server on 127.0.0.1)")
    return report.measurement("slicer_loop_remote_grow_ratio", slicer["first_click_s"] / free["first_click_s"],
                              note=note, **common)


def click_write_memory(plan, device_name: str) -> List[dict]:
    """Peak memory above the level before one click's write: box rollback, whole snapshot, series give-back."""
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "measured by make bench on the CPU") \
        or (None if has_module("slicer") else "slicer-core is not installed")
    from .scene_memory import VARIANTS as variants
    common = dict(model="segment editor write", device=device_name, precision="uint8", unit="MiB")
    if skipped:
        return [report.measurement("click_write_peak_mib", None, variant=v, skipped=skipped,
                                   label="one click's write, peak memory", **common) for v in variants]
    from .scene_memory import measure

    rows = []
    for row in measure():
        rows.append(report.measurement(
            "click_write_peak_mib", row["peak_growth_MiB"], variant=row["variant"],
            label="one click's write, peak memory", note=f"write {row['write_s'] * 1e3:.0f} ms"
            + (f" (+{row['series_start_s'] * 1e3:.0f} ms at a series' first)" if "series_start_s" in row else "")
            + "; 512x512x300, 10 segments in one layer", **common))
    return rows


def refining_write(plan, device_name: str) -> List[dict]:
    """Time of a refining click's write: cut to what changes, and over the whole region; one region and grown."""
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "measured by make bench on the CPU") \
        or (None if has_module("slicer") else "slicer-core is not installed")
    from .scene_memory import REFINE_VARIANTS as variants
    common = dict(model="segment editor write", device=device_name, precision="uint8", unit="ms",
                  label="a refining click's write")
    if skipped:
        return [report.measurement("refine_write_ms", None, variant=v, skipped=skipped, **common) for v in variants]
    from .scene_memory import measure_refine

    return [report.measurement("refine_write_ms", row["write_s"] * 1e3, variant=row["variant"],
                               note=f"a {row['region_voxels'] / 1e6:.1f}-million-voxel region of a 512x512x300 "
                               "segmentation; the result differs from the segment in one place", **common)
            for row in measure_refine()]
