"""``make bench``: the benchmark suite on this machine, one JSON result and one table.

    python -m FastSAM3DLib.benchmarks [--device cuda] [--threads 1] [--quick] [--no-medim] [--details]
                                      [--output-dir DIR]

Runs on CUDA automatically when a GPU is present (fp32 and bf16 there, fp32 on a CPU). Per model: encoder,
prompt + decoder, first and next click on a 512x512x300 CT, peak memory, the official eager attention; then
medim's SAM-Med3D and 2D SAM ViT-B slice by slice, and the ratios (see :mod:`.suite`). ``--details`` adds the
attention ops and the encoders per backend (:mod:`.attention`). Nothing is asserted. The README's table is
regenerated from the result with ``python -m FastSAM3DLib.benchmarks.report --update-readme RESULT.json``.
"""
import argparse
import json
import sys
from pathlib import Path

from . import report, steadiness

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "Testing" / "Benchmarks" / "results"


def main(argv=None) -> int:
    """Run the suite, write ``<output-dir>/bench-<device>-<date>.json``, print the table."""
    parser = argparse.ArgumentParser(description="FastSAM3D benchmarks (make bench)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--sam2d-slices", type=int, default=None, help="2D SAM slices to time (CPU 2, GPU 128)")
    parser.add_argument("--no-medim", action="store_true", help="skip medim's SAM-Med3D (about a minute on a CPU)")
    parser.add_argument("--precisions", default=None, metavar="LIST",
                        help="comma-separated: fp32, bf16, fp16, int8 (default: fp32,bf16 on CUDA, fp32,int8 on a CPU)")
    parser.add_argument("--details", action="store_true", help="also the attention ops and encoders per backend")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    import torch

    from . import suite

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    env = suite.environment(device, args.threads)
    precisions = tuple(args.precisions.split(",")) if args.precisions else (
        ("fp32", "bf16") if cuda else ("fp32", "int8"))
    plan = suite.Plan(device=str(device), precisions=precisions,
                      repeats=2 if args.quick else (10 if cuda else 3),
                      sam2d_slices=args.sam2d_slices or (128 if cuda else 2),
                      skip={"medim": "--no-medim"} if args.no_medim else {})
    print(f"make bench on {suite.device_label(env)}, torch {env['versions']['torch']}", flush=True)
    measurements, details, problems = suite.run(plan, env, log=lambda s: print(s, flush=True))
    if args.details:
        from . import attention

        print("attention ops and encoders per backend ...", flush=True)
        details["attention"] = attention.run(device, quick=args.quick, threads=args.threads,
                                             include_medim=not args.no_medim)
    result = {"schema": report.SCHEMA, "kind": "bench", "dry_run": False, "date": suite.now(), "environment": env,
              "measurements": measurements, "details": details, "status": {"ok": not problems, "problems": problems}}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"bench-{report.slug(suite.device_label(env))}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(report.render_text([result]))
    unsteady = steadiness.warning(measurements)
    if unsteady:
        print(f"\nnote: {unsteady}")
    for problem in problems:
        print(f"problem: {problem}")
    print(f"\nwrote {path}\nREADME table: python -m FastSAM3DLib.benchmarks.report --update-readme {path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
