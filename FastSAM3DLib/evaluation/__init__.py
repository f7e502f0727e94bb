"""Evaluation: simulated-click Dice/IoU of any registered model on image/label pairs.

* :mod:`.clicks`: the click-simulation protocols (FastSAM3D, SAM-Med3D, the CVPR 2025 interactive challenge).
* :mod:`.metrics`: Dice, IoU, the normalised surface Dice (NSD) and their per-click aggregates.
* :mod:`.dataset`: cases from folders, manifests or files; loading them; choosing structures. Folders are searched
  by :mod:`.discovery`, file names read by :mod:`.file_names`, structure names by :mod:`.label_names`.
* :mod:`.evaluate`: the loop, :func:`~FastSAM3DLib.evaluation.evaluate.evaluate_dataset`; each structure in each
  placement of the region by :mod:`.placements` (growth: :mod:`.growing`), the model called as the official
  evaluation calls it by :mod:`.model_runner`.
* :mod:`.results`: the resumable results folder (per-click CSV, skips, run settings).
* :mod:`.summary`: the JSON summary (means per structure, the CVPR 2025 challenge's numbers).
* :mod:`.plots`: Dice-versus-clicks curves and overlay montages (matplotlib, imported lazily).
* :mod:`.cli`: the ``python -m FastSAM3DLib evaluate`` command.

Nothing is imported here, so ``import FastSAM3DLib.evaluation`` stays cheap.
"""
