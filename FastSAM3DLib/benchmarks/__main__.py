"""``make bench``: every benchmark in one run, written as JSON with the machine it ran on, and a table.

    python -m FastSAM3DLib.benchmarks [--device cuda] [--threads 2] [--quick] [--output-dir DIR]

Runs on CUDA automatically when a GPU is present. Nothing here is asserted: speed is measured and reported.
"""
import argparse
import datetime
import json
import socket
import sys
from pathlib import Path

import torch

from . import attention, pipeline

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "Testing" / "Benchmarks" / "results"


def _ms(entry):
    return entry["median_ms"] if entry else float("nan")


def ratios(result) -> dict:
    """The headline ratios: ours vs the references, FastSAM3D vs SAM-Med3D, FastSAM3D vs 2D SAM."""
    models = {m["model"]: m for m in result["pipeline"]["models"]}
    out = dict(result["attention"]["encoders"].get("speedups", {}))
    fast, med = models.get("fastsam3d"), models.get("sam-med3d")
    if fast and med:
        out["sam-med3d_encoder_over_fastsam3d_encoder"] = _ms(med["encoder"]) / _ms(fast["encoder"])
    sam2d = result["pipeline"].get("sam2d")
    if fast and sam2d:
        per_volume = _ms(fast["encoder"]) + _ms(fast["one_click_prompt_and_decoder"])
        out["sam2d_128_slices_over_fastsam3d_volume"] = sam2d["volume_estimate_ms"] / per_volume
    return out


def table(result) -> str:
    """A plain-text summary of the run."""
    env = result["environment"]
    lines = [f"device: {env.get('gpu') or env.get('cpu')} ({env['device']}), threads {env['threads']}, "
             f"torch {env['versions']['torch']}", "", f"{'model':18s} {'encoder':>10s} {'one click':>10s} "
             f"{'1st click*':>11s} {'next click*':>12s}  (* on a {result['pipeline']['volume']} volume)"]
    for m in result["pipeline"]["models"]:
        lines.append(f"{m['model']:18s} {_ms(m['encoder']):8.1f}ms {_ms(m['one_click_prompt_and_decoder']):8.1f}ms "
                     f"{_ms(m['first_click_source_grid']):9.1f}ms {_ms(m['later_click_source_grid']):10.1f}ms")
    sam2d = result["pipeline"].get("sam2d")
    if sam2d:
        lines.append(f"2D SAM ViT-B: {_ms(sam2d['per_slice']):.1f} ms per 1024^2 slice "
                     f"-> {sam2d['volume_estimate_ms'] / 1e3:.1f} s for {sam2d['volume_slices']} slices "
                     f"({sam2d['slices_timed']} timed)")
    lines.append("")
    lines.append("encoders by backend:")
    for row in result["attention"]["encoders"]["results"]:
        timing = f"{row['median_ms']:9.1f} ms" if "median_ms" in row else row.get("error", "")
        lines.append(f"  {row['label']:28s} {row.get('dtype', ''):9s} {timing}")
    lines.append("")
    lines.extend(f"{k}: {v:.2f}x" for k, v in result["ratios"].items())
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run everything, write ``<output-dir>/<host>-<device>-<date>.json``, print the table."""
    parser = argparse.ArgumentParser(description="FastSAM3D benchmarks")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--sam2d-slices", type=int, default=None, help="2D SAM slices to time (GPU: 128)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = 3 if args.quick else (10 if device.type == "cuda" else 5)
    result = {"environment": attention.environment(device, args.threads),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print("attention and encoders ...", flush=True)
    result["attention"] = attention.run(device, quick=args.quick, threads=args.threads)
    print("interactive pipeline ...", flush=True)
    volume = pipeline.ct_sized_volume()
    result["pipeline"] = {
        "volume": "x".join(map(str, volume.shape[::-1])),
        "models": [pipeline.bench_model(name, device, repeats, volume) for name in ("fastsam3d", "sam-med3d")],
    }
    slices = args.sam2d_slices or (128 if device.type == "cuda" else 2)
    print(f"2D SAM, {slices} slices ...", flush=True)
    result["pipeline"]["sam2d"] = pipeline.bench_sam2d_slices(device, slices=slices)
    result["ratios"] = ratios(result)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tag = (result["environment"].get("gpu") or socket.gethostname()).replace(" ", "_")
    path = args.output_dir / f"{tag}-{device.type}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
