"""Growth through a server: a RemoteSession with ``grow`` gives what a local growing session gives, bit for bit.

The server (uvicorn on 127.0.0.1, as in ``test_server.py``) serves, under the name ``tiny-test``, the stand-in
that segments the bright structure around its prompts (:mod:`FastSAM3DLib.benchmarks.threshold_model`), so
that a click on a tube longer than 400 mm really grows over several regions; the local twin is the same
stand-in. The server keeps 2 embeddings per session (its default), so refining a grown segment also exercises
the client's resending of regions the server dropped.
"""
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server extra is not installed (pip install -r requirements-dev.txt)")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

import torch  # noqa: E402

from FastSAM3DLib import remote  # noqa: E402
from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre  # noqa: E402
from FastSAM3DLib.benchmarks.threshold_model import threshold_model  # noqa: E402
from FastSAM3DLib.geometry import Volume  # noqa: E402
from FastSAM3DLib.growth import GrowthSettings  # noqa: E402
from FastSAM3DLib.session import InteractiveSession  # noqa: E402
from FastSAM3DLib.server.settings import ServerSettings  # noqa: E402
from test_server import CLICKS, Server, local_model, phantom, ras, same  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = GrowthSettings(max_regions=8)


class FailingDecoder(torch.nn.Module):
    """The stand-in's decoder that answers NaN from its ``fail_at``-th run on (None: never)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder, self.runs, self.fail_at = decoder, 0, None

    def forward(self, *args, **kwargs):
        self.runs += 1
        logits, iou = self.decoder(*args, **kwargs)
        if self.fail_at is not None and self.runs >= self.fail_at:
            return torch.full_like(logits, float("nan")), iou
        return logits, iou


@pytest.fixture(scope="module")
def tube():
    return curved_tube()


@pytest.fixture(scope="module")
def served():
    """The served stand-in (its decoder can be told to fail) and the server."""
    model = threshold_model()
    model.mask_decoder = FailingDecoder(model.mask_decoder)
    with Server(ServerSettings(models=("tiny-test",)), loader=lambda spec, device: model) as server:
        yield model, server


def click_at(x):
    y, z = tube_centre(x)
    return [x, float(y), float(z)]


def regions_of(session):
    return {index: (state.roi, state.logits.numpy().tobytes(), state.iou)
            for index, state in session.region_set.regions.items()}


def test_a_remote_growing_session_equals_a_local_one_bit_for_bit(served, tube):
    model, server = served
    volume, truth = tube
    local = InteractiveSession(threshold_model(), volume, prompt_mode="newest", grow=SETTINGS)
    rem = remote.RemoteSession(server.url, "tiny-test", volume, prompt_mode="newest", grow=SETTINGS)
    assert rem.growth == SETTINGS and rem.growth_note == ""
    clicks = [(click_at(0.0), True), (click_at(150.0), True), (click_at(-20.0), False), (click_at(-150.0), True)]
    results = []
    for ras, include in clicks:
        a, b = local.add_click(ras, include), rem.add_click(ras, include)
        results.append(b)
        assert same(a, b) and a.regions == b.regions
        assert (a.growth.refined, a.growth.added, a.growth.refused, a.growth.stopped) == \
            (b.growth.refined, b.growth.added, b.growth.refused, b.growth.stopped)
        assert regions_of(local) == regions_of(rem)
        assert local.roi == rem.roi and np.array_equal(local.low_res_logits.numpy(), rem.low_res_logits)
    grown = rem.full_mask(results[0])  # the first click grew along the tube
    assert results[0].regions >= 3 and len(results[0].growth.added) >= 2
    assert 2 * np.count_nonzero(grown & truth) / (np.count_nonzero(grown) + np.count_nonzero(truth)) > 0.75
    # the last click refines a region encoded before: the local session still holds its embedding, the server
    # (2 embeddings per session) had dropped it, so the client sent the region again and the server re-encoded
    assert a.encoded is False and b.encoded is True
    for _ in range(2):  # undo needs no server
        assert same(local.undo(), rem.undo())
        assert regions_of(local) == regions_of(rem)
    rem.close()


def test_a_remote_growing_session_of_random_weights_equals_a_local_one():
    """Random weights (tiny-test) answer every prompt, the previous logits included, with other numbers."""
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume, grow=SETTINGS)
    with Server(ServerSettings(models=("tiny-test",))) as server:
        rem = remote.RemoteSession(server.url, "tiny-test", volume, grow=SETTINGS)
        for ijk, include in CLICKS:
            a, b = local.add_click(ras(volume, ijk), include), rem.add_click(ras(volume, ijk), include)
            assert same(a, b) and a.regions == b.regions and a.growth.refused == b.growth.refused
            assert regions_of(local) == regions_of(rem)
        assert same(local.undo(), rem.undo())
        rem.close()


def test_progress_can_stop_a_remote_growth_and_the_click_is_one_undo_step(served, tube):
    _, server = served
    volume, _ = tube
    rem = remote.RemoteSession(server.url, "tiny-test", volume, prompt_mode="newest", grow=SETTINGS)
    seen = []
    result = rem.add_click(click_at(0.0), progress=lambda state: seen.append(state) or len(seen) < 2)
    assert result.growth.stopped == "cancelled" and result.regions == 2 and len(rem.clicks) == 1
    assert seen[0].regions == 1 and seen[1].regions == 2
    undone = rem.undo()
    assert not undone.mask.any() and rem.clicks == [] and rem.region_set.regions == {}
    rem.close()


def test_a_server_failure_during_growth_changes_nothing(served, tube):
    model, server = served
    volume, _ = tube
    rem = remote.RemoteSession(server.url, "tiny-test", volume, prompt_mode="newest", grow=SETTINGS)
    stop = lambda state: False  # noqa: E731 - growth stops before its first added region
    first = rem.add_click(click_at(0.0), progress=stop)
    assert first.regions == 1
    before = (list(rem.clicks), rem.region_set, len(rem._multi_history), rem._shown_region)
    model.mask_decoder.runs, model.mask_decoder.fail_at = 0, 3  # refine, grow once, fail on the 2nd growth
    try:
        with pytest.raises(remote.ModelOutputError):
            rem.add_click(click_at(10.0))
    finally:
        model.mask_decoder.fail_at = None
    assert model.mask_decoder.runs >= 3
    after = (list(rem.clicks), rem.region_set, len(rem._multi_history), rem._shown_region)
    assert after[0] == before[0] and after[1] is before[1] and after[2:] == before[2:]
    second = rem.add_click(click_at(10.0))  # the same click works once the server does
    assert second.regions >= 3
    local = InteractiveSession(threshold_model(), volume, prompt_mode="newest", grow=SETTINGS)
    assert same(local.add_click(click_at(0.0), progress=stop), first) and same(local.add_click(click_at(10.0)), second)
    rem.close()


def test_without_torch_a_remote_session_segments_one_region_and_says_why(served, tube, monkeypatch):
    _, server = served
    volume, _ = tube
    monkeypatch.setattr(remote.cut_and_paste, "_LIBRARY_GEOMETRY", False)
    monkeypatch.setenv("FASTSAM3D_RESAMPLE", "sitk")
    assert remote.grows_by_default("fastsam3d") is False
    rem = remote.RemoteSession(server.url, "tiny-test", volume, prompt_mode="newest", grow=True)
    assert rem.growth is None and "PyTorch" in rem.growth_note
    result = rem.add_click(click_at(0.0))
    assert result.regions == 1 and result.growth is None
    rem.close()


def test_the_model_default_decides_when_grow_is_not_given():
    assert remote.grows_by_default("fastsam3d") is True
    assert remote.grows_by_default("fastsam3d-demo") is False  # measured not to help the demo model
    assert remote.grows_by_default("a-model-this-computer-does-not-know") is False


def test_the_segment_command_grows_through_a_server(served, tmp_path, capsys):
    """``segment --device http://... --grow`` writes the local growing session's mask; ``--no-grow`` one region."""
    import SimpleITK as sitk

    from FastSAM3DLib.cli import main
    from FastSAM3DLib.geometry import Volume

    _, server = served
    volume, _ = curved_tube(length=420.0, spacing=(3.0, 3.0, 3.0))
    image = tmp_path / "tube.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(image))
    y, z = tube_centre(-150.0, 420.0)
    point = [-150.0, float(y), float(z)]
    masks = {}
    for option in ("--grow", "--no-grow"):
        out = tmp_path / f"{option.strip('-')}.nii.gz"
        assert main(["segment", str(image), f"--point={point[0]},{point[1]},{point[2]}", "--model", "tiny-test",
                     "--device", server.url, option, "-o", str(out)]) == 0
        masks[option] = Volume.from_file(out).array > 0
    log = capsys.readouterr().out
    assert "regions" in log and "note:" not in log
    read = Volume.from_file(image)
    local = InteractiveSession(threshold_model(), read, grow=True)
    assert np.array_equal(masks["--grow"], local.full_mask(local.add_click(point)))
    single = InteractiveSession(threshold_model(), read)
    assert np.array_equal(masks["--no-grow"], single.full_mask(single.add_click(point)))
    assert np.count_nonzero(masks["--grow"]) > 1.5 * np.count_nonzero(masks["--no-grow"])


def test_the_command_line_runs_without_torch_and_says_why_it_does_not_grow(served, tmp_path):
    """A workstation that only talks to a server needs no PyTorch: every command's help, and ``segment --device
    http://... --grow`` segments one region per click and says why (growth's bookkeeping needs PyTorch)."""
    import os
    import subprocess
    import sys

    import SimpleITK as sitk

    from conftest import REPO_ROOT
    from FastSAM3DLib.memory import retrieval, settings

    assert tuple(retrieval.DESCRIPTORS) == settings.DESCRIPTOR_NAMES  # what the torch-free options offer
    _, server = served
    volume, _ = curved_tube(length=420.0, spacing=(3.0, 3.0, 3.0))
    image, out = tmp_path / "tube.nii.gz", tmp_path / "out.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(image))
    y, z = tube_centre(-150.0, 420.0)
    runs = [[command, "--help"] for command in ("segment", "evaluate", "memory", "serve", "distill", "finetune", "demo",
                                                "prepare-data", "export-weights", "models", "download", "import")]
    runs += [["--help"], ["segment", str(image), f"--point=-150,{y},{z}", "--model", "tiny-test", "--device",
                          server.url, "--grow", "-o", str(out)]]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for argv in runs:
        code = f"import sys; sys.modules['torch'] = None; from FastSAM3DLib.cli import main; sys.exit(main({argv!r}))"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    assert "note:" in proc.stdout and "PyTorch" in proc.stdout, proc.stdout
    assert np.count_nonzero(Volume.from_file(out).array) > 0


def test_a_neighbour_whose_image_cannot_be_used_is_refused_alone_as_locally(served):
    """A region of one constant value cannot be normalised: a local session refuses that neighbour and grows on;
    the remote click failed as a whole with InputImageError (its image was only made in the request)."""
    rng = np.random.default_rng(0)
    array = np.full((40, 40, 400), -1000, np.int16)  # (k, j, i): air
    array[:, :, :60] = (100 + 30 * rng.standard_normal((40, 40, 60))).astype(np.int16)  # tissue near the click
    array[16:24, 16:24, :] = 1000  # a bar of one value: its next regions hold nothing else above 0
    volume = Volume(array, np.diag([1.5, 1.5, 1.5, 1.0]))
    point, grow = (30.0, 30.0, 30.0), GrowthSettings(max_regions=6, time_budget_s=1e6)
    model, server = served
    local = InteractiveSession(model, volume, prompt_mode="newest", grow=grow)
    rem = remote.RemoteSession(server.url, "tiny-test", volume, prompt_mode="newest", grow=grow)
    a, b = local.add_click(point), rem.add_click(point)
    assert any("cannot be used" in reason for reason in a.growth.refused.values())
    assert same(a, b) and a.regions == b.regions and a.growth.refused == b.growth.refused
    rem.close()


@pytest.mark.parametrize("grow", [None, SETTINGS], ids=["one region", "growth"])
def test_running_out_of_memory_while_pasting_changes_nothing_remotely(served, monkeypatch, grow):
    """The remote session raised a bare MemoryError, and with growth kept the click it failed to show."""
    from FastSAM3DLib import growth
    from FastSAM3DLib.errors import OutOfMemoryError
    from FastSAM3DLib.remote import session as remote_session

    model, server = served
    volume = phantom()
    rem = remote.RemoteSession(server.url, "tiny-test", volume, grow=grow)
    rem.add_click(ras(volume, CLICKS[0][0]))
    before = rem.checkpoint()

    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(growth if grow else remote_session, "paste_result" if grow else "paste_back", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="nothing was changed"):
        rem.add_click(ras(volume, CLICKS[1][0]))
    after = rem.checkpoint()
    assert after[0] == before[0] and after[2] == before[2] and after[6] == before[6]  # clicks, histories
    rem.close()
