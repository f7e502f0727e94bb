"""The evaluate command: metrics, the click-threshold quirk, data discovery, and end-to-end runs (tiny-test)."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import build_model, geometry
from FastSAM3DLib.cli import main
from FastSAM3DLib.evaluation import dataset as ds
from FastSAM3DLib.evaluation.clicks import next_protocol_click, prediction_for_clicks
from FastSAM3DLib.evaluation.evaluate import evaluate_dataset
from FastSAM3DLib.evaluation.model_runner import ModelRunner, upsample_logits
from FastSAM3DLib.evaluation.metrics import (click_curve_summary, dice, dice_iou, dice_iou_in_region, iou,
                                             overlap_from_counts)
from FastSAM3DLib.evaluation.results import prediction_path
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.session import InteractiveSession

# ------------------------------------------------------------------------------------------------------ metrics


def test_dice_and_iou_values_and_nan_when_both_empty():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert np.isnan(dice(a, b)) and np.isnan(iou(a, b))
    a[0, 0, :2] = True
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    b[0, 0, 1:3] = True  # |A|=2, |B|=2, |A∩B|=1
    assert dice(a, b) == pytest.approx(0.5) and iou(a, b) == pytest.approx(1 / 3)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert overlap_from_counts(1, 2, 2) == dice_iou(a, b)
    with pytest.raises(ValueError):
        overlap_from_counts(3, 2, 2)
    with pytest.raises(ValueError):
        dice(a, np.zeros((4, 4, 3), bool))


def test_dice_in_a_region_equals_dice_on_the_whole_volume():
    rng = np.random.default_rng(0)
    reference = rng.random((20, 21, 22)) > 0.7
    region = (slice(3, 15), slice(0, 10), slice(5, 22))
    mask = rng.random((12, 10, 17)) > 0.5
    whole = np.zeros_like(reference)
    whole[region] = mask
    assert dice_iou_in_region(region, mask, reference) == pytest.approx(dice_iou(whole, reference))


def test_click_curve_summary_last_max_and_nan():
    curves = [[0.2, 0.5, 0.4], [0.6, float("nan"), 0.7], [float("nan")] * 3]
    out = click_curve_summary(curves, 3)
    assert out["after_1"] == pytest.approx(0.4) and out["after_3"] == pytest.approx(0.55)
    assert out["last"] == out["after_3"] and out["max"] == pytest.approx(0.6)
    assert "after_5" not in out and out["max"] >= out["last"]


# ------------------------------------------------------------------------------------------------------ the quirk


def ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) < radius


def test_fastsam3d_click_generator_thresholds_logits_at_one_half():
    truth = ball((24, 24, 24), (12, 12, 12), 6)
    logits = np.where(truth, 0.3, -5.0).astype(np.float32)  # reported prediction (logits > 0) is perfect
    assert dice(logits > 0, truth) == 1.0
    assert not prediction_for_clicks("fastsam3d", logits).any()  # ... but FastSAM3D's generator sees nothing
    assert np.array_equal(prediction_for_clicks("sam-med3d", logits), truth)
    assert prediction_for_clicks("fastsam3d", None) is None
    for index in (0, 1, 2):  # interior clicks and random error clicks alike land in the "missed" object
        point, label = next_protocol_click("fastsam3d", index, truth, logits, np.random.default_rng(index))
        assert label == 1 and truth[tuple(point.astype(int))]
    assert next_protocol_click("sam-med3d", 1, truth, logits, np.random.default_rng(0)) is None
    above = np.where(truth, 0.6, -5.0)
    assert next_protocol_click("fastsam3d", 2, truth, above, np.random.default_rng(0)) is None
    with pytest.raises(ValueError):
        prediction_for_clicks("nnunet", logits)


def test_official_model_loop_matches_the_interactive_session():
    """The GT-placement loop and the session run the same computation for the same ROI and click."""
    model = build_model("tiny-test", seed=0)
    k, j, i = np.indices((30, 34, 38))
    array = (100 + 300 * ((((k - 15) / 8) ** 2 + ((j - 17) / 9) ** 2 + ((i - 19) / 10) ** 2) < 1)).astype(np.int16)
    volume = Volume(array, np.diag([1.8, 1.6, 2.5, 1.0]))
    session = InteractiveSession(model, volume, prompt_mode="newest")
    ras = (volume.ijk_to_ras @ [19, 17, 15, 1.0])[:3]
    result = session.add_click(ras)
    runner = ModelRunner(model)
    embedding = runner.encode(geometry.extract_model_input(volume, session.roi))
    low, pred_iou = runner.decode(embedding, session.roi.ras_to_model(ras[None]), [1])
    region, mask = geometry.paste_back(volume, session.roi, upsample_logits(low, 128))
    np.testing.assert_array_equal(session.full_mask(result)[region], mask)
    assert pred_iou == pytest.approx(result.iou, abs=1e-6)


def test_plots_say_how_to_get_matplotlib(monkeypatch):
    from FastSAM3DLib.evaluation import plots

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_dice_curves([{"model": "m", "protocol": "fastsam3d", "placement": "gt", "case": "c", "value": "1",
                                 "structure": "s", "click": 1, "dice_crop": 0.5, "dice_full": 0.5, "iou_crop": 0.3,
                                 "iou_full": 0.3, "time_s": 0.1, "pred_iou": 0.2}], Path("."))


# ------------------------------------------------------------------------------------------------------ data


def write_image(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def test_find_cases_understands_labels_json_nnunet_itksnap_and_manifests(tmp_path):
    small = np.zeros((4, 5, 6), np.uint8)
    small[1, 1, 1], small[2, 2, 2] = 1, 2
    write_image(tmp_path / "a" / "ct.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "a" / "other_ct.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "a" / "the_seg.nii.gz", small)
    (tmp_path / "a" / "labels.json").write_text(json.dumps(
        {"the_seg.nii.gz": {"image": "ct.nii.gz", "labels": {"1": {"name": "liver"}, "2": {"name": "kidney_l"}}}}))
    write_image(tmp_path / "b" / "imagesTr" / "case1_0000.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "b" / "labelsTr" / "case1.nii.gz", small)
    (tmp_path / "b" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}}))
    write_image(tmp_path / "c" / "brain.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "c" / "brain-seg.nii.gz", small)
    (tmp_path / "c" / "brain-seg.label").write_text('# IDX R G B A VIS MSH "LABEL"\n 0 0 0 0 0 0 0 "Clear"\n'
                                                    ' 2 255 0 0 1 1 1 "hippo-R"\n')
    cases = {c.name: c for c in ds.find_cases(tmp_path)}
    assert set(cases) == {"a/ct", "b/imagesTr/case1_0000", "c/brain"}
    assert cases["a/ct"].label.name == "the_seg.nii.gz" and cases["a/ct"].names == {1: "liver", 2: "kidney_l"}
    assert cases["b/imagesTr/case1_0000"].names == {1: "tumour"}
    assert cases["c/brain"].names == {2: "hippo-R"} and cases["c/brain"].structure_name(1) == "label_1"

    (tmp_path / "m.json").write_text(json.dumps([{"image": "c/brain.nii.gz", "label": "c/brain-seg.nii.gz",
                                                  "structures": [2], "case": "brainy"}]))
    (tmp_path / "m.csv").write_text("image,label,structures\na/ct.nii.gz,a/the_seg.nii.gz,liver;7\n")
    (json_case,), (csv_case,) = ds.find_cases(tmp_path / "m.json"), ds.find_cases(tmp_path / "m.csv")
    assert json_case.name == "brainy" and json_case.structures == ["2"] and json_case.names == {2: "hippo-R"}
    assert csv_case.structures == ["liver", "7"] and csv_case.names[1] == "liver"
    values, missing = ds.select_structures(csv_case, [1, 2], ["kidney*"])  # the case's own list wins
    assert values == [1] and missing[0][1] == "7" and "no voxels" in missing[0][2]
    values, missing = ds.select_structures(cases["a/ct"], [1, 2], ["KIDNEY*", "1", "spleen"])
    assert values == [2, 1] and missing[0][0] == "spleen" and "no structure named" in missing[0][2]


def test_listed_cases_with_a_missing_file_are_reported_not_dropped_silently(tmp_path):
    """A labels.json entry whose image is gone, or an nnU-Net training image without its label, vanished from the
    data without a word; the orphan label must not be paired with some other image either."""
    import warnings

    small = np.zeros((4, 5, 6), np.uint8)
    small[1, 1, 1] = 1
    write_image(tmp_path / "a" / "ct.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "a" / "ct_seg.nii.gz", small)
    write_image(tmp_path / "a" / "gone_seg.nii.gz", small)
    (tmp_path / "a" / "labels.json").write_text(json.dumps({"ct_seg.nii.gz": {"image": "ct.nii.gz"},
                                                            "gone_seg.nii.gz": {"image": "gone.nii.gz"}}))
    write_image(tmp_path / "b" / "imagesTr" / "x_0000.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "b" / "imagesTr" / "y_0000.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "b" / "labelsTr" / "x.nii.gz", small)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = ds.find_cases(tmp_path)
    assert sorted((c.name, c.label.name) for c in cases) == [("a/ct", "ct_seg.nii.gz"),
                                                            ("b/imagesTr/x_0000", "x.nii.gz")]
    (warning,) = [w for w in caught if issubclass(w.category, ds.IncompleteDataWarning)]
    text = str(warning.message)
    assert text.startswith("2 case(s)") and "gone.nii.gz" in text and "y_0000.nii.gz" in text


def test_labels_in_a_folder_are_paired_by_whole_name_parts_then_by_grid(tmp_path):
    """ct_1_seg shared its longest name prefix ("ct_1") with ct_10 too, so ct_10 was also scored against ct_1's
    label; a label named unlike every image was paired with every image of its grid, even one with its own."""
    import warnings

    small = np.zeros((4, 5, 6), np.uint8)
    small[1, 1, 1] = 1
    other_grid = np.zeros((4, 5, 7), np.uint8)
    other_grid[1, 1, 1] = 1
    for name in ("ct_1", "ct_10"):  # same grid, so only the names can tell them apart
        write_image(tmp_path / "numbered" / f"{name}.nii.gz", small.astype(np.int16))
        write_image(tmp_path / "numbered" / f"{name}_seg.nii.gz", small)
    for name in ("patientA", "patientB"):
        write_image(tmp_path / "patients" / f"{name}.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "patients" / "patientA_seg.nii.gz", small)
    write_image(tmp_path / "patients" / "patientC_seg.nii.gz", other_grid)  # patientC's image is missing
    write_image(tmp_path / "lits" / "volume-0.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "lits" / "volume-1.nii.gz", other_grid.astype(np.int16))
    write_image(tmp_path / "lits" / "segmentation-1.nii.gz", other_grid)  # no common name part: by its grid
    write_image(tmp_path / "brats" / "brats_t1.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "brats" / "brats_t2.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "brats" / "brats_seg.nii.gz", small)  # one label for both modalities
    for name in ("case_1", "case_10", "İZMİR_01", "İZMİR_010"):  # label words stuck on; a name lower() lengthens
        write_image(tmp_path / "stuck" / f"{name}.nii.gz", small.astype(np.int16))
        write_image(tmp_path / "stuck" / f"{name}seg.nii.gz", small)
    write_image(tmp_path / "pet" / "patient1.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "pet" / "patient1_pet.nii.gz", other_grid.astype(np.int16))
    write_image(tmp_path / "pet" / "patient1_seg.nii.gz", small)  # its own name first, not the longer one
    write_image(tmp_path / "organs" / "ct.nii.gz", small.astype(np.int16))
    for name in ("ct_seg", "liver_mask"):  # one image: every label is its
        write_image(tmp_path / "organs" / f"{name}.nii.gz", small)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = sorted((c.image.name, c.label.name) for c in ds.find_cases(tmp_path))
    assert pairs == sorted([
        ("brats_t1.nii.gz", "brats_seg.nii.gz"), ("brats_t2.nii.gz", "brats_seg.nii.gz"),
        ("ct_1.nii.gz", "ct_1_seg.nii.gz"), ("ct_10.nii.gz", "ct_10_seg.nii.gz"),
        ("patientA.nii.gz", "patientA_seg.nii.gz"), ("volume-1.nii.gz", "segmentation-1.nii.gz"),
        ("case_1.nii.gz", "case_1seg.nii.gz"), ("case_10.nii.gz", "case_10seg.nii.gz"),
        ("İZMİR_01.nii.gz", "İZMİR_01seg.nii.gz"), ("İZMİR_010.nii.gz", "İZMİR_010seg.nii.gz"),
        ("patient1.nii.gz", "patient1_seg.nii.gz"), ("ct.nii.gz", "ct_seg.nii.gz"), ("ct.nii.gz", "liver_mask.nii.gz")])
    (warning,) = [w for w in caught if issubclass(w.category, ds.IncompleteDataWarning)]
    assert "patientC_seg.nii.gz" in str(warning.message) and "nor one on its grid" in str(warning.message)


def test_names_and_manifests_are_read_as_utf8_whatever_the_locale(tmp_path):
    """GDCM's DICOM writer leaves a process at LC_CTYPE "C", and Windows defaults to cp1252: files are read as
    UTF-8 explicitly, so structure names like these stay readable."""
    import locale

    small = np.zeros((4, 5, 6), np.uint8)
    small[1, 1, 1] = 1
    write_image(tmp_path / "ct.nii.gz", small.astype(np.int16))
    write_image(tmp_path / "ct_seg.nii.gz", small)
    (tmp_path / "labels.json").write_text(json.dumps({"ct_seg.nii.gz": {"image": "ct.nii.gz", "labels": {
        "1": {"name": "Leber – Segment IV"}}}}, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "m.csv").write_text("image,label,case\nct.nii.gz,ct_seg.nii.gz,Müller\n", encoding="utf-8")
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        (folder_case,), (csv_case,) = ds.find_cases(tmp_path), ds.find_cases(tmp_path / "m.csv")
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    assert folder_case.names == {1: "Leber – Segment IV"} and csv_case.name == "Müller"


def test_a_label_on_another_grid_is_resampled_onto_the_image(tmp_path):
    image = write_image(tmp_path / "img.nii.gz", np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10),
                        spacing=(1.0, 1.0, 2.0))
    fine = np.zeros((12, 8, 10), np.uint8)
    fine[4:8, 2:5, 3:7] = 3  # same world box on a grid with twice the slices
    label = write_image(tmp_path / "lab.nii.gz", fine, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, -0.5))
    volume, labels, resampled = ds.load_case(ds.Case("x", image, label))
    assert resampled and labels.shape == volume.shape
    assert np.count_nonzero(labels == 3) == 2 * 3 * 4


def whole_array_value_counts(array):
    """``value_counts`` before it counted in pieces (the reference): one bincount (an int64 copy of the whole
    label) for uint8/uint16, np.unique otherwise."""
    if np.issubdtype(array.dtype, np.unsignedinteger) and array.dtype.itemsize <= 2:
        counts = np.bincount(array.ravel())
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(array, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v != 0}


@pytest.mark.parametrize("chunk", [5, 1000, 1 << 20])
def test_label_values_counted_in_pieces_are_the_whole_array_counts(monkeypatch, chunk):
    """Every dtype (signed ones too, with their extreme values), layout (C, Fortran, strided views) and size
    (empty, one voxel, pieces that do not divide it): the same values, counts and order as before."""
    monkeypatch.setattr(ds, "_COUNT_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    for dtype in (np.uint8, np.uint16, np.int8, np.int16, np.int32, np.uint32, np.int64, np.bool_):
        for shape in ((0,), (4, 0, 3), (), (1, 1, 1), (13, 7, 5), (31, 17, 9)):
            if dtype is np.bool_:
                array = rng.random(shape) < 0.3
            else:
                info = np.iinfo(dtype)
                array = rng.integers(max(info.min, -40000), min(info.max, 70000), size=shape, endpoint=True)
                array = np.where(rng.random(shape) < 0.5, 0, array).astype(dtype)
                if array.size > 1:
                    array.reshape(-1)[[0, -1]] = info.max, info.min
            views = [array, np.asfortranarray(array), array.T]
            if array.ndim == 3:
                views.append(array[::2, :, ::-1])
            for view in views:
                got, reference = ds.value_counts(view), whole_array_value_counts(view)
                assert got == reference and list(got) == list(reference), (dtype, shape, view.strides)


def test_counting_label_values_does_not_copy_the_label_to_int64():
    """np.bincount on the whole uint8 label made an int64 copy: 8 times the label (1.7 GB for a 0.2 GB
    whole-body label, 50 GB at the image budget); in pieces it needs a few MB."""
    import tracemalloc

    label = np.zeros((32, 1024, 1024), np.uint8)
    label[3:9, 100:400, 200:300] = 5
    label[-1, -1, -1] = 255
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        counts = ds.value_counts(label)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts == {5: 6 * 300 * 100, 255: 1}
    assert peak < label.nbytes / 2, f"counting took {peak / 1e6:.0f} MB for a {label.nbytes / 1e6:.0f} MB label"


def test_a_label_read_once_loads_as_read_twice(tmp_path):
    """load_case with the label already read (evaluate's plan reads it) gives what reading it again gives, on the
    image's grid and on another grid (resampled)."""
    image = write_image(tmp_path / "img.nii.gz", np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10),
                        spacing=(1.0, 1.0, 2.0))
    fine = np.zeros((12, 8, 10), np.uint8)
    fine[4:8, 2:5, 3:7] = 3
    other = write_image(tmp_path / "other.nii.gz", fine, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, -0.5))
    same = write_image(tmp_path / "same.nii.gz", fine[::2].copy(), spacing=(1.0, 1.0, 2.0))
    for label in (other, same):
        case = ds.Case("x", image, label)
        read = ds.read_label(label)
        assert ds.label_values(read) == ds.read_label_values(label)
        volume, labels, resampled = ds.load_case(case, read)
        volume2, labels2, resampled2 = ds.load_case(case)
        assert resampled == resampled2 == (label == other)
        np.testing.assert_array_equal(labels, labels2)
        np.testing.assert_array_equal(volume.array, volume2.array)


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model_state_dict": build_model("tiny-test", seed=0).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    """An anisotropic, flipped CT-like volume with three labelled structures (one too small) and labels.json."""
    folder = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    shape = (24, 40, 44)  # k, j, i
    k, j, i = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    labels[(((k - 12) / 6) ** 2 + ((j - 16) / 8) ** 2 + ((i - 14) / 8) ** 2) < 1] = 1
    labels[8:16, 20:30, 26:36] = 2
    labels[3, 3, 3:6] = 9  # three voxels: below the default minimum of 10
    image = (rng.normal(40, 10, shape) + 200 * (labels == 1) + 120 * (labels == 2)).astype(np.int16)
    spacing, direction = (1.6, 1.4, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    write_image(folder / "ct.nii.gz", image, spacing, (10.0, -4.0, 7.0), direction)
    write_image(folder / "ct_seg.nii.gz", labels, spacing, (10.0, -4.0, 7.0), direction)
    (folder / "labels.json").write_text(json.dumps({"ct_seg.nii.gz": {"image": "ct.nii.gz", "labels": {
        "1": {"name": "blob"}, "2": {"name": "box"}, "9": {"name": "speck"}, "4": {"name": "absent"}}}}))
    return folder


def read_rows(folder):
    with open(Path(folder) / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def units_of(rows):
    units = {}
    for row in rows:
        units.setdefault((row["model"], row["protocol"], row["placement"], row["case"], row["value"]), []).append(row)
    return units


def check_summary_matches_csv(folder, clicks):
    """JSON means equal the CSV means; max over clicks >= last click; one row per click per unit."""
    rows = read_rows(folder)
    summary = json.loads((Path(folder) / "summary.json").read_text())
    units = units_of(rows)
    for key, unit in units.items():
        assert sorted(int(r["click"]) for r in unit) == list(range(1, clicks + 1)), key
    for model, protocols in summary["results"].items():
        for protocol, placements in protocols.items():
            for placement, block in placements.items():
                group = [u for k, u in units.items() if k[:3] == (model, protocol, placement)]
                assert block["overall"]["n"] == len(group)
                for metric in ("dice_crop", "dice_full", "iou_crop", "iou_full"):
                    curves = [[float(r[metric]) for r in sorted(u, key=lambda r: int(r["click"]))] for u in group]
                    stats = block["overall"][metric]
                    assert stats["after_1"] == pytest.approx(np.mean([c[0] for c in curves]), abs=1e-12)
                    assert stats["last"] == pytest.approx(np.mean([c[-1] for c in curves]), abs=1e-12)
                    assert stats["max"] == pytest.approx(np.mean([max(c) for c in curves]), abs=1e-12)
                    assert stats["max"] >= stats["last"] - 1e-12
                    for curve in curves:
                        assert max(curve) >= curve[-1]
                for name, stats in block["structures"].items():
                    named = [u for u in group if u[0]["structure"] == name]
                    assert stats["n"] == len(named)
                    assert stats["dice_full"]["last"] == pytest.approx(
                        np.mean([float(max(u, key=lambda r: int(r["click"]))["dice_full"]) for u in named]))
    return rows, summary


def test_cases_reached_through_symbolic_links_keep_their_names(synthetic_folder, tmp_path):
    """Names were made from resolved paths: through links they became whole paths of the link targets, so
    --exclude-case held nothing out (held-out data went into training)."""
    linked = tmp_path / "linked" / "sub"
    linked.mkdir(parents=True)
    for path in synthetic_folder.iterdir():
        (linked / path.name).symlink_to(path)
    assert [c.name for c in ds.find_cases(tmp_path / "linked")] == ["sub/ct"]
    assert [c.name for c in ds.find_cases(synthetic_folder)] == ["ct"]


def test_evaluate_cli_end_to_end_with_resume(synthetic_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(synthetic_folder), "--model", "tiny-test", "--checkpoint", str(tiny_checkpoint),
            "--clicks", "3", "--placement", "both", "--seed", "7", "--quiet", "--output", str(out)]
    assert main(args) == 0
    assert "evaluated 4 structure(s)" in capsys.readouterr().out
    rows, summary = check_summary_matches_csv(out, 3)
    assert len(rows) == 2 * 3 * 2  # structures x clicks x placements
    assert {r["structure"] for r in rows} == {"blob", "box"}
    for row in rows:
        assert 0 <= float(row["dice_full"]) <= 1 and float(row["time_s"]) >= 0 and row["pred_iou"] != ""
        assert row["click_label"] in ("0", "1")
        assert row["encoded"] == ("1" if row["click"] == "1" else row["encoded"])
    assert all(r["click_label"] == "1" for r in rows if r["click"] == "1")
    assert all(r["encoded"] == "0" for r in rows if r["placement"] == "gt" and r["click"] != "1")

    # the skipped structures and their reasons
    reasons = {(s["structure"], s["placement"]): s["reason"] for s in summary["skipped"]}
    assert reasons[("speck", "gt")].startswith("too small: 3 voxel(s)")
    assert reasons[("speck", "click")].startswith("too small")
    assert ("absent", "gt") not in reasons  # without --structures only present values are evaluated

    # Dice recomputed from the saved last prediction equals the CSV value
    volume, labels, _ = ds.load_case(ds.find_cases(synthetic_folder)[0])
    for row in [r for r in rows if r["click"] == "3"]:
        saved = Volume.from_file(prediction_path(out, "tiny-test", "fastsam3d", row["placement"], row["case"],
                                                 row["value"], row["structure"]))
        assert saved.array.shape == volume.shape and np.allclose(saved.ijk_to_ras, volume.ijk_to_ras)
        assert dice(saved.array, labels == int(row["value"])) == pytest.approx(float(row["dice_full"]), abs=1e-12)
        assert iou(saved.array, labels == int(row["value"])) == pytest.approx(float(row["iou_full"]), abs=1e-12)

    for name in ("dice_vs_clicks_fastsam3d.png", "montage_tiny-test_fastsam3d_gt.png",
                 "montage_tiny-test_fastsam3d_click.png"):
        assert (out / name).stat().st_size > 1000

    # rerunning does nothing new; an interrupted unit (torn CSV) is redone identically, without duplicates
    assert main(args) == 0
    assert read_rows(out) == rows
    text = (out / "results.csv").read_text().splitlines()
    (out / "results.csv").write_text("\n".join(text[:-2]) + "\n" + text[-2][:20])  # lose 1.4 rows of the last unit
    assert main(args) == 0
    redone = read_rows(out)
    assert len(redone) == len(rows)
    key = lambda r: (r["placement"], r["value"], r["click"])  # noqa: E731
    timeless = lambda rs: sorted(({k: v for k, v in r.items() if k != "time_s"} for r in rs), key=key)  # noqa: E731
    assert timeless(redone) == timeless(rows)  # seeded: the same clicks and Dice
    skipped = (out / "skipped.csv").read_text().splitlines()
    assert len(skipped) == 1 + 2  # header + speck in two placements, not duplicated by the reruns

    # other settings in the same folder are refused with a clear message
    assert main([a if a != "3" else "2" for a in args]) == 2
    assert "clicks=3" in capsys.readouterr().err


def _single_pair_args(image, label, checkpoint, out, *extra):
    return ["evaluate", str(image), "--label", str(label), "--model", "tiny-test", "--checkpoint", str(checkpoint),
            "--placement", "gt", "--quiet", "--no-plots", "--no-predictions", "--structures", "1", "--output",
            str(out), *extra]


def _evaluated_once(synthetic_folder, tiny_checkpoint, out, capsys):
    """(the arguments of a 2-click evaluation of the synthetic pair into ``out``, run once; the folder's bytes)."""
    args = _single_pair_args(synthetic_folder / "ct.nii.gz", synthetic_folder / "ct_seg.nii.gz", tiny_checkpoint,
                             out, "--clicks", "2")
    assert main(args) == 0
    capsys.readouterr()
    return args, {f.name: f.read_bytes() for f in out.iterdir()}


def test_a_refused_rerun_leaves_the_results_folder_byte_for_byte(synthetic_folder, tiny_checkpoint, tmp_path,
                                                                  capsys):
    """Another click count (e.g. cvpr25's default of 5 after a 10-click run) once dropped every earlier unit from
    results.csv as 'incomplete' before the settings were refused."""
    out = tmp_path / "eval"
    args, before = _evaluated_once(synthetic_folder, tiny_checkpoint, out, capsys)
    assert main(args[:-1] + ["3"]) == 2
    assert "clicks=2" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # NSD asked for where the units have none: they would count as done (and the settings claim NSD)
    assert main(args + ["--nsd-tolerance", "2"]) == 2
    assert "without NSD" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_other_data_under_the_same_case_names_is_refused_not_taken_as_done(synthetic_folder, tiny_checkpoint,
                                                                          tmp_path, capsys):
    """A unit is known by its case name: a second data folder with the same file names 'resumed' as done and
    reported the first folder's numbers (and drew its predictions over the other images)."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(synthetic_folder, other)
    out = tmp_path / "eval"
    args, before = _evaluated_once(synthetic_folder, tiny_checkpoint, out, capsys)
    moved = _single_pair_args(other / "ct.nii.gz", other / "ct_seg.nii.gz", tiny_checkpoint, out, "--clicks", "2")
    assert main(moved) == 2
    err = capsys.readouterr().err
    assert "case 'ct'" in err and str(other) in err and "another --output" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert main(args) == 0  # the same files continue


def test_evaluate_threads_are_set_and_recorded(synthetic_folder, tiny_checkpoint, tmp_path, capsys):
    """Dice depends slightly on PyTorch's thread count (the order of sums): it is an option and in summary.json."""
    import torch

    before = torch.get_num_threads()
    out = tmp_path / "eval"
    try:
        args = _single_pair_args(synthetic_folder / "ct.nii.gz", synthetic_folder / "ct_seg.nii.gz", tiny_checkpoint,
                                 out, "--clicks", "1", "--threads", "1")
        assert main(args) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((out / "summary.json").read_text())["runtime"]["torch_threads"] == 1
        assert main(args[:-1] + ["0"]) == 2 and "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_case_skipped_for_a_broken_file_is_evaluated_once_the_file_is_fixed(synthetic_folder, tiny_checkpoint,
                                                                                tmp_path, capsys):
    """Skips are decided again by a rerun: a truncated image, copied again as the message said, is evaluated
    (it used to count as done for ever), and its skip record goes."""
    import shutil

    image, out = tmp_path / "ct.nii.gz", tmp_path / "eval"
    image.write_bytes((synthetic_folder / "ct.nii.gz").read_bytes()[:3000])
    args = _single_pair_args(image, synthetic_folder / "ct_seg.nii.gz", tiny_checkpoint, out, "--clicks", "2")
    assert main(args) == 2  # the one pair given: nothing could be evaluated
    assert "truncated" in capsys.readouterr().err
    assert "truncated" in (out / "skipped.csv").read_text()
    shutil.copy(synthetic_folder / "ct.nii.gz", image)
    assert main(args) == 0
    assert "evaluated 1 structure(s)" in capsys.readouterr().out
    assert len(read_rows(out)) == 2 and (out / "skipped.csv").read_text().splitlines()[1:] == []


def test_a_folder_whose_only_label_is_empty_is_an_error_with_its_reason(synthetic_folder, tiny_checkpoint, tmp_path,
                                                                       capsys):
    """An empty label was passed over in silence: "evaluated 0 structure(s); 0 skipped (reasons in skipped.csv)",
    no skipped.csv, exit status 0."""
    folder, out = tmp_path / "data", tmp_path / "eval"
    folder.mkdir()
    (folder / "ct.nii.gz").write_bytes((synthetic_folder / "ct.nii.gz").read_bytes())
    label = sitk.ReadImage(str(synthetic_folder / "ct_seg.nii.gz"))
    sitk.WriteImage(label * 0, str(folder / "ct_seg.nii.gz"))
    args = ["evaluate", str(folder), "--model", "tiny-test", "--checkpoint", str(tiny_checkpoint), "--placement",
            "gt", "--quiet", "--no-plots", "--clicks", "2", "--output", str(out)]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "empty label: no labelled voxel" in captured.err.strip().splitlines()[-1]
    assert "empty label" in (out / "skipped.csv").read_text()


def test_skip_records_are_decided_again_without_rewriting_the_file_per_record(tmp_path, tiny_checkpoint,
                                                                               monkeypatch, capsys):
    """A rerun re-decides skips: a stale record made under a selector ('kid*' -> values '1;2') goes once its
    structures are evaluated, and skipped.csv is rewritten once per run, not once per record (quadratic)."""
    from FastSAM3DLib.evaluation import results

    small = np.zeros((12, 14, 16), np.uint8)
    small[3:8, 4:9, 5:10] = 3
    image = (40 + 150 * (small > 0)).astype(np.int16)
    write_image(tmp_path / "data" / "ct.nii.gz", image)
    write_image(tmp_path / "data" / "ct_seg.nii.gz", small)
    (tmp_path / "data" / "labels.json").write_text(json.dumps({"ct_seg.nii.gz": {"image": "ct.nii.gz", "labels": {
        "1": {"name": "kid_a"}, "2": {"name": "kid_b"}, "3": {"name": "other"}}}}))
    absent = [f"nothing{n}" for n in range(40)]
    args = ["evaluate", str(tmp_path / "data"), "--model", "tiny-test", "--checkpoint", str(tiny_checkpoint),
            "--placement", "gt", "--quiet", "--no-plots", "--no-predictions", "--clicks", "1", "--output",
            str(tmp_path / "out"), "--structures", "kid*", *absent]
    assert main(args) == 2  # nothing asked for is there: an error, its reasons recorded
    assert "nothing of" in capsys.readouterr().err
    skipped = {r["value"] for r in csv.DictReader(open(tmp_path / "out" / "skipped.csv"))}
    assert "1;2" in skipped and len(skipped) == 41
    writes = []
    real = results.write_text_atomically
    monkeypatch.setattr(results, "write_text_atomically",
                        lambda path, text: (writes.append(Path(path).name), real(path, text)))
    small[0:3, 0:3, 0:3], small[9:12, 10:13, 11:14] = 1, 2  # the label fixed: kid_a and kid_b are there now
    write_image(tmp_path / "data" / "ct_seg.nii.gz", small)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "evaluated 2 structure(s)" in out, out
    records = list(csv.DictReader(open(tmp_path / "out" / "skipped.csv")))
    assert len(records) == 40 and not any(r["value"] == "1;2" for r in records)
    assert writes.count("skipped.csv") <= 1


def test_a_dicom_series_folder_is_accepted_as_the_label(tmp_path, tiny_checkpoint, capsys):
    import SimpleITK as sitk

    from test_memory import _write_dicom_series

    labels = np.zeros((6, 10, 12), np.uint8)
    labels[2:5, 3:8, 3:9] = 1
    write_image(tmp_path / "ct.nii.gz", (40 + 150 * labels).astype(np.int16))
    _write_dicom_series(sitk.GetImageFromArray(labels), tmp_path / "seg_dicom")
    assert main(["evaluate", str(tmp_path / "ct.nii.gz"), "--label", str(tmp_path / "seg_dicom"), "--model",
                 "tiny-test", "--checkpoint", str(tiny_checkpoint), "--placement", "gt", "--quiet", "--no-plots",
                 "--no-predictions", "--clicks", "1", "--output", str(tmp_path / "out")]) == 0
    assert "evaluated 1 structure(s)" in capsys.readouterr().out


def test_evaluate_refuses_impossible_input_in_one_line_before_writing(synthetic_folder, tiny_checkpoint, tmp_path,
                                                                       capsys):
    image, label = synthetic_folder / "ct.nii.gz", synthetic_folder / "ct_seg.nii.gz"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text("{x")
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "afile").write_text("")
    cases = [(_single_pair_args(image, tmp_path / "nope.nii.gz", tiny_checkpoint, tmp_path / "o1"), "does not exist"),
             (_single_pair_args(image, label, tiny_checkpoint, tmp_path / "o2", "--clicks", "0"), "at least 1"),
             (_single_pair_args(image, label, tiny_checkpoint, tmp_path / "o3", "--nsd-tolerance", "inf"), "mm >= 0"),
             (["evaluate", str(tmp_path / "bad.json"), "--model", "tiny-test", "--checkpoint", str(tiny_checkpoint),
               "--output", str(tmp_path / "o4")], "bad.json is not a readable manifest"),
             (_single_pair_args(image, label, tiny_checkpoint, damaged), "run.json is damaged"),
             (_single_pair_args(image, label, tiny_checkpoint, tmp_path / "afile"), "is a file, not a folder")]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))
    assert [f.name for f in damaged.iterdir()] == ["run.json"] and (damaged / "run.json").read_text() == "{x"


def without_times(tree):
    if isinstance(tree, dict):
        return {k: without_times(v) for k, v in tree.items() if k != "time_s"}
    return tree


def test_evaluate_dataset_python_api_sam_med3d_protocol(synthetic_folder, monkeypatch):
    model = build_model("tiny-test", seed=1)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # without tqdm: plain progress lines
    lines = []
    summary = evaluate_dataset(synthetic_folder, model, None, clicks=2, protocol="sam-med3d", placement="click",
                               structures=["box", "absent", "nothing*"], seed=3, plots=False, log=lines.append)
    assert lines == ["[1/1] ct box click: Dice %.3f" % summary["results"]["tiny-test"]["sam-med3d"]["click"][
        "overall"]["dice_full"]["last"]]
    block = summary["results"]["tiny-test"]["sam-med3d"]["click"]
    assert block["overall"]["n"] == 1 and list(block["structures"]) == ["box"]
    assert set(block["overall"]["dice_full"]) == {"after_1", "last", "max"}
    reasons = {s["structure"]: s["reason"] for s in summary["skipped"]}
    assert "has no voxels" in reasons["absent"] and "no structure named 'nothing*'" in reasons["nothing*"]
    again = evaluate_dataset(synthetic_folder, model, None, clicks=2, protocol="sam-med3d", placement="click",
                             structures=["box"], seed=3, plots=False, progress=False)
    assert without_times(again["results"]) == without_times(summary["results"])  # reproducible


def test_evaluate_reads_the_label_of_its_first_case_once(synthetic_folder, monkeypatch, tmp_path):
    """The plan read every label to count its values and each case's evaluation read it again: the first case's
    label (a single case: the only one) is now read once; later cases' labels are not kept meanwhile."""
    reads = []
    original = Volume.from_file.__func__

    def counting(cls, path, *args, **kwargs):
        reads.append(Path(path).name)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(Volume, "from_file", classmethod(counting))
    model = build_model("tiny-test", seed=1)
    image, label = synthetic_folder / "ct.nii.gz", synthetic_folder / "ct_seg.nii.gz"
    cases = [ds.Case(name, image, label) for name in ("a", "b")]
    settings = dict(clicks=2, placement="gt", structures=["2"], plots=False, progress=False, save_predictions=False)
    evaluate_dataset(cases[:1], model, tmp_path / "one", **settings)
    assert sorted(reads) == ["ct.nii.gz", "ct_seg.nii.gz"]
    reads.clear()
    evaluate_dataset(cases, model, tmp_path / "two", **settings)
    assert reads == ["ct_seg.nii.gz", "ct_seg.nii.gz", "ct.nii.gz", "ct.nii.gz", "ct_seg.nii.gz"]
    one, two = read_rows(tmp_path / "one"), read_rows(tmp_path / "two")
    assert len(one) == 2 and len(two) == 4
    for a, b in zip(one, two):  # case a: the same clicks and Dice whether its label was kept or read again
        assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}


def test_evaluate_on_the_shared_totalseg_ct(shared_data, tmp_path):
    """Real CT (3 mm, flipped axes): a few organs with both placements, numbers consistent with the files."""
    folder = shared_data / "totalseg"
    cases = ds.find_cases(folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz")
    assert cases[0].names[5] == "liver"
    out = tmp_path / "ct"
    summary = evaluate_dataset(cases, build_model("tiny-test", seed=0), out, clicks=2,
                               structures=["kidney_left", "gallbladder", "13"], plots=False, progress=False)
    rows, _ = check_summary_matches_csv(out, 2)
    assert len(rows) == 2 * 2 * 2
    skipped = {(s["structure"], s["placement"]): s["reason"] for s in summary["skipped"]}
    assert skipped[("lung_middle_lobe_right", "click")].startswith("too small: 1 voxel")
    volume = Volume.from_file(folder / "example_ct_sm.nii.gz")
    for row in rows:  # every simulated click lies inside the volume
        ijk = geometry.ras_to_ijk(volume, np.array([[float(row[c]) for c in ("click_r", "click_a", "click_s")]]))[0]
        assert np.all(ijk >= -0.5) and np.all(ijk <= np.array(volume.shape[::-1]) - 0.5)


def test_demo_heldout_manifest_names_real_structures(shared_data):
    """The model card's held-out set (Testing/Evaluation/demo-heldout.json): every case loads and every listed
    structure is present, with the names of the data's own label tables."""
    manifest = Path(__file__).parent / "Evaluation" / "demo-heldout.json"
    cases = ds.find_cases(manifest)
    assert [c.name for c in cases] == ["example_ct_sm", "example_ct", "MRIcrop"]
    tables = json.loads((shared_data / "totalseg" / "labels.json").read_text())
    for case in cases:
        assert case.image.is_file() and case.label.is_file()
        _, labels, _ = ds.load_case(case)
        values, missing = ds.select_structures(case, [int(v) for v in np.unique(labels) if v])
        assert not missing and len(values) == len(case.structures)
        own = tables.get(case.label.name, {}).get("labels", {})
        for value in values:
            if own:
                assert own[str(value)]["name"] == case.structure_name(value)


def test_a_structure_whose_parts_lie_further_apart_than_the_crop_is_skipped_for_that_reason():
    """Both kidneys under one value, 300 mm apart: the crop centred on their bounding box holds neither, and the
    skip said "too thin or small" of a 6.4 million voxel structure."""
    from FastSAM3DLib.evaluation.dataset import empty_crop_reason
    from FastSAM3DLib.geometry import Volume

    volume = Volume(np.zeros((40, 40, 400), np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    apart = np.zeros(volume.shape, bool)
    apart[10:30, 10:30, 20:50] = apart[10:30, 10:30, 330:360] = True
    assert "spans 340 mm" in empty_crop_reason(volume, apart, 128, 1.5)
    assert "give each part a value of its own" in empty_crop_reason(volume, apart, 128, 1.5)
    thin = np.zeros(volume.shape, bool)
    thin[20, 20, 100:110] = True
    assert "too thin or small" in empty_crop_reason(volume, thin, 128, 1.5)
