"""Apple's MPS device, emulated (``Testing/mps_emulation.py``): it has no float64, so growth's blending and the
memory plug-in's weights compute on the CPU for MPS tensors. Before, on a Mac every growing click (the default
for the official models) and every click with a memory bank failed with "MPS framework doesn't support float64"."""
import numpy as np
import pytest
import torch

from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre
from FastSAM3DLib.benchmarks.threshold_model import threshold_model
from FastSAM3DLib.memory.plugin import RULES, memory_weights
from FastSAM3DLib.session import InteractiveSession
from mps_emulation import emulated_mps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_emulation_refuses_what_mps_refuses():
    with emulated_mps():
        x = torch.zeros(3, device="mps")
        assert x.device.type == "mps" and (x + 1).device.type == "mps" and x.cpu().device.type == "cpu"
        with pytest.raises(TypeError, match="float64"):
            x.double()
        with pytest.raises(TypeError, match="float64"):
            torch.zeros(2, dtype=torch.float64, device="mps")
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert torch.zeros(2, dtype=torch.float64).dtype == torch.float64  # the CPU keeps float64


def test_a_growing_click_with_mps_logits_grows_exactly_as_on_the_cpu(monkeypatch):
    volume, _ = curved_tube()
    click = [0.0, *(float(v) for v in tube_centre(0.0))]
    on_cpu = InteractiveSession(threshold_model(), volume, grow=True)
    expected = on_cpu.add_click(click)
    decode = InteractiveSession.run_decoder

    def decode_on_mps(self, *args, **kwargs):
        logits, iou = decode(self, *args, **kwargs)
        return logits.to("mps"), iou

    monkeypatch.setattr(InteractiveSession, "run_decoder", decode_on_mps)
    with emulated_mps():
        session = InteractiveSession(threshold_model(), volume, grow=True)
        result = session.add_click(click)
        mask = session.full_mask(result)
    assert result.regions == expected.regions >= 3  # growth added neighbours: blend and the neighbours' prior ran
    assert np.array_equal(mask, on_cpu.full_mask(expected))


@pytest.mark.parametrize("rule", RULES)
def test_memory_weights_of_mps_distances_are_those_of_the_cpu(rule):
    distances = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 5.0]])
    expected = memory_weights(distances, 0.3, rule)
    with emulated_mps():
        weights = memory_weights(distances.to("mps"), 0.3, rule)
    assert torch.equal(weights.cpu(), expected)
