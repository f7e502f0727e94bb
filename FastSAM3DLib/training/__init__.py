"""Training: distillation of a FastSAM3D-style encoder from a SAM-Med3D-style teacher, and fine-tuning with
simulated clicks, on cached model-space crops of real image/label pairs and synthetic phantoms.

One file per responsibility:

* :mod:`.phantoms` - synthetic labelled volumes (random ellipsoids, blobs, tubes; random spacing/orientation)
* :mod:`.data` - image/label discovery, the crop cache (official geometry), sampling with :mod:`.augment`
* :mod:`.losses` - Dice + cross-entropy (MONAI-equivalent), feature losses
* :mod:`.interaction` - the official simulated-click loop of ``train.py``
* :mod:`.distill` - layer-wise progressive distillation (pairing, schedule, projections, teacher cache)
* :mod:`.finetune` - decoder fine-tuning (optionally unfreezing encoder blocks, or training from scratch)
* :mod:`.engine` - the shared loop: AdamW, schedule, AMP, seeding, progress bar, JSON log, resume
* :mod:`.checkpoints` - official-format checkpoints, atomic writes, weights export
* :mod:`.cli` - ``prepare-data``, ``distill``, ``finetune``, ``export-weights``

Nothing is imported or computed at import time; import the submodule you need.
"""
