"""How close the ``fast`` precision (int8 encoder, :mod:`FastSAM3DLib.quantize`) comes to the exact network.

    python -m FastSAM3DLib.benchmarks.precision [--data ../shared/data] [--reference ../shared/reference]
                                                [--model fastsam3d-demo] [--clicks 5] [--memory BANK] [--json OUT]

Three comparisons, each reporting the relative L2 difference of the low-res logits, the agreement of the
thresholded 128³ masks (% of voxels equal, the mask the official code reports: upsampled logits > 0) and,
on labelled data, the Dice of each precision against the reference label:

* **fixtures**: the official parity fixtures' weight fill and input (``shared/reference/fixtures``), for
  FastSAM3D and SAM-Med3D, with the fixtures' recorded prompt calls;
* **random**: official-size models with random weights (seed 0) on the fixture input and a centre click;
* **data**: the bundled demo model on the real volumes of ``shared/data``, every case's largest structures,
  the official FastSAM3D click protocol on the ground-truth-centred crop. The clicks come from the exact
  model's predictions and both precisions get the same clicks, each feeding back its own previous logits.

Nothing is asserted here (``Testing/test_fast_path.py`` holds the thresholds); the README's Speed options quote
the numbers. The fast path becomes a default only where masks agree on at least 99.5 % of voxels.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared"
FIXTURES = {"fastsam3d": "fastsam3d_public.npz", "sam-med3d": "sammed3d_public.npz"}
# (dataset, image, label) under shared/data: each folder's cases, as the evaluation finds them
DATA_CASES = (
    ("totalseg", "totalseg/example_ct.nii.gz", "totalseg/example_seg.nii.gz"),
    ("totalseg", "totalseg/example_mr_sm.nii.gz", None),
    ("itksnap", "itksnap/MRIcrop-orig.gipl.gz", "itksnap/MRIcrop-seg.gipl.gz"),
    ("torchio_fpg", "torchio_fpg/t2.nii.gz", "torchio_fpg/t1_seg_gif_on_t2grid.nii.gz"),
    ("brats2013", "brats2013", None),
    ("sct", "sct/t2.nii.gz", "sct/t2_seg-manual.nii.gz"),
    ("shepp_logan", "shepp_logan/shepp_logan_128_image.nii.gz", "shepp_logan/shepp_logan_128_label.nii.gz"),
)


def fast_copy(model):
    """A deep copy of ``model`` with the int8 encoder (the original stays exact); a memory bank attached to
    ``model`` is copied with it and the copy retrieves from its own."""
    from ..quantize import quantize_encoder

    fast = copy.deepcopy(model)
    quantize_encoder(fast.image_encoder)
    fast.precision = "fast"
    return fast


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _up(low: torch.Tensor, size: int = 128) -> torch.Tensor:
    import torch.nn.functional as F

    return F.interpolate(low.float(), size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """% of voxels where the thresholded (> 0) upsampled logits agree."""
    return 100.0 * float(((_up(a) > 0) == (_up(b) > 0)).double().mean())


@torch.no_grad()
def fixture_agreement(reference_dir: Path) -> List[Dict[str, object]]:
    """Fast vs exact on the parity fixtures' fill, input and prompt calls (FastSAM3D and SAM-Med3D)."""
    from ..parity import fill_like_fixture, fixture_input, run_prompt_steps
    from ..registry import build_model

    rows = []
    x = fixture_input()
    for name, filename in FIXTURES.items():
        ref = np.load(reference_dir / "fixtures" / filename)
        exact = build_model(name)
        fill_like_fixture(exact, ref["plus_one_keys"])
        fast = fast_copy(exact)
        points, labels = torch.tensor(ref["points"]), torch.tensor(ref["labels"])
        emb_e, emb_f = exact.image_encoder(x), fast.image_encoder(x)
        out_e = run_prompt_steps(exact, emb_e, points, labels)
        out_f = run_prompt_steps(exact, emb_f, points, labels)  # same decoder: only the encoder differs
        row = {"set": "fixtures", "model": name, "embedding_rel_l2": _rel(emb_f, emb_e)}
        for step in ("step1", "step2", "step1_zeromask"):
            e, f = torch.tensor(out_e[f"{step}_low_res_masks"]), torch.tensor(out_f[f"{step}_low_res_masks"])
            row[f"{step}_logits_rel_l2"] = _rel(f, e)
            row[f"{step}_mask_agreement_pct"] = _agreement(f, e)
        rows.append(row)
    return rows


@torch.no_grad()
def random_weight_agreement(models=("fastsam3d", "sam-med3d")) -> List[Dict[str, object]]:
    """Official-size models with random weights (seed 0): the fixture input, one click at the centre."""
    from ..parity import fixture_input
    from ..registry import build_model

    rows = []
    x = fixture_input()
    for name in models:
        exact = build_model(name, seed=0)
        fast = fast_copy(exact)
        emb_e, emb_f = exact.image_encoder(x), fast.image_encoder(x)
        pe, dec = exact.prompt_encoder, exact.mask_decoder
        sparse, dense = pe(points=(torch.tensor([[[64.0, 60.0, 70.0]]]), torch.tensor([[1]])), boxes=None,
                           masks=None)
        low = [dec(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                   dense_prompt_embeddings=dense, multimask_output=False)[0] for emb in (emb_e, emb_f)]
        rows.append({"set": "random", "model": name, "embedding_rel_l2": _rel(emb_f, emb_e),
                     "step1_logits_rel_l2": _rel(low[1], low[0]), "step1_mask_agreement_pct": _agreement(low[1],
                                                                                                        low[0])})
    return rows


def _cases(data_dir: Path):
    from ..evaluation.dataset import as_cases, find_cases

    for dataset, image, label in DATA_CASES:
        path = data_dir / image
        if not path.exists():
            continue
        if label is None:
            try:
                cases = find_cases(path)
            except Exception:  # noqa: BLE001 - a folder the evaluation cannot read is skipped, not fatal
                continue
        else:
            cases = as_cases([(path, data_dir / label)])
        for case in cases:
            yield dataset, case


@torch.no_grad()
def data_agreement(data_dir: Path, model_name: str = "fastsam3d-demo", clicks: int = 5, structures: int = 4,
                   min_voxels: int = 1000, log=print, memory=None) -> List[Dict[str, object]]:
    """The demo model, exact vs fast, on ``structures`` largest structures of each case of ``data_dir``;
    ``memory``: a Memorizing SAM bank attached to both (as ``build_model(memory=...)`` attaches it)."""
    from ..evaluation.clicks import next_protocol_click
    from ..evaluation.dataset import load_case
    from ..evaluation.metrics import dice
    from ..geometry import Volume, extract_label, extract_model_input, roi_centred_on_mask
    from ..registry import build_model

    exact = build_model(model_name, checkpoint="cached", memory=memory)
    fast = fast_copy(exact)
    rows = []
    for dataset, case in _cases(data_dir):
        volume, labels, _ = load_case(case)
        values, counts = np.unique(labels[labels > 0], return_counts=True)
        chosen = [int(v) for v, c in sorted(zip(values, counts), key=lambda vc: -vc[1]) if c >= min_voxels]
        for value in chosen[:structures]:
            mask = labels == value
            roi = roi_centred_on_mask(volume, mask)
            truth = extract_label(Volume(mask.astype(np.uint8), volume.ijk_to_ras), roi) != 0
            if truth.sum() < 10:
                continue
            image = torch.from_numpy(extract_model_input(volume, roi))[None, None]
            embeddings = [m.image_encoder(image) for m in (exact, fast)]
            rng = np.random.default_rng(value)
            previous: List[Optional[torch.Tensor]] = [None, None]
            up_exact = None
            for index in range(clicks):
                click = next_protocol_click("fastsam3d", index, truth, up_exact, rng)
                if click is None:
                    break
                point, label = click
                lows = []
                for k, model in enumerate((exact, fast)):
                    pe, dec = model.prompt_encoder, model.mask_decoder
                    prior = previous[k] if previous[k] is not None else torch.zeros(1, 1, 32, 32, 32)
                    sparse, dense = pe(points=(torch.tensor(point, dtype=torch.float32)[None, None],
                                               torch.tensor([[label]])), boxes=None, masks=prior)
                    low = dec(image_embeddings=embeddings[k], image_pe=pe.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False)[0]
                    lows.append(low)
                previous = lows
                up_exact = _up(lows[0]).numpy()
                masks = [(_up(low) > 0).numpy() for low in lows]
                rows.append({"set": "data", "dataset": dataset, "case": case.name, "structure": value,
                             "click": index + 1, "logits_rel_l2": _rel(lows[1], lows[0]),
                             "mask_agreement_pct": 100.0 * float(np.mean(masks[0] == masks[1])),
                             "dice_exact": dice(masks[0], truth), "dice_fast": dice(masks[1], truth)})
        log(f"  {dataset}/{case.name}: {len(chosen[:structures])} structures")
    return rows


def summarise_data(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per dataset: worst and mean mask agreement, mean and worst |Dice difference|, worst logits rel-L2."""
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        sel = [r for r in rows if r["dataset"] == dataset]
        diffs = [abs(r["dice_fast"] - r["dice_exact"]) for r in sel if np.isfinite(r["dice_fast"] - r["dice_exact"])]
        out.append({"dataset": dataset, "clicks": len(sel),
                    "structures": len({(r["case"], r["structure"]) for r in sel}),
                    "min_mask_agreement_pct": min(r["mask_agreement_pct"] for r in sel),
                    "mean_mask_agreement_pct": float(np.mean([r["mask_agreement_pct"] for r in sel])),
                    "mean_abs_dice_diff": float(np.mean(diffs)) if diffs else float("nan"),
                    "max_abs_dice_diff": float(np.max(diffs)) if diffs else float("nan"),
                    "mean_dice_exact": float(np.nanmean([r["dice_exact"] for r in sel])),
                    "mean_dice_fast": float(np.nanmean([r["dice_fast"] for r in sel])),
                    "max_logits_rel_l2": max(r["logits_rel_l2"] for r in sel)})
    return out


def main(argv=None) -> int:
    """Command line: compare the fast (int8) precision with the exact one; prints a JSON line per comparison and
    writes every row to ``--json`` when given."""
    parser = argparse.ArgumentParser(description="fast (int8) vs exact precision: logits, masks, Dice")
    parser.add_argument("--data", type=Path, default=DEFAULT_SHARED / "data")
    parser.add_argument("--reference", type=Path, default=DEFAULT_SHARED / "reference")
    parser.add_argument("--model", default="fastsam3d-demo", help="model for the real-data comparison")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--structures", type=int, default=4, help="largest structures per case")
    parser.add_argument("--no-random", action="store_true", help="skip the official-size random-weight models")
    parser.add_argument("--memory", type=Path, default=None,
                        help="a memory bank attached to both precisions for the real-data comparison")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .suite import environment

    result: Dict[str, object] = {"environment": environment("cpu", args.threads)}  # the int8 kernel used, too
    if (args.reference / "fixtures").is_dir():
        result["fixtures"] = fixture_agreement(args.reference)
        for row in result["fixtures"]:
            print(json.dumps(row))
    if not args.no_random:
        result["random"] = random_weight_agreement()
        for row in result["random"]:
            print(json.dumps(row))
    if args.data.is_dir():
        rows = data_agreement(args.data, args.model, args.clicks, args.structures, memory=args.memory)
        result["data"] = rows
        result["data_summary"] = summarise_data(rows)
        for row in result["data_summary"]:
            print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
