"""Benchmarks of the library (measured, never asserted in tests).

* :mod:`.attention`: image-encoder latency per attention backend and precision (ours, medim's SAM-Med3D, the
  official-style eager attention), the attention ops alone, and the effect of the 3D sparse mode.

Importing this package imports nothing heavy; call e.g. ``FastSAM3DLib.benchmarks.attention.run()``.
"""


def run_attention(**kwargs):
    """Shortcut for :func:`FastSAM3DLib.benchmarks.attention.run` (returns a JSON-serialisable dict)."""
    from .attention import run

    return run(**kwargs)
