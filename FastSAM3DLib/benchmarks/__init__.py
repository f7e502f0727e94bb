"""Benchmarks of the library (measured, never asserted in tests).

* :mod:`.suite`: what ``make bench`` and ``make gpu-check`` measure (per model, device and precision: encoder,
  CUDA graph, prompt + decoder, first/next click, peak memory, and the reference ratios);
* :mod:`.pipeline`: the individual measurements; :mod:`.sam2d`: the 2D SAM ViT-B baseline;
* :mod:`.attention`: attention ops and encoders per backend, the 3D sparse mode's effect;
* :mod:`.report`: the result schema (a list of named measurements), the tables, the README section;
* :mod:`.gpu_check`: ``make gpu-check`` (cuda tests, the Triton kernel on the GPU, the suite on CUDA).

Importing this package imports nothing heavy; call e.g. ``FastSAM3DLib.benchmarks.attention.run()``.
"""


def run_attention(**kwargs):
    """Shortcut for :func:`FastSAM3DLib.benchmarks.attention.run` (returns a JSON-serialisable dict)."""
    from .attention import run

    return run(**kwargs)
