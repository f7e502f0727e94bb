"""The results folder of an evaluation: per-click CSV, skips, run settings, and the JSON summary.

Files (all in the output folder):

* ``results.csv``: one row per (model, case, structure, placement, protocol, click) with the columns of
  :data:`FIELDS`. A *unit* (one structure of one case, with one model, protocol and placement) is written as a
  whole after its last click, so an interrupted run loses at most the unit in progress; on loading, a unit with
  fewer rows than clicks, or a row with missing or extra fields, or a last line without its newline (a torn
  write: full disk, a kill mid-append) is dropped and recomputed.
* ``skipped.csv``: units not evaluated, with the reason (too small, missing, not on the model grid, ...).
* ``run.json``: settings that must stay the same for the rows to be comparable (clicks, seed, minimum voxels,
  the checkpoint of each model name) and the case files (for the overlay montage). They bind a rerun only once
  results exist: a run stopped before it finished any structure leaves nothing that a rerun with other settings
  would mix with.
* ``summary.json``: written by :func:`.summary.summarise` from all rows (see there).

Rerunning with the same output folder skips every unit already in ``results.csv`` or ``skipped.csv``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import FastSAM3DError
from ..files import append_lines, complete_lines, parse_json, write_text_atomically
from .metrics import NSD_MEASURE

FIELDS = ["model", "case", "structure", "value", "voxels", "placement", "protocol", "click", "click_r", "click_a",
          "click_s", "click_label", "dice_crop", "iou_crop", "dice_full", "iou_full", "pred_iou", "encoded",
          "time_s", "nsd_full", "recall_full", "coverage", "regions"]
SKIP_FIELDS = ["model", "case", "structure", "value", "placement", "protocol", "reason"]
FLOAT_FIELDS = ("click_r", "click_a", "click_s", "dice_crop", "iou_crop", "dice_full", "iou_full", "pred_iou",
                "time_s", "nsd_full", "recall_full", "coverage")
INT_FIELDS = ("voxels", "click", "click_label", "encoded")
METRICS = ("dice_crop", "iou_crop", "dice_full", "iou_full")
PLACEMENT_TITLES = {"gt": "ground-truth-centred ROI", "click": "click-centred ROI (interactive session)",
                    "grow": "regions grown from the clicks (session with growth)"}


class EvaluationStateError(FastSAM3DError):
    """The output folder holds results made with other settings; mixing them would be wrong."""


def unit_key(row: Dict) -> tuple:
    """Identity of a unit: (model, protocol, placement, case, structure value)."""
    return (str(row["model"]), str(row["protocol"]), str(row["placement"]), str(row["case"]), str(row["value"]))


def _parse(row: Dict[str, str]) -> Dict:
    if None in row or any(value is None for value in row.values()):
        raise ValueError("a row with missing or extra fields")  # cut off, or two rows glued together
    out = dict(row)
    for name in FLOAT_FIELDS:
        text = row.get(name, "")
        out[name] = float(text) if text not in ("", None) else float("nan")
    for name in INT_FIELDS:
        text = row.get(name, "")
        out[name] = int(text) if text not in ("", None) else -1
    return out


def skip_value(value):
    """A skip record's ``value`` as one type: an int for an integer label value (also when read back from
    ``skipped.csv`` as text), else unchanged (a selector such as ``1;2`` or ``*``)."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return value


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def _csv_text(fields, rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k, "")) for k in fields})
    return buffer.getvalue()


def json_clean(value):
    """``value`` with NaN/inf replaced by None (strict JSON) and numpy scalars made Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _refuse_another_checkpoint(folder, settings: Dict, model_name: str, checkpoint: Optional[str],
                               stored_models) -> None:
    """EvaluationStateError when ``settings`` (a run.json) hold ``model_name``'s results from another checkpoint
    (only when ``stored_models`` holds that name: a run that finished no structure left nothing to mix with)."""
    known = settings.get("models", {}).get(model_name) if model_name in stored_models else None
    if known and checkpoint and known != "unknown" and checkpoint != "unknown" and known != checkpoint:
        if " with memory bank " in checkpoint and " with memory bank " not in known:
            raise EvaluationStateError(
                f"{folder} holds results of '{model_name}' written by an older FastSAM3D that did not record which "
                "memory bank and memory settings made them, so they cannot be continued: use another --output "
                "folder.")
        raise EvaluationStateError(
            f"{folder} holds results of '{model_name}' with checkpoint {known}, not {checkpoint}. Use "
            "another --output folder, or store these under another name (--name).")


def check_model_checkpoint(folder: Optional[Path], model_name: str, checkpoint: Optional[str]) -> None:
    """Refuse, as :meth:`ResultStore.check_settings` will, results of ``model_name`` from another checkpoint in
    ``folder``; reads its run.json and results.csv only and changes nothing (for checks before anything is
    written)."""
    if folder is None:
        return
    run_json = Path(folder) / "run.json"
    if run_json.is_file():
        try:
            settings = parse_json(run_json.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return  # damaged: the store says so with its own message
        if isinstance(settings, dict):
            units = _read_units(Path(folder) / "results.csv")[0]
            clicks = settings.get("clicks")
            stored = _stored_models(units, clicks) if isinstance(clicks, int) else {k[0] for k in units}
            _refuse_another_checkpoint(folder, settings, model_name, checkpoint, stored)


def _read_units(path: Path) -> tuple:
    """(unit key -> parsed rows, number of data lines, header, whether a cut-off last line was left out) of a
    results.csv; rows with missing or extra fields are left out of the units too."""
    if not path.is_file():
        return OrderedDict(), 0, list(FIELDS), False
    text, cut = complete_lines(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    raw = list(reader)
    header = list(reader.fieldnames or [])
    units: Dict[tuple, List[Dict]] = OrderedDict()
    for row in raw:
        try:
            parsed = _parse(row)
            units.setdefault(unit_key(parsed), []).append(parsed)
        except (TypeError, ValueError, KeyError):
            continue  # a torn or glued line: its unit is incomplete and dropped
    return units, len(raw), header, cut


def _complete_units(units: Dict[tuple, List[Dict]], clicks: int) -> List[List[Dict]]:
    """The units of ``units`` holding exactly clicks 1..``clicks``."""
    return [rows for rows in units.values() if sorted(r["click"] for r in rows) == list(range(1, clicks + 1))]


def _stored_models(units: Dict[tuple, List[Dict]], clicks: int) -> set:
    """Names of the models with at least one finished unit (complete under the folder's recorded ``clicks``)."""
    return {str(rows[0]["model"]) for rows in _complete_units(units, int(clicks))}


def _case_files(case) -> Dict[str, str]:
    """The resolved image and label files of a case, as run.json records them."""
    return {"image": str(Path(case.image).resolve()), "label": str(Path(case.label).resolve())}


class ResultStore:
    """Rows and skips of an evaluation, kept in memory and (with a folder) on disk, resumable.

    Reading a folder changes nothing in it: the files are rewritten (incomplete units dropped, an older header
    updated) only once :meth:`check_settings` has accepted the new run's settings, so a refused run leaves the
    folder as it was. A skipped unit is not done: a rerun decides it again (its input may have been fixed), and
    its record is replaced, or removed when the unit is evaluated.
    """

    def __init__(self, folder: Optional[Path], clicks: int) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.clicks = int(clicks)
        self.rows: List[Dict] = []
        loaded_skips: List[Dict] = []
        self.settings: Dict = {}
        self.dropped_units = 0
        self._rewrite_results = False
        self._stored_models: set = set()  # models with finished units in results.csv
        self._skips_damaged = False  # skipped.csv held a cut-off or malformed line: rewritten at the next flush
        if self.folder is not None:
            if self.folder.exists() and not self.folder.is_dir():
                raise EvaluationStateError(f"{self.folder} is a file, not a folder: choose another --output folder.")
            if self.folder.is_dir():
                loaded_skips = self._load()
        self._done = {unit_key(r) for r in self.rows}
        self._skips: Dict[tuple, Dict] = OrderedDict((unit_key(r), r) for r in loaded_skips)
        self._skips_changed = len(self._skips) != len(loaded_skips) or self._skips_damaged  # duplicates, torn line
        self._final_skips = {k for k, r in self._skips.items() if str(r.get("reason", "")).startswith("too small")}

    @property
    def skipped(self) -> List[Dict]:
        """The skip records (one per unit, each with its ``reason``)."""
        return list(self._skips.values())

    # ----------------------------------------------------------------- files
    @property
    def results_csv(self) -> Optional[Path]:
        """``results.csv``: the per-click rows (None without a folder)."""
        return self.folder / "results.csv" if self.folder else None

    @property
    def skipped_csv(self) -> Optional[Path]:
        """``skipped.csv``: skipped units and their reasons (None without a folder)."""
        return self.folder / "skipped.csv" if self.folder else None

    @property
    def run_json(self) -> Optional[Path]:
        """``run.json``: settings and case files (None without a folder)."""
        return self.folder / "run.json" if self.folder else None

    def _load(self) -> List[Dict]:
        """Read the folder's settings and rows (changing nothing); returns its skip records."""
        if self.run_json.is_file():
            try:
                self.settings = parse_json(self.run_json.read_text(encoding="utf-8"))
                if not isinstance(self.settings, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise EvaluationStateError(f"{self.run_json} is damaged ({exc}), so the results in {self.folder} "
                                           "cannot be continued: choose another --output folder.") from None
        if self.results_csv.is_file():
            units, lines, header, cut = _read_units(self.results_csv)
            complete = _complete_units(units, self.clicks)
            self.dropped_units = len(units) - len(complete)
            self.rows = [r for rows in complete for r in rows]
            recorded = self.settings.get("clicks")
            self._stored_models = _stored_models(units, recorded if isinstance(recorded, int) else self.clicks)
            # (older files: no nsd_full) rewritten once the settings are accepted
            self._rewrite_results = bool(self.dropped_units or len(self.rows) != lines or header != FIELDS or cut)
        if not self.skipped_csv.is_file():
            return []
        text, cut = complete_lines(self.skipped_csv)
        records = list(csv.DictReader(io.StringIO(text, newline="")))
        kept = [dict(r, value=skip_value(r.get("value"))) for r in records
                if r.get("reason") and None not in r and all(v is not None for v in r.values())]
        self._skips_damaged = cut or len(kept) != len(records)
        return kept

    def check_settings(self, settings: Dict, model_name: str, checkpoint: Optional[str]) -> None:
        """Refuse to add rows made with other settings; record the settings and this model's checkpoint.

        Only settings under which results were stored bind: those of a run that finished no structure (its
        run.json alone) are replaced."""
        old = self.settings
        has_rows = bool(self._stored_models)
        binding = {"clicks": has_rows, "seed": has_rows, "min_voxels": has_rows or bool(self._final_skips)}
        for key in ("clicks", "seed", "min_voxels"):
            if binding[key] and key in old and old[key] != settings[key]:
                raise EvaluationStateError(
                    f"{self.folder} holds results made with {key}={old[key]}, not {settings[key]}. Use another "
                    f"--output folder, or the same {key} to continue that run.")
        tolerance = settings.get("nsd_tolerance_mm")
        known_tolerance = old.get("nsd_tolerance_mm") if has_rows else None
        if tolerance is not None and known_tolerance is not None and tolerance != known_tolerance:
            raise EvaluationStateError(
                f"{self.folder} holds NSD values at a tolerance of {known_tolerance} mm, not {tolerance} mm. Use "
                "another --output folder, or the same --nsd-tolerance.")
        if known_tolerance is not None and old.get("nsd_measure") != NSD_MEASURE:  # whatever this run measures:
            raise EvaluationStateError(  # its summary would report those values as the challenge's NSD
                f"{self.folder} holds NSD values of an earlier measure (border voxels, before 2026-12), not the "
                "challenge's (surface elements weighted by area): use another --output folder.")
        protocol = settings.get("protocol")
        if tolerance is not None and protocol is not None and any(
                r["protocol"] == protocol and not math.isfinite(r["nsd_full"]) for r in self.rows):
            raise EvaluationStateError(
                f"{self.folder} holds {protocol} results without NSD, which would count as done: to get NSD, use "
                "another --output folder (or leave out --nsd-tolerance to continue this one).")
        _refuse_another_checkpoint(self.folder, old, model_name, checkpoint, self._stored_models)
        merged = dict(old)
        merged.update({k: settings[k] for k in ("clicks", "seed", "min_voxels")})
        if tolerance is not None:
            merged["nsd_tolerance_mm"], merged["nsd_measure"] = tolerance, NSD_MEASURE
        elif not has_rows:
            merged.pop("nsd_tolerance_mm", None)  # no NSD values stored under the old tolerance
            merged.pop("nsd_measure", None)
        merged["models"] = dict(merged.get("models") or {})
        if checkpoint or model_name not in merged["models"] or model_name not in self._stored_models:
            merged["models"][model_name] = checkpoint or "unknown"
        self.settings = merged
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        if self._rewrite_results:
            write_text_atomically(self.results_csv, _csv_text(FIELDS, self.rows))
            self._rewrite_results = False
        self._save_settings()

    def check_cases(self, cases) -> None:
        """Refuse cases whose names the folder holds for other image or label files (changing nothing): a unit is
        known by its case name, so results of other data under the same name would count as already done."""
        known = self.settings.get("cases", {})
        for case in cases:
            files = _case_files(case)
            recorded = known.get(case.name)
            if isinstance(recorded, dict):
                other = [key for key in ("image", "label") if recorded.get(key) and recorded[key] != files[key]]
                if other:
                    key = other[0]
                    raise EvaluationStateError(
                        f"{self.folder} holds results of case '{case.name}' with the {key} {recorded[key]}, not "
                        f"{files[key]}. Use another --output folder for other data (or give the same files "
                        "to continue that run).")

    def record_cases(self, cases) -> None:
        """Remember the image and label files of the cases (the montage reads them back)."""
        known = self.settings.setdefault("cases", {})
        for case in cases:
            known[case.name] = _case_files(case)
        self._save_settings()

    def _save_settings(self) -> None:
        if self.folder is not None:
            write_text_atomically(self.run_json, json.dumps(json_clean(self.settings), indent=1) + "\n")

    # ----------------------------------------------------------------- units
    def is_done(self, key: tuple) -> bool:
        """True when the unit ``key`` (see :func:`unit_key`) is already evaluated, or skipped as too small (a
        property of the data under the run's checked ``min_voxels``); other skips are decided again."""
        return key in self._done or key in self._final_skips

    def add_unit(self, rows: List[Dict]) -> None:
        """Append the rows of one finished unit (all its clicks); a former skip of it is forgotten."""
        if len(rows) != self.clicks:
            raise ValueError(f"a unit has {len(rows)} rows, expected {self.clicks}")
        self._append(self.results_csv, FIELDS, rows)
        self.rows.extend(rows)
        self._done.add(unit_key(rows[0]))
        self._stored_models.add(str(rows[0]["model"]))
        self.forget_skip(unit_key(rows[0]))

    def add_skip(self, record: Dict) -> None:
        """Record a unit that was not evaluated, with its ``reason`` (replacing an earlier record of it)."""
        key, record = unit_key(record), dict(record)
        record["value"] = skip_value(record.get("value"))
        if key in self._skips:
            if self._skips[key] != record:
                self._skips[key] = record
                self._skips_changed = True
        else:
            self._skips[key] = record
            if not self._skips_changed:  # the file holds every record so far: one more line is enough
                self._append(self.skipped_csv, SKIP_FIELDS, [record])

    def forget_skip(self, key: tuple) -> None:
        """Remove the skip record of unit ``key``, if any (it was evaluated, or its input was fixed)."""
        if self._skips.pop(key, None) is not None:
            self._skips_changed = True

    def forget_case_skips(self, model: str, protocol: str, placements, case: str) -> None:
        """Forget the skips of ``case`` that a run of ``model``/``protocol``/``placements`` decides again (all but
        the final ones), also those recorded under a selector rather than a value."""
        wanted = {str(p) for p in placements}
        for key in [k for k in self._skips if k[0] == str(model) and k[1] == str(protocol) and k[2] in wanted
                    and k[3] == str(case) and k not in self._final_skips]:
            del self._skips[key]
            self._skips_changed = True

    def flush(self) -> None:
        """Rewrite ``skipped.csv`` once when records were replaced or removed (appends are written at once)."""
        if self._skips_changed and self.skipped_csv is not None:
            write_text_atomically(self.skipped_csv, _csv_text(SKIP_FIELDS, self.skipped))
        self._skips_changed = False

    @staticmethod
    def _append(path: Optional[Path], fields, rows) -> None:
        """Append ``rows`` on a fresh line (a cut-off last line is cut away first); on a failure (full disk...)
        the file is cut back to its former end and :class:`~FastSAM3DLib.errors.OutputFileError` names it."""
        if path is not None:
            append_lines(path, _csv_text(fields, rows), header_lines=1)


def safe_name(text: str) -> str:
    """``text`` made safe as a file name (letters, digits, ``._+-``; anything else becomes ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")
    return cleaned or "_"


def prediction_path(folder: Path, model: str, protocol: str, placement: str, case: str, value,
                    structure: str) -> Path:
    """Where the prediction after the last click of a unit is saved (a label image on the source grid)."""
    parts = [safe_name(p) for p in str(case).split("/") if p]
    return Path(folder, "predictions", safe_name(model), protocol, placement, *parts,
                f"{value}_{safe_name(structure)}.nii.gz")
