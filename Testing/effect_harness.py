"""Runs the real Segment Editor effect (FastSAM3D/SegmentEditorFastSAM3DLib/SegmentEditorEffect.py) without Qt.

What is real: the effect's and the module's own code, Slicer's MRML scene, segmentation, markups and selection
nodes, the markups logic, and ``vtkSlicerSegmentEditorLogic`` (``slicer-core``); the worker thread; Slicer's
GIL regime between timer ticks (:mod:`slicer_event_loop`).

What stands in for the application (each with the behaviour of Slicer's or Qt's source that the effect
depends on, not a recording of calls):

* ``qt``: widgets that hold their state; ``QComboBox`` emits ``currentIndexChanged`` when its first item is
  added or its index changes, unless signals are blocked (``qcombobox.cpp``); ``QTimer`` fires only from
  :meth:`EffectHarness.run_event_loop`, which holds the GIL in C between ticks as Slicer's loop does.
* the scripted effect: parameters stored on the Segment Editor node as ``<effect name>.<name>``
  (``qSlicerSegmentEditorAbstractEffect::setParameter`` adds the effect name), edits through a real
  Segment Editor logic (``saveStateForUndo``, ``modifySegmentByLabelmap``), ``undo`` as the editor's Ctrl+Z.
* ``slicer.app``: a cache folder, ``testingEnabled``, ``aboutToQuit``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import threading
import types
from pathlib import Path

import slicer
import vtk

from slicer_event_loop import hold_gil

REPO = Path(__file__).resolve().parents[1]
EFFECT_FILE = REPO / "FastSAM3D" / "SegmentEditorFastSAM3DLib" / "SegmentEditorEffect.py"


# ------------------------------------------------------------------------------------------------------
# qt and ctk


def _positional_count(slot, available):
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


class _Signals:
    def __init__(self):
        self._slots = {}
        self._blocked = False

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot=None):
        if slot is None:
            self._slots.pop(signal, None)
        elif slot in self._slots.get(signal, []):
            self._slots[signal].remove(slot)

    def blockSignals(self, block):
        previous, self._blocked = self._blocked, bool(block)
        return previous

    def emit(self, signal, *args):
        """Call the connected slots; like PythonQt, pass a Python slot only as many arguments as it takes."""
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args[:_positional_count(slot, len(args))])

    def receivers(self, signal):
        return len(self._slots.get(signal, []))


class QWidget(_Signals):
    def __init__(self, *args):
        super().__init__()
        self.text, self.enabled, self.visible, self.toolTip, self.styleSheet = "", True, True, "", ""
        self.wordWrap = self.checkable = self.checked = self.collapsed = False
        if args and isinstance(args[0], str):
            self.text = args[0]

    def setToolTip(self, text):
        self.toolTip = text

    def setStyleSheet(self, text):
        self.styleSheet = text

    def setTextInteractionFlags(self, flags):
        pass


class QPushButton(QWidget):
    def click(self):
        if self.enabled:
            if self.checkable:
                self.checked = not self.checked
            self.emit("clicked()")


class QCheckBox(QPushButton):
    """A check box: a click toggles ``checked``, then ``clicked()`` is emitted (QAbstractButton)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.checkable = True


class QComboBox(QWidget):
    """Qt's combo box as far as the effect uses it, including the signal of the first added item."""

    def __init__(self, *args):
        super().__init__(*args)
        self._items, self._index = [], -1

    @property
    def count(self):
        return len(self._items)

    @property
    def currentData(self):
        return self._items[self._index][1] if self._index >= 0 else None

    @property
    def currentText(self):
        return self._items[self._index][0] if self._index >= 0 else ""

    def currentIndex(self):
        return self._index

    def addItem(self, text, data=None):
        self._items.append((text, data))
        if self._index < 0:  # QComboBoxPrivate::_q_rowsInserted selects the first item and says so
            self.setCurrentIndex(0)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def itemText(self, index):
        return self._items[index][0]

    def itemData(self, index):
        return self._items[index][1]

    def clear(self):
        """Remove every item; like Qt, the index becomes -1 and that is signalled."""
        self._items = []
        self.setCurrentIndex(-1)

    def setCurrentIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)


class QLineEdit(QWidget):
    Password = 2

    def setEchoMode(self, mode):
        self.echoMode = mode


class QSettings:
    """Slicer's settings (one store per harness, see :class:`EffectHarness`); like every Qt object in Slicer,
    only for the main thread (a worker thread reading them raises here)."""

    store = {}

    def __init__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("QSettings used on a worker thread: read settings on the main thread")

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value

    def remove(self, key):
        self.store.pop(key, None)


class QTimer(_Signals):
    def __init__(self):
        super().__init__()
        self.interval, self.active = 0, False

    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class _Layout:
    def __init__(self, *args):
        self.items = []

    def addWidget(self, widget):
        self.items.append(widget)

    def addRow(self, *items):
        self.items.append(items)


def _qt_module():
    qt = types.ModuleType("qt")
    qt.QWidget, qt.QLabel, qt.QPushButton, qt.QComboBox, qt.QTimer = QWidget, QWidget, QPushButton, QComboBox, QTimer
    qt.QCheckBox = QCheckBox
    qt.QLineEdit, qt.QSettings = QLineEdit, type("QSettings", (QSettings,), {"store": {}})
    qt.QHBoxLayout = qt.QFormLayout = qt.QVBoxLayout = _Layout
    qt.QIcon = lambda *args: ("icon",) + args
    qt.Qt = types.SimpleNamespace(TextSelectableByMouse=1)
    qt.QEventLoop = types.SimpleNamespace(WaitForMoreEvents=4)
    qt.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *args: "")
    return qt


def _ctk_module():
    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton = QWidget
    return ctk


# ------------------------------------------------------------------------------------------------------
# the application and the scripted effect


class FakeApp(_Signals):
    """``slicer.app`` as the module and the effect use it."""

    def __init__(self, cache_path):
        super().__init__()
        self.cachePath = str(cache_path)
        self.testing = True

    def testingEnabled(self):
        return self.testing

    def quit(self):
        self.emit("aboutToQuit()")


class ScriptedEffect:
    """``qSlicerSegmentEditorScriptedEffect`` for one effect, on a real Segment Editor logic and node."""

    NotConfirmed, ConfirmedWithoutDialog, ConfirmedWithDialog = 0, 1, 2

    def __init__(self, scene, editor_node):
        self.name, self.title, self.perSegment, self.requireSegments = "", "", False, False
        self.node = editor_node
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(editor_node)
        self.options = []
        self.critical = []  # what Slicer would log as critical errors
        self.active = False  # the C++ effect's active(): see follow_activation

    def parameterSetNode(self):
        return self.node

    def _key(self, name):
        return f"{self.name}.{name}"  # Slicer adds the effect's name: callers must not

    # Slicer's rules (qSlicerSegmentEditorAbstractEffect.cxx): an empty value is never stored for a parameter that
    # has none, a default is set only where no non-empty value is, and reading a parameter that has no value at all
    # logs a critical error (kept in ``critical`` here, which the harness's users check).
    #
    # A change is announced as Slicer does (qSlicerSegmentEditorAbstractEffect::setCommonParameter): the node's full
    # Modified event is suppressed and EffectParameterModified is invoked, on which qMRMLSegmentEditorWidget has
    # connected every registered effect's updateGUIFromMRML: so the effect's panel is updated synchronously inside
    # setParameter, before the caller's next line (deferred only while the node is in StartModify/EndModify).
    def setParameter(self, name, value):
        old, value = self.node.GetAttribute(self._key(name)), str(value)
        if (old is None and value == "") or value == (old or ""):
            return
        disabled = self.node.GetDisableModifiedEvent()
        self.node.SetDisableModifiedEvent(1)
        self.node.SetAttribute(self._key(name), value)
        self.node.SetDisableModifiedEvent(disabled)
        self.node.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def connect_effect(self, effect):
        """What qMRMLSegmentEditorWidget::registerEffect does after setMRMLDefaults: parameter changes update the
        effect's panel."""
        self.node.AddObserver(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified,
                              lambda caller, event: self.active and effect.updateGUIFromMRML())

    def follow_activation(self, effect):
        """What qSlicerSegmentEditorScriptedEffect adds around the effect's activate/deactivate: the C++ effect is
        active from just before its panel is updated and the Python activate() runs, until deactivate() runs; its
        updateGUIFromMRML does nothing while inactive (``if (!this->active()) return;``)."""
        activate, deactivate = effect.activate, effect.deactivate

        def activated():
            self.active = True
            effect.updateGUIFromMRML()
            activate()

        def deactivated():
            self.active = False
            deactivate()

        effect.activate, effect.deactivate = activated, deactivated

    def parameterDefined(self, name):
        return bool(self.node.GetAttribute(self._key(name)))

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def parameter(self, name):
        value = self.node.GetAttribute(self._key(name))
        if value is None:
            value = self.node.GetAttribute(name)  # Slicer falls back to the common parameter
        if value is None:
            self.critical.append(f"Parameter named {name} cannot be found for effect {self.name}")
            return ""
        return value

    def addLabeledOptionsWidget(self, label, widget):
        self.options.append((label, widget))

    def addOptionsWidget(self, widget):
        self.options.append(widget)

    def confirmCurrentSegmentVisible(self):
        return self.ConfirmedWithoutDialog

    def referenceGeometryImage(self):
        self.logic.SetSegmentationNode(self.node.GetSegmentationNode())
        self.logic.SetSourceVolumeNode(self.node.GetSourceVolumeNode())
        return self.logic.GetReferenceGeometryImage() if self.logic.UpdateReferenceGeometryImage() else None

    def saveStateForUndo(self):
        self.logic.SaveStateForUndo()

    def modifySegmentByLabelmap(self, segmentation_node, segment_id, labelmap, mode):
        # as qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap: the selection is left as it is
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode, True, False)

    def undo(self):
        """The Segment Editor's Ctrl+Z."""
        self.logic.Undo()


class AbstractScriptedSegmentEditorEffect:
    """What ``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect`` gives an effect."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect
        scriptedEffect.self = lambda: self

    def xyToRas(self, xy, viewWidget):
        return viewWidget.xy_to_ras(xy)


class SliceView:
    """A slice view widget and its interactor, as processInteractionEvents sees them."""

    def __init__(self, xy_to_ras=lambda xy: (float(xy[0]), float(xy[1]), 0.0)):
        self.xy_to_ras = xy_to_ras
        self.key, self.shift, self.control, self.alt, self.position = "", False, False, False, (0, 0)

    def className(self):
        return "qMRMLSliceWidget"

    def GetKeySym(self):
        return self.key

    def GetShiftKey(self):
        return self.shift

    def GetControlKey(self):
        return self.control

    def GetAltKey(self):
        return self.alt

    def GetEventPosition(self):
        return self.position


# ------------------------------------------------------------------------------------------------------
# the harness


class EffectHarness:
    """The effect in a scene with a volume, a segmentation and a selected segment, ready to click."""

    def __init__(self, monkeypatch, cache_path, volume_node=None):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.logics = []
        for name, logic in [("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic()),
                            ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                            ("Markups", slicer.vtkSlicerMarkupsLogic())]:
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics.append(logic)
        self.app = FakeApp(cache_path)
        self._install_modules(monkeypatch)
        self.editor_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.scripted = ScriptedEffect(self.scene, self.editor_node)
        self.view = SliceView()

    def _install_modules(self, monkeypatch):
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        slm = types.ModuleType("slicer.ScriptedLoadableModule")
        for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget",
                     "ScriptedLoadableModuleTest"):
            setattr(slm, name, type(name, (), {"__init__": lambda self, *args: None}))
        effects = types.ModuleType("SegmentEditorEffects")
        effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
        for name, module in (("qt", _qt_module()), ("ctk", _ctk_module()), ("slicer.i18n", i18n),
                             ("slicer.ScriptedLoadableModule", slm), ("SegmentEditorEffects", effects)):
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        monkeypatch.setattr(slicer, "app", self.app, raising=False)
        monkeypatch.setattr(slicer.util, "RenderBlocker", contextlib.nullcontext)
        monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
        for name in ("FastSAM3D", "SegmentEditorFastSAM3DLib"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.syspath_prepend(str(REPO / "FastSAM3D"))

    def create_effect(self):
        """Load the effect's file as Slicer does (module named after its folder) and build the options panel."""
        spec = importlib.util.spec_from_file_location("SegmentEditorFastSAM3DLib", EFFECT_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["SegmentEditorFastSAM3DLib"] = module
        spec.loader.exec_module(module)
        self.module = module
        self.effect = module.SegmentEditorEffect(self.scripted)
        self.effect.setMRMLDefaults()
        self.scripted.connect_effect(self.effect)
        self.scripted.follow_activation(self.effect)
        self.effect.setupOptionsFrame()
        return self.effect

    def select(self, volume_node, segmentation_node, segment_id):
        """What the Segment Editor does when the user picks these in its panel."""
        self.editor_node.SetAndObserveSourceVolumeNode(volume_node)
        self.editor_node.SetAndObserveSegmentationNode(segmentation_node)
        self.editor_node.SetSelectedSegmentID(segment_id)

    def run_event_loop(self, loop_seconds=0.005, timeout=120.0, each_tick=None):
        """Slicer's loop: the GIL held in C, then the effect's timer callback, until its timer stops.
        ``each_tick()``, if given, runs after every timer callback, as a user acting on the panel between events."""
        import time

        start = time.perf_counter()
        timer = self.effect._timer
        while timer.isActive():
            hold_gil(loop_seconds)
            timer.emit("timeout()")
            if each_tick is not None:
                each_tick()
            if time.perf_counter() - start > timeout:
                raise TimeoutError("the effect was still busy")

    def click(self, ras, include=True):
        """Add a point through the effect and run the loop until its result is written."""
        added = self.effect.addClick(ras, include)
        self.run_event_loop()
        return added

    def key(self, key, shift=False):
        self.view.key, self.view.shift = key, shift
        return self.effect.processInteractionEvents(self.view, vtk.vtkCommand.KeyPressEvent, self.view)

    def mouse_press(self, xy, shift=False, control=False, alt=False):
        self.view.position, self.view.shift, self.view.control, self.view.alt = xy, shift, control, alt
        return self.effect.processInteractionEvents(self.view, vtk.vtkCommand.LeftButtonPressEvent, self.view)

    def mouse_double_click(self, xy, shift=False, control=False, alt=False):
        """A second press soon after the first: VTK's Qt adapter (QVTKInteractorAdapter) turns Qt's
        MouseButtonDblClick into LeftButtonDoubleClickEvent and sends no press for it."""
        self.view.position, self.view.shift, self.view.control, self.view.alt = xy, shift, control, alt
        return self.effect.processInteractionEvents(self.view, vtk.vtkCommand.LeftButtonDoubleClickEvent, self.view)

    def close(self):
        worker = getattr(self.effect, "_worker", None) if hasattr(self, "effect") else None
        if worker is not None:
            worker.stop(10)
        self.scene.Clear(True)
        critical = self.scripted.critical
        assert not critical, f"{len(critical)} critical error(s) Slicer would log, e.g. {critical[:3]}"
