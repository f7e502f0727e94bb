"""``make bench`` rows: each int8 kernel's time against float32 on this CPU, and the one the fast precision uses.

The same race :func:`FastSAM3DLib.int8_products.choose_kernel` runs once per process (one 512 x 768 x 768
product, activation quantisation and rescaling included, interleaved rounds), reported so that a result from
any machine says why its ``int8`` rows are fast, slow or missing.
"""
from __future__ import annotations

from typing import List


def bench_rows(plan, device_name: str) -> List[dict]:
    """Ratio int8 time / float32 time per kernel (below 1: faster), with the kernel chosen here in the note."""
    from .. import int8_products
    from . import report

    common = dict(model=f"one {int8_products.RACE_ROWS}x768x768 product", device=device_name, precision="int8",
                  unit="x")
    skipped = plan.skip.get("host") or (None if plan.device == "cpu" else "int8 products are a CPU path")
    if skipped:
        return [report.measurement("int8_product_ratio", None, variant=kernel, label="int8 / float32 time",
                                   skipped=skipped, **common) for kernel in int8_products.KERNELS]
    timings = int8_products.time_kernels()
    chosen, why = int8_products.choose_kernel("cpu")
    rows = []
    for kernel in int8_products.KERNELS:
        works, reason = int8_products.kernel_works(kernel)
        value = timings[kernel] / timings["float32"] if kernel in timings else None
        note = (f"{1e3 * timings[kernel]:.2f} ms vs float32 {1e3 * timings['float32']:.2f} ms; "
                f"{'used by the fast precision here' if kernel == chosen else 'not used here'}") if works else None
        rows.append(report.measurement("int8_product_ratio", value, variant=kernel, label="int8 / float32 time",
                                       note=note, skipped=None if works else reason, **common))
    if chosen is None:
        rows[-1]["note"] = f"{rows[-1]['note'] or ''}; fast precision stays exact: {why}".lstrip("; ")
    return rows
