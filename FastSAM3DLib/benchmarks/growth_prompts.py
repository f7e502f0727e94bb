"""Which prompt lets a model continue an object into the neighbouring region? (the design of growth, measured)

For each structure of a labelled case: the region around its deepest voxel is the *known* region, with ideal
logits (+4 inside the reference label, -4 outside, on its 32³ grid) so that only the prompting of the
neighbour is measured, not the known region's own errors. For every face the label crosses (and the image goes
on), the neighbour region is decoded with each variant:

* ``dense+1``: the known logits as the dense prompt (zeros where unknown) and the one point deepest inside the
  known mask in the shared voxels (what :mod:`FastSAM3DLib.growth` does);
* ``dense+3``: the same with three points;
* ``dense``: the dense prompt and one point at the same place labelled as padding is not possible in the
  official prompt encoder, so this is ``dense+1`` with the point's label 0 (exclude) far outside the object:
  the dense prompt alone carries the object;
* ``points``: the one point, zeros as the dense prompt (a fresh click there).

Reported per variant (means over the neighbours): Dice with the reference inside the neighbour's new voxels
(those the known region does not have), recall there, and Dice in the shared voxels (agreement).

Run: ``python -m FastSAM3DLib.benchmarks.growth_prompts IMAGE LABEL [MODEL] [VALUE ...]``.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Sequence

VARIANTS = ("dense+1", "dense+3", "dense", "points")


def measure(image: str, label: str, model_name: str = "fastsam3d-demo", values: Optional[Sequence[int]] = None,
            threads: int = 1) -> Dict:
    """The figures of the module doc for ``values`` (default: every label value) of one case."""
    import numpy as np
    import torch

    from .. import build_model, geometry
    from ..geometry import Volume
    from ..growth import GrowthSettings, growth_points, prior_for, RegionState
    from ..regions import Lattice
    from ..session import InteractiveSession

    torch.set_num_threads(threads)
    volume = Volume.from_file(image)
    labels = Volume.from_file(label)
    model = build_model(model_name, checkpoint="cached" if model_name == "fastsam3d-demo" else None, seed=0)
    session = InteractiveSession(model, volume, grow=True)
    low = model.config.image_size // 4
    values = list(values) if values else [int(v) for v in np.unique(labels.array) if v != 0]
    scores: Dict[str, List[List[float]]] = {v: [] for v in VARIANTS}
    for value in values:
        mask = labels.array == value
        if mask.sum() < 50:
            continue
        ijk = np.argwhere(mask)[len(np.argwhere(mask)) // 2][::-1]
        seed = geometry.roi_around(volume, (volume.ijk_to_ras @ np.append(ijk, 1.0))[None, :3])
        lattice = Lattice.around(volume, seed, model.config.image_size, model.config.spacing_mm,
                                 GrowthSettings().overlap)
        truth_seed = geometry.extract_label(Volume(mask.astype(np.uint8), volume.ijk_to_ras), seed) > 0
        known = torch.nn.functional.avg_pool3d(torch.from_numpy(truth_seed.astype(np.float32))[None, None], 4)
        logits = torch.where(known > 0.5, torch.tensor(4.0), torch.tensor(-4.0)).contiguous()
        states = {(0, 0, 0): RegionState(seed, logits, 1.0)}
        for axis in range(3):
            for direction in (-1, 1):
                face = logits[0, 0].select(axis, 0 if direction < 0 else low - 1)
                if not bool((face > 0).any()) or not lattice.continues((0, 0, 0), axis, direction):
                    continue
                index = tuple(direction if a == axis else 0 for a in range(3))
                roi = lattice.roi(index)
                truth = geometry.extract_label(Volume(mask.astype(np.uint8), volume.ijk_to_ras), roi) > 0
                truth_low = torch.nn.functional.avg_pool3d(torch.from_numpy(truth.astype(np.float32))[None, None],
                                                           4)[0, 0] > 0.5
                prior, shared = prior_for(lattice, states, index)
                embedding = session.region_embedding(roi, {})
                one, three = growth_points(prior, shared, 1), growth_points(prior, shared, 3)
                if len(one) == 0:
                    continue
                far = np.array([[low * 4 - 2.0] * 3]) if direction < 0 else np.array([[1.0, 1.0, 1.0]])
                prompts = {"dense+1": (one, [1], prior), "dense+3": (three, [1] * len(three), prior),
                           "dense": (far, [0], prior), "points": (one, [1], None)}
                for name, (points, point_labels, dense) in prompts.items():
                    out, _ = session.run_decoder(embedding, points, point_labels, dense)
                    predicted = out[0, 0] > 0
                    new = ~shared
                    scores[name].append([_dice(predicted[new], truth_low[new]), _recall(predicted[new], truth_low[new]),
                                         _dice(predicted[shared], truth_low[shared])])
    summary = {"model": model_name, "image": image, "neighbours": len(scores["dense+1"])}
    for name, rows in scores.items():
        if rows:
            table = np.array(rows, dtype=float)
            summary[name] = {"dice_new": round(float(np.nanmean(table[:, 0])), 3),
                             "recall_new": round(float(np.nanmean(table[:, 1])), 3),
                             "dice_shared": round(float(np.nanmean(table[:, 2])), 3)}
    return summary


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else float("nan")


def _recall(a, b) -> float:
    return int((a & b).sum()) / int(b.sum()) if int(b.sum()) else float("nan")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) < 2 or arguments[0] in ("-h", "--help"):
        print("usage: python -m FastSAM3DLib.benchmarks.growth_prompts IMAGE LABEL [MODEL] [VALUE ...]\n"
              "  e.g. ../shared/data/totalseg/example_ct.nii.gz ../shared/data/totalseg/example_seg.nii.gz "
              "fastsam3d-demo", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(measure(arguments[0], arguments[1], *(arguments[2:3] or ["fastsam3d-demo"]),
                             values=[int(v) for v in arguments[3:]] or None), indent=2))
