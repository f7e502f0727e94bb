"""Evaluation: simulated-click Dice/IoU of any registered model on image/label pairs.

* :mod:`.clicks`: the click-simulation protocols (FastSAM3D, SAM-Med3D, the CVPR 2025 interactive challenge).
* :mod:`.metrics`: Dice, IoU, the normalised surface Dice (NSD) and their per-click aggregates.
* :mod:`.dataset`: finding image/label pairs (folders, manifests) and label names; choosing structures.
* :mod:`.evaluate`: the loop, :func:`~FastSAM3DLib.evaluation.evaluate.evaluate_dataset`.
* :mod:`.results`: the resumable results folder (CSV, skips, JSON summary).
* :mod:`.plots`: Dice-versus-clicks curves and overlay montages (matplotlib, imported lazily).
* :mod:`.cli`: the ``python -m FastSAM3DLib evaluate`` command.

Nothing is imported here, so ``import FastSAM3DLib.evaluation`` stays cheap.
"""
