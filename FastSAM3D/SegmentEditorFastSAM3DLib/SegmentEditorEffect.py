"""The FastSAM3D Segment Editor effect: click in a slice view, the selected segment gets the 3D result.

Thin by design: the clicks are kept in a point list per segment (FastSAM3DLib.scene), the model runs in an
InteractiveSession (FastSAM3DLib.session) on one worker thread (FastSAM3DLib.background) that never touches
Qt or MRML, and each result is written on the main thread through the Segment Editor's own logic
(FastSAM3DLib.scene.write_region with an EffectEditor), so masking, overwrite and undo behave as for Paint.
A timer polls the worker; each poll waits for it with the GIL released, because Slicer's main thread keeps
the GIL while Qt runs and a worker would otherwise crawl (see FastSAM3DLib.background).
"""
import logging
import os
import sys
import time

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

DEVICES = [("auto", _("Automatic (CUDA, then Apple MPS, then CPU)")), ("cuda", "CUDA"), ("cpu", "CPU"),
           ("mps", "Apple MPS"), ("server", _("FastSAM3D server (address below)"))]
PROMPT_MODES = [("", _("Model default")), ("newest", _("Newest click only")), ("all", _("All clicks"))]
PRECISIONS = [("", _("Exact (the official network)")), ("fast", _("Fast on a CPU (int8 image encoder)"))]
#: The effect's parameters (the Segment Editor node stores them as "FastSAM3D.<name>").
MODEL, DEVICE, PROMPT_MODE, SERVER = "Model", "Device", "PromptMode", "ServerURL"  # (never the token)
MEMORY_BANK = "MemoryBank"  # a Memorizing SAM bank file for the model, or "" (none)
PRECISION = "Precision"  # "fast": the image encoder in int8 on a CPU (FastSAM3DLib.quantize); "": exact
GROW = "Grow"  # "1": grow over several 128^3 regions (FastSAM3DLib.growth); "0": one region; "": the model's default
#: Keys in the slice views while the effect is active (none is used by Slicer's views or the Segment Editor).
TOGGLE_POLARITY_KEY, UNDO_POINT_KEYS, CLEAR_POINTS_KEY = "e", ("x", "BackSpace"), "X"
#: Longest wait for a running job when Slicer quits (a download is cancelled at once).
QUIT_WAIT_SECONDS = 10.0
#: Segments whose session (image embeddings, undo logits, a server session) is kept; the least recently clicked
#: one's goes beyond that (its points stay: the next click on it replays them in a new session).
MAX_SESSIONS = 8


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Left click: a point of the current polarity (include, or exclude after 'e' or the Exclude button);
    x / Backspace: undo point; Shift+x: clear points."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "FastSAM3D"
        scriptedEffect.title = _("FastSAM3D")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        # tests: predictor(volume, points, labels) -> (region, mask) replaces the model
        self.predictorForTesting = None
        self._worker = None
        self._sessions = {}  # (segmentation ID, segment ID) -> InteractiveSession; only the worker touches them
        self._baselines = {}  # (segmentation ID, segment ID) -> the segment before its first point (SegmentBaseline)
        self._written = {}  # the same key -> {source volume ID: the region the series has written on its grid}
        self._undone = {}  # tag of a running "undo" -> (world RAS, include) of the point it removed
        self._sessionOrder = []  # keys whose session may exist on the worker, least recently clicked first
        self._shownPointNodes = []  # IDs of the point lists activate() showed (deactivate() hides these)
        self._sceneObserver = None  # observes the scene's EndCloseEvent once the worker exists
        self._volume = (None, None)  # (cache key, Volume)
        self._include = True  # polarity of the next click
        self._generation = 0  # results of jobs submitted before the last deactivation are not written
        self._sceneGeneration = 0  # the first generation of the current scene (File > Close scene starts one)
        self._downloadCancelled = False
        self._progress = None  # (done, total) of a running download, written by the worker
        self._growth = None  # GrowthProgress of a growing click, written by the worker
        self._stopGrowing = False  # read by the worker: stop the running growth (what grew so far stays)
        self._timer = qt.QTimer()
        self._timer.setInterval(5)
        self._timer.connect("timeout()", self._poll)
        self._quitConnected = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        here = os.path.dirname(__file__)
        for folder in (os.path.join(here, "..", "Resources"), os.path.join(here, "..", "..", "Resources")):
            path = os.path.join(folder, "Icons", "SegmentEditorFastSAM3D.png")
            if os.path.exists(path):
                return qt.QIcon(path)
        return qt.QIcon()

    def helpText(self):
        return "<html>" + _(
            "Segment the selected segment in 3D by clicking on the object in a slice view "
            "(FastSAM3D or SAM-Med3D).<p>"
            "<b>Left click</b>: add a point. Points are <b>include</b> points (inside the object) until you press "
            "<b>e</b> or the <b>Exclude</b> button; then they are exclude points (outside it) until you press "
            "e or Include again. <b>x</b> or <b>Backspace</b>: undo the last point. <b>Shift + x</b>: clear the "
            "points (the segment stays). <b>Ctrl + z</b> / <b>Ctrl + y</b>: undo / redo the segment change (the "
            "points stay; the next click is computed from all of them). Shift, Ctrl and Alt keep their usual "
            "meaning in the views (crosshair, blending, panning).<p>"
            "Each click changes the segment only around the clicks, within the editable area and intensity "
            "range of the Masking section; 'Modify other segments' applies as for Paint. With 'Grow beyond one "
            "region' (Model options; on by default, except for the bundled demo model) every region you click in "
            "is kept and the segment grows into neighbouring regions while it reaches their borders; 'Stop "
            "growing' keeps what is done. The first "
            "use asks to install PyTorch. The bundled demo model works offline; the FastSAM3D and SAM-Med3D weights "
            "(Apache-2.0) are downloaded only when you press Download.") + "</html>"

    # ------------------------------------------------------------------ options panel
    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.statusLabel.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        self.scriptedEffect.addLabeledOptionsWidget(_("Status:"), self.statusLabel)

        polarityRow = qt.QHBoxLayout()
        self.includeButton = qt.QPushButton(_("Include"))
        self.includeButton.setToolTip(_("The next clicks are include points, inside the object (key: e toggles)"))
        self.excludeButton = qt.QPushButton(_("Exclude"))
        self.excludeButton.setToolTip(_("The next clicks are exclude points, outside the object (key: e toggles)"))
        for button, include in ((self.includeButton, True), (self.excludeButton, False)):
            button.checkable = True
            button.connect("clicked()", lambda include=include: self.setPolarity(include))
            polarityRow.addWidget(button)
        self.scriptedEffect.addLabeledOptionsWidget(_("Clicks add:"), polarityRow)

        pointsRow = qt.QHBoxLayout()
        self.pointsLabel = qt.QLabel()
        undoButton = qt.QPushButton(_("Undo point"))
        undoButton.setToolTip(_("Remove the last point and show the result without it (x or Backspace)"))
        undoButton.connect("clicked()", self.onUndoPoint)
        clearButton = qt.QPushButton(_("Clear points"))
        clearButton.setToolTip(_("Forget the points of this segment; the segment stays as it is (Shift+x)"))
        clearButton.connect("clicked()", self.onClearPoints)
        pointsRow.addWidget(self.pointsLabel)
        pointsRow.addWidget(undoButton)
        pointsRow.addWidget(clearButton)
        self.scriptedEffect.addLabeledOptionsWidget(_("Points:"), pointsRow)

        self.installButton = qt.QPushButton(_("Install PyTorch and the other packages..."))
        self.installButton.connect("clicked()", self.onInstall)
        self.scriptedEffect.addOptionsWidget(self.installButton)

        options = ctk.ctkCollapsibleButton()
        options.text = _("Model options")
        options.collapsed = True
        form = qt.QFormLayout(options)
        self.modelCombo = qt.QComboBox()
        self.deviceCombo = qt.QComboBox()
        for value, text in DEVICES:
            self.deviceCombo.addItem(text, value)
        self.promptCombo = qt.QComboBox()
        self.promptCombo.setToolTip(_("Newest click only: FastSAM3D's evaluation protocol. All clicks: SAM-Med3D's."))
        for value, text in PROMPT_MODES:
            self.promptCombo.addItem(text, value)
        self.deviceWarning = qt.QLabel()
        self.deviceWarning.wordWrap = True
        self.weightsLabel = qt.QLabel()
        self.weightsLabel.wordWrap = True
        weightsRow = qt.QHBoxLayout()
        self.downloadButton = qt.QPushButton(_("Download"))
        self.downloadButton.setToolTip(_("Download the weights from their publisher and verify them"))
        self.downloadButton.connect("clicked()", self.onDownload)
        importButton = qt.QPushButton(_("Import..."))
        importButton.setToolTip(_("Use a weights file copied by hand (checked like a download)"))
        importButton.connect("clicked()", self.onImport)
        weightsRow.addWidget(self.downloadButton)
        weightsRow.addWidget(importButton)
        self.memoryCombo = qt.QComboBox()
        self.memoryCombo.setToolTip(_("Memorizing SAM: keys and values of labelled cases, made by this model's "
                                      "weights, mixed into one encoder block (see the README). None: the model "
                                      "alone"))
        memoryRow = qt.QHBoxLayout()
        memoryRow.addWidget(self.memoryCombo)
        chooseBankButton = qt.QPushButton(_("Choose..."))
        chooseBankButton.setToolTip(_("Use a bank file made with 'python -m FastSAM3DLib memory build'"))
        chooseBankButton.connect("clicked()", self.onChooseMemoryBank)
        memoryRow.addWidget(chooseBankButton)
        form.addRow(_("Model:"), self.modelCombo)
        form.addRow(_("Memory bank:"), memoryRow)
        form.addRow(_("Device:"), self.deviceCombo)
        self.serverEdit = qt.QLineEdit()
        self.serverEdit.setToolTip(_("Address of a FastSAM3D server, e.g. https://gpu.example.org:8000"))
        self.serverEdit.connect("editingFinished()", self.updateMRMLFromGUI)
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.setEchoMode(qt.QLineEdit.Password)
        self.tokenEdit.setToolTip(_("The server's token: kept in Slicer's settings on this computer, never in the "
                                    "scene"))
        self.tokenEdit.connect("editingFinished()", self.onTokenEdited)
        form.addRow(_("Server:"), self.serverEdit)
        form.addRow(_("Token:"), self.tokenEdit)
        form.addRow(self.deviceWarning)
        form.addRow(_("Prompting:"), self.promptCombo)
        self.precisionCombo = qt.QComboBox()
        self.precisionCombo.setToolTip(_("Fast: the image encoder's matrix products in int8 on a CPU, a first click up "
                                         "to 1.9x faster; its masks agree with the exact ones on more than 99 % "
                                         "of voxels (README, Speed options). On a GPU the model stays exact."))
        for value, text in PRECISIONS:
            self.precisionCombo.addItem(text, value)
        form.addRow(_("Precision:"), self.precisionCombo)
        self.growCheckBox = qt.QCheckBox(_("Grow beyond one region"))
        self.growCheckBox.setToolTip(_("Keep every region you click in and let the segment grow into neighbouring "
                                       "regions (192 mm each) while it reaches their borders: for organs, vessels "
                                       "and bones larger than one region. Off: one region, which follows the "
                                       "newest click"))
        self.growCheckBox.connect("clicked()", self.onGrowClicked)
        form.addRow(self.growCheckBox)
        form.addRow(_("Weights:"), self.weightsLabel)
        form.addRow(weightsRow)
        self.scriptedEffect.addOptionsWidget(options)
        self.stopGrowingButton = qt.QPushButton(_("Stop growing"))
        self.stopGrowingButton.setToolTip(_("Keep the regions segmented so far and stop growing (one undo step)"))
        self.stopGrowingButton.connect("clicked()", self.onStopGrowing)
        self.stopGrowingButton.visible = False
        self.scriptedEffect.addOptionsWidget(self.stopGrowingButton)
        for combo in (self.modelCombo, self.deviceCombo, self.promptCombo, self.memoryCombo, self.precisionCombo):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.tokenEdit.text = self._logic().serverToken() or ""
        self.setPolarity(True)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault(MODEL, self._logic().defaultModel())
        self.scriptedEffect.setParameterDefault(DEVICE, "auto")
        self.scriptedEffect.setParameterDefault(PROMPT_MODE, "")
        self.scriptedEffect.setParameterDefault(SERVER, "")
        self.scriptedEffect.setParameterDefault(MEMORY_BANK, "")
        self.scriptedEffect.setParameterDefault(GROW, "")
        self.scriptedEffect.setParameterDefault(PRECISION, "")

    def _parameter(self, name):
        """The effect's parameter ``name``, "" when it is not defined. Slicer stores no empty default (its
        setParameterDefault("") is a no-op) and logs a critical error for every read of an undefined parameter,
        so undefined ones are not read (as Slicer's own Logical effect does)."""
        return self.scriptedEffect.parameter(name) if self.scriptedEffect.parameterDefined(name) else ""

    def _options(self):
        """(model, device, prompt mode); the device is the server's address when the server is chosen."""
        device = self._parameter(DEVICE)
        if device == "server":
            device = self._parameter(SERVER).strip() or "server"
        return (self._parameter(MODEL), device, self._parameter(PROMPT_MODE))

    def _sessionOptions(self):
        """What a session is made with: (model, device, prompt mode, memory bank file or "", grow "1" or "0",
        precision "" or "fast")."""
        return self._options() + (self._parameter(MEMORY_BANK), "1" if self._grows() else "0",
                                  self._parameter(PRECISION))

    def _grows(self):
        """Whether segments grow: the user's choice, else the chosen model's default (off where it was measured
        to give no gain)."""
        choice = self._parameter(GROW)
        if choice in ("0", "1"):
            return choice == "1"
        return self._logic().growsByDefault(self._parameter(MODEL))

    def onGrowClicked(self):
        """The user's growth choice is stored (it then holds for every model) and applies from the next click."""
        previous = self._sessionOptions()
        self.scriptedEffect.setParameter(GROW, "1" if self.growCheckBox.checked else "0")
        if self._sessionOptions() != previous:
            self._forgetSessions()  # a server session made with the other choice is closed now, not at expiry
        self.updateMRMLFromGUI()

    def _usesServer(self):
        return self._parameter(DEVICE) == "server"

    def onTokenEdited(self):
        """A new token is kept and the sessions opened with the old one are dropped (an unchanged one keeps them)."""
        if (self.tokenEdit.text or "") == (self._logic().serverToken() or ""):
            return
        self._logic().setServerToken(self.tokenEdit.text)
        self._forgetSessions()

    def updateGUIFromMRML(self):
        model, promptMode = self._parameter(MODEL), self._parameter(PROMPT_MODE)
        device = self._parameter(DEVICE)
        if self.modelCombo.count == 0:
            wasBlocked = self.modelCombo.blockSignals(True)  # the first addItem selects it and would save it
            try:
                for name, text in self._logic().modelChoices():
                    self.modelCombo.addItem(text, name)
            except Exception as exc:  # noqa: BLE001 - a broken manifest must not break the panel
                self._status(_("Cannot list the models: {error}").format(error=exc), error=True)
            finally:
                self.modelCombo.blockSignals(wasBlocked)
        if model and self.modelCombo.count and self.modelCombo.findData(model) < 0:  # e.g. saved by another
            # version: shown as the one used (not when the list could not be read: it is read again next time)
            wasBlocked = self.modelCombo.blockSignals(True)
            self.modelCombo.addItem(_("{name} (not installed here)").format(name=model), model)
            self.modelCombo.blockSignals(wasBlocked)
        self._fillMemoryCombo(model)
        for combo, value in ((self.modelCombo, model), (self.deviceCombo, device), (self.promptCombo, promptMode),
                             (self.memoryCombo, self._parameter(MEMORY_BANK)),
                             (self.precisionCombo, self._parameter(PRECISION))):
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(max(combo.findData(value), 0))
            combo.blockSignals(wasBlocked)
        self.growCheckBox.checked = self._grows()
        server = self._usesServer()
        self.serverEdit.text = self._parameter(SERVER)
        self.serverEdit.visible = self.tokenEdit.visible = server
        missing = [] if server else self._logic().missingDependencies()
        self.installButton.visible = bool(missing)
        self.installButton.enabled = not self._logic().installing()
        self.deviceWarning.text = self._deviceWarning(device) if not missing else ""
        try:
            ready, text = (True, _("on the server")) if server else self._logic().weightsStatus(model)
        except Exception as exc:  # noqa: BLE001
            ready, text = False, str(exc)
        if self._progress is None:
            self.weightsLabel.text = text
            self.downloadButton.text = _("Download")
        self.downloadButton.enabled = not ready or self._progress is not None
        node = self._pointsNode(create=False)
        count = node.GetNumberOfControlPoints() if node else 0
        self.pointsLabel.text = _("{count} point(s)").format(count=count)
        if not self.statusLabel.text:
            self._status(_("Missing packages: {names}. Click in a view to install them.").format(
                names=", ".join(missing)) if missing else _("Ready: left click inside the object."))

    def updateMRMLFromGUI(self):
        """Store what the panel shows. Every widget is read before the first parameter is set: each change makes
        the Segment Editor call updateGUIFromMRML at once, which puts the widgets back to the stored values."""
        previous = self._sessionOptions()
        model = self.modelCombo.currentData or self._logic().defaultModel()
        bank = self.memoryCombo.currentData or ""
        if model != self._parameter(MODEL):
            bank = ""  # a bank belongs to one model's weights
        values = ((MEMORY_BANK, bank), (MODEL, model), (DEVICE, self.deviceCombo.currentData or "auto"),
                  (PROMPT_MODE, self.promptCombo.currentData or ""), (SERVER, self.serverEdit.text.strip()),
                  (PRECISION, self.precisionCombo.currentData or ""))
        for name, value in values:
            self.scriptedEffect.setParameter(name, value)
        if self._sessionOptions() != previous:
            self._forgetSessions()  # new model/device/server/memory bank: new sessions
            if self._sessionOptions()[::3] != previous[::3]:
                self.updateGUIFromMRML()  # the memory banks offered follow the model

    def _forgetSessions(self, key=None):
        """Drop the sessions (of one segment, or all) on the worker; a server's sessions are closed there too."""
        self._sessionOrder = [k for k in self._sessionOrder if key is not None and k != tuple(key)]
        if self._worker is None or self._worker.cancelled():  # stopped: its sessions go with it
            return
        sessions = self._sessions

        def forget():
            for k in [k for k in sessions if key is None or k == tuple(key)]:
                _closeSession(sessions.pop(k))

        self._worker.submit(("forget",), forget)
        self._timer.start()

    def _keepSession(self, key):
        """``key``'s session is the most recently clicked; the sessions beyond :data:`MAX_SESSIONS` go, and so do
        those of removed segments (a server session would hold a server slot until it idles out). What else is
        kept for a segment (series record, hidden point list) goes with its segmentation node: Ctrl+Z in the
        Segment Editor brings a removed segment back under its ID, and its points with it."""
        from FastSAM3DLib import scene

        for known in set(self._sessionOrder) | set(self._baselines) | set(self._written):
            node = slicer.mrmlScene.GetNodeByID(known[0]) if known[0] else None
            if node is None or not node.IsA("vtkMRMLSegmentationNode"):
                self._forgetSessions(known)
                self._baselines.pop(known, None)
                self._written.pop(known, None)
            elif node.GetSegmentation().GetSegment(known[1]) is None and known in self._sessionOrder:
                self._forgetSessions(known)
        scene.remove_orphan_prompt_lists(slicer.mrmlScene)
        self._sessionOrder = [k for k in self._sessionOrder if k != key] + [key]
        while len(self._sessionOrder) > MAX_SESSIONS:
            self._forgetSessions(self._sessionOrder[0])

    def _fillMemoryCombo(self, model):
        """The memory banks made by model ``model`` (bundled and in the cache's memory folder), the chosen
        file even if it lies elsewhere, and "None"; rebuilt without signals."""
        chosen = self._parameter(MEMORY_BANK)
        try:
            banks = self._logic().memoryBanks(model)
        except Exception as exc:  # noqa: BLE001 - an unreadable folder must not break the panel
            logging.info("FastSAM3D: cannot list the memory banks: %s", exc)
            banks = []
        if chosen and chosen not in [path for path, _text in banks]:
            banks.append((chosen, os.path.basename(chosen)))
        items = [("", _("None"))] + banks
        wasBlocked = self.memoryCombo.blockSignals(True)
        try:
            if [self.memoryCombo.itemData(i) for i in range(self.memoryCombo.count)] != [p for p, _t in items]:
                self.memoryCombo.clear()
                for path, text in items:
                    self.memoryCombo.addItem(text, path)
        finally:
            self.memoryCombo.blockSignals(wasBlocked)

    def onChooseMemoryBank(self):
        """Pick a bank file; it must have been made by the selected model's weights (checked at the next click)."""
        path = qt.QFileDialog.getOpenFileName(None, _("Choose a memory bank"), self._logic().memoryBankDir(),
                                              _("Memory banks (*.safetensors)"))
        if not path:
            return
        # Qt writes "/" on every system (the listed banks have "\\" on Windows), and the cache folder may be
        # spelled otherwise: a listed bank is chosen as listed, else the path with the system's separators
        try:
            listed = [bank for bank, _text in self._logic().memoryBanks(self._parameter(MODEL))]
        except Exception:  # noqa: BLE001 - an unreadable folder lists nothing
            listed = []
        path = next((bank for bank in listed if _sameFile(bank, path)), os.path.normpath(path))
        self.scriptedEffect.setParameter(MEMORY_BANK, path)
        self._forgetSessions()
        self.updateGUIFromMRML()

    def _deviceWarning(self, device):
        if "torch" not in sys.modules:  # known after the first click; importing torch here would stall the panel
            return ""
        try:
            from FastSAM3DLib.scene import resolve_device

            resolved = resolve_device(device)
        except Exception as exc:  # noqa: BLE001
            return str(exc)
        if resolved == "cpu":
            return _("Running on the CPU: the first click of an area takes seconds, the next ones less than a second. "
                     "A CUDA GPU (or Apple MPS) is much faster.")
        return ""

    def setPolarity(self, include):
        """Make the next clicks include (True) or exclude (False) points."""
        self._include = bool(include)
        if hasattr(self, "includeButton"):
            self.includeButton.checked = self._include
            self.excludeButton.checked = not self._include

    # ------------------------------------------------------------------ activation
    def activate(self):
        self._showPoints(True)
        self.updateGUIFromMRML()

    def deactivate(self):
        self._showPoints(False)
        self._generation += 1  # a result still being computed is not written once the effect is left
        self._stopGrowing = True  # so a growth in progress ends now rather than running on for nothing

    def sourceVolumeNodeChanged(self):
        self._volume = (None, None)

    def cleanup(self):
        """Called when the Segment Editor widget is destroyed: stop the timer and the worker, drop references."""
        self._timer.stop()
        self._timer.disconnect("timeout()", self._poll)
        if self._quitConnected:
            slicer.app.disconnect("aboutToQuit()", self._onQuit)
            self._quitConnected = False
        if self._sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None
        self._stopWorker()
        self._sessions, self._baselines, self._written, self._volume = {}, {}, {}, (None, None)

    def _onQuit(self):
        self._timer.stop()
        self._stopWorker()

    def _stopWorker(self):
        """End the worker thread; a download or a growth notices at once, a click is waited for (bounded)."""
        if self._worker is not None:
            self._downloadCancelled = True
            self._stopGrowing = True  # quitting from Python or destroying the editor does not deactivate first
            if not self._worker.stop(QUIT_WAIT_SECONDS):
                logging.warning("FastSAM3D: a computation was still running when the worker was stopped")
            self._worker = None

    def _showPoints(self, visible):
        """Show the selected segmentation's point lists (and remember them), or hide the ones shown: Slicer 5.10
        selects the new segmentation before it deactivates the effect, so "the selected one" is no longer the
        one that was shown by then."""
        from FastSAM3DLib import scene

        parameterNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterNode.GetSegmentationNode() if parameterNode else None
        nodes = scene.prompt_point_nodes(segmentationNode) if segmentationNode is not None else []
        if not visible:
            nodes = nodes + [slicer.mrmlScene.GetNodeByID(i) for i in self._shownPointNodes]
        for node in nodes:
            if node is not None and node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility(visible)
        self._shownPointNodes = [node.GetID() for node in nodes] if visible else []

    # ------------------------------------------------------------------ interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
                return False
            key = callerInteractor.GetKeySym()
            if key == TOGGLE_POLARITY_KEY:
                self.setPolarity(not self._include)
                return True
            if key in UNDO_POINT_KEYS:
                self.onUndoPoint()
                return True
            if key == CLEAR_POINTS_KEY:
                self.onClearPoints()
                return True
            return False
        # a quick second click arrives as a double click alone (VTK's Qt adapter sends no press for it); taken
        # as a press, so that it adds its point and does not maximise the view (Slicer's double click)
        if eventId not in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonDoubleClickEvent) \
                or callerInteractor.GetControlKey() or callerInteractor.GetAltKey() or callerInteractor.GetShiftKey():
            return False  # Slicer's own gestures (Shift: pan and crosshair, Ctrl: blend and reset) keep working
        confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
        if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
            return True  # the dialog consumed the button release: do not start an action
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        self.addClick(ras, include=self._include)
        return True

    def addClick(self, ras, include=True):
        """Add an include/exclude point at world RAS ``ras`` for the selected segment and start the model."""
        from FastSAM3DLib import scene

        if self.busy():
            self._status(_("Still working on the previous request; click again when it is done."))
            return False
        context = self._context()
        if context is None or not self._ready():
            return False
        scene.add_prompt_point(self._pointsNode(), ras, include)
        self._predict(context, "click")
        return True

    def onUndoPoint(self):
        """Remove the last prompt point and compute the segment again without it (idle only)."""
        from FastSAM3DLib import scene

        node = self._pointsNode(create=False)
        if self.busy() or node is None or self._context() is None:
            return
        undone = scene.remove_last_prompt_point(node)
        if undone is not None:
            self._predict(self._context(), "undo", undone)

    def onStopGrowing(self):
        """Stop the running growth; the regions segmented so far are written (the click stays one undo step)."""
        self._stopGrowing = True
        self.stopGrowingButton.visible = False

    def onClearPoints(self):
        """Remove every prompt point and end the series; the segment keeps its voxels (idle only)."""
        node = self._pointsNode(create=False)
        if self.busy() or node is None:
            return
        node.RemoveAllControlPoints()
        key = self._sessionKey()
        self._baselines.pop(tuple(key), None)
        self._written.pop(tuple(key), None)
        self._ensureWorker()
        self._forgetSessions(key)
        self._status(_("Points cleared; the segment is unchanged."))

    def busy(self):
        """True while the worker thread computes, installs or downloads."""
        return self._worker is not None and self._worker.busy()

    # ------------------------------------------------------------------ model calls
    def _predict(self, context, action, undone=None):
        """Run the session on the worker for the point list as it is now (``action``: "click" after a point was
        added, "undo" after ``undone`` = (world RAS, include) was removed); the result is written by _poll."""
        from FastSAM3DLib import scene

        segmentationNode, segmentId, sourceVolumeNode = context
        pointsNode = self._pointsNode()
        tag = (action, segmentationNode.GetID(), segmentId, sourceVolumeNode.GetID(),
               pointsNode.GetNumberOfControlPoints(), self._generation)
        if undone is not None:
            self._undone[tag] = undone
        try:
            volume = self._sourceVolume(sourceVolumeNode)
        except Exception as exc:  # noqa: BLE001 - a FastSAM3DError says what to do; the point list is put back
            self._failed(tag, exc)
            return
        scene.show_polarity(pointsNode)
        points, labels = scene.ras_points_from_markups(pointsNode)
        key, options, logic, predictor = (self._sessionKey(), self._sessionOptions(), self._logic(),
                                          self.predictorForTesting)
        self._ensureWorker()
        self._keepSession(key)
        where = (logic.cacheDir(), logic.serverToken())  # read here: the worker must not touch Qt or settings

        def job():  # runs on the worker thread: no Qt, no MRML
            if predictor is not None:
                return predictor(volume, points, labels) if labels.any() else None
            for other in [s for k, s in self._sessions.items() if k != key]:
                forget = getattr(other, "forget_last_paste", None)  # a session made in the console may lack it
                if forget is not None:
                    forget()  # only the segment clicked now keeps its last mask (up to 79 MB each)
            session = self._sessions.get(key)
            if session is None or session.volume is not volume or getattr(session, "fastsam3dOptions", None) != options:
                replaced = self._sessions.pop(key, None)
                if replaced is not None:  # another volume copy or options: a server session is closed, not left
                    _closeSession(replaced)
                session = logic.createSession(options[0], options[1], options[2], volume, options[3] or None,
                                              grow=options[4] == "1", precision=options[5] or "exact",
                                              cacheDir=where[0], token=where[1])
                session.fastsam3dOptions = options
                self._sessions[key] = session
            result = scene.replay_clicks(session, points, labels, progress=progress)
            if result is None and len(labels):  # the session has these points already, but the segment may not
                # show them (Ctrl+Z, the list edited in Markups): the newest point again gives its result to write
                scene.replay_clicks(session, points[:-1], labels[:-1])
                result = scene.replay_clicks(session, points, labels, progress=progress)
            return result

        def progress(state):  # worker thread: only plain attributes, read by _poll
            self._growth = state
            return not self._stopGrowing

        self._growth, self._stopGrowing = None, False
        self._ensureWorker().submit(tag, job)
        self._timer.start()
        self._status(_("Working... (the first click loads the model and may take a while)")
                     if not self._sessions else _("Working..."))

    def _poll(self):
        if self._worker is None:
            self._timer.stop()
            return
        for tag, value, error, seconds in self._worker.poll():
            if tag[0] in ("click", "undo"):
                self._growth = None  # its progress ends with its result (a job queued next may be no growth)
            if tag[0] in ("click", "undo") and tag[-1] != self._generation:
                self._dropStale(tag)
            elif error is not None:
                self._failed(tag, error)
            elif tag[0] in ("click", "undo") and (value is not None or tag[4] == 0):
                self._apply(tag, value, seconds)  # no point left: the segment as it was before the points
            elif tag[0] in ("click", "undo"):
                self._undone.pop(tag, None)
                self._status(_("{count} point(s): nothing to change.").format(count=tag[4]))
            elif tag[0] in ("download", "import"):
                self._progress = None
                self._status(_("Weights ready."))
        if self._progress is not None and self._progress[1]:
            self.weightsLabel.text = _("downloading: {percent:.0f} %").format(
                percent=100.0 * self._progress[0] / self._progress[1])
        growth = self._growth
        if growth is not None and self.busy():
            self.stopGrowingButton.visible = True
            self._status(_("Growing: {regions} regions ({added} added, {seconds:.0f} s)...").format(
                regions=growth.regions, added=growth.added, seconds=growth.elapsed_s))
        if not self.busy():
            self._timer.stop()
            self._progress = None
            self._growth = None
            self.stopGrowingButton.visible = False
            self.updateGUIFromMRML()

    def _dropStale(self, tag):
        """A result that arrived after the effect was left: not written; the point list is put back to match
        (unless the scene was closed since: its node IDs now name the next scene's nodes)."""
        if tag[-1] < self._sceneGeneration:
            return
        self._revertPoints(tag)
        self._forgetSessions((tag[1], tag[2]))  # it holds the dropped action: the next one replays the points
        self._status(_("The last click was not applied because the effect was left while it was computed.")
                     if tag[0] == "click" else
                     _("The last point removal was not applied because the effect was left while it was computed; "
                       "the point is back."))

    def _revertPoints(self, tag):
        """Undo what the action did to the point list (when the list is still as it left it), so that the points
        match the segment: remove the point a click added, or add back the point an undo removed."""
        from FastSAM3DLib import scene

        undone = self._undone.pop(tag, None)
        if tag[0] not in ("click", "undo") or len(tag) < 6:
            return
        segmentationNode = slicer.mrmlScene.GetNodeByID(tag[1])
        node = scene.prompt_points_node(segmentationNode, tag[2], create=False) if segmentationNode else None
        if node is None or node.GetNumberOfControlPoints() != tag[4]:
            return
        if tag[0] == "click":
            scene.remove_last_prompt_point(node)
        elif undone is not None:
            scene.add_prompt_point(node, undone[0], undone[1])

    def _apply(self, tag, result, seconds):
        from FastSAM3DLib import scene
        from FastSAM3DLib.errors import FastSAM3DError
        from FastSAM3DLib.session_common import union

        action, segmentationNodeId, segmentId, sourceVolumeNodeId, count, _generation = tag
        region, mask = (None, None) if result is None else \
            (result.region, result.mask) if hasattr(result, "region") else tuple(result)[:2]
        segmentationNode = slicer.mrmlScene.GetNodeByID(segmentationNodeId)
        sourceVolumeNode = slicer.mrmlScene.GetNodeByID(sourceVolumeNodeId)
        key = (segmentationNodeId, segmentId)
        note = ""
        try:
            start = time.perf_counter()
            if action == "click" and count == 1:  # a new series of points: remember the segment as it is
                self._baselines[key] = scene.SegmentBaseline(segmentationNode, segmentId, sourceVolumeNode)
                self._written.pop(key, None)
            baseline = self._baselines.get(key)
            if count == 0:  # every point removed: give the segment back wherever the points wrote
                if baseline is None or not self._written.get(key):
                    self._undone.pop(tag, None)
                    self._status(_("0 point(s): the segment is as it was.") if baseline is not None else
                                 _("0 point(s): the segment keeps the points' result (they were placed before the "
                                   "effect was started); Ctrl+Z undoes their edits."))
                    return
                baselineVolume = slicer.mrmlScene.GetNodeByID(baseline.volume_id)
                if baselineVolume is None:
                    raise FastSAM3DError(_("The volume the first point was placed on is gone: the segment cannot "
                                           "be given back; Ctrl+Z undoes the points' edits."))
                region = self._writtenOn(sourceVolumeNode, self._written[key])
                if region is None:
                    self._undone.pop(tag, None)
                    self._status(_("0 point(s): the segment is as it was."))
                    return
                mask = baseline.mask_on(region, sourceVolumeNode, baselineVolume)
                if baselineVolume is not sourceVolumeNode:
                    note = _("; given back through this source volume, not the first point's: where it does not "
                             "reach, Ctrl+Z gives the rest back")
            with slicer.util.RenderBlocker():
                edited = scene.write_region(segmentationNode, segmentId, sourceVolumeNode, region, mask,
                                            editor=scene.EffectEditor(self.scriptedEffect),
                                            taken=baseline.taken if baseline is not None else None)
            written = time.perf_counter() - start
            if not edited and count > 0:
                note += _("; the segment already showed this result (no change, no undo step)")
        except Exception as exc:  # noqa: BLE001 - the segment is unchanged; the point list is put back too
            self._failed(tag, exc, computed=True)
            return
        self._undone.pop(tag, None)
        if count == 0:
            self._baselines.pop(key, None)
            self._written.pop(key, None)
        else:
            onVolumes = self._written.setdefault(key, {})
            onVolumes[sourceVolumeNodeId] = union(region, onVolumes.get(sourceVolumeNodeId))
        iou = getattr(result, "iou", None)
        regions = getattr(result, "regions", 1)
        text = _("{count} point(s): model {model:.2f} s, writing {write:.2f} s{iou}{regions}{precision}{growth}"
                 "{note}")
        growthNote = getattr(self._sessions.get(self._sessionKey()), "growth_note", "")
        self._status(text.format(
            count=count, model=seconds, write=written,
            iou=_(", predicted IoU {iou:.2f}").format(iou=iou) if iou is not None else "",
            regions=_(", {n} regions").format(n=regions) if regions > 1 else "",
            precision=self._precisionNote(), growth=_("; {why}").format(why=growthNote) if growthNote else "",
            note=note))

    def _writtenOn(self, volume, written):
        """The region of ``volume``'s grid that holds every region the series wrote (``written``: source volume
        ID -> region on its grid; the user may have changed the source volume during the series), or None."""
        from FastSAM3DLib import scene
        from FastSAM3DLib.session_common import union

        region = None
        for volumeId, part in written.items():
            node = slicer.mrmlScene.GetNodeByID(volumeId)
            if node is not None:
                region = union(region, part if node is volume else scene.region_on(part, node, volume))
        return region

    def _precisionNote(self):
        """Why the fast precision that was chosen is not used (e.g. on a GPU), or ""."""
        if self._parameter(PRECISION) != "fast":
            return ""
        model = getattr(self._sessions.get(self._sessionKey()), "model", None)
        if model is None or getattr(model, "precision", "fast") == "fast":
            return ""
        why = getattr(model, "precision_note", "") or _("fast is unavailable")
        return _("; exact precision: {why}").format(why=why)

    def _failed(self, tag, error, computed=False):
        """Say why ``tag``'s action failed and put its point back. ``computed``: the session did the action but its
        result could not be written, so the session is dropped (the next action replays the point list); a
        session that refused the action kept its state."""
        from FastSAM3DLib.errors import FastSAM3DError

        self._revertPoints(tag)
        if computed:
            self._forgetSessions((tag[1], tag[2]))
        if isinstance(error, FastSAM3DError):
            message = str(error)
        else:
            message = _("Unexpected error ({kind}: {error}); details are in the Python console.").format(
                kind=type(error).__name__, error=error)
            logging.error("FastSAM3D: %s", getattr(error, "details", error))
        self._status(message, error=True)
        self._progress = None

    # ------------------------------------------------------------------ dependencies and weights
    def _ready(self):
        """Installed packages (asks first) and weights; says what to do when something is missing."""
        if self.predictorForTesting is not None:
            return True
        logic = self._logic()
        bank = self._parameter(MEMORY_BANK)
        if bank and self._usesServer():
            self._status(_("A memory bank needs a local model: choose 'None' as memory bank under 'Model options', "
                           "or a CPU or GPU device."), error=True)
            return False
        if bank and not os.path.isfile(bank):
            self._status(_("The memory bank {path} is missing: choose another under 'Model options'.").format(
                path=bank), error=True)
            return False
        if self._usesServer():  # the server has the model and its weights; this computer needs no PyTorch
            if self._options()[1] == "server":
                self._status(_("Enter the FastSAM3D server's address under 'Model options'."), error=True)
                return False
            return True
        if logic.installing():
            self._status(_("PyTorch is being installed; click again when it is done."))
            return False
        if logic.missingDependencies() and not self.onInstall():
            return False
        problem = logic.torchProblem()
        if problem:
            self._status(problem, error=True)
            return False
        try:
            ready, text = logic.weightsStatus(self._options()[0])
        except Exception as exc:  # noqa: BLE001 - e.g. a model without published weights
            ready, text = False, str(exc)
        if not ready:
            self._status(_("No weights for this model yet ({text}). Open 'Model options' and press Download "
                           "or Import, or choose the bundled demo model.").format(text=text), error=True)
            return False
        return True

    def onInstall(self):
        """Install the missing packages once (a second request while installing is refused); True when done."""
        logic = self._logic()
        if logic.installing():  # this panel's or another's (the module's, another Segment Editor's)
            return False
        self.installButton.enabled = False
        try:
            with logic.installation(), slicer.util.WaitCursor():
                installed = logic.installDependencies(askConfirmation=True)
        except Exception as exc:  # noqa: BLE001 - one message, in the panel (pip may have shown its own)
            logging.error("FastSAM3D: installing the Python packages failed: %s", exc)
            self._status(_("Installing the Python packages failed: {error}").format(error=exc), error=True)
            return False
        finally:
            self.updateGUIFromMRML()
        if not installed:  # declined, or updated while an older PyTorch still runs (then: restart)
            logic = self._logic()
            problem = None if logic.missingDependencies() else logic.torchProblem()
            self._status(problem or _("FastSAM3D needs PyTorch: press 'Install PyTorch...' when you are ready."),
                         error=True)
        return bool(installed)

    def onDownload(self):
        """Download the selected model's weights on the worker after a confirmation; pressed again, cancel."""
        if self._progress is not None:  # the button reads "Cancel" during a download
            self._downloadCancelled = True
            return
        model = self._options()[0]
        if not slicer.util.confirmOkCancelDisplay(
                _("Download the weights of '{model}' from their publisher (hundreds of MB)?").format(model=model)):
            return
        self._downloadCancelled = False
        self._progress = (0, 0)
        self.downloadButton.text = _("Cancel download")
        logic = self._logic()

        def progress(done, total):
            self._progress = (done, total or 0)
            return not self._downloadCancelled

        cacheDir = logic.cacheDir()  # read here: the worker must not touch Qt
        self._ensureWorker().submit(("download",), lambda: logic.downloadWeights(model, progress, cacheDir=cacheDir))
        self._timer.start()
        self._status(_("Downloading the weights..."))

    def onImport(self):
        """Import a checkpoint file the user chooses as the selected model's weights."""
        path = qt.QFileDialog.getOpenFileName(None, _("Import model weights"), "",
                                              _("Checkpoints (*.pth *.pt *.ckpt *.safetensors);;All files (*)"))
        if not path:
            return
        model, logic = self._options()[0], self._logic()
        self._progress = (0, 0)
        cacheDir = logic.cacheDir()  # read here: the worker must not touch Qt
        self._ensureWorker().submit(("import",), lambda: logic.importWeights(model, path, cacheDir=cacheDir))
        self._timer.start()
        self._status(_("Checking and importing {path}...").format(path=path))

    # ------------------------------------------------------------------ helpers
    def _logic(self):
        if getattr(self, "_logicInstance", None) is None:
            import FastSAM3D

            self._logicInstance = FastSAM3D.FastSAM3DLogic()
        return self._logicInstance

    def _ensureWorker(self):
        if self._worker is None:
            from FastSAM3DLib.background import POLL_INTERVAL_MS, Worker

            self._worker = Worker()
            self._timer.setInterval(POLL_INTERVAL_MS)
            if not self._quitConnected:
                slicer.app.connect("aboutToQuit()", self._onQuit)
                self._quitConnected = True
            if self._sceneObserver is None:
                self._sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent,
                                                                   self._onSceneClosed)
        return self._worker

    def _onSceneClosed(self, caller=None, event=None):
        """File > Close scene: nothing of the old scene is kept (sessions, their volume copies and embeddings,
        baselines; node IDs are reused by the next scene) and a result still being computed is not written."""
        self._forgetSessions()
        self._baselines, self._written, self._undone = {}, {}, {}
        self._volume, self._shownPointNodes = (None, None), []
        self._generation += 1
        self._sceneGeneration = self._generation

    def _status(self, text, error=False):
        self.statusLabel.text = text
        self.statusLabel.setStyleSheet("color: #c62828" if error else "")

    def _context(self):
        """(segmentation node, selected segment ID, source volume node), or None after saying what is missing."""
        node = self.scriptedEffect.parameterSetNode()
        segmentationNode = node.GetSegmentationNode() if node else None
        segmentId = node.GetSelectedSegmentID() if node else None
        sourceVolumeNode = node.GetSourceVolumeNode() if node else None
        if segmentationNode is None or not segmentId or sourceVolumeNode is None:
            self._status(_("Select a segmentation, a segment and a source volume first."), error=True)
            return None
        return segmentationNode, segmentId, sourceVolumeNode

    def _sessionKey(self):
        node = self.scriptedEffect.parameterSetNode()
        segmentationNode = node.GetSegmentationNode() if node else None
        return (segmentationNode.GetID() if segmentationNode else None, node.GetSelectedSegmentID() if node else None)

    def _pointsNode(self, create=True):
        from FastSAM3DLib import scene

        node = self.scriptedEffect.parameterSetNode()
        segmentationNode = node.GetSegmentationNode() if node else None
        segmentId = node.GetSelectedSegmentID() if node else None
        if segmentationNode is None or not segmentId:
            return None
        points = scene.prompt_points_node(segmentationNode, segmentId, create=create)
        if points is not None and points.GetID() not in self._shownPointNodes:
            self._shownPointNodes.append(points.GetID())  # shown while the effect is active: hidden when left
        return points

    def _sourceVolume(self, volumeNode):
        """The source volume as a Volume copy, rebuilt only when the node, its voxels, its geometry or its
        transform change (not when it is renamed: each new copy means new sessions, which replay every point)."""
        from FastSAM3DLib import scene

        transform = volumeNode.GetParentTransformNode()
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        key = (volumeNode.GetID(), volumeNode.GetImageData().GetMTime(),
               tuple(ijkToRas.GetElement(r, c) for r in range(4) for c in range(4)),
               transform.GetID() if transform else None, transform.GetTransformToWorldMTime() if transform else 0)
        if self._volume[0] != key:
            self._volume = (key, scene.volume_from_node(volumeNode))
        return self._volume[1]


def _closeSession(session):
    """Close a server session now (a local one has nothing to close); on the worker thread."""
    if hasattr(session, "close"):
        try:
            session.close()
        except Exception:  # noqa: BLE001 - an unreachable server forgets it after its idle expiry
            logging.info("FastSAM3D: could not close a server session", exc_info=True)


def _sameFile(a, b):
    """Whether paths ``a`` and ``b`` name the same existing file, however they are spelled."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False
