"""The CVPR 2025 interactive 3D challenge protocol in ``evaluate``: NSD against hand-computed cases, the area under
the click curve, the largest-error-component click, and the ``cvpr25`` protocol end to end (CPU, tiny-test)."""
import csv
import json
import math

import numpy as np
import pytest

from FastSAM3DLib.evaluation.clicks import largest_error_click, protocol_click
from FastSAM3DLib.evaluation.metrics import area_under_clicks, normalized_surface_dice, nsd_in_region
from test_clicks import compare_with_whole_grid, error_box_cases, same_click, whole_grid_largest_error_click
from test_evaluation import synthetic_folder  # noqa: F401 - the fixture


def _voxels(shape, *points):
    mask = np.zeros(shape, bool)
    for p in points:
        mask[p] = True
    return mask


# ------------------------------------------------------------------------------------------------ NSD by hand
def test_nsd_of_single_voxels_weighs_the_surface_elements_at_their_corners():
    """A voxel's surface elements sit at its 8 corners, equal in area: two voxels 3 mm apart have corners 2 mm
    apart (half of each voxel's elements), 3 mm apart (the rest) and more."""
    a, b = _voxels((1, 1, 6), (0, 0, 0)), _voxels((1, 1, 6), (0, 0, 3))
    assert normalized_surface_dice(a, b, (1, 1, 1), 1.9) == 0.0
    assert normalized_surface_dice(a, b, (1, 1, 1), 2.0) == 0.5
    assert normalized_surface_dice(a, b, (1, 1, 1), 3.0) == 1.0
    # anisotropic: 2 voxels along axis 0 at 0.5 mm (near corners 0.5 mm apart); along axis 1 at 1 mm (1 mm)
    a, b, c = _voxels((3, 3, 1), (0, 0, 0)), _voxels((3, 3, 1), (2, 0, 0)), _voxels((3, 3, 1), (0, 2, 0))
    assert normalized_surface_dice(a, b, (0.5, 1, 1), 0.5) == 0.5
    assert normalized_surface_dice(a, b, (0.5, 1, 1), 0.49) == 0.0
    assert normalized_surface_dice(a, c, (0.5, 1, 1), 0.5) == 0.0
    assert normalized_surface_dice(a, c, (0.5, 1, 1), 1.0) == 0.5


def test_nsd_is_the_challenges_surface_dice_also_on_coarse_grids():
    """The number the challenge's code gives (DeepMind's surface-distance on the whole arrays, as
    ``CVPR25_iter_eval.py`` calls it), for a ball dilated by one voxel at 3 mm and at 0.75 x 0.75 x 5.5 mm in each
    axis order: the crop around the masks and the spacing's axis order change nothing. Counting border voxels
    gave 0.0 instead of 0.44 at 3 mm."""
    from scipy import ndimage
    import surface_distance

    grid = np.indices((30, 30, 30)) - 14.5
    ball = (grid ** 2).sum(0) <= 8 ** 2
    values = {}
    for change, prediction in (("grown", ndimage.binary_dilation(ball)), ("shifted", np.roll(ball, 1, axis=0))):
        for spacing in ((3.0, 3.0, 3.0), (0.75, 0.75, 5.5), (5.5, 0.75, 0.75)):
            reference = surface_distance.compute_surface_dice_at_tolerance(
                surface_distance.compute_surface_distances(ball, prediction, spacing), 2.0)
            values[change, spacing] = normalized_surface_dice(prediction, ball, spacing, 2.0)
            assert values[change, spacing] == pytest.approx(reference, abs=1e-12), (change, spacing)
    assert values["grown", (3.0, 3.0, 3.0)] > 0.4
    # shifted along axis 0: 0.75 mm (within 2 mm everywhere) or 5.5 mm (far) along that axis
    assert values["shifted", (0.75, 0.75, 5.5)] == 1.0 > values["shifted", (5.5, 0.75, 0.75)]


def test_nsd_of_identical_empty_and_far_apart_masks():
    a = np.zeros((7, 7, 7), bool)
    a[2:5, 2:5, 2:5] = True
    assert normalized_surface_dice(a, a, (2, 2, 2), 0.0) == 1.0
    assert math.isnan(normalized_surface_dice(a & False, a & False, (1, 1, 1)))
    assert normalized_surface_dice(a, a & False, (1, 1, 1)) == 0.0
    far = np.zeros((7, 7, 30), bool)
    far[2:5, 2:5, 2:5] = far[2:5, 2:5, 25:28] = True
    near_only = far.copy()
    near_only[:, :, 20:] = False
    assert 0.0 < normalized_surface_dice(far, near_only, (1, 1, 1), 2.0) < 1.0  # the far cube matches nothing
    with pytest.raises(ValueError):
        normalized_surface_dice(a, a, (1, 1, 1), -1.0)


def test_nsd_in_a_region_equals_nsd_on_the_whole_grid():
    rng = np.random.default_rng(0)
    reference = np.zeros((20, 22, 24), bool)
    reference[4:12, 5:15, 6:18] = True
    prediction = np.zeros_like(reference)
    prediction[6:14, 3:13, 8:20] = rng.random((8, 10, 12)) > 0.2
    region = (slice(5, 16), slice(2, 14), slice(7, 21))
    whole = np.zeros_like(reference)
    whole[region] = prediction[region]
    assert nsd_in_region(region, prediction[region], reference, (1.5, 0.8, 2.0), 2.0) == pytest.approx(
        normalized_surface_dice(whole, reference, (1.5, 0.8, 2.0), 2.0))


def test_area_under_the_click_curve_is_trapezoids_one_unit_per_click():
    assert area_under_clicks([0.2, 0.4, 0.6]) == pytest.approx(0.8)
    assert area_under_clicks([1.0] * 5) == pytest.approx(4.0)
    assert area_under_clicks([0.5]) == 0.0
    assert math.isnan(area_under_clicks([0.1, float("nan")]))


# ------------------------------------------------------------------------------------------------ the click
def test_the_challenge_click_is_the_centre_of_the_largest_error_component():
    rng = np.random.default_rng(0)
    truth = np.zeros((20, 20, 20), bool)
    truth[2:7, 2:7, 2:7] = True  # 5^3: its centre (4, 4, 4) is the only deepest voxel
    truth[12:15, 12:15, 12:15] = True  # 3^3, smaller
    point, label = largest_error_click(truth, np.zeros_like(truth), rng)
    assert point.tolist() == [4, 4, 4] and label == 1
    prediction = truth.copy()
    prediction[10:17, 1:8, 10:17] = True  # a 7^3 false positive, the largest error: exclude at its centre
    point, label = protocol_click("cvpr25", 3, truth, prediction, rng)
    assert point.tolist() == [13, 4, 13] and label == 0
    assert largest_error_click(truth, truth, rng) is None


def tight_box_largest_error_click(truth, prediction, rng):
    """A wrong crop, to show the cases can tell: the box without margin, its border not background."""
    import edt
    from scipy import ndimage

    from FastSAM3DLib.evaluation.clicks import error_box

    box = error_box(truth, prediction, margin=0)
    if box is None:
        return None
    truth, prediction = truth[box].astype(bool), prediction[box].astype(bool)
    labels, count = ndimage.label(truth != prediction, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    dist = edt.edt(np.ascontiguousarray(labels == int(np.argmax(sizes)), dtype=np.uint8), black_border=False)
    candidates = np.argwhere(dist == dist.max())
    point = candidates[rng.integers(len(candidates))]
    return (point + [s.start for s in box]).astype(np.float64), int(truth[tuple(point)])


def test_the_challenge_click_on_the_error_box_is_the_whole_volume_click():
    """Components (numbered in scan order: equal sizes pick the first), distances and ties on the box around
    truth ∪ prediction give the whole-volume click; a tight box whose border is not background would not."""
    clicks, wrong = compare_with_whole_grid(error_box_cases(seed=12), largest_error_click,
                                            whole_grid_largest_error_click, tight_box_largest_error_click)
    assert clicks > 300 and wrong > 30
    # two equal components: the first in scan order wins, also when the box starts after the volume's origin
    truth = np.zeros((30, 30, 30), bool)
    truth[20:23, 5:8, 25:28] = truth[22:25, 15:18, 3:6] = True
    for seed in range(3):
        point, label = largest_error_click(truth, np.zeros_like(truth), np.random.default_rng(seed))
        assert point.tolist() == [21, 6, 26] and label == 1
        assert same_click((point, label), whole_grid_largest_error_click(truth, np.zeros_like(truth),
                                                                         np.random.default_rng(seed)))


# ------------------------------------------------------------------------------------------------ end to end
def test_cvpr25_protocol_end_to_end(synthetic_folder, tmp_path, capsys):  # noqa: F811
    from FastSAM3DLib.cli import main
    from FastSAM3DLib.evaluation.evaluate import evaluate_dataset
    from FastSAM3DLib.registry import build_model

    out = tmp_path / "eval"
    model = build_model("tiny-test", seed=1)
    # an older results file (no nsd_full column) in the folder is rewritten, not appended to misaligned
    evaluate_dataset(synthetic_folder, model, out, clicks=5, protocol="fastsam3d", placement="gt",
                     structures=["box"], plots=False, progress=False, save_predictions=False)
    with open(out / "results.csv", newline="") as stream:
        old = list(csv.DictReader(stream))
    fields = [f for f in old[0] if f != "nsd_full"]
    with open(out / "results.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(old)
    summary = evaluate_dataset(synthetic_folder, model, out, protocol="cvpr25", placement="both",
                               structures=["box", "blob"], progress=False, save_predictions=False)
    with open(out / "results.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert "nsd_full" in rows[0] and len(rows) == 5 + 4 * 5  # the old unit kept, 4 new units of 5 clicks
    mine = [r for r in rows if r["protocol"] == "cvpr25"]
    assert all(0.0 <= float(r["nsd_full"]) <= 1.0 for r in mine)
    assert all(r["nsd_full"] == "" for r in rows if r["protocol"] == "fastsam3d")
    block = summary["results"]["tiny-test"]["cvpr25"]["gt"]["overall"]
    units = {}
    for r in mine:
        if r["placement"] == "gt":
            units.setdefault(r["value"], []).append((int(r["click"]), float(r["dice_full"]), float(r["nsd_full"])))
    curves = [sorted(u) for u in units.values()]  # one case: the challenge's per-click means over its structures
    case_dsc = np.mean([[c[1] for c in u] for u in curves], axis=0)
    case_nsd = np.where(case_dsc > 0.2, np.mean([[c[2] for c in u] for u in curves], axis=0), 0.0)
    assert block["cvpr25"]["dsc_auc"] == pytest.approx(area_under_clicks(case_dsc))
    assert block["cvpr25"]["final_nsd"] == pytest.approx(case_nsd[-1])
    assert block["time_s"]["per_case"] > 0
    stated = summary["metrics"]["cvpr25"]  # the deviations from the challenge, in the file itself
    assert all(words in stated for words in ("no bounding-box step", "not the image grid", "not capped",
                                             "then means over cases", "not as one multi-class label map"))
    assert json.loads((out / "run.json").read_text())["nsd_tolerance_mm"] == 2.0
    assert (out / "cvpr25_cvpr25.png").is_file() and not (out / "cvpr25_fastsam3d.png").exists()
    # the command line prints the challenge's numbers; another tolerance in the same folder is refused
    capsys.readouterr()
    assert main(["evaluate", str(synthetic_folder), "--model", "tiny-test", "--checkpoint", "random", "--protocol",
                 "cvpr25", "--placement", "gt", "--structures", "box", "--quiet", "--no-plots", "--no-predictions",
                 "-o", str(tmp_path / "cli")]) == 0
    text = capsys.readouterr().out
    assert "5 clicks" in text and "CVPR25: DSC AUC" in text and "NSD AUC" in text
    assert main(["evaluate", str(synthetic_folder), "--model", "tiny-test", "--checkpoint", "random", "--protocol",
                 "cvpr25", "--nsd-tolerance", "1", "--placement", "gt", "--quiet", "-o", str(tmp_path / "cli")]) == 2
    assert "tolerance" in capsys.readouterr().err


def test_the_challenge_numbers_are_means_over_cases_with_its_nsd_rule():
    """Means over structures weighed a case of three structures three times, and NSD counted where the case's
    DSC was 0.2 or less (CVPR25_iter_eval.py scores NSD 0 there)."""
    from FastSAM3DLib.evaluation.results import FIELDS
    from FastSAM3DLib.evaluation.summary import summarise

    def unit(case, value, dsc, nsd):
        return [dict({f: "" for f in FIELDS}, model="m", case=case, structure=f"s{value}", value=value, voxels=100,
                     placement="gt", protocol="cvpr25", click=click + 1, click_label=1, dice_crop=d, iou_crop=d,
                     dice_full=d, iou_full=d, nsd_full=n, time_s=0.1, encoded=0, pred_iou=0.5)
                for click, (d, n) in enumerate(zip(dsc, nsd))]

    rows = (unit("A", 1, [0.9] * 5, [0.8] * 5) + unit("A", 2, [0.9] * 5, [0.8] * 5) + unit("A", 3, [0.9] * 5, [0.8] * 5)
            + unit("B", 1, [0.1, 0.1, 0.1, 0.3, 0.3], [0.5] * 5))
    numbers = summarise(rows, [], 5)["results"]["m"]["cvpr25"]["gt"]["overall"]["cvpr25"]
    assert numbers["cases"] == 2
    assert numbers["dsc_auc"] == pytest.approx((0.9 * 4 + area_under_clicks([0.1, 0.1, 0.1, 0.3, 0.3])) / 2)
    assert numbers["final_dsc"] == pytest.approx((0.9 + 0.3) / 2)
    assert numbers["nsd_auc"] == pytest.approx((0.8 * 4 + area_under_clicks([0, 0, 0, 0.5, 0.5])) / 2)
    assert numbers["final_nsd"] == pytest.approx((0.8 + 0.5) / 2)
