"""Benchmark results as a list of named measurements, the tables they render to, and the README section.

A result file (``make bench`` or ``make gpu-check``) is one JSON object::

    {"schema": 1, "kind": "bench" | "gpu-check", "dry_run": false, "date": "...",
     "environment": {...machine, device, versions, threads...},
     "measurements": [{"name": "first_click_ms", "model": "fastsam3d", "variant": "", "device": "NVIDIA H200",
                       "precision": "bf16", "value": 7.9, "unit": "ms", "label": "first click",
                       "note": null, "skipped": null}, ...],
     "details": {...raw timings, spreads, breakdowns...}}

**Adding a measurement** (e.g. a GIL ratio or memory per click): append ``measurement(name, value, ...)`` to
the list. Names listed in :data:`COLUMNS` become columns of the main table (one row per model, variant,
device and precision); any other name is listed in the "other measurements" table with its label, so a new
kind of number needs no change here. ``value=None`` with ``skipped="reason"`` records what could not be
measured and why.

The README's benchmark section is generated from result files: ``python -m FastSAM3DLib.benchmarks.report
--update-readme [RESULT.json ...]`` rewrites the block between :data:`BEGIN` and :data:`END` (the sources are
named in the begin marker, so ``--check`` and the tests can re-render it).
"""
import argparse
import json
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

SCHEMA = 1
REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (column header, unit); the order is the column order of the main table
COLUMNS = OrderedDict([
    ("encoder_ms", ("encoder", "ms")),
    ("encoder_cuda_graph_ms", ("encoder, CUDA graph", "ms")),
    ("decoder_ms", ("prompt + decoder", "ms")),
    ("first_click_ms", ("first click", "ms")),
    ("next_click_ms", ("next click", "ms")),
    ("peak_memory_mib", ("peak memory", "MiB")),
    ("speedup_vs_eager", ("vs official eager", "x")),
    ("speedup_vs_medim", ("vs medim", "x")),
    ("speedup_vs_sam2d", ("vs 2D SAM", "x")),
])
MEASUREMENT_KEYS = ("name", "model", "variant", "device", "precision", "value", "unit", "label", "note", "skipped")
# reference rows the ratio columns divide by (model, variant); see derive_ratios
EAGER_VARIANT = "official eager attention"
#: the clicks with SimpleITK resampling both ways (the session before FastSAM3DLib.resample)
SITK_VARIANT = "SimpleITK resampling"
MEDIM_MODEL = "medim:SAM-Med3D"
SAM2D_MODEL = "sam-vit-b-2d"
SAM2D_VARIANT = "128 slices"
MODEL_NAMES = {"fastsam3d": "FastSAM3D", "sam-med3d": "SAM-Med3D", MEDIM_MODEL: "medim SAM-Med3D (official code)",
               SAM2D_MODEL: "2D SAM ViT-B"}

BEGIN = "<!-- BENCHMARK TABLE BEGIN"
END = "<!-- BENCHMARK TABLE END -->"
LEGEND = (
    "Columns: *encoder* is the image encoder on one 128³ input; *prompt + decoder* one click's prompt encoder "
    "and mask decoder alone; *first click* and *next click* go through `InteractiveSession` on a synthetic "
    "512×512×300 CT (ROI resampling, encoder, decoder, paste-back; the next click reuses the embedding); "
    "*peak memory* is one session (first click and three more) including the weights: the PyTorch allocator's "
    "peak on a GPU, weights plus the profiler's peak of live tensors on a CPU. The ratios divide the reference's "
    "encoder time by this row's, same device and precision: *official eager* is the official attention formula "
    "(materialised bias, softmax, matmul) in our model, *medim* the official SAM-Med3D code, *2D SAM* a ViT-B "
    "image encoder run on 128 slices of 1024² (slice by slice, as in the FastSAM3D paper). bf16 and fp16 are "
    "autocast; int8 is the `fast` precision (the image encoder's matrix products in int8 on a CPU, "
    "`FastSAM3DLib.quantize`). *SimpleITK resampling* rows repeat the fp32 clicks with SimpleITK resampling both "
    "ways (`FASTSAM3D_RESAMPLE=sitk`, the session before its PyTorch resampling). Random weights (speed does not "
    "depend on their values); medians after a warm-up run (on a CPU, "
    "medim and 2D SAM run without one).")


def measurement(name: str, value: Optional[float], *, model: str, device: str, precision: str, variant: str = "",
                unit: Optional[str] = None, label: Optional[str] = None, note: Optional[str] = None,
                skipped: Optional[str] = None) -> Dict[str, object]:
    """One named measurement; ``unit``/``label`` default to the column's for names in :data:`COLUMNS`."""
    header, default_unit = COLUMNS.get(name, (None, None))
    if value is not None and not math.isfinite(float(value)):
        value, skipped = None, skipped or "not a finite number"
    return {"name": name, "model": model, "variant": variant, "device": device, "precision": precision,
            "value": None if value is None else float(value), "unit": unit or default_unit or "",
            "label": label or header or name, "note": note, "skipped": None if value is not None else (skipped or
                                                                                                     "not measured")}


def derive_ratios(measurements: List[dict]) -> List[dict]:
    """The ratio columns: reference encoder time / this row's, for each non-reference row with an encoder time."""
    encoder = {(m["model"], m["variant"], m["device"], m["precision"]): m["value"]
               for m in measurements if m["name"] == "encoder_ms" and m["value"]}
    references = (("speedup_vs_eager", None, EAGER_VARIANT), ("speedup_vs_medim", MEDIM_MODEL, ""),
                  ("speedup_vs_sam2d", SAM2D_MODEL, SAM2D_VARIANT))
    out = []
    for (model, variant, device, precision), ms in encoder.items():
        if variant or model in (MEDIM_MODEL, SAM2D_MODEL):
            continue
        for name, ref_model, ref_variant in references:
            base = encoder.get((ref_model or model, ref_variant, device, precision))
            if base:
                out.append(measurement(name, base / ms, model=model, device=device, precision=precision))
    return out


def validate(result: dict) -> List[str]:
    """Problems with a result document (empty when it follows the schema)."""
    problems = []
    for key, kind in (("schema", int), ("kind", str), ("date", str), ("environment", dict), ("measurements", list)):
        if not isinstance(result.get(key), kind):
            problems.append(f"{key!r} missing or not a {kind.__name__}")
    if result.get("schema") not in (None, SCHEMA) and isinstance(result.get("schema"), int):
        problems.append(f"schema {result['schema']} is not {SCHEMA}")
    for i, m in enumerate(result.get("measurements") or []):
        if not isinstance(m, dict) or set(m) != set(MEASUREMENT_KEYS):
            problems.append(f"measurement {i} does not have exactly the keys {MEASUREMENT_KEYS}")
            continue
        if (m["value"] is None) == (m["skipped"] is None):
            problems.append(f"measurement {i} ({m['name']}) needs either a value or a skip reason")
        if m["value"] is not None and not isinstance(m["value"], (int, float)):
            problems.append(f"measurement {i} ({m['name']}) has a non-numeric value")
    return problems


# --------------------------------------------------------------------------------------------- formatting
def format_value(value: Optional[float], unit: str) -> str:
    """A short human-readable value: 0.42 ms, 31 ms, 1.31 s, 850 MiB, 1.2 GiB, 11.7x."""
    if value is None:
        return "—"
    if unit == "ms":
        if value >= 100_000:
            return f"{value / 1e3:.0f} s"
        if value >= 1000:
            return f"{value / 1e3:.2f} s"
        return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"
    if unit == "MiB":
        if value >= 1024:
            return f"{value / 1024:.2f} GiB"
        return f"{value:.0f} MiB" if value >= 10 else f"{value:.2f} MiB" if value >= 0.01 else f"{value * 1024:.1f} KiB"
    if unit == "x":
        return f"{value:.0f}×" if value >= 100 else f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"
    return f"{value:.3g} {unit}".strip()


def slug(text: str) -> str:
    """``text`` reduced to letters, digits, dots and dashes (for file names)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _row_name(model: str, variant: str) -> str:
    name = MODEL_NAMES.get(model, model)
    return f"{name}, {variant}" if variant else name


def table_rows(results: Sequence[dict]):
    """(header, rows, other rows, notes, not-measured lines) of the tables.

    Rows are grouped by device and precision (in order of first appearance), then listed in the order their
    first measurement appears.
    """
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    other, skipped, notes = [], OrderedDict(), []
    for result in results:
        for m in result["measurements"]:
            key = (m["model"], m["variant"], m["device"], m["precision"])
            if m["name"] in COLUMNS:
                rows.setdefault(key, {})[m["name"]] = m
            else:
                other.append([m["label"], _row_name(m["model"], m["variant"]), m["device"], m["precision"],
                              format_value(m["value"], m["unit"]), m["note"] or m["skipped"] or ""])
            if m["skipped"] and m["name"] in COLUMNS:
                group = skipped.setdefault(m["skipped"], [OrderedDict(), OrderedDict(), OrderedDict()])
                for part, value in zip(group, (m["label"], _row_name(m["model"], m["variant"]),
                                               f"{m['device']}, {m['precision']}")):
                    part[value] = None
            elif m["note"] and m["name"] in COLUMNS:
                where = f"{_row_name(m['model'], m['variant'])}, {m['device']}, {m['precision']}"
                notes.append(f"{m['label']} ({where}): {m['note']}")
    used = [name for name in COLUMNS if any(name in cells for cells in rows.values())]
    header = ["model", "device", "precision"] + [COLUMNS[name][0] for name in used]
    groups = list(OrderedDict.fromkeys((key[2], key[3]) for key in rows))
    body = []
    for (model, variant, device, precision), cells in sorted(rows.items(), key=lambda kv: groups.index(kv[0][2:])):
        body.append([_row_name(model, variant), device, precision] +
                    [format_value(cells[n]["value"], cells[n]["unit"]) if n in cells else "" for n in used])
    not_measured = [f"{', '.join(labels)} of {', '.join(models)} ({'; '.join(where)}): {reason}"
                    for reason, (labels, models, where) in skipped.items()]
    return header, body, other, notes, not_measured


def _source_line(result: dict, name: str = "") -> str:
    env = result["environment"]
    versions = env.get("versions", {})
    where = env.get("gpu") or f"{env.get('cpu', 'CPU')} ({env.get('cpu_count', '?')} cores" + (
        f", {env['cpu_capability']}, int8 kernel {env['int8_kernel']})" if env.get("cpu_capability") else ")")
    threads, load = env.get("threads"), env.get("load_average_at_start")
    bits = [where, f"{threads} torch thread{'s' if threads != 1 else ''}" if threads else None,
            f"torch {versions.get('torch')}", f"Triton {versions['triton']}" if versions.get("triton") else None,
            f"CUDA {env['cuda']}" if env.get("cuda") else None,
            f"load average {load[0]:.1f} at start" if load else None,
            result.get("date", "")[:10]]
    text = ", ".join(b for b in bits if b)
    return f"{name}: {text}" if name else text


def render_markdown(results: Sequence[dict], names: Sequence[str] = ()) -> str:
    """The README table(s): main table, other measurements, sources, what was not measured, the legend."""
    header, body, other, notes, not_measured = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    if other:
        lines += ["", "| other measurement | model | device | precision | value | note |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in other]
    lines.append("")
    names = list(names) or [""] * len(results)
    lines += [f"- {_source_line(r, f'`{n}`' if n else '')}" for r, n in zip(results, names)]
    lines += [f"- {note}" for note in notes]
    lines += [f"- Not measured: {note}" for note in not_measured]
    lines += ["", LEGEND]
    return "\n".join(lines)


def render_text(results: Sequence[dict]) -> str:
    """The same tables as fixed-width text for a terminal."""
    header, body, other, notes, not_measured = table_rows(results)

    def block(head, rows):
        cells = [[c.replace("×", "x").replace("—", "-") for c in row] for row in [head] + rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        left = head.index("precision") + 1 if "precision" in head else len(head)  # text columns, then numbers
        out = ["  ".join(c.ljust(w) if i < left or head[i] == "note" else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
        return [out[0], "  ".join("-" * w for w in widths)] + out[1:]

    if len({row[1] for row in body}) == 1:  # one device: the source line names it
        header, body = header[:1] + header[2:], [row[:1] + row[2:] for row in body]
    lines = block(header, body)
    if other:
        lines += [""] + block(["other measurement", "model", "device", "precision", "value", "note"], other)
    lines += [""] + [_source_line(r) for r in results]
    lines += notes
    lines += [f"not measured: {note}" for note in not_measured]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- README
def load(path) -> dict:
    """Read one result file; raises ValueError naming the problems when it does not follow the schema."""
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    problems = validate(result)
    if problems:
        raise ValueError(f"{path} is not a benchmark result of schema {SCHEMA}: {'; '.join(problems)}")
    return result


def readme_block(text: str):
    """(sources, generated text) of the README's benchmark block, or None when it has no markers."""
    match = re.search(re.escape(BEGIN) + r"(.*?)-->\n(.*?)" + re.escape(END), text, re.S)
    if not match:
        return None
    sources = re.findall(r"\S+\.json", match.group(1))
    return sources, match.group(2).rstrip("\n")


def render_readme_block(sources: Sequence[str], root: Path = REPO_ROOT) -> str:
    """The whole marked block (markers included) for the given repository-relative result files."""
    results = [load(root / s) for s in sources]
    names = [Path(s).name for s in sources]
    begin = (f"{BEGIN}: generated by `python -m FastSAM3DLib.benchmarks.report --update-readme`; do not edit; "
             f"sources: {' '.join(sources)} -->")
    return f"{begin}\n{render_markdown(results, names)}\n{END}"


def update_readme(readme: Path, sources: Optional[Sequence[str]] = None, root: Path = REPO_ROOT) -> bool:
    """Rewrite the README's block from ``sources`` (default: those its marker names); True if it changed."""
    text = readme.read_text(encoding="utf-8")
    block = readme_block(text)
    if block is None:
        raise ValueError(f"{readme} has no '{BEGIN} ... {END}' block")
    sources = list(sources) if sources else block[0]
    sources = [Path(s).resolve().relative_to(root.resolve()).as_posix() if Path(s).is_absolute() else
               Path(s).as_posix() for s in sources]
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render_readme_block(sources, root) + text[stop:]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Command line: print the table of result files, or regenerate/check the README block."""
    parser = argparse.ArgumentParser(description="Render benchmark results (make bench, make gpu-check)")
    parser.add_argument("results", nargs="*", help="result JSON files (default for the README: its sources)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README.md's benchmark block")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's block is out of date")
    parser.add_argument("--markdown", action="store_true", help="print markdown instead of text")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    args = parser.parse_args(argv)
    if args.update_readme or args.check:
        text = args.readme.read_text(encoding="utf-8")
        block = readme_block(text)
        if block is None:
            print(f"{args.readme} has no benchmark block", file=sys.stderr)
            return 1
        if args.check:
            wanted = render_readme_block(block[0])
            current = text[text.index(BEGIN):text.index(END) + len(END)]
            print("README benchmark block is up to date" if wanted == current else
                  "README benchmark block is out of date: python -m FastSAM3DLib.benchmarks.report --update-readme")
            return 0 if wanted == current else 1
        changed = update_readme(args.readme, args.results or None)
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
        return 0
    if not args.results:
        parser.error("give result files, or --update-readme / --check")
    results = [load(p) for p in args.results]
    print(render_markdown(results, [Path(p).name for p in args.results]) if args.markdown else render_text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
