"""Apple's MPS device, emulated (``Testing/mps_emulation.py``): it has no float64, and no max_pool3d/avg_pool3d
before torch 2.9, so growth's mask steps and blending and the memory plug-in's descriptor and weights run on the
CPU for MPS tensors. Before, on a Mac every growing click (the default for the official models) and every click
with a memory bank failed ("MPS framework doesn't support float64", "not currently implemented for the MPS
device")."""
import numpy as np
import pytest
import torch

from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre
from FastSAM3DLib.benchmarks.threshold_model import threshold_model
from FastSAM3DLib.memory.plugin import RULES, memory_weights
from FastSAM3DLib.memory.retrieval import DESCRIPTORS, describe
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
        with pytest.raises(NotImplementedError, match="max_pool3d"):  # torch < 2.9
            torch.nn.functional.max_pool3d(x.reshape(1, 1, 3, 1, 1), 1)
        with pytest.raises(NotImplementedError, match="avg_pool3d"):
            torch.nn.functional.avg_pool3d(x.reshape(1, 1, 3, 1, 1), 1)
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


@pytest.mark.parametrize("name", sorted(DESCRIPTORS))
def test_the_memory_descriptor_of_an_mps_input_is_that_of_the_cpu_on_mps(name):
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = describe(x, name)
    with emulated_mps():
        descriptor = describe(x.to("mps"), name)
        assert descriptor.device.type == "mps"  # beside the bank's keys, on the model's device
    assert torch.equal(descriptor.cpu(), expected)
