"""``make gpu-check``: everything a CUDA machine can tell us, in one command, in a few minutes.

    PYTHONPATH=. python3 -m FastSAM3DLib.benchmarks.gpu_check [--dry-run] [--budget-s 450] [--output-dir DIR]

Needs only the repository and a Python with torch (and Triton for the kernel): no virtual environment, no
network, no SimpleITK. In order:

1. the tests marked ``cuda`` (the files under ``Testing/`` that use the marker), with pytest when it is installed;
2. the Triton kernel against a float64 reference on the GPU: fp32/bf16/fp16 x dense/sparse/padded, with the
   relative L2 error of the kernel and of the PyTorch backend in the same precision, and whether the kernel
   really ran (no silent fallback);
3. the benchmark suite (:mod:`.suite`) on CUDA: FastSAM3D and SAM-Med3D at official size with random weights,
   fp32 and bf16, the encoder eagerly and as a CUDA graph, first and next click through the session on a
   512x512x300 volume (resampled in PyTorch on the GPU when SimpleITK is absent), peak GPU memory per
   session, the official eager attention, medim (when installed) and 2D SAM ViT-B slice by slice;
4. the attention ops and encoders per backend (details).

Writes ``Testing/Benchmarks/results/gpu-check-<GPU>-<date>.json`` and prints the tables. Exit status 0 when
the tests and the kernel check passed and no benchmark raised, 1 otherwise, 2 without a CUDA GPU.
``--dry-run`` runs the same steps on the CPU in seconds (tiny models and sizes, the kernel under
``TRITON_INTERPRET=1``); ``make test`` runs it.
"""
import argparse
import faulthandler
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

from . import report, steadiness

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "Testing" / "Benchmarks" / "results"
CUDA_MARK = re.compile(r"^\s*@pytest\.mark\.cuda\b", re.M)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# relative L2 against the float64 reference that each precision must reach (as Testing/test_attention_triton.py)
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
# the attention shapes of the registered models: FastSAM3D's global attention (6 heads x 128 on 8³ tokens),
# a larger grid, and SAM-Med3D's padded windows (12 heads x 64, 8³ real tokens in a 14³ window)
GPU_CASES = (
    {"kind": "dense", "side": 8, "heads": 6, "head_dim": 128},
    {"kind": "sparse", "side": 8, "heads": 6, "head_dim": 128, "tile": (2, 2, 4), "radius": 1},
    {"kind": "dense", "side": 16, "heads": 6, "head_dim": 64},
    {"kind": "sparse", "side": 16, "heads": 6, "head_dim": 64, "tile": (4, 4, 4), "radius": 1},
    {"kind": "padded", "side": 8, "heads": 12, "head_dim": 64, "window": 14},
)
DRY_RUN_CASES = (
    {"kind": "dense", "side": 4, "heads": 1, "head_dim": 16},
    {"kind": "sparse", "side": 4, "heads": 1, "head_dim": 16, "tile": (2, 2, 4), "radius": 1},
    {"kind": "padded", "side": 4, "heads": 1, "head_dim": 16, "window": 6},
)


# ------------------------------------------------------------------------------------------------ cuda tests
def cuda_test_files(root: Path = REPO_ROOT) -> List[Path]:
    """The test files under ``root/Testing`` that mark tests with ``@pytest.mark.cuda``."""
    testing = root / "Testing"
    return [p for p in sorted(testing.glob("test_*.py")) if CUDA_MARK.search(p.read_text(errors="replace"))]


def run_cuda_tests(root: Path = REPO_ROOT, timeout_s: float = 240) -> Dict[str, object]:
    """Run the ``cuda``-marked tests with pytest in a child process; counts, failures and skip reasons."""
    from .suite import has_module

    if not has_module("pytest"):
        return {"status": "skipped", "reason": "pytest is not installed, so the cuda tests did not run "
                                               "(pip install pytest, or carry its wheel)"}
    files = cuda_test_files(root) if (root / "Testing").is_dir() else []
    if not files:
        return {"status": "skipped", "reason": f"no test file under {root / 'Testing'} marks tests 'cuda'"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda-tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}"] + [p.relative_to(root).as_posix() for p in files]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p]))
        env.pop("TRITON_INTERPRET", None)  # the cuda tests compile for the GPU; a dry run sets it for itself
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-3000:]
            return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s",
                    "files": [f.name for f in files],
                    "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        result = {"files": [f.name for f in files], "command": " ".join(cmd[1:4] + ["..."]),
                  "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                  "output_tail": (proc.stdout + proc.stderr)[-3000:]}
        if xml.is_file():
            result.update(_junit_counts(xml))
    if proc.returncode == 5:
        result.update(status="skipped", reason="pytest collected no cuda test")
    elif proc.returncode == 0 and not result.get("passed") and result.get("skipped"):
        result.update(status="skipped", reason="; ".join(result.get("skip_reasons") or ["every cuda test skipped"]))
    elif proc.returncode == 0 and not result.get("failed") and not result.get("errors"):
        result["status"] = "passed"
    else:
        result["status"] = "failed"
    return result


def _junit_counts(path: Path) -> Dict[str, object]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures, skip_reasons = [], {}
    for case in root.iter("testcase"):
        for child in case:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if child.tag in ("failure", "error"):
                failures.append({"test": name, "message": (child.get("message") or "")[:500]})
            elif child.tag == "skipped":
                reason = child.get("message") or ""
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"],
            "failures": failures, "skip_reasons": skip_reasons}


# ------------------------------------------------------------------------------------------------ kernel
def _case_inputs(case: dict, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    n, box = case["side"] ** 3, case.get("window", case["side"])
    q, k, v = (torch.randn(1, case["heads"], n, case["head_dim"], generator=gen) for _ in range(3))
    tables = [torch.randn(2 * box - 1, case["head_dim"], generator=gen) * 0.1 for _ in range(3)]
    pad_qkv = torch.randn(3, case["heads"], case["head_dim"], generator=gen)
    return [t.to(device) for t in (q, k, v)], [t.to(device) for t in tables], pad_qkv.to(device)


def _triton_launches(fn) -> int:
    """How many times ``fn`` launches the Triton kernel (its Python entry point, counted while ``fn`` runs).

    Counted rather than profiled: a profiler session in this process would leave CUPTI attached and slow the
    benchmarks that follow by 10-20 % (pytorch#144455)."""
    from ..attention import triton_kernel

    launch, count = triton_kernel.rel_pos_attention_triton, [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return launch(*args, **kwargs)

    triton_kernel.rel_pos_attention_triton = counting
    try:
        fn()
    finally:
        triton_kernel.rel_pos_attention_triton = launch
    return count[0]


def kernel_check(device, cases=GPU_CASES, precisions=("fp32", "bf16", "fp16")) -> Dict[str, object]:
    """The Triton backend against a float64 eager reference, case by case; ``ok`` per case and overall."""
    import torch

    from .. import attention
    from ..attention import reference

    device = torch.device(device)
    if not attention.triton_supported(device):
        return {"status": "skipped", "reason": f"the Triton backend cannot run on {device} here (Triton missing, "
                                               "a GPU older than sm_80, or a CPU without TRITON_INTERPRET=1)"}
    from ..attention import triton_kernel  # importable here: the backend is supported

    rows = []
    for case in cases:
        (q, k, v), tables, pad_qkv = _case_inputs(case, device)
        grid, scale = (case["side"],) * 3, case["head_dim"] ** -0.5
        d64 = [t.double() for t in (q, k, v)] + [t.double() for t in tables]
        layout = (attention.SparseLayout(case["tile"], case["radius"]).blocks(grid)
                  if case["kind"] == "sparse" else None)
        with torch.no_grad():
            if case["kind"] == "padded":
                window = (case["window"],) * 3
                ref = reference.padded_window_attention_eager(*d64[:3], pad_qkv.double(), *d64[3:], grid, window,
                                                              scale)
            elif layout is None:
                ref = reference.rel_pos_attention_eager(*d64, grid, scale)
            else:
                ref = reference.rel_pos_attention_masked_eager(*d64, grid, scale, layout.token_mask())
        for precision in precisions:
            low = [t.to(getattr(torch, PRECISION_DTYPES[precision])) for t in (q, k, v)]

            def run(backend):
                with torch.no_grad():
                    if case["kind"] == "padded":
                        return attention.padded_window_attention(*low, pad_qkv, *tables, grid, window, scale,
                                                                 backend=backend)
                    return attention.rel_pos_attention(*low, *tables, grid, scale, backend=backend, sparse=layout)

            row = {"kind": case["kind"], "tokens": case["side"] ** 3, "heads": case["heads"],
                   "head_dim": case["head_dim"], "precision": precision, "tolerance": TOLERANCE[precision]}
            if layout is not None:
                row["sparse"] = {"tile": list(case["tile"]), "radius": case["radius"], "density": layout.density}
            if case["kind"] == "padded":
                row["window"] = case["window"]
            try:
                result = []
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    launches = _triton_launches(lambda: result.append(run("triton")))
                ours = result[0]
                theirs = run("torch")
                identical = bool(torch.equal(ours, theirs))
                messages = [str(w.message)[:300] for w in caught]
                fallback = [m for m in messages if "instead" in m or "fall" in m.lower()]
                row.update(rel_l2=_rel_l2(ours, ref), torch_rel_l2=_rel_l2(theirs, ref), dtype=str(ours.dtype)[6:],
                           warnings=messages, identical_to_torch=identical, triton_launches=launches)
                row["triton_ran"] = launches > 0 and not fallback
                row["ok"] = bool(row["rel_l2"] <= TOLERANCE[precision] and row["triton_ran"]
                                 and row["dtype"] == PRECISION_DTYPES[precision])
            except Exception as exc:  # one failing variant must not hide the others
                defect = triton_kernel.interpreter_defect(exc)
                if defect:  # reported as not run, with the reason, not as a failure of the kernel
                    row.update(ok=None, not_run=defect)
                else:
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            rows.append(row)
    failed = [r for r in rows if r["ok"] is False]
    result = {"status": "passed" if not failed else "failed", "cases": rows, "failed": len(failed),
              "reference": "float64 eager formula (FastSAM3DLib.attention.reference) on the same float32 inputs"}
    not_run = [r for r in rows if r["ok"] is None]
    if not_run:
        result["not_run"] = {"cases": len(not_run), "reason": not_run[0]["not_run"]}
    return result


def _rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def kernel_table(check: Dict[str, object]) -> str:
    """The kernel check as fixed-width text."""
    if check.get("status") == "skipped":
        return f"skipped: {check['reason']}"
    lines = [f"{'case':34s} {'prec':5s} {'rel-L2 triton':>13s} {'rel-L2 torch':>13s} {'tolerance':>9s}  result"]
    for r in check["cases"]:
        name = f"{r['kind']} {r['tokens']} tokens, {r['heads']}x{r['head_dim']}"
        if "sparse" in r:
            name += f" t{'x'.join(map(str, r['sparse']['tile']))} r{r['sparse']['radius']}"
        if "error" in r:
            lines.append(f"{name:34s} {r['precision']:5s} {r['error'][:80]}")
            continue
        if "not_run" in r:
            lines.append(f"{name:34s} {r['precision']:5s} not run: {r['not_run']}")
            continue
        verdict = "ok" if r["ok"] else ("FALLBACK (Triton did not run)" if not r["triton_ran"] else "FAIL")
        lines.append(f"{name:34s} {r['precision']:5s} {r['rel_l2']:13.2e} {r['torch_rel_l2']:13.2e} "
                     f"{r['tolerance']:9.1e}  {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver
def _details(device, repeats: int, plan, dry_run: bool, problems: List[str]) -> Dict[str, object]:
    """Attention ops and encoders per backend and dtype (triton/torch/eager, dense/sparse); the dry run times
    the ops on a tiny grid only. A call that fails is a problem and loses nothing else."""
    from . import attention as bench_attention

    calls = [("attention_ops", lambda: bench_attention.benchmark_attention_ops(
        device, sides=(4,) if dry_run else (8, 16), dtypes=("float32", "bfloat16", "float16"),
        heads=1 if dry_run else 6, head_dim=16 if dry_run else 128, repeats=repeats, memory=not dry_run))]
    if not dry_run:
        calls.append(("encoders", lambda: bench_attention.benchmark_encoders(
            device, dtypes=("float32", "bfloat16"), include_medim=False, repeats=repeats)))
    out = {}
    for name, call in calls:
        if plan.time_left() <= (0 if dry_run else 90):
            out[name] = {"skipped": "time budget spent"}
            continue
        try:
            out[name] = call()
        except Exception as exc:  # noqa: BLE001 - recorded; the other call still runs
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            problems.append(f"attention details, {name}: {type(exc).__name__}: {exc}")
            continue
        failed = [r for r in out[name].get("results", []) if "error" in r]
        if failed:
            problems.append(f"attention details, {name}: {len(failed)} of {len(out[name]['results'])} rows failed "
                            f"(first: {failed[0]['error'][:200]})")
    return out


def main(argv=None) -> int:
    """Run the checks and benchmarks, write the JSON, print the tables; see the module docstring."""
    parser = argparse.ArgumentParser(description="FastSAM3D GPU check (tests, Triton kernel, benchmarks)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, kernel under TRITON_INTERPRET=1")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting new benchmarks after this")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; "
                             "a temporary folder for --dry-run)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the cuda-marked tests")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sam2d-slices", type=int, default=None, help="2D SAM slices to time (GPU: 128)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.dry_run:  # must be set before anything imports Triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:  # a hang must not take the results with it: end with a traceback before the caller's kill
        faulthandler.dump_traceback_later(args.budget_s + 70, exit=True)
    try:
        import torch
    except ImportError:
        faulthandler.cancel_dump_traceback_later()
        print(f"gpu-check: this Python ({sys.executable}) has no PyTorch; run it with one that has, e.g. "
              "make gpu-check PYTHON=.venv/bin/python (make test builds .venv)", file=sys.stderr)
        return 2

    from . import suite

    output_dir = args.output_dir or (Path(tempfile.gettempdir()) / "fastsam3d-gpu-check" if args.dry_run
                                     else DEFAULT_OUTPUT)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.dry_run and not torch.cuda.is_available():
        path = output_dir / f"gpu-check-no-gpu-{suite.now()[:10]}.json"
        path.write_text(json.dumps({"schema": report.SCHEMA, "kind": "gpu-check", "dry_run": False,
                                    "date": suite.now(), "no_gpu": _no_gpu_diagnostics()}, indent=2) + "\n")
        print(f"gpu-check: no CUDA GPU is visible to torch; what torch and nvidia-smi say is in {path} "
              "(use --dry-run to check the steps on the CPU)")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    env = suite.environment(device, args.threads)
    print(f"gpu-check on {suite.device_label(env)} (torch {env['versions']['torch']}, "
          f"Triton {env['versions']['triton']}){' [dry run]' if args.dry_run else ''}", flush=True)
    checks, problems, measurements, details = {}, [], [], {}
    tag = "dry-run" if args.dry_run else report.slug(env.get("gpu") or "cuda")
    path = output_dir / f"gpu-check-{tag}-{suite.now()[:10]}.json"

    def save(partial=True):
        """Write what there is (after every step and benchmark unit: a run cut off keeps its numbers)."""
        result = {"schema": report.SCHEMA, "kind": "gpu-check", "dry_run": args.dry_run, "date": suite.now(),
                  "environment": env, "measurements": measurements, "checks": checks, "details": details,
                  "status": {"ok": not problems, "problems": list(problems), "partial": partial,
                             "seconds": round(time.monotonic() - start, 1)}}
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    print("1. cuda-marked tests ...", flush=True)
    checks["cuda_tests"] = ({"status": "skipped", "reason": "--skip-tests"} if args.skip_tests else
                            run_cuda_tests(REPO_ROOT, timeout_s=min(240.0, 0.5 * args.budget_s)))
    tests = checks["cuda_tests"]
    if tests["status"] == "failed":
        problems.append(f"cuda tests failed: {tests.get('failed', '?')} failed, {tests.get('errors', '?')} errors"
                        f"{' (' + tests['reason'] + ')' if tests.get('reason') else ''}")
    save()

    print("2. Triton kernel vs the float64 reference ...", flush=True)
    try:
        checks["kernel"] = kernel_check(device, DRY_RUN_CASES if args.dry_run else GPU_CASES)
    except Exception as exc:
        checks["kernel"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "cases": []}
    if checks["kernel"]["status"] == "failed":
        problems.append(f"kernel check failed: {checks['kernel'].get('failed', checks['kernel'].get('reason'))}")
    save()

    print("3. benchmarks ...", flush=True)
    if args.dry_run:
        from .sam2d import TINY

        plan = suite.Plan(device="cpu", precisions=("fp32", "bf16"), volume_shape=(40, 64, 64),
                          repeats=args.repeats or 1, memory_clicks=1, sam2d_slices=args.sam2d_slices or 2,
                          sam2d_config=TINY, sitk_reference=False,
                          skip={"medim": "dry run (medim's official-size SAM-Med3D takes minutes on a CPU)",
                                "host": "dry run (make bench measures the Slicer host)"})
        names = suite.DRY_RUN_MODELS
    else:
        plan = suite.Plan(device="cuda", precisions=("fp32", "bf16"), repeats=args.repeats or 10,
                          sam2d_slices=args.sam2d_slices or 128)
        names = None
    plan.deadline = start + args.budget_s - 20

    def so_far(units, unit_details, unit_problems):
        measurements[:] = units
        details.update(unit_details)
        save()

    try:
        found, found_details, bench_problems = suite.run(plan, env, log=lambda s: print(s, flush=True),
                                                         model_names=names, after_unit=so_far)
        measurements[:] = found
        details.update(found_details)
        problems.extend(bench_problems)
    except Exception as exc:  # what was measured before is kept (so_far)
        problems.append(f"benchmarks stopped: {type(exc).__name__}: {exc}")
    save()
    print("4. attention ops and encoders per backend ...", flush=True)
    details["attention"] = _details(device, args.repeats or (1 if args.dry_run else 10), plan, args.dry_run,
                                    problems)

    from .. import attention

    failure = attention.triton_failure()
    env["triton_failure"] = failure
    if failure and not args.dry_run:  # "auto" then measured PyTorch under the Triton label
        problems.append(f"Triton stopped during the run, so later 'auto' timings are PyTorch's: {failure}")
    faulthandler.cancel_dump_traceback_later()
    result = save(partial=False)

    print()
    print(summary(result))
    print(f"\nwrote {path}")
    return 0 if not problems else 1


def _no_gpu_diagnostics() -> Dict[str, object]:
    """What torch and the driver say when torch sees no GPU (the one run must still explain itself)."""
    import torch

    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the reason is the point
        out["cuda_init_error"] = f"{type(exc).__name__}: {exc}"
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout[-4000:]
    except (OSError, subprocess.SubprocessError) as exc:
        out["nvidia_smi"] = f"not run: {exc}"
    return out


def summary(result: dict) -> str:
    """The printed report: tests, kernel table, benchmark tables, verdict."""
    tests, kernel = result["checks"]["cuda_tests"], result["checks"]["kernel"]
    if tests["status"] == "skipped":
        test_line = f"cuda tests: skipped ({tests['reason']})"
    else:
        test_line = (f"cuda tests: {tests['status']}: {tests.get('passed', '?')} passed, {tests.get('failed', '?')} "
                     f"failed, {tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped"
                     f"{' (' + tests['reason'] + ')' if tests.get('reason') else ''}")
        test_line += "".join(f"\n  FAILED {f['test']}: {f['message'][:200]}" for f in tests.get("failures", []))
    status = result["status"]
    verdict = (f"gpu-check: {'OK' if status['ok'] else 'PROBLEMS'} in {status['seconds']:.0f} s"
               + "".join(f"\n  - {p}" for p in status["problems"]))
    unsteady = steadiness.warning(result["measurements"])
    return "\n".join([test_line, "", "Triton kernel vs float64 reference:", kernel_table(kernel), "",
                      report.render_text([result]), ""] + ([f"note: {unsteady}", ""] if unsteady else [])
                     + [verdict])


if __name__ == "__main__":
    sys.exit(main())
