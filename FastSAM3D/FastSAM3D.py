"""FastSAM3D for 3D Slicer: the module, its logic for scripts, and the self-test.

The interactive tool is the Segment Editor effect "FastSAM3D" (``SegmentEditorFastSAM3DLib/``), registered
when Slicer starts. Every decision lives in the bundled library ``FastSAM3DLib``; this file only connects it
to Slicer (dependencies, weights, the batch call, the self-test). Nothing is installed or downloaded at
import time or without the user's consent.

Run the self-test without the main window (from the repository root)::

    Slicer --no-main-window --additional-module-paths FastSAM3D --python-script FastSAM3D/FastSAM3D.py
"""
import contextlib
import importlib.util
import logging
import os
import sys

import qt

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                          ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

EFFECT_NAME = "FastSAM3D"
EFFECT_PACKAGE = "SegmentEditorFastSAM3DLib"  # Slicer names the effect's Python module after its folder
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _libraryOnPath():
    """Installed, FastSAM3DLib sits beside this file (on sys.path); in the source tree, one folder up."""
    for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(folder, "FastSAM3DLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


_libraryOnPath()


def resourcePath(*parts):
    """A file of the extension's Resources folder (installed beside this file, or the repository's)."""
    for folder in (os.path.join(MODULE_DIR, "Resources"), os.path.join(os.path.dirname(MODULE_DIR), "Resources")):
        if os.path.isdir(folder):
            return os.path.join(folder, *parts)
    return os.path.join(MODULE_DIR, "Resources", *parts)


#: createSession's default for values the caller did not read on the main thread: read them there.
READ_HERE = object()


class FastSAM3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FastSAM3D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["FastSAM3D for Slicer team"]
        self.parent.helpText = _(
            "Interactive 3D segmentation with FastSAM3D and SAM-Med3D: click inside an object in a slice view and "
            "the selected segment gets the 3D result. Use it as the <b>FastSAM3D</b> effect of the Segment "
            "Editor; from the Python console, <code>FastSAM3DLogic().segment(volumeNode, pointsRas)</code> "
            "segments volumes in a loop.")
        self.parent.helpText += "<p>" + _("For more information, see the {url_start}documentation{url_end}.").format(
            url_start='<a href="https://github.com/fastsam3d/SlicerFastSAM3D#readme">', url_end="</a>") + "</p>"
        self.parent.acknowledgementText = _(
            "FastSAM3D (Shen et al., MICCAI 2024) and SAM-Med3D (Wang et al., 2023): code and weights Apache-2.0 "
            "per their repositories. Not for clinical use.")
        iconPath = resourcePath("Icons", "FastSAM3D.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)
        slicer.app.connect("startupCompleted()", registerEditorEffect)


def registerEditorEffect(reload=False):
    """Register the Segment Editor effect once (at start-up, or later when the module is opened).

    ``reload=True`` (the module's "Reload" in developer mode) reads the effect's source again: Slicer would
    otherwise keep the class it cached in ``sys.modules`` under the effect folder's name. Segment Editors made
    afterwards get the new code; one already made keeps its copy of the effect until Slicer restarts
    (``qSlicerSegmentEditorEffectFactory::copyEffects`` adds only effects an editor does not have yet).
    """
    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    path = os.path.join(MODULE_DIR, "SegmentEditorFastSAM3DLib", "SegmentEditorEffect.py").replace("\\", "/")
    registered = [effect for effect in factory.registeredEffects() if effect.name == EFFECT_NAME]
    if reload:
        sys.modules.pop(EFFECT_PACKAGE, None)
        for effect in registered:
            effect.setPythonSource(path)  # the factory's instance now runs the new code; new editors clone it
        logging.info("FastSAM3D: effect reloaded; a Segment Editor already shown runs the new effect code only "
                     "after Slicer restarts")
    if registered:
        return
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(path)
    instance.self().register()


class FastSAM3DWidget(ScriptedLoadableModuleWidget):
    """A short panel: where the tool is, dependency state, and the batch call."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        registerEditorEffect()
        self.logic = FastSAM3DLogic()
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        info = qt.QLabel(_("FastSAM3D is an effect of the Segment Editor: select a segment, choose the FastSAM3D "
                           "effect, then left-click inside the object (press e to switch to exclude points)."))
        info.wordWrap = True
        form.addRow(info)
        openButton = qt.QPushButton(_("Open the Segment Editor with FastSAM3D"))
        openButton.connect("clicked()", self.onOpenSegmentEditor)
        form.addRow(openButton)
        self.dependencyLabel = qt.QLabel()
        self.dependencyLabel.wordWrap = True
        form.addRow(_("Python packages:"), self.dependencyLabel)
        self.installButton = qt.QPushButton(_("Install PyTorch and the other packages..."))
        self.installButton.connect("clicked()", self.onInstall)
        form.addRow(self.installButton)
        example = qt.QLabel("<code>FastSAM3DLogic().segment(volumeNode, [[r, a, s]], segmentName='lesion')</code>")
        example.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        form.addRow(_("Batch (Python console):"), example)
        self.layout.addStretch(1)
        self.updateStatus()

    def updateStatus(self):
        from FastSAM3DLib.requirements import no_torch_build_here, torch_restart_problem

        missing = self.logic.missingDependencies()
        problem = None if missing else self.logic.torchProblem()
        # where installing cannot help: an old PyTorch still running (restart), an Intel Mac (use a server)
        restart = problem if problem and problem == torch_restart_problem() else None
        unhelped = restart or (no_torch_build_here() if "torch" in missing or problem else None)
        if unhelped:
            self.dependencyLabel.text = unhelped
        elif missing:
            self.dependencyLabel.text = _("missing: {packages}").format(packages=", ".join(missing))
        else:
            self.dependencyLabel.text = problem or _("all installed")
        self.installButton.visible = bool(missing or problem) and not unhelped

    def onReload(self):
        """Developer mode "Reload": reload this module, the library and the effect's code."""
        for name in [name for name in sys.modules if name == "FastSAM3DLib" or name.startswith("FastSAM3DLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)
        registerEditorEffect(reload=True)

    def onOpenSegmentEditor(self):
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setActiveEffectByName(EFFECT_NAME)

    def onInstall(self):
        """Install what is missing; a failure is shown in one dialog (pip's own where Slicer's pip shows one)."""
        if self.logic.installing():  # Slicer's pip keeps the GUI alive: a second press would nest
            return
        try:
            with self.logic.installation(), slicer.util.WaitCursor():
                self.logic.installDependencies(askConfirmation=True)
        except Exception as exc:  # noqa: BLE001 - shown here once, the traceback in the details
            logging.info("FastSAM3D: installing the packages failed", exc_info=True)
            if not getattr(exc, "shownBySlicer", False):
                import traceback

                slicer.util.errorDisplay(_("Installing the Python packages failed.") + f"\n\n{exc}",
                                         detailedText=traceback.format_exc())
        finally:
            self.updateStatus()  # what is installed now, after a failure too


class FastSAM3DLogic(ScriptedLoadableModuleLogic):
    """FastSAM3D for scripts, the effect and the tests: dependencies, weights, models, the batch call.

    Downloaded weights are kept in Slicer's cache folder (``cacheDir()``); the bundled demo model needs none.
    """

    #: Packages installed with pip besides torch (numpy and SimpleITK come with Slicer).
    PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4"}
    #: What the PyTorch extension installs PyTorch with (as its own ``_installLightTheTorch`` asks for it).
    LIGHT_THE_TORCH = "light-the-torch>=0.5"

    _installInProgress = False  # shared by every FastSAM3D panel (module, each Segment Editor's effect)

    # --- dependencies
    def installing(self):
        """Whether a FastSAM3D panel is installing packages now (Slicer's pip keeps the GUI responsive meanwhile,
        so another panel could otherwise start a second installation into the same site-packages)."""
        return FastSAM3DLogic._installInProgress

    @contextlib.contextmanager
    def installation(self):
        """The block of one panel's installation: :meth:`installing` is True for every panel meanwhile."""
        if FastSAM3DLogic._installInProgress:
            raise RuntimeError(_("The Python packages are being installed already; wait until that is done."))
        FastSAM3DLogic._installInProgress = True
        try:
            yield
        finally:
            FastSAM3DLogic._installInProgress = False

    def missingDependencies(self):
        """Import names of the Python packages that are not installed yet (checked without importing them)."""
        names = ["torch"] + list(self.PIP_REQUIREMENTS)
        return [name for name in names if importlib.util.find_spec(name) is None]

    def torchProblem(self):
        """None when the installed PyTorch is new enough, else a message saying what to do (torch not imported)."""
        from FastSAM3DLib.requirements import torch_requirement_problem

        return torch_requirement_problem()

    def installDependencies(self, askConfirmation=True):
        """Install what is missing: torch (also one too old for FastSAM3D) through the PyTorch extension, the rest
        with pip. True when done."""
        from FastSAM3DLib.requirements import TORCH_REQUIREMENT, no_torch_build_here, torch_restart_problem

        missing = self.missingDependencies()
        problem = None if "torch" in missing else self.torchProblem()
        if problem and problem != torch_restart_problem():
            missing = ["torch"] + missing  # installed, but older than FastSAM3D needs: the extension updates it
        if not missing:
            return not problem  # False while an older PyTorch still runs: only a restart helps
        noBuild = no_torch_build_here() if "torch" in missing else None
        if noBuild:
            raise RuntimeError(noBuild)  # no download of GBs that cannot work
        if askConfirmation and slicer.app.testingEnabled():
            logging.info("FastSAM3D: not installing %s in testing mode", ", ".join(missing))
            return False  # confirmOkCancelDisplay would answer OK by itself: never install GBs unasked
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("FastSAM3D needs these Python packages: {packages}. PyTorch is installed by the PyTorch "
                  "extension (a download of up to a few GB, for your GPU if one is found); this can take several "
                  "minutes and Slicer does not respond meanwhile. Install now?").format(packages=", ".join(missing)),
                windowTitle=_("FastSAM3D: install packages")):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("The PyTorch extension is missing. Install 'PyTorch' from the Extensions "
                                     "Manager, restart Slicer, then try again.")) from None
            if importlib.util.find_spec("light_the_torch") is None:  # installed here, so that pip's failure
                self.pipInstall(self.LIGHT_THE_TORCH)  # dialog is known to have been shown (or not)
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                            torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        for name, requirement in self.PIP_REQUIREMENTS.items():
            if name in missing:
                self.pipInstall(requirement)
        importlib.invalidate_caches()
        return not self.missingDependencies() and not self.torchProblem()

    def pipInstall(self, requirement):
        """``slicer.util.pip_install(requirement)``, its dialogs titled FastSAM3D where Slicer shows them (5.12+).

        A failure raises ``subprocess.CalledProcessError`` with ``shownBySlicer`` set when Slicer's pip already
        showed it in its own error dialog, so that the caller does not show a second one.
        """
        import inspect
        import subprocess

        try:
            from slicer import packaging
        except ImportError:
            packaging = None  # Slicer 5.10: pip's output goes to the log, a failure is only raised
        ownDialogs = packaging is not None and "requester" in inspect.signature(packaging.pip_install).parameters
        try:
            if ownDialogs:
                slicer.util.pip_install(requirement, requester="FastSAM3D")
            else:
                slicer.util.pip_install(requirement)
        except subprocess.CalledProcessError as exc:
            # Slicer's packaging.pip_install shows its error dialog unless testing (on the main thread, as here)
            exc.shownBySlicer = ownDialogs and not slicer.app.testingEnabled()
            raise

    # --- models and weights
    def cacheDir(self):
        """Where downloaded weights are kept: a folder in Slicer's cache folder (Application settings), shared
        with the console functions of FastSAM3DLib.scene."""
        from FastSAM3DLib.scene import slicer_cache_dir

        return slicer_cache_dir()

    def modelNames(self):
        """Every selectable model: the downloadable ones, then the bundled demo model."""
        from FastSAM3DLib.weights import available_models

        return [choice.name for choice in available_models(self.cacheDir())]

    def modelChoices(self):
        """(name, text for a menu) of every selectable model, saying which are ready."""
        from FastSAM3DLib.weights import available_models

        return [(c.name, c.name if c.ready else _("{name} (weights not here yet)").format(name=c.name))
                for c in available_models(self.cacheDir())]

    def defaultModel(self):
        """The model offered first: the first whose weights are ready (offline: the bundled demo)."""
        from FastSAM3DLib.weights import preferred_model

        try:
            return preferred_model(self.cacheDir())
        except Exception:  # noqa: BLE001 - a broken manifest: the panel reports it; keep a sensible name
            logging.exception("FastSAM3D: cannot list the models")
            return "fastsam3d-demo"

    def weightsStatus(self, model):
        """(ready, text) for the model's weights; cheap (no hashing)."""
        from FastSAM3DLib.weights import model_choice

        choice = model_choice(model, self.cacheDir())
        if choice.source == "bundled":
            return choice.ready, (_("bundled with the extension ({licence})").format(licence=choice.licence)
                                  if choice.ready else _("missing from this installation: reinstall FastSAM3D"))
        if choice.ready:
            return True, _("ready ({licence} weights, in {folder})").format(licence=choice.licence,
                                                                             folder=choice.path.parent)
        if choice.state.startswith("changed"):
            return False, _("file present but not verified: Download or Import it again")
        return False, _("not on this computer ({licence} weights): Download, or Import a copied file").format(
            licence=choice.licence)

    def downloadWeights(self, model, progress=None, cacheDir=None):
        """Download and verify the weights (may take minutes); ``progress(done, total)`` returning False cancels.
        ``cacheDir``: read on the main thread by a caller that runs this on a worker (default: read here)."""
        from FastSAM3DLib.weights import download_weights

        return download_weights(model, cacheDir if cacheDir is not None else self.cacheDir(), progress)

    def importWeights(self, model, path, progress=None, cacheDir=None):
        """Check and copy a weights file obtained by hand into the cache (``cacheDir``: as downloadWeights)."""
        from FastSAM3DLib.weights import import_weights

        return import_weights(model, path, cacheDir if cacheDir is not None else self.cacheDir(), progress)

    SERVER_TOKEN_SETTING = "FastSAM3D/ServerToken"

    def serverToken(self):
        """The FastSAM3D server's token: Slicer's settings on this computer, else $FASTSAM3D_TOKEN (never the scene)."""
        token = qt.QSettings().value(self.SERVER_TOKEN_SETTING)
        return str(token) if token else os.environ.get("FASTSAM3D_TOKEN") or None

    def setServerToken(self, token):
        """Keep the server's token in Slicer's settings (an empty one removes it)."""
        settings = qt.QSettings()
        if token:
            settings.setValue(self.SERVER_TOKEN_SETTING, token)
        else:
            settings.remove(self.SERVER_TOKEN_SETTING)

    # --- memory banks (Memorizing SAM)
    def memoryBankDir(self):
        """Where the effect looks for memory banks besides the bundled ones: ``memory`` in the weights cache."""
        return os.path.join(self.cacheDir(), "memory")

    def memoryBanks(self, model):
        """(path, text for a menu) of the memory banks made by model ``model``: bundled, then in
        ``memoryBankDir()``. Only the files' headers are read (PyTorch is not imported). A bank the model cannot
        use says why in its text: made with other weights than the ones the model loads here, or by a newer
        FastSAM3D (choosing it anyway, the first click refuses it with what to do)."""
        from FastSAM3DLib.memory.header import NEWER_FORMAT, OTHER_WEIGHTS, find_banks
        from FastSAM3DLib.resources import resources_dir
        from FastSAM3DLib.weights import weights_sha256

        try:
            sha256 = weights_sha256(model, self.cacheDir())
        except Exception:  # noqa: BLE001 - a broken manifest: the banks are listed unchecked
            sha256 = None
        found = find_banks([resources_dir() / "Models", self.memoryBankDir()], model=model, weights_sha256=sha256)
        why = {OTHER_WEIGHTS: _("made with other weights: not usable with these"),
               NEWER_FORMAT: _("made by a newer FastSAM3D: update the extension")}
        return [(str(b["path"]), _("{name} ({why})").format(name=os.path.basename(str(b["path"])),
                                                           why=why[b["problem"]]) if b["problem"] else
                 _("{name} ({entries} entries, {crop} crops)").format(
                     name=os.path.basename(str(b["path"])), entries=b["entries"], crop=b["crop"])) for b in found]

    def growsByDefault(self, model):
        """Whether ``model``'s segments grow over several regions unless the user says otherwise (read without
        PyTorch: the panel asks before PyTorch is installed, and must not load it on the main thread)."""
        from FastSAM3DLib.model_configs import get_model_config

        try:
            return get_model_config(model).grows_by_default
        except ValueError:  # an unknown name: the panel reports the model itself
            return True

    def createSession(self, model, device, promptMode, volume, memoryBank=None, grow=False, precision=None,
                      cacheDir=None, token=READ_HERE):
        """A session on ``volume`` (runs on the effect's worker thread): an InteractiveSession that loads the model
        once, or, when ``device`` is a server's address, a RemoteSession that keeps the geometry here. ``volume``:
        a FastSAM3DLib ``Volume``, or, from the Python console, a volume node (read here: main thread only).

        ``memoryBank``: a Memorizing SAM bank file attached to the (local) model with the default settings; a
        bank made by other weights, or a server device, is refused with a message saying what to do.
        ``grow``: the session's segments grow over several regions (FastSAM3DLib.growth), with a server too where
        this computer has PyTorch (else one region, and the session's ``growth_note`` says why). ``precision``:
        None (``$FASTSAM3D_PRECISION``, else exact) or ``"fast"`` (int8 image encoder on a CPU; with a memory bank
        too). ``cacheDir``, ``token``: the weights cache and the server token (None: no token), read by the caller
        on the main thread (default: read here, which touches Qt: not on a worker thread).
        """
        from FastSAM3DLib import remote, scene

        if hasattr(volume, "IsA"):  # a node given in the console
            volume = scene.volume_from_node(volume)
        if remote.is_server_url(device):
            if memoryBank:
                from FastSAM3DLib.errors import FastSAM3DError

                raise FastSAM3DError(_("A memory bank needs a local model: choose 'None' as memory bank, or a CPU "
                                       "or GPU device instead of the server."))
            return remote.RemoteSession(device, model, volume, prompt_mode=promptMode or None,
                                        token=self.serverToken() if token is READ_HERE else token, grow=bool(grow))
        from FastSAM3DLib.errors import FastSAM3DError
        from FastSAM3DLib.quantize import resolve_precision
        from FastSAM3DLib.session import InteractiveSession

        try:
            effective = resolve_precision(precision)
        except ValueError as exc:
            raise FastSAM3DError(str(exc)) from None
        # a model per memory bank (scene.load_model keeps them apart): no session's bank changes under it
        built = scene.load_model(model, scene.resolve_device(device), "cached",
                                 cacheDir if cacheDir is not None else self.cacheDir(), effective, memoryBank)
        return InteractiveSession(built, volume, prompt_mode=promptMode or None, grow=bool(grow))

    # --- batch
    def segment(self, volumeNode, pointsRas, labels=None, segmentationNode=None, segmentName="FastSAM3D",
                model=None, device="auto", editorSettings=None, predictor=None, memoryBank=None, grow=None,
                precision=None):
        """Segment one object from world-RAS clicks and write it into a segment; returns (segmentationNode, segmentId).

        ``labels``: 1 = include, 0 = exclude per point (default all include). ``model``: a name of
        ``modelNames()`` (default: the first whose weights are here). The segmentation is created when
        not given; the segment ``segmentName`` is reused or added. ``editorSettings``: a
        ``FastSAM3DLib.scene.EditorSettings`` (editable area, overwrite mode, intensity range). ``memoryBank``: a
        Memorizing SAM bank file (``memoryBanks(model)`` lists them) attached to the model. ``device``: "auto",
        "cuda", "cpu", "mps", or a FastSAM3D server's address (no PyTorch needed here then; the server session
        is closed when the call returns). ``grow``: segments grow over several regions (None: the model's
        default, ``growsByDefault(model)``). ``precision``: None ($FASTSAM3D_PRECISION, else exact), "exact" or
        "fast". Example::

            logic = slicer.util.getModuleLogic("FastSAM3D")
            for volumeNode in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                segmentation, segmentId = logic.segment(volumeNode, [[-5.0, 20.0, 35.0]], segmentName="tumour")
        """
        from FastSAM3DLib import remote, scene

        model = model or self.defaultModel()
        if predictor is None:
            if not remote.is_server_url(device):
                missing = self.missingDependencies()
                if missing:
                    raise RuntimeError(_("Missing Python packages: {packages}. Run installDependencies() "
                                         "first.").format(packages=", ".join(missing)))
                problem = self.torchProblem()
                if problem:
                    raise RuntimeError(problem)
            grow = self.growsByDefault(model) if grow is None else grow
            predictor = self._sessionPredictor(model, device, memoryBank, grow, precision)
        return scene.segment_volume_node(volumeNode, pointsRas, labels, segmentationNode, segmentName, model,
                                         predictor, editorSettings, device, self.cacheDir())

    def _sessionPredictor(self, model, device, memoryBank, grow, precision):
        """``predictor(volume, points, labels)``: a fresh session per volume (with the bank or without), all
        clicks; a server's session is closed once the result is here."""
        from FastSAM3DLib import scene

        def predict(volume, pointsRas, labels):
            session = self.createSession(model, device, None, volume, memoryBank, grow, precision)
            try:
                return scene.replay_clicks(session, pointsRas, labels)
            finally:
                if hasattr(session, "close"):
                    session.close()

        predict.model_name = model
        return predict


def spherePredictor(radiusMm=8.0):
    """A deterministic stand-in for the model (tests): a ball around the first include point, minus balls of
    the same radius around the exclude points, on the source voxel grid."""
    import numpy as np

    def predict(volume, pointsRas, labels):
        points, labels = np.asarray(pointsRas, float).reshape(-1, 3), np.asarray(labels).ravel()
        if not labels.any():
            raise ValueError("no include point")
        world = np.stack(np.meshgrid(*[np.arange(n) for n in volume.array.shape[::-1]], indexing="ij"), -1)
        world = (world.reshape(-1, 3) @ volume.ijk_to_ras[:3, :3].T + volume.ijk_to_ras[:3, 3])
        world = world.reshape(volume.array.shape[::-1] + (3,)).transpose(2, 1, 0, 3)  # (k, j, i, 3)
        inside = np.linalg.norm(world - points[np.flatnonzero(labels)[0]], axis=-1) <= radiusMm
        for point in points[labels == 0]:
            inside &= np.linalg.norm(world - point, axis=-1) > radiusMm
        return (slice(None), slice(None), slice(None)), inside

    return predict


class FastSAM3DTest(ScriptedLoadableModuleTest):
    """Loads the bundled sample CT, activates the effect, clicks, and checks the segment (stand-in model;
    the real model too when PyTorch and its weights are installed)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)
        registerEditorEffect()

    def runTest(self):
        self.setUp()
        self.test_EffectClicks()
        self.setUp()
        self.test_BatchLogic()
        self.setUp()
        self.test_RealModel()

    # --- helpers
    def _sampleVolume(self):
        from FastSAM3DLib.resources import sample_path

        return slicer.util.loadVolume(str(sample_path("totalseg_example_ct_sm.nii.gz")))

    def _segmentArray(self, segmentationNode, segmentId, volumeNode):
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0

    def _centreRas(self, volumeNode):
        bounds = [0.0] * 6
        volumeNode.GetRASBounds(bounds)
        return [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]

    def _editor(self, volumeNode, segmentationNode):
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.show()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentationNode)
        editorWidget.setSourceVolumeNode(volumeNode)
        return editorWidget, editorNode

    def _click(self, effect, ras, include):
        """A real click in the Red view when there is one; the effect's click entry point otherwise."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # --no-main-window
            return effect.addClick(ras, include)
        sliceWidget = layoutManager.sliceWidget("Red")
        sliceWidget.sliceLogic().GetSliceNode().JumpSliceByCentering(*ras)
        slicer.app.processEvents()
        xy = effect.rasToXy(ras, sliceWidget)
        effect.setPolarity(include)
        slicer.util.clickAndDrag(sliceWidget.sliceView(), start=xy, end=xy, steps=1)
        return True

    def _wait(self, effect, timeout=300.0):
        """Run Slicer's event loop until the effect is idle. Not time.sleep: that would release the GIL and
        hide a worker that only runs when the effect's timer lets it (the loop itself keeps the GIL)."""
        import time

        start = time.time()
        while effect.busy() and time.time() - start < timeout:
            slicer.app.processEvents(qt.QEventLoop.WaitForMoreEvents)  # the effect's timer wakes it up
        slicer.app.processEvents()
        self.assertFalse(effect.busy(), "FastSAM3D did not finish in time")

    # --- tests
    def test_EffectClicks(self):
        import numpy as np
        from FastSAM3DLib import scene

        self.delayDisplay("Load the sample CT and open the Segment Editor")
        volumeNode = self._sampleVolume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "organ")
        editorWidget, editorNode = self._editor(volumeNode, segmentationNode)
        editorNode.SetSelectedSegmentID(segmentId)
        editorWidget.setActiveEffectByName(EFFECT_NAME)
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the FastSAM3D effect is not registered")
        effect = effect.self()
        effect.predictorForTesting = spherePredictor(8.0)

        self.delayDisplay("Include click")
        centre = self._centreRas(volumeNode)
        self.assertTrue(self._click(effect, centre, include=True))
        self._wait(effect)
        volume = scene.volume_from_node(volumeNode)
        points, labels = scene.ras_points_from_markups(scene.prompt_points_node(segmentationNode, segmentId))
        self.assertEqual(labels.tolist(), [1])
        expected = spherePredictor(8.0)(volume, points, labels)[1]
        first = self._segmentArray(segmentationNode, segmentId, volumeNode)
        self.assertTrue(np.array_equal(first, expected), "segment differs from the predicted ball")
        self.assertGreater(int(first.sum()), 50)

        self.delayDisplay("Exclude click")
        offset = [centre[0] + 6.0, centre[1], centre[2]]
        self.assertTrue(self._click(effect, offset, include=False))
        self._wait(effect)
        points, labels = scene.ras_points_from_markups(scene.prompt_points_node(segmentationNode, segmentId))
        self.assertEqual(labels.tolist(), [1, 0])
        second = self._segmentArray(segmentationNode, segmentId, volumeNode)
        self.assertTrue(np.array_equal(second, spherePredictor(8.0)(volume, points, labels)[1]))
        self.assertLess(int(second.sum()), int(first.sum()))

        self.delayDisplay("Undo point, then the Segment Editor's undo")
        effect.onUndoPoint()
        self._wait(effect)
        self.assertTrue(np.array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), first))
        editorWidget.undo()
        self.assertTrue(np.array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), second))
        effect.onClearPoints()
        self._wait(effect)
        self.assertEqual(scene.prompt_points_node(segmentationNode, segmentId).GetNumberOfControlPoints(), 0)
        editorWidget.setActiveEffectByName("")
        self.delayDisplay("test_EffectClicks passed")

    def test_BatchLogic(self):
        import numpy as np

        volumeNode = self._sampleVolume()
        segmentationNode, segmentId = FastSAM3DLogic().segment(volumeNode, [self._centreRas(volumeNode)],
                                                               segmentName="ball", predictor=spherePredictor(5.0))
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(), "ball")
        self.assertGreater(int(np.count_nonzero(self._segmentArray(segmentationNode, segmentId, volumeNode))), 10)
        self.delayDisplay("test_BatchLogic passed")

    def test_RealModel(self):
        logic = FastSAM3DLogic()
        if logic.missingDependencies() or logic.torchProblem():
            self.delayDisplay("test_RealModel skipped: PyTorch (2.4 or newer) is not installed")
            return
        import numpy as np

        volumeNode = self._sampleVolume()
        segmentationNode, segmentId = logic.segment(volumeNode, [self._centreRas(volumeNode)])
        self.assertGreater(int(np.count_nonzero(self._segmentArray(segmentationNode, segmentId, volumeNode))), 0)
        self.delayDisplay("test_RealModel passed")


if __name__ == "__main__":  # Slicer --no-main-window --additional-module-paths FastSAM3D --python-script FastSAM3D.py
    try:
        FastSAM3DTest().runTest()
        logging.info("FastSAM3D self-test passed")
        slicer.util.exit(0)
    except Exception:
        logging.exception("FastSAM3D self-test failed")
        slicer.util.exit(1)
