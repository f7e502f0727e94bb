"""Memory and time of a segment grown over 20 regions (issue 17, item 6).

A synthetic 768 x 336 x 336 mm CT-like volume (3 mm voxels) holds room for 5 x 2 x 2 regions. One click with
growth forced to go everywhere (``max_fill=1``, ``min_agreement=0``: every neighbour is kept, so the number of
regions is set by ``regions``, not by what the model sees) builds a ``regions``-region segment with the real
encoder of ``model_name``; then ``clicks`` more clicks land in other regions. Reported:

* ``retained_mb``: bytes of every tensor storage and NumPy array the session holds (regions' logits, undo
  history, cached embeddings, the last mask), each counted once (:func:`.session_memory.retained_bytes`);
* ``embeddings``: how many region embeddings are cached (at most ``max_embeddings``) and the bytes of one;
* ``logits_mb``: the logits of the regions and of the undo history;
* ``grow_s``: seconds of the growing click; ``click_ms``: median of the later clicks;
* ``embedding_kb_per_model``: the size of one region's embedding for every registered model (from its
  configuration), to scale ``retained_mb`` to another model: embeddings dominate, logits are 131 kB a region.

:func:`measure_paste` times a refining click's paste on a segment (a large ellipsoid, a thin tube) grown
through a CT-sized volume, pasted whole or only where the click changed it (``--paste``).

The random-weight ``tiny-test`` model is the default because its masks reach every face, so the forced growth
really makes ``regions`` regions (the demo model's ~40 mm blob reaches none: it stays at one region).

Run: ``python -m FastSAM3DLib.benchmarks.growth [MODEL] [MAX_EMBEDDINGS]`` or ``... growth --paste [SEGMENT ...]``
(prints JSON).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Optional
from unittest import mock


def measure(model_name: Optional[str] = None, regions: int = 20, max_embeddings: Optional[int] = None,
            clicks: int = 10, threads: int = 1, device: str = "cpu") -> dict:
    """Grow a ``regions``-region segment and click ``clicks`` more times; return the figures of the module doc."""
    import numpy as np
    import torch

    from .. import build_model
    from ..geometry import Volume
    from ..growth import GrowthSettings
    from ..session import InteractiveSession
    from ..registry import get_model_config, list_models
    from .session_memory import retained_bytes

    torch.set_num_threads(threads)
    model_name = model_name or "tiny-test"
    model = build_model(model_name, checkpoint="cached" if model_name == "fastsam3d-demo" else None, device=device,
                        seed=0)
    rng = np.random.default_rng(0)
    array = rng.normal(40, 10, (112, 112, 256)).astype(np.float32)
    array[40:70, 40:70, :] += 300  # a bright bar along x
    matrix = np.diag([3.0, 3.0, 3.0, 1.0])
    matrix[:3, 3] = (-384.0, -168.0, -168.0)
    volume = Volume(array, matrix)
    settings = GrowthSettings(max_regions=regions, max_fill=1.0, min_agreement=0.0, time_budget_s=3600.0,
                              max_embeddings=max_embeddings or GrowthSettings().max_embeddings)
    session = InteractiveSession(model, volume, grow=settings)
    start = time.perf_counter()
    result = session.add_click([0.0, 0.0, 0.0])
    grow_seconds = time.perf_counter() - start
    times = []
    for n in range(clicks):
        point = [rng.uniform(-300, 300), rng.uniform(-100, 100), rng.uniform(-100, 100)]
        start = time.perf_counter()
        session.add_click(point, include=bool(n % 2))
        times.append(time.perf_counter() - start)
    states = [session.region_set] + list(session._multi_history)
    logits = {id(s.logits): s.logits for state in states for s in state.regions.values()}
    embedding_bytes = [e.untyped_storage().nbytes() for e in session._embeddings.values()]
    return {
        "model": model_name, "device": device, "threads": threads, "regions": result.regions,
        "clicks_after": clicks, "max_embeddings": settings.max_embeddings,
        "embeddings": len(embedding_bytes),
        "embedding_kb": round(embedding_bytes[0] / 1e3, 1) if embedding_bytes else 0,
        "logits_mb": round(sum(t.untyped_storage().nbytes() for t in logits.values()) / 1e6, 2),
        "retained_mb": round(retained_bytes(session) / 1e6, 2),
        "grow_s": round(grow_seconds, 2), "click_ms": round(1e3 * statistics.median(times), 1) if times else None,
        "embedding_kb_per_model": {name: round(_embedding_bytes(get_model_config(name)) / 1e3, 1)
                                   for name in list_models()},
    }


#: The variants of :func:`measure_paste`: the whole segment pasted again, or only the regions the click changed.
PASTE_VARIANTS = ("whole segment pasted", "changed regions pasted")
#: The segments of :func:`measure_paste`: a large organ, a thin vessel.
PASTE_SEGMENTS = ("ellipsoid", "thin tube")
#: The volume of the ``make bench`` paste rows: (k, j, i) shape and (i, j, k) spacing in mm of a 512x512x300 CT.
PASTE_VOLUME = ((300, 512, 512), (0.7, 0.7, 1.0))


def measure_paste(shape=PASTE_VOLUME[0], spacing=PASTE_VOLUME[1], segment: str = "ellipsoid",
                  repeats: int = 3) -> dict:
    """Time of a refining click's paste on a segment grown through a CT-sized volume, both ways.

    The volume (k, j, i ``shape``, ``spacing`` mm) is covered by every region of its lattice; their logits are
    a smooth ``segment``: an ellipsoid nearly as large as the volume (every region holds part of it) or a tube
    of 10 mm radius along S through the centre (a vessel: most regions hold none of it, the others a thin
    column). The click refines the central region (its logits shifted by 2 cells along R). Timed:
    :func:`growth.paste_result` from the previous paste (only that region's reach pasted again, or the whole
    segment where that is cheaper) and without it (the whole segment), median of ``repeats``; ``differ``
    counts the voxels where the two masks differ (only ties may); ``handed_over``: the repaste found the whole
    paste cheaper and made it (the thin tube).
    """
    import numpy as np
    import torch

    from .. import geometry, growth, regions
    from ..geometry import Volume

    if segment not in PASTE_SEGMENTS:
        raise ValueError(f"unknown segment {segment!r}; one of {', '.join(PASTE_SEGMENTS)}")
    matrix = np.diag([*spacing, 1.0])
    volume = Volume(np.zeros(shape, dtype=np.int16), matrix)
    centre = (volume.ijk_to_ras @ np.r_[(np.array(shape[::-1]) - 1) / 2.0, 1.0])[:3]
    roi = geometry.roi_around(volume, centre[None], 128, 1.5)
    lattice = regions.Lattice.around(volume, roi, 128, 1.5, 32)
    indices = _covering(lattice)
    middle = np.array(lattice.grid.size) / 2.0
    radii = np.array(lattice.grid.size) * 0.45 / 4  # the ellipsoid's, in low-res cells

    def logits(index, shift=0.0):
        cells = np.stack(np.meshgrid(*[np.arange(32) + 0.5] * 3, indexing="ij"), -1)
        model = cells * 4 + lattice.start(index) - 0.5  # grid voxel of each cell centre (x, y, z)
        offset = (model - middle) / 4 - [shift, 0.0, 0.0]  # in low-res cells
        if segment == "ellipsoid":
            inside = 1.0 - np.sqrt(((offset / radii) ** 2).sum(-1))
        else:  # 10 mm = 10 / 6 cells of 4 x 1.5 mm
            inside = 1.0 - np.hypot(offset[..., 0], offset[..., 1]) / (10.0 / 6.0)
        return torch.from_numpy((4.0 * inside).astype(np.float32)[None, None])

    states = {index: growth.RegionState(lattice.roi(index), logits(index), 0.9) for index in indices}
    before = growth.RegionSet(lattice, states)
    central = lattice.central_index(centre)
    refined = before.with_region(central, growth.RegionState(lattice.roi(central), logits(central, 2.0), 0.9))
    box, mask, pasted = growth.paste_result(volume, growth.RegionSet(lattice), before, None)
    times = {variant: [] for variant in PASTE_VARIANTS}
    masks = {}
    with mock.patch.object(regions, "_paste_blended", wraps=regions._paste_blended) as whole:
        for _ in range(repeats):
            for variant in PASTE_VARIANTS:
                start = time.perf_counter()
                masks[variant] = growth.paste_result(volume, before, refined, pasted.shown,
                                                     pasted if variant == PASTE_VARIANTS[1] else None)[1]
                times[variant].append(time.perf_counter() - start)
    return {"segment": segment, "regions": len(indices), "shape": list(shape), "voxels": int(mask.size),
            "segment_voxels": int(np.count_nonzero(mask)),
            "differ": int(np.count_nonzero(masks[PASTE_VARIANTS[0]] != masks[PASTE_VARIANTS[1]])),
            "handed_over": whole.call_count > repeats,  # the repaste made the whole paste (a thin segment)
            **{variant: round(statistics.median(seconds) * 1e3, 1) for variant, seconds in times.items()}}


def _covering(lattice, min_inside: int = 32) -> list:
    """The lattice's regions holding at least ``min_inside`` voxels of its grid along every axis."""
    axes = []
    for axis, size in enumerate(lattice.grid.size):
        origin = lattice.origin[axis]
        steps = range((-lattice.size - origin) // lattice.stride, (size - origin) // lattice.stride + 1)
        axes.append([n for n in steps if min(origin + lattice.stride * n + lattice.size, size)
                     - max(origin + lattice.stride * n, 0) >= min_inside])
    return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]


def _embedding_bytes(config) -> int:
    """Bytes of one float32 image embedding of a model: out_chans x (image_size / 16)^3."""
    return int(config.encoder.out_chans) * (int(config.image_size) // 16) ** 3 * 4


def bench_rows(plan, device_name: str) -> list:
    """``make bench`` rows: memory kept by a 20-region grown segment after 10 more clicks, those clicks' time, and
    the refining paste of :func:`paste_rows`; rows without a value, each saying why, in a dry run or on a GPU."""
    from . import report

    common = dict(model="grown segment, 20 regions (tiny-test)", device=device_name, precision="fp32")
    labels = (("growth_retained_mb", "retained memory after 10 more clicks", "MB"),
              ("growth_click_ms", "click on a 20-region segment", "ms"))
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "measured by make bench on the CPU")
    if skipped:
        return [report.measurement(name, None, label=label, unit=unit, skipped=skipped, **common)
                for name, label, unit in labels] + paste_rows(plan, device_name)
    import torch

    threads = torch.get_num_threads()
    try:
        figures = measure(threads=threads)
    finally:
        torch.set_num_threads(threads)
    per_model = figures["embedding_kb_per_model"]
    scaled = figures["retained_mb"] + figures["embeddings"] * (per_model["fastsam3d"] - figures["embedding_kb"]) / 1e3
    note = (f"{figures['embeddings']} embeddings of {figures['embedding_kb']} kB, {figures['logits_mb']} MB of logits "
            f"(undo included); with FastSAM3D's {per_model['fastsam3d']} kB embeddings about {scaled:.0f} MB")
    return [
        report.measurement("growth_retained_mb", figures["retained_mb"], label=labels[0][1], unit="MB", note=note,
                           **common),
        report.measurement("growth_click_ms", figures["click_ms"], label=labels[1][1], unit="ms",
                           note=f"growing click {figures['grow_s']} s (20 regions encoded)", **common),
    ] + paste_rows(plan, device_name)


def paste_rows(plan, device_name: str) -> list:
    """``make bench`` rows: a refining click's paste on a segment grown through :data:`PASTE_VOLUME`, both ways,
    for each of :data:`PASTE_SEGMENTS`."""
    from . import report

    shape, spacing = PASTE_VOLUME
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "measured by make bench on the CPU")
    rows = []
    for segment in PASTE_SEGMENTS:
        common = dict(model=f"grown {segment}, {'x'.join(str(n) for n in shape[::-1])} CT", device=device_name,
                      precision="fp64", unit="ms", label="a refining click's paste")
        if skipped:
            rows += [report.measurement("growth_paste_ms", None, variant=v, skipped=skipped, **common)
                     for v in PASTE_VARIANTS]
            continue
        figures = measure_paste(shape, spacing, segment)
        note = (f"{figures['regions']} regions, a {figures['segment_voxels'] / 1e6:.2f}-million-voxel segment, "
                f"the central region refined; the two masks differ in {figures['differ']} voxels"
                + ("; the repaste made the whole paste, cheaper here" if figures["handed_over"] else ""))
        rows += [report.measurement("growth_paste_ms", figures[v], variant=v, note=note, **common)
                 for v in PASTE_VARIANTS]
    return rows


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    elif sys.argv[1:2] == ["--paste"]:
        print(json.dumps([measure_paste(segment=segment) for segment in sys.argv[2:] or PASTE_SEGMENTS], indent=2))
    else:
        print(json.dumps(measure(sys.argv[1] if len(sys.argv) > 1 else None,
                                 max_embeddings=int(sys.argv[2]) if len(sys.argv) > 2 else None), indent=2))
