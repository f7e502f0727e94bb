"""The evaluation's ``grow`` placement: whole-object Dice, recall, coverage and regions per click, paired with the
``click`` placement (same first click), on a synthetic tube longer than one region (threshold stand-in model)."""
import numpy as np
import pytest

pytest.importorskip("SimpleITK")
pytest.importorskip("edt", reason="simulated interior clicks need the 'edt' package")

from FastSAM3DLib.benchmarks.long_phantoms import curved_tube  # noqa: E402
from FastSAM3DLib.benchmarks.threshold_model import threshold_model  # noqa: E402
from FastSAM3DLib.evaluation.evaluate import evaluate_dataset  # noqa: E402
from FastSAM3DLib.geometry import Volume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grow_placement_measures_the_whole_object(tmp_path):
    import SimpleITK as sitk

    volume, truth = curved_tube(length=420.0, spacing=(3.0, 3.0, 3.0))
    image, label = tmp_path / "tube.nii.gz", tmp_path / "tube_seg.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(image))
    sitk.WriteImage(Volume(truth.astype(np.uint8), volume.ijk_to_ras).to_sitk(), str(label))
    out = tmp_path / "eval"
    for placement in ("click", "grow"):
        evaluate_dataset([(str(image), str(label))], threshold_model(), out, clicks=2, placement=placement,
                         plots=False, save_predictions=False, progress=False, log=lambda *a: None)
    import csv

    rows = {(r["placement"], int(r["click"])): r for r in csv.DictReader(open(out / "results.csv"))}
    single, grown = rows[("click", 1)], rows[("grow", 1)]
    assert (single["click_r"], single["click_a"], single["click_s"]) == (grown["click_r"], grown["click_a"],
                                                                         grown["click_s"])  # paired
    assert float(grown["recall_full"]) > 0.95 and float(grown["coverage"]) > 0.99 and int(grown["regions"]) >= 3
    assert float(single["recall_full"]) < 0.6 and float(grown["dice_full"]) > float(single["dice_full"]) + 0.2
