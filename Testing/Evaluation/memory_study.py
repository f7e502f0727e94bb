"""The Memorizing SAM measurement of the README and the model card (spec MEMORIZING_SAM.md section 6.4), on CPU.

    .venv/bin/python Testing/Evaluation/memory_study.py --out out/memory-study [--seeds 2023 1 2]

* banks: ``memory-bank.json`` (4 patients the demo model was trained on), one per crop rule (``gt``, ``click``),
  made by ``fastsam3d-demo``'s bundled weights; tests: ``memory-heldout.json`` (the model card's 10 held-out
  structures of 2 other patients). The guard refuses to run if a test patient is in a bank.
* per placement (bank crop = placement), per click seed: memory off, the default (memory attention, k 3, local
  ratio 0.3, kNN), and the controls: random retrieval, the released value substitution with normalised weights
  (``values``), the released formula (``released``), k 1 and 5, local ratio 0.5 and 0.7.
* the FastSAM3D click protocol, 5 clicks; Dice on the source grid after 1, 3, 5 clicks; each setting paired with
  "off" on the same structures and click seeds; 95 % bootstrap intervals resampling the 10 structures (all click
  seeds of a structure together: two test patients are too few to resample patients), Wilcoxon over the
  structure x seed units.

Writes ``report.md`` and ``report.json`` in ``--out``; one results folder per placement and seed beside them.
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

SETTINGS = [  # name, attach options
    ("on", {}),
    ("random", {"retrieval_mode": "random"}),
    ("values", {"rule": "values"}),
    ("released", {"rule": "released"}),
    ("k1", {"k": 1}),
    ("k5", {"k": 5}),
    ("r0.5", {"local_ratio": 0.5}),
    ("r0.7", {"local_ratio": 0.7}),
]


def main(argv=None) -> int:
    """Build the banks, run every setting, write the report; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/memory-study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[2023, 1, 2])
    parser.add_argument("--placements", nargs="+", default=["gt", "click"])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--protocol", default="fastsam3d", choices=("fastsam3d", "cvpr25"),
                        help="cvpr25: deterministic clicks (centre of the largest error), NSD compared too")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from FastSAM3DLib.memory import MemoryOverflowError, build_bank, save_bank
    from FastSAM3DLib.memory.evaluation import evaluate_with_memory, paired_comparison
    from FastSAM3DLib.registry import build_model

    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model("fastsam3d-demo", checkpoint="cached")
    started = time.perf_counter()
    banks = {}
    for crop in args.placements:
        path = args.out / f"bank-{crop}.safetensors"
        if not path.is_file():
            save_bank(build_bank(HERE / "memory-bank.json", model, crop=crop, log=lambda s: None), path)
        banks[crop] = path
    test = HERE / "memory-heldout.json"
    quiet = dict(progress=False, save_predictions=False, plots=False, log=lambda s: None)
    problems = {}
    for placement in args.placements:
        for seed in args.seeds:
            folder = args.out / f"{placement}-seed{seed}"
            common = dict(clicks=args.clicks, protocol=args.protocol, placement=placement, seed=seed, **quiet)
            evaluate_with_memory(test, model, folder, bank=None, name="off", **common)
            for name, options in SETTINGS:
                try:
                    evaluate_with_memory(test, model, folder, bank=banks[placement], name=name, **options, **common)
                except MemoryOverflowError as exc:
                    problems[name] = " ".join(str(exc).split())[:300]
            print(f"{placement} seed {seed}: done after {time.perf_counter() - started:.0f} s", flush=True)

    pooled = args.out / "pooled"
    pooled.mkdir(exist_ok=True)
    rows, clusters = [], {}
    for placement in args.placements:
        for seed in args.seeds:
            with open(args.out / f"{placement}-seed{seed}" / "results.csv", newline="") as stream:
                for row in csv.DictReader(stream):
                    structure = f"{row['case']}/{row['value']}"
                    row["case"] = f"{structure}@{seed}"  # a unit = structure x click seed
                    clusters[row["case"]] = structure  # the bootstrap resamples structures
                    rows.append(row)
    with open(pooled / "results.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    report = {"protocol": args.protocol, "threads": args.threads, "seeds": args.seeds, "clicks": args.clicks,
              "seconds": round(time.perf_counter() - started, 1), "problems": problems, "comparisons": {}}
    metrics = ["dice_full"] + (["nsd_full"] if args.protocol == "cvpr25" else [])
    lines = [f"Memory on - off on the source grid (fastsam3d-demo, {args.protocol} click protocol, {args.clicks} "
             f"clicks, seeds {', '.join(map(str, args.seeds))}; {args.threads} torch thread(s)); n = structures x "
             "seeds; 95 % CI: bootstrap over the structures.", ""]
    for name, _ in SETTINGS:
        if name in problems:
            lines.append(f"* {name}: {problems[name]}")
            continue
        entries = [e for metric in metrics
                   for e in paired_comparison(pooled, "off", name, clicks=(1, 3, 5), metric=metric,
                                              patients=clusters)]
        report["comparisons"][name] = entries
        for e in entries:
            ci = e["ci95"] or [float("nan")] * 2
            lines.append(f"| {name} | {e['metric'].split('_')[0]} | {e['placement']} | {e['click']} | {e['n']} | "
                         f"{e['base_mean']:.3f} | "
                         f"{e['other_mean']:.3f} | {e['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | "
                         f"{'-' if e['wilcoxon_p'] is None else format(e['wilcoxon_p'], '.3f')} | "
                         f"{e['wins']}/{e['ties']}/{e['losses']} |")
    header = ["| setting | metric | placement | click | n | off | on | on - off [95 % CI] | Wilcoxon p | "
              "wins/ties/losses |", "|---|---|---|---|---|---|---|---|---|---|"]
    table = [line for line in lines[2:] if line.startswith("|")]
    notes = [line for line in lines[2:] if not line.startswith("|")]
    text = "\n".join(lines[:2] + header + table + [""] + notes) + "\n"
    (args.out / "report.md").write_text(text)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    print(f"total {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
