"""Resuming an evaluation: torn results.csv rows, failed appends, runs that finished nothing, the memory
retrieval journal, skip records read back, and the cvpr25 plot's AUC (the numbers summary.json reports)."""
import csv
import errno
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FastSAM3DLib import build_model
from FastSAM3DLib.errors import OutputFileError
from FastSAM3DLib.evaluation.evaluate import evaluate_dataset
from FastSAM3DLib.evaluation.results import FIELDS, EvaluationStateError, ResultStore, check_model_checkpoint, unit_key
from FastSAM3DLib.evaluation.summary import summarise

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(placement="gt", plots=False, progress=False, save_predictions=False, log=lambda s: None)


# ------------------------------------------------------------------------------------------------------ helpers


def _row(case, value, click, dice):
    """A results row with every field filled in (so that a cut inside any field shows)."""
    return {"model": "m", "case": case, "structure": f"s{value}", "value": value, "voxels": 1234,
            "placement": "gt", "protocol": "fastsam3d", "click": click, "click_r": 1.25, "click_a": -2.5,
            "click_s": 3.75, "click_label": 1, "dice_crop": dice, "iou_crop": dice / 2, "dice_full": dice,
            "iou_full": dice / 2, "pred_iou": 0.875, "encoded": int(click == 1), "time_s": 0.5,
            "nsd_full": 0.625, "recall_full": 0.75, "coverage": 0.8125, "regions": 12}


def _unit(case, value, clicks=2):
    return [_row(case, value, c, 0.1 * value + 0.01 * c) for c in range(1, clicks + 1)]


def _store(folder, clicks=2, checkpoint="a.pth"):
    store = ResultStore(folder, clicks)
    store.check_settings({"clicks": clicks, "seed": 1, "min_voxels": 10}, "m", checkpoint)
    return store


def _lines_well_formed(path):
    """Every data line of a CSV has exactly the header's fields (nothing glued, nothing cut)."""
    rows = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    return all(len(r) == len(rows[0]) for r in rows[1:])


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny-test", seed=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One small image with labels 1, 2, 3 (and 9: three voxels, too small) and its label file."""
    folder = tmp_path_factory.mktemp("pair")
    shape = (20, 24, 26)
    k, j, i = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    labels[(((k - 10) / 5) ** 2 + ((j - 9) / 6) ** 2 + ((i - 9) / 6) ** 2) < 1] = 1
    labels[6:14, 14:21, 15:23] = 2
    labels[2:6, 2:8, 18:24] = 3
    labels[17, 20, 2:5] = 9
    image = (np.random.default_rng(0).normal(40, 10, shape) + 150 * (labels > 0)).astype(np.int16)
    for name, array in (("ct.nii.gz", image), ("ct_seg.nii.gz", labels)):
        written = sitk.GetImageFromArray(array)
        written.SetSpacing((1.5, 1.4, 2.0))
        sitk.WriteImage(written, str(folder / name))
    return [(folder / "ct.nii.gz", folder / "ct_seg.nii.gz")]


def _timeless(folder):
    with open(Path(folder) / "results.csv", newline="") as stream:
        rows = [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(stream)]
    return sorted(rows, key=lambda r: (r["placement"], int(r["value"]), int(r["click"])))


# ------------------------------------------------------------------------------------------------------ torn rows


def test_a_results_file_cut_anywhere_in_its_last_unit_drops_that_unit(tmp_path):
    """A row cut inside a field (full disk, kill mid-append) still had all its commas, or lost its last fields
    (read as NaN / -1): the unit was taken as finished, with values that were never computed."""
    store = _store(tmp_path)
    store.add_unit(_unit("c", 1))
    store.add_unit(_unit("c", 2))
    text = (tmp_path / "results.csv").read_text()
    start = len("".join(text.splitlines(keepends=True)[:-2]))  # where the last unit begins
    last = unit_key(_row("c", 2, 1, 0.0))
    for cut in range(start, len(text)):
        (tmp_path / "results.csv").write_text(text[:cut])
        loaded = ResultStore(tmp_path, 2)
        assert not loaded.is_done(last), (cut, text[cut - 10:cut])
        assert loaded.is_done(unit_key(_row("c", 1, 1, 0.0)))
        assert len(loaded.rows) == 2
    (tmp_path / "results.csv").write_text(text)
    assert ResultStore(tmp_path, 2).is_done(last)


def test_a_row_cut_inside_a_character_of_a_name_is_dropped_not_an_error(tmp_path):
    """The file was decoded before its cut-off line was dropped: a cut inside "é" raised UnicodeDecodeError."""
    store = _store(tmp_path)
    store.add_unit(_unit("c", 1))
    store.add_unit([dict(r, structure="rein é") for r in _unit("c", 2)])
    data = (tmp_path / "results.csv").read_bytes()
    (tmp_path / "results.csv").write_bytes(data[:data.rindex("é".encode()) + 1])  # half of the two bytes
    loaded = ResultStore(tmp_path, 2)
    assert loaded.is_done(unit_key(_row("c", 1, 1, 0.0))) and not loaded.is_done(unit_key(_row("c", 2, 1, 0.0)))
    check_model_checkpoint(tmp_path, "m", "a.pth")


def test_the_next_append_after_a_cut_row_starts_on_a_fresh_line(tmp_path):
    """The next unit was glued onto the cut line: its first row was lost and it was redone on every rerun."""
    store = _store(tmp_path)
    store.add_unit(_unit("c", 1))
    store.add_unit(_unit("c", 2))
    text = (tmp_path / "results.csv").read_text()
    (tmp_path / "results.csv").write_text(text[:-7])  # inside the last field of the last row
    resumed = _store(tmp_path)
    assert resumed.dropped_units == 1
    resumed.add_unit(_unit("c", 2))
    resumed.add_unit(_unit("c", 3))
    assert _lines_well_formed(tmp_path / "results.csv")
    again = ResultStore(tmp_path, 2)
    assert again.dropped_units == 0 and len(again.rows) == 6
    assert all(again.is_done(unit_key(_row("c", v, 1, 0.0))) for v in (1, 2, 3))
    assert (tmp_path / "results.csv").read_text().startswith(text)  # the same rows, rewritten whole


def test_append_lines_cuts_a_torn_last_line_and_writes_the_header_once(tmp_path):
    from FastSAM3DLib.files import append_lines

    path = tmp_path / "log.csv"
    append_lines(path, "a,b\n1,2\n", header_lines=1)
    append_lines(path, "a,b\n3,4\n", header_lines=1)
    assert path.read_text() == "a,b\n1,2\n3,4\n"
    path.write_text("a,b\n1,2\n3,")  # cut inside its last line
    append_lines(path, "a,b\n5,6\n", header_lines=1)
    assert path.read_text() == "a,b\n1,2\n5,6\n"
    path.write_text("a,")  # not even the header is whole
    append_lines(path, "a,b\n7,8\n", header_lines=1)
    assert path.read_text() == "a,b\n7,8\n"


_APPENDER = """
import sys
from pathlib import Path
if sys.argv[3] == "windows":
    sys.path.insert(0, sys.argv[4])
    from windows_files import windows_byte_locks
    windows_byte_locks()
from FastSAM3DLib.files import append_lines
name, path = sys.argv[1], Path(sys.argv[2])
for i in range(400):
    append_lines(path, "a,b\\n" + "".join(f"{name},{i},{j},{'x' * 200}\\n" for j in range(3)), header_lines=1)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the test emulates Windows' byte locks with POSIX ones")
@pytest.mark.parametrize("platform", ["posix", "windows"])
def test_two_processes_appending_to_one_file_lose_no_line(tmp_path, platform):
    """Two evaluations into one folder append to one results.csv: cutting a torn last line must never cut a line
    the other process is still writing (each append holds the file's lock: flock, or on Windows, which has none
    and where appends went unlocked, a byte lock through msvcrt)."""
    path = tmp_path / "results.csv"
    writers = [subprocess.Popen([sys.executable, "-c", _APPENDER, name, str(path), platform,
                                 str(Path(__file__).parent)], cwd=REPO) for name in "AB"]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    lines = path.read_text().splitlines()
    assert lines[0] == "a,b" and len(lines) == 1 + 2 * 400 * 3
    assert sorted(lines[1:]) == sorted(f"{n},{i},{j},{'x' * 200}" for n in "AB" for i in range(400) for j in range(3))


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE (a file size limit) is POSIX")
def test_a_full_disk_while_appending_names_the_file_and_leaves_no_half_row(tmp_path):
    """With a file size limit (as a full disk) the append failed with a bare 'File too large' and left a half
    row, which the next run read as a finished structure."""
    store = _store(tmp_path)
    store.add_unit(_unit("c", 1))
    before = (tmp_path / "results.csv").read_bytes()
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_evaluation_resume import _store, _unit
        store = _store({str(tmp_path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 100}, resource.RLIM_INFINITY))
        try:
            store.add_unit(_unit("c", 2))
        except Exception as exc:
            print(json.dumps([type(exc).__name__, str(exc), getattr(exc, "errno", None), len(store.rows)]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, message, code, rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "OutputFileError" and code == errno.EFBIG, message
    assert str(tmp_path / "results.csv") in message and "ulimit" in message
    assert rows == 2  # the unit that could not be written is not counted as done
    assert (tmp_path / "results.csv").read_bytes() == before
    resumed = _store(tmp_path)
    resumed.add_unit(_unit("c", 2))
    assert _lines_well_formed(tmp_path / "results.csv") and len(ResultStore(tmp_path, 2).rows) == 4


def test_a_failed_append_raises_the_output_error_and_keeps_the_file(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.add_unit(_unit("c", 1))
    before = (tmp_path / "results.csv").read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(OutputFileError, match="results.csv: No space left"):
        store.add_unit(_unit("c", 2))
    monkeypatch.undo()
    assert (tmp_path / "results.csv").read_bytes() == before
    assert not store.is_done(unit_key(_row("c", 2, 1, 0.0))) and len(store.rows) == 2


def test_an_evaluation_resumed_after_a_cut_row_equals_an_uninterrupted_one(tiny, pair, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    evaluate_dataset(pair, tiny, whole, clicks=2, structures=["1", "2"], **QUIET)
    evaluate_dataset(pair, tiny, cut, clicks=2, structures=["1", "2"], **QUIET)
    text = (cut / "results.csv").read_text()
    last = text.rstrip("\n").rfind("\n") + 1
    inside = last + len(",".join(text[last:].split(",")[:FIELDS.index("dice_full")])) + 4
    (cut / "results.csv").write_text(text[:inside])  # the write stopped inside the last row's dice_full
    evaluate_dataset(pair, tiny, cut, clicks=2, structures=["1", "2"], **QUIET)
    assert _timeless(cut) == _timeless(whole)
    assert _lines_well_formed(cut / "results.csv")


# ------------------------------------------------------------------------------------------------------ settings


def _interrupted(pair, model, out, **kwargs):
    """An evaluation stopped (Ctrl+C) when its first structure starts: run.json is written, no result."""
    def stop(meta):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(pair, model, out, structures=["1"], on_unit=stop, **QUIET, **kwargs)
    assert (out / "run.json").is_file() and not (out / "results.csv").exists()


@pytest.mark.parametrize("first, second", [
    (dict(checkpoint="wrong.pth"), dict(checkpoint="right.pth")),
    (dict(clicks=3), dict(clicks=2)),
    (dict(seed=5), dict(seed=6)),
    (dict(min_voxels=4), dict(min_voxels=10)),
    (dict(nsd_tolerance_mm=1.0), dict(nsd_tolerance_mm=2.0)),
])
def test_a_run_that_finished_nothing_does_not_block_the_corrected_rerun(tiny, pair, tmp_path, first, second):
    """run.json of a run stopped before any structure finished refused the rerun with 'holds results of ...'."""
    out = tmp_path / "eval"
    base = dict(clicks=2, checkpoint="right.pth")
    _interrupted(pair, tiny, out, **{**base, **first})
    check_model_checkpoint(out, "tiny-test", "right.pth")  # the memory evaluation's early check agrees
    summary = evaluate_dataset(pair, tiny, out, structures=["1"], **QUIET, **{**base, **second})
    assert summary["runtime"]["structures_evaluated"] == 1
    settings = json.loads((out / "run.json").read_text())
    assert settings["models"]["tiny-test"] == "right.pth"
    assert all(settings[k] == v for k, v in {**base, **second}.items() if k in ("clicks", "seed", "min_voxels"))
    assert settings.get("nsd_tolerance_mm") == second.get("nsd_tolerance_mm")
    # now there are results: other settings are refused as before, and the folder is left as it is
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(EvaluationStateError, match="holds"):
        evaluate_dataset(pair, tiny, out, structures=["1"], **QUIET, **{**base, **first})
    if "checkpoint" in first:
        with pytest.raises(EvaluationStateError, match="checkpoint right.pth, not wrong.pth"):
            check_model_checkpoint(out, "tiny-test", "wrong.pth")
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_skips_too_small_under_a_minimum_still_bind_that_minimum(tiny, pair, tmp_path):
    """A 'too small' skip counts as done: a folder holding only such skips keeps its min_voxels."""
    out = tmp_path / "eval"
    evaluate_dataset(pair, tiny, out, clicks=1, structures=["9"], **QUIET)
    assert not (out / "results.csv").exists() and "too small" in (out / "skipped.csv").read_text()
    with pytest.raises(EvaluationStateError, match="min_voxels=10"):
        evaluate_dataset(pair, tiny, out, clicks=1, structures=["9"], min_voxels=2, **QUIET)
    evaluate_dataset(pair, tiny, out, clicks=1, structures=["9"], seed=3, checkpoint="other.pth", **QUIET)


# ------------------------------------------------------------------------------------------------------ skips


def test_skipped_values_have_one_type_in_every_run(tiny, pair, tmp_path):
    """summary.json's skipped[].value was an int after a fresh run and a string after any rerun."""
    out = tmp_path / "eval"
    args = dict(clicks=1, structures=["9", "4", "nothing*"], **QUIET)
    first = evaluate_dataset(pair, tiny, out, **args)
    second = evaluate_dataset(pair, tiny, out, **args)
    values = sorted((type(s["value"]).__name__, str(s["value"])) for s in first["skipped"])
    assert values == [("int", "4"), ("int", "9"), ("str", "nothing*")]
    in_order = lambda records: sorted(records, key=lambda s: str(s["value"]))  # noqa: E731 (rerun: new order)
    assert in_order(second["skipped"]) == in_order(first["skipped"])
    assert in_order(json.loads((out / "summary.json").read_text())["skipped"]) == in_order(first["skipped"])


# ------------------------------------------------------------------------------------------------------ journal


def test_the_memory_journal_of_a_resumed_run_equals_an_uninterrupted_ones(tiny, tmp_path, monkeypatch):
    """The retrievals of the structure being evaluated when the run stopped were journaled twice."""
    from test_memory import _write_case

    from FastSAM3DLib.evaluation import results
    from FastSAM3DLib.memory import build_bank
    from FastSAM3DLib.memory.evaluation import evaluate_with_memory

    data = tmp_path / "data"
    data.mkdir()
    train = _write_case(data, "a1", 0, [((18, 20, 20), 6)])
    test = _write_case(data, "b1", 2, [((20, 18, 22), 5), ((10, 28, 12), 4), ((26, 10, 30), 4)])
    (data / "train.json").write_text(json.dumps([dict(train, patient="P1")]))
    (data / "test.json").write_text(json.dumps([dict(test, patient="P2")]))
    bank = build_bank(data / "train.json", tiny, log=lambda s: None)
    common = dict(bank=bank, name="on", clicks=2, placement="gt", plots=False, progress=False,
                  save_predictions=False, log=lambda s: None)
    evaluate_with_memory(data / "test.json", tiny, tmp_path / "whole", **common)

    real, calls = results.ResultStore.add_unit, []

    def killed_before_the_second_units_rows(self, rows):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # its retrievals are journaled, its rows are not written
        return real(self, rows)

    monkeypatch.setattr(results.ResultStore, "add_unit", killed_before_the_second_units_rows)
    with pytest.raises(KeyboardInterrupt):
        evaluate_with_memory(data / "test.json", tiny, tmp_path / "part", **common)
    monkeypatch.undo()
    journal = tmp_path / "part" / "memory_retrievals.jsonl"
    journal.write_text(journal.read_text() + '{"model": "on", "cas')  # and a cut-off line
    evaluate_with_memory(data / "test.json", tiny, tmp_path / "part", **common)

    def lines(folder):
        return [json.loads(line) for line in (folder / "memory_retrievals.jsonl").read_text().splitlines()]

    whole, resumed = lines(tmp_path / "whole"), lines(tmp_path / "part")
    assert len(whole) == 3  # one retrieval per structure (the encoder runs once on its crop)
    assert [(r["value"], r["rows"]) for r in resumed] == [(r["value"], r["rows"]) for r in whole]
    for a, b in zip(whole, resumed):
        assert a.keys() == b.keys() and all(
            np.allclose(a[k], b[k]) if k in ("distances", "weights") else a[k] == b[k] for k in a)
    assert _timeless(tmp_path / "part") == _timeless(tmp_path / "whole")
    settings = [(tmp_path / f / "memory_settings.jsonl").read_text().splitlines() for f in ("whole", "part")]
    assert len(settings[0]) == len(settings[1]) == 1  # the resumed run's settings are recorded once


# ------------------------------------------------------------------------------------------------------ plot


def test_the_cvpr25_plot_legend_gives_the_summarys_challenge_auc(tmp_path, monkeypatch):
    """The legend averaged per structure and left out 'NSD := 0 unless the case's DSC > 0.2'."""
    pytest.importorskip("matplotlib")
    from FastSAM3DLib.evaluation import plots

    rows = []
    for click in range(1, 6):
        rows.append(dict(_row("A", 1, click, 0.15), protocol="cvpr25", nsd_full=0.5))  # poor DSC: NSD counts 0
        for value in (1, 2, 3):
            rows.append(dict(_row("B", value, click, 0.9), protocol="cvpr25", nsd_full=0.95))
    challenge = summarise(rows, [], 5, {})["results"]["m"]["cvpr25"]["gt"]["overall"]["cvpr25"]
    legends, real = {}, plots._save

    def grab(figure, path):
        for axis in figure.axes:
            legends[axis.get_title().split()[0]] = [t.get_text() for t in axis.get_legend().get_texts()]
        return real(figure, path)

    monkeypatch.setattr(plots, "_save", grab)
    assert plots.plot_challenge_curves(rows, tmp_path)
    assert legends["DSC"] == [f"m, gt ROI: challenge AUC {challenge['dsc_auc']:.2f} (n=4)"]
    assert legends["NSD"] == [f"m, gt ROI: challenge AUC {challenge['nsd_auc']:.2f} (n=4)"]
    assert not math.isclose(challenge["nsd_auc"], float(np.mean([0.5 * 4] + [0.95 * 4] * 3)))


def test_nsd_values_of_the_earlier_border_voxel_measure_are_not_continued(tiny, pair, tmp_path):
    """A folder whose NSD values were measured by border voxels (run.json without nsd_measure, before 2026-12)
    must not get values of the challenge's measure beside them, nor any other run: one without NSD (another
    protocol) rewrote the summary, which then reported the old values as the challenge's NSD. The folder is
    left as it was."""
    out = tmp_path / "eval"
    evaluate_dataset(pair, tiny, out, structures=["1"], clicks=2, nsd_tolerance_mm=2.0, **QUIET)
    settings = json.loads((out / "run.json").read_text())
    assert settings["nsd_measure"].startswith("surface elements")
    del settings["nsd_measure"]
    (out / "run.json").write_text(json.dumps(settings))
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    for nsd in ({"nsd_tolerance_mm": 2.0}, {}):
        with pytest.raises(EvaluationStateError, match="earlier measure"):
            evaluate_dataset(pair, tiny, out, clicks=2, **nsd, **QUIET)
        assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_a_plot_that_fails_while_saving_leaves_the_former_one(tmp_path, monkeypatch):
    """Plots were written in place: a run stopped while saving left half a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from FastSAM3DLib.evaluation import plots

    path = tmp_path / "dice_vs_clicks_fastsam3d.png"
    path.write_bytes(b"the former plot")
    figure = plt.figure()

    def cut_short(self, name, **kwargs):
        Path(name).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(figure), "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        plots._save(figure, path)
    plt.close(figure)
    assert path.read_bytes() == b"the former plot" and [p.name for p in tmp_path.iterdir()] == [path.name]


_HOLDER = """
import sys, time
from pathlib import Path
from FastSAM3DLib.weights.filelock import FileLock
lock = FileLock(Path(sys.argv[1]) / ".evaluate.lock")
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_evaluation_into_a_folder_being_written_is_refused(tiny, pair, tmp_path):
    """Two evaluations into one folder rewrote run.json and skipped.csv from their own view (one model's
    checkpoint record was lost); the second is refused and changes nothing, and a finished one leaves no lock."""
    out = tmp_path / "new" / "eval"
    locked = []  # a new folder is made and locked at once, not left open to a second run for the whole first one
    evaluate_dataset(pair, tiny, out, structures=["1"], clicks=2, on_unit=lambda meta: locked.append(
        (out / ".evaluate.lock").is_file()), **QUIET)
    assert locked == [True] and not (out / ".evaluate.lock").exists()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".evaluate.lock"}
        with pytest.raises(EvaluationStateError, match=f"Another evaluation is writing into .*process {holder.pid}"):
            evaluate_dataset(pair, tiny, out, clicks=2, **QUIET)
        after = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".evaluate.lock"}
        assert after == before
    finally:
        holder.kill()
        holder.wait()
    if os.environ.get("FASTSAM3D_EMULATE_WINDOWS") == "1":  # no flock: a dead holder is told only by its age
        with pytest.raises(EvaluationStateError, match=r"if none is running, delete .*\.evaluate\.lock"):
            evaluate_dataset(pair, tiny, out, clicks=2, **QUIET)
        return
    evaluate_dataset(pair, tiny, out, clicks=2, **QUIET)  # the holder is gone: its lock is broken
    assert not (out / ".evaluate.lock").exists()


def test_a_refused_evaluation_into_a_new_folder_leaves_no_folder(tiny, pair, tmp_path, monkeypatch):
    """The folder is made to be locked; a run refused before it wrote anything removes it again."""
    def refuse(self, cases):
        raise EvaluationStateError("refused")

    monkeypatch.setattr(ResultStore, "check_cases", refuse)
    with pytest.raises(EvaluationStateError, match="refused"):
        evaluate_dataset(pair, tiny, tmp_path / "new" / "eval", clicks=2, **QUIET)
    assert not (tmp_path / "new").exists()


def test_the_summary_says_when_the_auc_spans_another_number_of_clicks_than_the_challenges():
    assert "with 3 clicks the AUC spans all" in summarise([], [], 3)["metrics"]["cvpr25"]
    assert "AUC spans" not in summarise([], [], 5)["metrics"]["cvpr25"]


def test_an_evaluation_with_nsd_but_without_surface_distance_stops_before_it_starts(tiny, pair, tmp_path,
                                                                                     monkeypatch):
    """The ImportError came at the first structure's NSD, after the model had run, as a traceback."""
    from FastSAM3DLib.errors import FastSAM3DError

    monkeypatch.setitem(sys.modules, "surface_distance", None)
    with pytest.raises(FastSAM3DError, match=r"pip install surface-distance"):
        evaluate_dataset(pair, tiny, tmp_path / "eval", clicks=2, protocol="cvpr25", **QUIET)
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="appends take turns through flock, which Windows lacks")
def test_an_append_waits_a_bounded_time_for_a_hung_writer(tmp_path, monkeypatch):
    """The flock wait had no end: a hung writer (or a stuck network share) hung the evaluation, and Ctrl+C,
    deferred while the rows are written, could not stop it."""
    import fcntl

    from FastSAM3DLib import files

    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    monkeypatch.setattr(files.records, "APPEND_WAIT_SECONDS", 0.3)
    with open(path, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # another open file of it holds the lock
        with pytest.raises(OutputFileError, match="another process has held it"):
            files.append_lines(path, "a,b\n3,4\n", header_lines=1)
    files.append_lines(path, "a,b\n3,4\n", header_lines=1)
    assert path.read_text() == "a,b\n1,2\n3,4\n"


def test_memory_results_of_a_version_that_did_not_record_the_bank_are_refused_for_what_they_are(tmp_path):
    """Such a folder records the checkpoint alone ("cached"): continuing it with the same bank was refused as
    results "with checkpoint cached, not cached with memory bank ...", which reads as if they had no bank."""
    from FastSAM3DLib.evaluation.results import _refuse_another_checkpoint

    settings = {"models": {"fastsam3d-demo+memory": "cached"}}
    now = "cached with memory bank 0123456789abcdef (3 entries, block 4, pooled32), rule attention, k 5"
    with pytest.raises(EvaluationStateError, match="older FastSAM3D that did not record which memory bank"):
        _refuse_another_checkpoint(tmp_path, settings, "fastsam3d-demo+memory", now, {"fastsam3d-demo+memory"})
    with pytest.raises(EvaluationStateError, match="with checkpoint other.pth, not cached"):  # as before
        _refuse_another_checkpoint(tmp_path, {"models": {"m": "other.pth"}}, "m", "cached", {"m"})
