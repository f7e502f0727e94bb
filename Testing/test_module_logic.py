"""The scripted module's Logic (FastSAM3D/FastSAM3D.py): the batch call of the Slicer Python console, its sessions
and models, and the dependency panel, on real MRML through Testing/effect_harness.py. Each test is a finding of
a review of the module against Slicer's sources and the library."""
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")

import vtk  # noqa: E402

from test_effect import _demo_volume, _write_bank, box_volume  # noqa: E402
from test_scene_adapter import make_volume, segment_array  # noqa: E402

find_spec = importlib.util.find_spec
CENTRE = [13 * 1.5, 11 * 1.5, 7 * 2.0]  # inside the box of test_effect.box_volume


def module_logic():
    import FastSAM3D

    return FastSAM3D.FastSAM3DLogic()


def model_tag(segmentation_node, segment_id):
    from FastSAM3DLib import scene

    tag = vtk.reference("")
    segmentation_node.GetSegmentation().GetSegment(segment_id).GetTag(scene.MODEL_TAG, tag)
    return str(tag)


def test_the_console_call_grows_by_the_models_default_and_records_the_model(harness, monkeypatch, one_torch_thread):
    """Like the library, the CLI and the effect, a model that grows by default does so from the console (it cut a
    420 mm tube to one 192 mm region), and the segment records the model, not "custom predictor"."""
    from FastSAM3DLib import scene
    from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre
    from FastSAM3DLib.benchmarks.threshold_model import threshold_model

    stand_in = threshold_model()  # segments the bright tube around its prompts, in place of fastsam3d's weights
    monkeypatch.setattr(scene, "load_model", lambda *args, **kwargs: stand_in)
    tube, truth = curved_tube(length=420.0)
    volume = make_volume(harness.scene, tube.ijk_to_ras, tube.array)
    logic = module_logic()
    monkeypatch.setattr(logic, "torchProblem", lambda: None)
    click = [0.0, *map(float, tube_centre(0.0, length=420.0))]
    grown, grown_id = logic.segment(volume, [click], model="fastsam3d", device="cpu", segmentName="grown")
    one, one_id = logic.segment(volume, [click], model="fastsam3d", device="cpu", segmentName="one", grow=False)
    covered = segment_array(grown, grown_id, volume)[truth].mean()
    assert covered > 0.95 and segment_array(one, one_id, volume)[truth].mean() < 0.6, covered
    assert model_tag(grown, grown_id) == "fastsam3d"


def test_console_calls_use_the_weights_the_effect_downloaded(harness, monkeypatch):
    """segment_volume_node looked in the library's platform cache, not in Slicer's folder where the effect
    downloads: with fastsam3d downloaded it ran the demo model silently, and model="fastsam3d" said to download."""
    from FastSAM3DLib import scene
    from FastSAM3DLib.scene import batch
    from FastSAM3DLib.weights.cache import model_files
    from FastSAM3DLib.weights.manifest import load_manifest
    from FastSAM3DLib.weights.verify import write_record

    logic = module_logic()
    assert scene.slicer_cache_dir() == logic.cacheDir()
    monkeypatch.setenv("FASTSAM3D_CACHE", str(Path(logic.cacheDir()).parent / "elsewhere"))  # not the library's
    entry = load_manifest(None).get("fastsam3d")
    files = model_files(entry, logic.cacheDir())  # what the Download button leaves (contents are not read here)
    files.path.parent.mkdir(parents=True, exist_ok=True)
    files.path.write_bytes(b"x" * 10)
    write_record(files, entry, entry.sha256 or "0" * 64, "download")
    used = []

    def recording_predictor(model, device="auto", cache_dir=None, grow=None, **kwargs):
        used.append((model, cache_dir))
        return lambda volume, points, labels: (tuple(slice(0, n) for n in volume.shape),
                                               np.zeros(volume.shape, bool))

    monkeypatch.setattr(batch, "session_predictor", recording_predictor)
    scene.segment_volume_node(box_volume(harness), [CENTRE], segment_name="lesion")
    assert used == [("fastsam3d", logic.cacheDir())]


def test_console_mistakes_are_refused_before_the_model_runs_and_names_match_exactly(harness):
    """A volume given as segmentation (an AttributeError) or a closed-surface segmentation was refused only after
    the model had run; segmentName="liver" wrote into the user's "Liver" (Slicer's lookup ignores case); a point
    list for a segment that does not exist stayed hidden in the scene; createSession took no volume node."""
    import FastSAM3D
    from FastSAM3DLib import scene
    from FastSAM3DLib.errors import FastSAM3DError
    from test_scene_adapter import make_segmentation, set_segment

    logic, volume, runs = module_logic(), box_volume(harness), []
    sphere = FastSAM3D.spherePredictor(6.0)

    def counted(*args):
        runs.append(1)
        return sphere(*args)

    with pytest.raises(FastSAM3DError, match="Give a segmentation node .*got vtkMRMLScalarVolumeNode"):
        logic.segment(volume, [CENTRE], segmentationNode=volume, predictor=counted)
    surface = make_segmentation(harness.scene, volume, "Surf")
    set_segment(surface, volume, "A", np.ones((14, 22, 26), bool))
    surface.CreateClosedSurfaceRepresentation()
    surface.GetSegmentation().SetSourceRepresentationName("Closed surface")
    with pytest.raises(FastSAM3DError, match="Closed surface"):
        logic.segment(volume, [CENTRE], segmentationNode=surface, predictor=counted)
    assert runs == []
    manual = make_segmentation(harness.scene, volume, "Manual")
    users = set_segment(manual, volume, "Liver", np.zeros((14, 22, 26), bool))
    _, written = logic.segment(volume, [CENTRE], segmentationNode=manual, segmentName="liver", predictor=counted)
    assert written != users and manual.GetSegmentation().GetSegment(written).GetName() == "liver"
    nodes = harness.scene.GetNumberOfNodes()
    with pytest.raises(FastSAM3DError, match="does not exist"):
        scene.prompt_points_node(manual, "Segment_1")
    assert harness.scene.GetNumberOfNodes() == nodes
    session = logic.createSession("fastsam3d-demo", "cpu", None, volume)
    assert session.volume.shape == (14, 22, 26)


def test_console_calls_through_a_server_close_their_sessions_and_need_no_local_pytorch(harness, monkeypatch):
    """Each call opened a server session and left it for 30 minutes: a loop over volumes filled the server."""
    pytest.importorskip("uvicorn", reason="the server extra is not installed")
    from test_server import Server

    volume = box_volume(harness)
    logic = module_logic()
    monkeypatch.setattr(logic, "missingDependencies", lambda: ["torch"])  # a Slicer without PyTorch
    with Server(max_sessions=2) as server:
        for n in range(4):
            node, segment_id = logic.segment(volume, [CENTRE], model="tiny-test", device=server.url,
                                             segmentName=f"s{n}")
            assert model_tag(node, segment_id) == "tiny-test"
        assert len(server.backend.store) == 0


def test_a_console_call_does_not_change_the_memory_bank_of_the_effects_session(harness, one_torch_thread):
    """Models are shared between calls: the console's call without a bank detached the bank the effect's open
    session had been given (and the reverse); now a model with another bank is another model."""
    from FastSAM3DLib.memory import attached_memory
    from FastSAM3DLib.registry import build_model

    _demo_volume(harness)
    effect = harness.create_effect()
    logic = effect._logic()
    _write_bank(build_model("fastsam3d-demo", checkpoint="cached"),
                Path(logic.memoryBankDir()) / "demo-bank.safetensors")
    effect.activate()
    effect.memoryCombo.setCurrentIndex(1)  # the user chooses the bank
    assert harness.click(tuple(CENTRE))
    model = effect._sessions[effect._sessionKey()].model
    assert attached_memory(model) is not None
    logic.segment(box_volume(harness), [CENTRE], model="fastsam3d-demo", device="cpu")  # the console, no bank
    assert harness.click((CENTRE[0] + 1.5, CENTRE[1], CENTRE[2]))
    assert effect._sessions[effect._sessionKey()].model is model and attached_memory(model) is not None


def test_exact_in_the_panel_wins_over_the_environment(harness, monkeypatch, one_torch_thread, int8_kernel):
    """``$FASTSAM3D_PRECISION=fast`` is for scripts: the panel's "Exact" choice is exact."""
    from FastSAM3DLib.scene import batch

    monkeypatch.setenv("FASTSAM3D_PRECISION", "fast")
    batch._cached_model.cache_clear()
    _demo_volume(harness)
    effect = harness.create_effect()
    effect.activate()
    assert effect.precisionCombo.currentData == ""  # "Exact (the official network)"
    assert harness.click(tuple(CENTRE))
    assert effect._sessions[effect._sessionKey()].model.precision == "exact"
    batch._cached_model.cache_clear()


def dependency_panel(button_visible: bool):
    """The module's dependency panel (label, install button, logic) without Slicer's GUI."""
    import FastSAM3D

    widget = FastSAM3D.FastSAM3DWidget.__new__(FastSAM3D.FastSAM3DWidget)
    widget.logic = FastSAM3D.FastSAM3DLogic()
    widget.dependencyLabel = types.SimpleNamespace(text="")
    widget.installButton = types.SimpleNamespace(visible=button_visible)
    return widget


def fake_pytorch_utils(monkeypatch):
    """The PyTorch extension's PyTorchUtils, recording each installTorch call's arguments (returned list)."""
    asked = []
    utils = types.ModuleType("PyTorchUtils")
    utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=lambda **kwargs: asked.append(kwargs))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", utils)
    return asked


def test_a_pytorch_too_old_for_fastsam3d_is_shown_and_updated(harness, monkeypatch):
    """The panel said "all installed" and the install button did nothing while every click failed."""
    from FastSAM3DLib import requirements

    monkeypatch.setattr(requirements, "installed_torch_version", lambda: "2.3.1")
    widget = dependency_panel(button_visible=False)
    widget.updateStatus()
    assert "PyTorch 2.3.1 is installed" in widget.dependencyLabel.text and widget.installButton.visible
    asked = fake_pytorch_utils(monkeypatch)
    pipped = []
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.10's pip
    monkeypatch.setattr(slicer.util, "pip_install", pipped.append)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "light_the_torch" else
                        find_spec(name, *a))
    assert widget.logic.installDependencies(askConfirmation=False) is False  # still too old: not done
    assert asked and asked[0]["torchVersionRequirement"] == requirements.TORCH_REQUIREMENT
    assert pipped == [widget.logic.LIGHT_THE_TORCH]  # installed by us, before the PyTorch extension needs it


def install_panel(harness, monkeypatch, pip_install, packaging_style: bool):
    """The module's panel, with safetensors missing, the user answering OK, and Slicer's pip as given: 5.12+'s
    ``slicer.packaging.pip_install`` (which shows its own error dialog) or 5.10's ``slicer.util.pip_install``.
    Returns (widget, dialogs shown, panel refreshes)."""
    import subprocess

    import FastSAM3D

    harness.app.testing = False  # in testing mode the panel never installs (nor does Slicer show dialogs)
    dialogs, refreshed = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **k: dialogs.append(text), raising=False)
    if packaging_style:
        packaging = types.ModuleType("slicer.packaging")

        def pip_install_512(requirements, constraints=None, blocking=True, show_progress=True, requester=None):
            pip_install(requirements, requester)
            dialogs.append("Package installation failed.")  # Base/Python/slicer/packaging.py, dialog mode
            raise subprocess.CalledProcessError(1, "pip install")

        packaging.pip_install = pip_install_512
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
        monkeypatch.setattr(slicer.util, "pip_install", lambda requirements, **kwargs: packaging.pip_install(
            requirements, **kwargs))
    else:
        def pip_install_510(requirements):
            pip_install(requirements, None)
            raise subprocess.CalledProcessError(1, "pip install")

        monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.10 has no slicer.packaging
        monkeypatch.setattr(slicer.util, "pip_install", pip_install_510)
    widget = FastSAM3D.FastSAM3DWidget.__new__(FastSAM3D.FastSAM3DWidget)  # its panel without Slicer's GUI
    widget.logic = FastSAM3D.FastSAM3DLogic()
    widget.updateStatus = lambda: refreshed.append(True)
    monkeypatch.setattr(widget.logic, "missingDependencies", lambda: ["safetensors"])
    monkeypatch.setattr(widget.logic, "torchProblem", lambda: None)
    return widget, dialogs, refreshed


@pytest.mark.parametrize("packaging_style", [True, False], ids=["slicer-5.12", "slicer-5.10"])
def test_a_failed_installation_is_shown_once_and_the_panel_refreshed(harness, monkeypatch, packaging_style):
    """Slicer 5.12's pip shows its own error dialog, and the panel's tryWithErrorDisplay showed a second one
    (SLICER_REVIEW A7); 5.10's pip shows none, so the panel's is the only one. The panel is refreshed either way
    (tryWithErrorDisplay raises again, which once skipped the refresh)."""
    asked = []
    widget, dialogs, refreshed = install_panel(harness, monkeypatch, lambda req, requester: asked.append(
        (req, requester)), packaging_style)
    widget.onInstall()
    assert asked == [("safetensors>=0.4", "FastSAM3D" if packaging_style else None)]
    assert len(dialogs) == 1 and refreshed == [True], dialogs
    if not packaging_style:
        assert "Installing the Python packages failed" in dialogs[0] and "pip install" in dialogs[0]


def test_pressing_install_again_while_pip_runs_starts_nothing(harness, monkeypatch):
    """Slicer 5.10's pip (and light-the-torch's run in every version) keeps the GUI responsive with
    processEvents and no modal dialog, so the button can be pressed during an install."""
    calls = []

    def pip_install(requirements, requester):
        calls.append(requirements)
        widget.onInstall()  # the second press, from inside the first install's event processing

    widget, dialogs, refreshed = install_panel(harness, monkeypatch, pip_install, False)
    widget.onInstall()
    assert calls == ["safetensors>=0.4"] and len(dialogs) == 1 and refreshed == [True]


def test_after_an_update_while_an_old_pytorch_runs_the_panel_asks_for_a_restart(harness, monkeypatch):
    """PyTorch Utils updated PyTorch while an older one was imported: the panel said "all installed" (it read
    only the version on disk) and every click failed; pressing install again would download it again."""
    from importlib import metadata

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2.6.0" if name == "torch" else real_version(name))
    old_torch = types.ModuleType("torch")  # the one imported before the update
    old_torch.__version__, old_torch.__spec__ = "2.2.2", find_spec("torch")
    monkeypatch.setitem(sys.modules, "torch", old_torch)
    widget = dependency_panel(button_visible=True)
    widget.updateStatus()
    assert "Restart Slicer" in widget.dependencyLabel.text and not widget.installButton.visible
    asked = fake_pytorch_utils(monkeypatch)
    assert widget.logic.installDependencies(askConfirmation=False) is False and asked == []
    with pytest.raises(RuntimeError, match="Restart Slicer"):
        widget.logic.segment(None, [[0.0, 0.0, 0.0]])


def test_on_an_intel_mac_the_panel_says_to_use_a_server_and_nothing_is_downloaded(harness, monkeypatch):
    """The panel offered to install PyTorch, which has no build there since 2.2: a download of GBs that ends in
    "too old" or "no matching distribution"."""
    import platform

    from FastSAM3DLib import requirements

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(requirements, "installed_torch_version", lambda: "2.2.2")
    widget = dependency_panel(button_visible=True)
    widget.updateStatus()
    assert "no build for macOS on Intel" in widget.dependencyLabel.text and not widget.installButton.visible
    asked = fake_pytorch_utils(monkeypatch)
    with pytest.raises(RuntimeError, match="FastSAM3D server"):
        widget.logic.installDependencies(askConfirmation=False)
    assert asked == []


def test_while_the_module_panel_installs_the_effect_starts_no_second_installation(harness, monkeypatch):
    """PyTorchUtils installs through light-the-torch with the GUI processing events for minutes: a press of the
    effect's Install button (or a click) meanwhile must not start a second pip into the same site-packages."""
    from test_effect import ready

    effect = ready(harness)[0]
    effect.predictorForTesting = None
    widget = dependency_panel(button_visible=True)
    widget.updateStatus = lambda: None
    seen, started = [], []

    def install(logic, askConfirmation=True):
        started.append(askConfirmation)
        seen.append(effect.onInstall())  # the effect's Install button, while the GUI stays responsive
        effect.updateGUIFromMRML()
        seen.append(effect.installButton.enabled)
        seen.append(effect._ready())  # a click in a slice view
        seen.append(effect.statusLabel.text)
        return True

    monkeypatch.setattr(type(widget.logic), "installDependencies", install)
    monkeypatch.setattr(type(widget.logic), "missingDependencies", lambda logic: ["torch"])
    widget.onInstall()
    assert started == [True]
    assert seen[:3] == [False, False, False] and "being installed" in seen[3]
    assert not widget.logic.installing()
