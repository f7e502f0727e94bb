"""The bundled demo weights: registered, small, loadable strictly, and as good on the demo as the model card says.

The demo clicks once at the deepest voxel of the sample's right kidney (label 2) and writes the label; its Dice
against the reference must be at least the model card's own figure minus a small margin (the computation is
deterministic; the margin absorbs floating-point differences between CPUs and torch builds).
"""
import re

import numpy as np
import pytest
import torch

from FastSAM3DLib.demo import DEMO_WEIGHTS, SAMPLE_LABEL, run_demo
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.registry import build_model, get_model_config
from FastSAM3DLib.resources import resources_dir, sample_path

WEIGHTS = resources_dir() / DEMO_WEIGHTS
CARD = resources_dir() / "Models" / "MODEL_CARD.md"
MARGIN = 0.03
CARD_LINE = re.compile(r"demo click Dice[^:]*:\s*\**\s*([0-9.]+)", re.IGNORECASE)

pytestmark = [pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"bundled demo weights {WEIGHTS} are absent"),
              pytest.mark.usefixtures("one_torch_thread")]


def card_figure() -> float:
    """The single-click demo Dice the model card reports."""
    found = CARD_LINE.search(CARD.read_text())
    assert found, f"{CARD} must state the demo click Dice ('Demo click Dice ...: 0.xx')"
    return float(found.group(1))


def test_demo_weights_are_small_official_format_and_load_strictly():
    assert WEIGHTS.stat().st_size < 20e6
    saved = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "epoch", "args"} <= set(saved)
    assert saved["args"]["model_name"] == "fastsam3d-demo"
    config = get_model_config("fastsam3d-demo")
    assert config.spacing_mm == 1.5 and config.image_size == 128 and config.encoder.block_form == "fastsam3d"
    model = build_model("fastsam3d-demo", checkpoint=WEIGHTS)  # strict keys and shapes
    assert sum(v.numel() for v in model.state_dict().values()) == \
        sum(v.numel() for v in saved["model_state_dict"].values())


def test_demo_segments_the_right_kidney_as_the_model_card_says(tmp_path):
    lines = []
    assert run_demo(tmp_path, log=lines.append, weights=("fastsam3d-demo", WEIGHTS, "bundled demo weights")) == 0
    truth = Volume.from_file(sample_path(SAMPLE_LABEL)).array == 2
    mask = Volume.from_file(tmp_path / "demo_label.nii.gz").array > 0
    dice = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
    assert (tmp_path / "demo_preview.png").is_file()
    assert dice >= card_figure() - MARGIN, (dice, card_figure(), lines)
    assert any(f"{dice:.3f}" in line for line in lines)  # the demo reports the same Dice
