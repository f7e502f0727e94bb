"""Measuring the memory honestly: evaluation with the leakage guard, and paired memory-on/off statistics.

:func:`evaluate_with_memory` runs :func:`FastSAM3DLib.evaluation.evaluate.evaluate_dataset` with a bank attached
(spec section 6.4):

* **patient-level disjointness**: ``guard="refuse"`` (default) raises when a test patient (or case) is in the
  bank; ``guard="exclude"`` evaluates case by case, excluding the test case's patient and case from retrieval.
  Patient ids come from the manifest (``patient``/``patient_id``; else the case name stands in).
* same cases, click seeds (the evaluation's ``unit_rng``), checkpoint, placements and protocol as the run
  without memory: give each setting its own ``name`` in one results folder.
* every retrieval of the evaluated structures (model, protocol, case, structure, label value, placement, the
  entries found, distances, weights) goes to ``memory_retrievals.jsonl`` in the results folder, so one can check
  *what* was retrieved (e.g. the same organ of another patient); the warm-up on a blank input is not recorded.
  A structure's lines are written with its results; those of a structure an interrupted run did not finish are
  removed when it is evaluated again, so a resumed run's journal equals an uninterrupted one's.
* the results' name stands for the model with this memory: results of that name made with another bank (by
  its contents), rule, k, local ratio, retrieval or guard are refused, as results of another checkpoint are.

:func:`paired_comparison` reads ``results.csv`` and compares two model names unit by unit: mean Dice after given
clicks, the mean paired difference with a 95 % bootstrap interval (resampling patients, or units when there are
fewer than 5 patients, which is then stated), a Wilcoxon signed-rank p-value, wins/ties/losses.
"""
from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..evaluation.results import check_model_checkpoint
from ..files import append_lines, complete_lines, parse_json, write_text_atomically
from .bank import MemoryBank, MemoryBankError, load_bank
from .build import read_provenance
from .plugin import attach_memory


def case_patients(source, cases) -> Dict[str, str]:
    """case name -> patient id (from a manifest's ``patient``/``patient_id``; the case name otherwise)."""
    provenance = read_provenance(source) if isinstance(source, (str, Path)) else []
    out = {}
    for number, case in enumerate(cases):
        info = provenance[number] if number < len(provenance) else {}
        out[case.name] = str(info.get("patient") or case.name)
    return out


def evaluate_with_memory(source, model, output, *, bank=None, name: Optional[str] = None, guard: str = "refuse",
                         k: int = 3, local_ratio: float = 0.3, rule: str = "attention", retrieval_mode: str = "knn",
                         seed_memory: int = 0, allow_other_encoder: bool = False,
                         patients: Optional[Dict[str, str]] = None, log: Callable[[str], None] = print,
                         **evaluate_kwargs) -> Dict:
    """Evaluate a built ``model`` on ``source`` (folder, manifest or cases) with the memory ``bank`` attached.

    ``bank``: a :class:`~.bank.MemoryBank`, a bank path, or None (memory off: a plain evaluation under ``name``).
    ``guard``: ``"refuse"`` or ``"exclude"`` (module docstring). ``patients``: case name -> patient id (default:
    from the manifest). Other keyword arguments go to ``evaluate_dataset`` (clicks, protocol, placement, seed,
    structures, ...). Returns the evaluation summary.
    """
    from ..evaluation import dataset as ds
    from ..evaluation.evaluate import evaluate_dataset

    if guard not in ("refuse", "exclude"):
        raise ValueError("guard must be 'refuse' or 'exclude'")
    cases = ds.find_cases(source) if isinstance(source, (str, Path)) else ds.as_cases(source)
    patients = dict(patients or case_patients(source, cases))
    name = name or model.config.name
    if bank is None:
        return evaluate_dataset(cases, model, output, name=name, log=log, **evaluate_kwargs)
    if not isinstance(bank, MemoryBank):
        bank = load_bank(bank, model, allow_other_encoder=allow_other_encoder)
    bank_patients = set(bank.entry_patients())
    bank_cases = set(bank.entry_cases())
    same_image = _same_images(bank, cases)  # test case name -> bank case names holding the very same image file
    shared = sorted({patients.get(c.name, c.name) for c in cases} & bank_patients)
    shared_cases = sorted(({c.name for c in cases} & bank_cases) | set(same_image))
    if guard == "refuse" and (shared or shared_cases):
        held = (f"the test patient(s) {', '.join(shared)}" + (f" (cases {', '.join(shared_cases)})" if shared_cases
                                                                else "")) if shared else \
            f"the images of test case(s) {', '.join(shared_cases)} (under other case names or patient ids)"
        raise MemoryBankError(
            f"the memory bank holds {held}"
            + ": results would leak the answer. Build the bank from other patients, or leave those entries out "
              "of retrieval for their own cases (--memory-guard exclude; guard='exclude' in Python).")
    handle = attach_memory(model, bank, k=k, local_ratio=local_ratio, rule=rule, retrieval_mode=retrieval_mode,
                           seed=seed_memory, allow_other_encoder=allow_other_encoder)
    folder = Path(output) if output is not None else None
    settings = dict(handle.settings(), guard=guard, model=name)
    # the results' name stands for the model *with this memory*: results made with another bank (by its
    # contents), rule, k, ratio or guard are refused under that name, as another checkpoint is
    memory = (f"memory bank {settings['bank_sha256'][:16]} ({settings['entries']} entries, block "
              f"{settings['block']}, {settings['descriptor']}), rule {settings['rule']}, k {settings['k']}, local "
              f"ratio {settings['local_ratio']:g}, retrieval {settings['retrieval']} (seed {settings['seed']}), "
              f"guard {guard}")
    evaluate_kwargs["checkpoint"] = f"{evaluate_kwargs.get('checkpoint') or 'unknown checkpoint'} with {memory}"
    try:
        check_model_checkpoint(folder, name, evaluate_kwargs["checkpoint"])
    except BaseException:
        handle.detach()
        raise
    journal = folder / "memory_retrievals.jsonl" if folder is not None else None
    current: Dict[str, object] = {}  # the structure being evaluated; empty during the warm-up on a blank input
    pending: List[str] = []  # its journal lines, written together with its results
    recorded: List[bool] = []
    unfinished: List[set] = []  # journal keys already on disk (read at the first structure this run starts)

    def started(meta):
        if folder is not None and not recorded:  # the settings once the evaluation has begun (not on a refusal)
            _record_settings(folder / "memory_settings.jsonl", settings)
            recorded.append(True)
        current.clear()
        current.update({key: meta[key] for key in ("protocol", "case", "structure", "value", "placement")})
        pending.clear()
        if journal is not None:
            if not unfinished:
                unfinished.append(_journal_keys(journal))
            key = _journal_key({"model": name, **current})
            if key in unfinished[0]:  # only structures not done yet start: these lines are of an interrupted try
                _drop_journal_lines(journal, key)
                unfinished[0].discard(key)

    def note(last):
        if journal is None or not current:
            return
        pending.extend(json.dumps({"model": name, **current, **item}) + "\n" for item in last)

    def finished(meta):
        if journal is not None and pending:
            append_lines(journal, "".join(pending))
        pending.clear()
        current.clear()

    handle.on_retrieval = note
    plots = evaluate_kwargs.pop("plots", True)
    try:
        if guard == "refuse":
            return evaluate_dataset(cases, model, output, name=name, log=log, plots=plots, on_unit=started,
                                    on_unit_done=finished, **evaluate_kwargs)
        # case by case, each into the same folder, whose summary then covers them all (a temporary one when
        # the caller keeps results in memory)
        with tempfile.TemporaryDirectory(prefix="fastsam3d-memory-") as scratch:
            into = output if output is not None else scratch
            summary, totals = None, {"seconds": 0.0, "structures_evaluated": 0, "model_clicks": 0}
            for number, case in enumerate(cases):
                handle.exclude(patients=[patients.get(case.name, case.name)],
                               cases=[case.name, *same_image.get(case.name, [])])
                current.clear()
                last = number == len(cases) - 1
                summary = evaluate_dataset([case], model, into, name=name, log=log, on_unit=started,
                                           on_unit_done=finished, plots=plots and last and output is not None,
                                           **evaluate_kwargs)
                for key in totals:
                    totals[key] += summary["runtime"][key]
            if summary is not None:  # the runtime of all the calls, as one plain evaluation would report it
                summary["runtime"] = dict(totals, scope="this evaluation, case by case", seconds_per_structure=(
                    totals["seconds"] / totals["structures_evaluated"] if totals["structures_evaluated"] else None),
                    torch_threads=summary["runtime"].get("torch_threads"))
            return summary
    finally:
        handle.detach()


def _record_settings(path: Path, settings: Dict) -> None:
    """Add ``settings`` as a line of ``path`` unless a run with these settings is recorded there (a resumed run)."""
    line = json.dumps(settings) + "\n"
    known = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    if line not in known:
        append_lines(path, line)


def _journal_key(item: Dict) -> tuple:
    """The structure a journal line belongs to (lines written before the protocol was recorded match none)."""
    return tuple(str(item.get(k)) for k in ("model", "protocol", "case", "value", "placement")) \
        if item.get("protocol") is not None else ()


def _journal_lines(journal: Path) -> List[str]:
    """The complete lines of the retrieval journal (a cut-off last line left out)."""
    if not journal.is_file():
        return []
    return complete_lines(journal)[0].splitlines(keepends=True)


def _line_key(line: str) -> tuple:
    try:
        item = parse_json(line)
    except ValueError:
        return ()
    return _journal_key(item) if isinstance(item, dict) else ()


def _journal_keys(journal: Path) -> set:
    """The structures with lines in the retrieval journal."""
    return {_line_key(line) for line in _journal_lines(journal)} - {()}


def _drop_journal_lines(journal: Path, key: tuple) -> None:
    """Rewrite the retrieval journal without the lines of structure ``key`` (an unfinished earlier try)."""
    kept = [line for line in _journal_lines(journal) if _line_key(line) != key]
    write_text_atomically(journal, "".join(kept))


def _same_images(bank: MemoryBank, cases) -> Dict[str, List[str]]:
    """Test case name -> the bank's case names whose image file has the same bytes (banks built before image
    checksums were recorded match nothing here: their guard compares names and patient ids only)."""
    from .build import image_sha256

    by_sha: Dict[str, List[str]] = {}
    for record in bank.cases:
        if isinstance(record, dict) and record.get("image_sha256"):
            by_sha.setdefault(str(record["image_sha256"]), []).append(str(record["case"]))
    if not by_sha:
        return {}
    out = {}
    for case in cases:
        try:
            found = by_sha.get(image_sha256(case.image))
        except OSError:  # unreadable here: the evaluation reports it for that case
            continue
        if found:
            out[case.name] = found
    return out


# ------------------------------------------------------------------------------------------------ statistics
def _read_rows(results) -> List[Dict[str, str]]:
    path = Path(results)
    if path.is_dir():
        path = path / "results.csv"
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _value_after(rows: List[Dict[str, str]], click: int, metric: str) -> float:
    """The metric after ``click`` clicks (the last row at or before it)."""
    best = None
    for row in rows:
        if int(row["click"]) <= click and (best is None or int(row["click"]) > int(best["click"])):
            best = row
    if best is None or best.get(metric) in ("", None):
        return float("nan")
    return float(best[metric])


def paired_comparison(results, base: str, other: str, *, clicks: Sequence[int] = (1, 3, 5),
                      metric: str = "dice_crop", placements: Optional[Sequence[str]] = None,
                      patients: Optional[Dict[str, str]] = None, n_boot: int = 5000, seed: int = 0) -> List[Dict]:
    """Unit-by-unit comparison of model names ``other`` vs ``base`` in a results folder or CSV.

    One dict per (placement, protocol, click): ``n`` paired units, ``patients``, ``base``/``other`` means,
    ``diff`` (other - base) with ``ci95`` (bootstrap over the ``patients`` (case name -> patient id) when there
    are >= 5, else over units; without ``patients`` each case counts as its own: ``ci_over`` says which),
    ``wilcoxon_p`` (None without scipy or with all differences 0), ``wins``/``ties``/``losses`` (|difference| <=
    0.001 is a tie).
    """
    rows = _read_rows(results)
    units: Dict[tuple, Dict[str, List[Dict[str, str]]]] = {}
    for row in rows:
        if row["model"] not in (base, other):
            continue
        if placements and row["placement"] not in placements:
            continue
        key = (row["placement"], row["protocol"], row["case"], row["value"])
        units.setdefault(key, {}).setdefault(row["model"], []).append(row)
    rng = np.random.default_rng(seed)
    out = []
    groups = sorted({(k[0], k[1]) for k in units})
    for placement, protocol in groups:
        paired = [(k, v) for k, v in units.items() if k[:2] == (placement, protocol) and base in v and other in v]
        for click in clicks:
            a = np.array([_value_after(v[base], click, metric) for _, v in paired])
            b = np.array([_value_after(v[other], click, metric) for _, v in paired])
            ok = np.isfinite(a) & np.isfinite(b)
            keys = [k for (k, _), good in zip(paired, ok) if good]
            a, b = a[ok], b[ok]
            diff = b - a
            who = np.array([(patients or {}).get(k[2], k[2]) for k in keys])
            distinct = sorted(set(who.tolist()))
            entry = {"placement": placement, "protocol": protocol, "click": int(click), "metric": metric,
                     "n": int(len(diff)), "patients": len(distinct), "base": base, "other": other,
                     "base_mean": float(a.mean()) if len(a) else None,
                     "other_mean": float(b.mean()) if len(b) else None,
                     "diff": float(diff.mean()) if len(diff) else None, "ci95": None, "ci_over": None,
                     "wilcoxon_p": None, "wins": int((diff > 1e-3).sum()), "ties": int((abs(diff) <= 1e-3).sum()),
                     "losses": int((diff < -1e-3).sum())}
            if len(diff) >= 2:
                if len(distinct) >= 5:
                    index = {p: np.flatnonzero(who == p) for p in distinct}
                    boots = []
                    for _ in range(n_boot):
                        pick = rng.choice(len(distinct), len(distinct), replace=True)
                        sel = np.concatenate([index[distinct[i]] for i in pick])
                        boots.append(diff[sel].mean())
                    entry["ci_over"] = "patients" if patients is not None else "cases (no patient ids given)"
                else:
                    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
                    entry["ci_over"] = f"units ({len(distinct)} patient(s): too few to resample patients)"
                lo, hi = np.percentile(np.asarray(boots), [2.5, 97.5])
                entry["ci95"] = [float(lo), float(hi)]
                try:
                    from scipy.stats import wilcoxon

                    if np.any(np.abs(diff) > 0):
                        entry["wilcoxon_p"] = float(wilcoxon(diff).pvalue)
                except ImportError:
                    pass
            out.append(entry)
    return out


def comparison_table(entries: List[Dict]) -> str:
    """Markdown table of :func:`paired_comparison` results."""
    def fmt(v, digits=3):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    lines = ["| placement | click | n | off | on | on - off [95 % CI] | Wilcoxon p | wins/ties/losses |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        ci = f" [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]" if e["ci95"] else ""
        diff = "-" if e["diff"] is None else f"{e['diff']:+.3f}"
        lines.append(f"| {e['placement']} | {e['click']} | {e['n']} | {fmt(e['base_mean'])} | {fmt(e['other_mean'])} | "
                     f"{diff}{ci} | {fmt(e['wilcoxon_p'], 3)} | {e['wins']}/{e['ties']}/{e['losses']} |")
    return "\n".join(lines)
