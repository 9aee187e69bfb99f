"""Slicer in a box: the MSKdeX module loaded through 3D Slicer's own Python code.

What is real here: Slicer's Python (``slicer.util``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``, ``SampleData``) imported from
``../shared/reference/slicer/vX`` (never copied into the repository), and slicer-core's MRML
scene, nodes, storage nodes and module logics (volumes, plots, application logic, slice
logics). What is stood in: ``qt``, ``ctk`` and ``slicer.app`` (C++ in Slicer), as small as the
module and Slicer's Python need: widgets that store values and fire signals in connection
order (a QCheckBox emits stateChanged before toggled, as Qt does), a UI loader that builds the
panel from the real .ui file (unknown widget classes or properties fail), an IO manager that
loads and saves through the real MRML storage nodes the way qSlicerCoreIOManager does, and a
layout manager whose slice views are real vtkMRMLSliceLogic pipelines.

Usage: ``box = SlicerBox("v5.8.1", tmp_path); box.start(); ...; box.stop()`` (the fixture in
conftest.py does it); ``box.stop()`` puts every patched module back.
"""

from __future__ import annotations

import inspect
import locale
import logging
import os
import sys
import time
import types
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = ROOT.parent / "shared" / "reference" / "slicer"
VERSIONS = ("v5.8.1", "v5.10.0")
MODULE_DIR = ROOT / "MSKdeX"


def slicer_core():
    """slicer-core's ``slicer`` package (Slicer's MRML in plain Python), or None when not installed."""
    try:
        import slicer
    except ImportError:
        return None
    return slicer if hasattr(slicer, "vtkMRMLScene") else None


def require_slicer_core():
    """slicer-core's ``slicer`` package; skips the calling test module when it is not installed."""
    import pytest

    slicer = slicer_core()
    if slicer is None:
        pytest.skip("slicer-core (Slicer's MRML in plain Python) not installed", allow_module_level=True)
    return slicer


def reference_dir(version: str) -> Path | None:
    """Slicer's Python sources of ``version`` (None when ../shared/reference is absent)."""
    d = REFERENCE / version
    return d if (d / "Base" / "Python" / "slicer" / "util.py").is_file() else None


# ---------------------------------------------------------------------------------------------
# qt stand-in
# ---------------------------------------------------------------------------------------------
def _call(slot, args):
    """Call ``slot`` with as many of the signal's arguments as it accepts (PythonQt does the same)."""
    try:
        sig = inspect.signature(slot)
    except (TypeError, ValueError):
        return slot(*args)
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return slot(*args)
    n = len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    return slot(*args[:n])


class Signal:
    """A Qt signal: slots run in connection order, synchronously."""

    def __init__(self, owner, name):
        self.owner, self.name, self.slots = owner, name, []

    def connect(self, slot):
        self.slots.append(slot)
        return True

    def disconnect(self, slot=None):
        if slot is None:
            self.slots.clear()
            return True
        for k, s in enumerate(self.slots):
            if s == slot:
                del self.slots[k]
                return True
        return False

    def emit(self, *args):
        for slot in list(self.slots):
            _call(slot, args)


class QObject:
    SIGNALS: tuple = ("destroyed",)

    def __init__(self, parent=None):
        object.__setattr__(self, "_props", {})
        self._parent = None
        self._children = []
        self.objectName = ""
        for klass in type(self).__mro__:
            for name in getattr(klass, "SIGNALS", ()):
                if name not in self.__dict__:
                    self.__dict__[name] = Signal(self, name)
        if parent is not None:
            self.setParent(parent)

    # PythonQt string connections: obj.connect("clicked(bool)", slot)
    def connect(self, signature, slot):
        return getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature, slot=None):
        return getattr(self, signature.split("(")[0]).disconnect(slot)

    @property
    def name(self):
        return self.objectName

    @name.setter
    def name(self, value):
        self.objectName = value

    def setObjectName(self, value):
        self.objectName = value

    def property(self, name):
        return self._props.get(name)

    def setProperty(self, name, value):
        self._props[name] = value

    def parent(self):
        return self._parent

    def setParent(self, parent):
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def children(self):
        return list(self._children)

    def findChildren(self, cls=None):
        out = []
        for c in self._children:
            if cls is None or isinstance(c, cls):
                out.append(c)
            out.extend(c.findChildren(cls))
        return out

    def isWidgetType(self):
        return False

    def deleteLater(self):
        pass

    def className(self):
        return type(self).__name__


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None

    def isWidgetType(self):
        return True

    def setLayout(self, layout):
        self._layout = layout
        layout._widget = self

    def layout(self):
        return self._layout

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setVisible(self, v):
        self.visible = bool(v)

    def isVisible(self):
        return self.visible

    def setEnabled(self, v):
        self.enabled = bool(v)

    def isEnabled(self):
        return self.enabled


class QLayout(QObject):
    def __init__(self, parent=None):
        super().__init__(None)
        self._widget = None
        if isinstance(parent, QWidget):
            parent.setLayout(self)

    def addWidget(self, widget, *args):
        if self._widget is not None:
            widget.setParent(self._widget)

    def addLayout(self, *args):
        pass

    def addRow(self, *args):
        for a in args:
            if isinstance(a, QWidget):
                self.addWidget(a)

    def parentWidget(self):
        return self._widget


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


def _value_property(attr, signal, convert, clamp=False):
    """A Qt value property: setting a different value emits ``signal`` with the new value."""

    def get(self):
        return self.__dict__[attr]

    def set_(self, value):
        value = convert(self, value)
        if clamp:
            value = min(max(value, self.minimum), self.maximum)
        if self.__dict__.get(attr) != value:
            self.__dict__[attr] = value
            getattr(self, signal).emit(value)

    return property(get, set_)


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self.wordWrap = False


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled", "pressed", "released")

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self.__dict__["checked"] = False

    def _set_checked(self, value):
        value = bool(value)
        if value != self.__dict__["checked"]:
            self.__dict__["checked"] = value
            self.toggled.emit(value)

    checked = property(lambda self: self.__dict__["checked"], _set_checked)

    def setChecked(self, v):
        self.checked = v

    def isChecked(self):
        return self.checked

    def click(self):
        """A user's click: only an enabled button reacts (as in Qt)."""
        if not self.enabled:
            return False
        if self.checkable:
            self.checked = not self.checked
        self.clicked.emit(self.checked)
        return True


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    SIGNALS = ("stateChanged",)

    def __init__(self, text="", parent=None):
        super().__init__(text, parent)
        self.checkable = True

    def _set_checked(self, value):
        value = bool(value)
        if value != self.__dict__["checked"]:
            self.__dict__["checked"] = value
            self.stateChanged.emit(2 if value else 0)  # Qt: checkStateSet() before toggled
            self.toggled.emit(value)

    checked = property(lambda self: self.__dict__["checked"], _set_checked)


class QLineEdit(QWidget):
    SIGNALS = ("textChanged", "editingFinished", "returnPressed")
    text = _value_property("_text", "textChanged", lambda self, v: str(v))

    def __init__(self, parent=None):
        super().__init__(parent)
        self.__dict__["_text"] = ""
        self.placeholderText = ""


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged", "currentTextChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items = []
        self.__dict__["currentIndex"] = -1

    def _set_index(self, index):
        index = int(index)
        if not -1 <= index < len(self._items):
            return
        if index != self.__dict__["currentIndex"]:
            self.__dict__["currentIndex"] = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    currentIndex = property(lambda self: self.__dict__["currentIndex"], _set_index)

    @property
    def currentText(self):
        i = self.currentIndex
        return self._items[i] if 0 <= i < len(self._items) else ""

    @currentText.setter
    def currentText(self, text):
        if text in self._items:
            self.currentIndex = self._items.index(text)

    @property
    def count(self):
        return len(self._items)

    def addItem(self, text, *args):
        self._items.append(str(text))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def addItems(self, texts):
        for t in texts:
            self.addItem(t)

    def itemText(self, i):
        return self._items[i]

    def findText(self, text):
        return self._items.index(text) if text in self._items else -1

    def setCurrentIndex(self, i):
        self.currentIndex = i

    def clear(self):
        self._items = []
        self.__dict__["currentIndex"] = -1
        self.currentIndexChanged.emit(-1)


class _Ranged(QWidget):
    SIGNALS = ("valueChanged",)
    INTEGER = False

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum = (0, 99) if self.INTEGER else (0.0, 99.0)
        self.__dict__["value"] = self.minimum
        self.singleStep = 1
        self.decimals = 2
        self.suffix = ""
        self.prefix = ""

    def _convert(self, v):
        if self.INTEGER:
            return int(round(v))
        return round(float(v), int(self.decimals))  # Qt rounds to the shown decimals

    value = _value_property("value", "valueChanged", _convert, clamp=True)

    def setRange(self, lo, hi):
        self.minimum, self.maximum = lo, hi
        self.value = self.value

    def setMinimum(self, v):
        self.setRange(v, max(v, self.maximum))

    def setMaximum(self, v):
        self.setRange(min(v, self.minimum), v)

    def setValue(self, v):
        self.value = v


class QSpinBox(_Ranged):
    INTEGER = True


class QSlider(_Ranged):
    INTEGER = True


class QDoubleSpinBox(_Ranged):
    pass


class QTextEdit(QWidget):
    SIGNALS = ("textChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""

    def toPlainText(self):
        return self._text

    def setPlainText(self, text):
        if text != self._text:
            self._text = str(text)
            self.textChanged.emit()


class QColor:
    def __init__(self, *args):
        self.args = args


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value, self.minimum, self.maximum = 0, 0, 100
        self.textVisible = True
        self.format = "%p%"


class QTableWidgetItem:
    def __init__(self, text=""):
        self._text = str(text)

    def text(self):
        return self._text


class QTableWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._items, self._rows, self._cols, self._header = {}, 0, 0, []

    def clear(self):
        self._items, self._header = {}, []

    def setRowCount(self, n):
        self._rows = int(n)

    def rowCount(self):
        return self._rows

    def setColumnCount(self, n):
        self._cols = int(n)

    def columnCount(self):
        return self._cols

    def setHorizontalHeaderLabels(self, labels):
        self._header = list(labels)

    def setItem(self, r, c, item):
        assert 0 <= r < self._rows and 0 <= c < self._cols, (r, c)
        self._items[(r, c)] = item

    def item(self, r, c):
        return self._items.get((r, c))


class QListWidgetItem:
    def __init__(self, text=""):
        self._text, self._flags, self._check, self._list = str(text), 1 | 32, None, None

    def text(self):
        return self._text

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = int(flags)

    def checkState(self):
        return self._check

    def setCheckState(self, state):
        if state != self._check:
            self._check = state
            if self._list is not None:
                self._list.itemChanged.emit(self)


class QListWidget(QWidget):
    SIGNALS = ("itemChanged", "currentRowChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items = []

    def addItem(self, item):
        item = item if isinstance(item, QListWidgetItem) else QListWidgetItem(item)
        item._list = self
        self._items.append(item)

    def clear(self):
        for it in self._items:
            it._list = None
        self._items = []

    @property
    def count(self):
        return len(self._items)

    def item(self, i):
        return self._items[i]

    def row(self, item):
        return self._items.index(item)


class QTimer(QObject):
    """Timers run only when the harness says so (SlicerBox.process_events); every timer
    created is remembered, so a test can see the ones left running."""

    SIGNALS = ("timeout",)
    ALL: "weakref.WeakSet[QTimer]" = weakref.WeakSet()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.singleShot, self.interval, self._active = False, 0, False
        QTimer.ALL.add(self)

    def setSingleShot(self, v):
        self.singleShot = bool(v)

    def setInterval(self, ms):
        self.interval = int(ms)

    def start(self, ms=None):
        if ms is not None:
            self.interval = int(ms)
        self._active = True

    def stop(self):
        self._active = False

    def isActive(self):
        return self._active

    def fire(self):
        if self.singleShot:
            self._active = False
        self.timeout.emit()

    @staticmethod
    def singleShot_(ms, fn):  # qt.QTimer.singleShot(ms, fn): run at the next event processing
        t = QTimer()
        t.setSingleShot(True)
        t.timeout.connect(fn)
        t.start(ms)


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self):
        return os.path.exists(self.path)

    def open(self, mode):
        return self.exists()

    def close(self):
        pass

    def remove(self):
        try:
            os.remove(self.path)
            return True
        except OSError:
            return False


class QDir:
    def __init__(self, path=""):
        self.path = path

    def mkpath(self, path):
        os.makedirs(path, exist_ok=True)
        return True


class QSettings:
    STORE: dict = {}

    def value(self, key, default=None):
        return self.STORE.get(key, default)

    def setValue(self, key, value):
        self.STORE[key] = value

    def contains(self, key):
        return key in self.STORE


class QIcon:
    def __init__(self, path=""):
        self.path = path


class QFileDialog:
    #: what the next "Save as" dialog answers (set by the test); "" = the user cancelled
    nextSavePath = ""

    @staticmethod
    def getSaveFileName(*args, **kwargs):
        return QFileDialog.nextSavePath

    @staticmethod
    def getExistingDirectory(*args, **kwargs):
        return QFileDialog.nextSavePath


class QMessageBox(QWidget):
    Ok, Cancel, Yes, No, Retry, Close, NoButton = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000, 0
    Information, Warning, Critical, Question = 1, 2, 3, 4


class QApplication:
    cursorDepth = 0

    @staticmethod
    def setOverrideCursor(cursor):
        QApplication.cursorDepth += 1

    @staticmethod
    def restoreOverrideCursor():
        QApplication.cursorDepth -= 1


class Qt:
    Unchecked, PartiallyChecked, Checked = 0, 1, 2
    ItemIsSelectable, ItemIsEditable, ItemIsUserCheckable, ItemIsEnabled = 1, 2, 16, 32
    WaitCursor, ArrowCursor = 3, 0
    Horizontal, Vertical = 1, 2
    AlignLeft, AlignRight, AlignCenter = 1, 2, 132


class QUiLoader:
    """Builds the widget tree of a .ui file with this module's classes (any unknown class or
    property is an error: every widget the module relies on must exist in the real file)."""

    def load(self, qfile):
        root = ET.parse(qfile.path).getroot()
        top = root.find("widget")
        widget = self._widget(top, None)
        for c in root.iter("connection"):
            sender = widget if top.get("name") == c.findtext("sender") else _find(widget, c.findtext("sender"))
            receiver = widget if top.get("name") == c.findtext("receiver") else _find(widget, c.findtext("receiver"))
            slot = getattr(receiver, c.findtext("slot").split("(")[0])
            sender.connect(c.findtext("signal"), slot)
        return widget

    def _widget(self, el, parent):
        cls = el.get("class")
        klass = _WIDGET_CLASSES.get(cls)
        if klass is None:
            raise RuntimeError(f"the harness has no stand-in for widget class {cls}")
        w = klass(parent) if cls not in ("QLabel", "QPushButton", "QCheckBox") else klass("", parent)
        w.objectName = el.get("name")
        for prop in el.findall("property"):
            _set_property(w, prop)
        for child in el:
            if child.tag == "widget":
                self._widget(child, w)
            elif child.tag == "layout":
                self._layout(child, w)
        return w

    def _layout(self, el, widget):
        for item in el.findall("item"):
            for child in item:
                if child.tag == "widget":
                    self._widget(child, widget)
                elif child.tag == "layout":
                    self._layout(child, widget)


def _find(widget, name):
    for w in widget.findChildren():
        if w.objectName == name:
            return w
    raise RuntimeError(f"no widget named {name}")


_KNOWN_PROPERTIES = {
    "text", "toolTip", "checked", "checkable", "value", "minimum", "maximum", "decimals", "singleStep",
    "enabled", "visible", "nodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "renameEnabled",
    "placeholderText", "filters", "collapsed", "suffix", "prefix", "wordWrap", "geometry", "minimumSize",
    "leftMargin", "rightMargin", "topMargin", "bottomMargin", "orientation", "showChildNodeTypes",
    "editEnabled", "selectNodeUponCreation", "baseName", "textVisible", "format", "currentPath",
}


def _set_property(w, prop):
    name = prop.get("name")
    v = prop[0]
    value = {"string": lambda: v.text or "", "bool": lambda: v.text == "true", "number": lambda: int(v.text),
             "double": lambda: float(v.text), "stringlist": lambda: [s.text or "" for s in v],
             "enum": lambda: v.text, "set": lambda: v.text, "cstring": lambda: v.text or ""}.get(v.tag, lambda: None)()
    if prop.get("stdset") == "0":
        w.setProperty(name, value)
        return
    if name not in _KNOWN_PROPERTIES:
        raise RuntimeError(f"the harness does not know property {name} of {w.objectName}")
    if name in ("geometry", "minimumSize", "leftMargin", "rightMargin", "topMargin", "bottomMargin", "orientation"):
        return
    if name == "checked":
        w.__dict__["checked"] = value  # designer state, no signal (nothing is connected yet)
        return
    if name in ("minimum", "maximum") and isinstance(w, _Ranged) and w.INTEGER:
        value = int(value)
    setattr(w, name, value)


# ---------------------------------------------------------------------------------------------
# ctk stand-in
# ---------------------------------------------------------------------------------------------
class ctkCollapsibleButton(QAbstractButton):
    SIGNALS = ("contentsCollapsed",)

    def __init__(self, parent=None):
        super().__init__("", parent)
        self.collapsed = False


class ctkCollapsibleGroupBox(QWidget):
    pass


class ctkSliderWidget(_Ranged):
    pass


class ctkDoubleSpinBox(_Ranged):
    pass


class ctkCheckBox(QCheckBox):
    pass


class ctkComboBox(QComboBox):
    pass


class ctkRangeWidget(QWidget):
    SIGNALS = ("valuesChanged",)


class ctkDoubleSlider(_Ranged):
    pass


class ctkDoubleRangeSlider(ctkRangeWidget):
    pass


class ctkCheckablePushButton(QPushButton):
    pass


class ctkColorPickerButton(QPushButton):
    SIGNALS = ("colorChanged",)


class ctkPathLineEdit(QWidget):
    SIGNALS = ("currentPathChanged", "validInputChanged")
    currentPath = _value_property("_path", "currentPathChanged", lambda self, v: str(v))

    def __init__(self, parent=None):
        super().__init__(parent)
        self.__dict__["_path"] = ""
        self.filters = ""


class ctkDirectoryButton(QWidget):
    SIGNALS = ("directoryChanged",)
    directory = _value_property("_dir", "directoryChanged", lambda self, v: str(v))

    def __init__(self, parent=None):
        super().__init__(parent)
        self.__dict__["_dir"] = ""


class ctkFlowLayout(QLayout):
    pass


# ---------------------------------------------------------------------------------------------
# slicer Qt widgets stand-in (qMRML*)
# ---------------------------------------------------------------------------------------------
class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(QWidget):
    """Node selector: the current node of the allowed types; becomes None when that node
    leaves the scene (Close Scene), emitting currentNodeChanged like the real widget."""

    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged", "nodeAdded", "nodeActivated")
    ALL: "weakref.WeakSet[qMRMLNodeComboBox]" = weakref.WeakSet()

    def __init__(self, parent=None):
        super().__init__(parent)
        qMRMLNodeComboBox.ALL.add(self)
        self.nodeTypes = []
        self.noneEnabled = self.addEnabled = self.removeEnabled = self.renameEnabled = False
        self.showChildNodeTypes = True
        self.editEnabled = False
        self.selectNodeUponCreation = True
        self.baseName = ""
        self._scene = None
        self._node = None
        self._tag = None

    def setMRMLScene(self, scene):
        if self._scene is not None and self._tag is not None:
            self._scene.RemoveObserver(self._tag)
        self._scene = scene
        self._tag = scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved) if scene is not None else None
        if self._node is not None and (scene is None or not scene.IsNodePresent(self._node)):
            self._node = None

    def mrmlScene(self):
        return self._scene

    def _onNodeRemoved(self, caller, event):
        if self._node is not None and not self._scene.IsNodePresent(self._node):
            self.setCurrentNode(None)

    def _accepts(self, node):
        return any(node.IsA(t) for t in self.nodeTypes) if self.nodeTypes else True

    def currentNode(self):
        return self._node

    def currentNodeID(self):
        return self._node.GetID() if self._node is not None else ""

    def setCurrentNode(self, node):
        if node is not None and (self._scene is None or not self._scene.IsNodePresent(node) or not self._accepts(node)):
            return  # the real combo box cannot select a node it does not list
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)
            self.currentNodeIDChanged.emit(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeID):
        self.setCurrentNode(self._scene.GetNodeByID(nodeID) if nodeID else None)


class qMRMLSliderWidget(ctkSliderWidget):
    pass


class qMRMLSpinBox(ctkDoubleSpinBox):
    pass


class qMRMLRangeWidget(ctkRangeWidget):
    pass


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    pass


_WIDGET_CLASSES = {c.__name__: c for c in (
    QWidget, QLabel, QPushButton, QToolButton, QCheckBox, QLineEdit, QComboBox, QSpinBox, QSlider, QDoubleSpinBox,
    QProgressBar, QTableWidget, QListWidget, ctkCollapsibleButton, ctkCollapsibleGroupBox, ctkSliderWidget,
    ctkDoubleSpinBox, ctkCheckBox, ctkComboBox, ctkRangeWidget, ctkPathLineEdit, ctkDirectoryButton,
    qMRMLWidget, qMRMLNodeComboBox, qMRMLSliderWidget, qMRMLSpinBox, qMRMLRangeWidget)}


def _module(name, classes, extra=None):
    m = types.ModuleType(name)
    m.__doc__ = f"Slicer-in-a-box stand-in for {name} (Testing/Python/slicer/slicer_box.py)"
    for c in classes:
        setattr(m, c.__name__, c)
    for k, v in (extra or {}).items():
        setattr(m, k, v)
    return m


def make_qt():
    m = _module("qt", [QObject, QWidget, QLayout, QVBoxLayout, QHBoxLayout, QFormLayout, QGridLayout, QLabel,
                       QAbstractButton, QPushButton, QToolButton, QCheckBox, QLineEdit, QComboBox, QSpinBox, QSlider,
                       QDoubleSpinBox, QTextEdit, QColor, QProgressBar, QTableWidgetItem, QTableWidget, QListWidgetItem, QListWidget,
                       QTimer, QFile, QDir, QSettings, QIcon, QFileDialog, QMessageBox, QApplication, Qt, QUiLoader])
    m.QEventLoop = types.SimpleNamespace(ExcludeUserInputEvents=1, AllEvents=0)
    return m


def make_ctk():
    return _module("ctk", [ctkCollapsibleButton, ctkCollapsibleGroupBox, ctkSliderWidget, ctkDoubleSpinBox,
                           ctkCheckBox, ctkComboBox, ctkRangeWidget, ctkDoubleSlider, ctkDoubleRangeSlider,
                           ctkPathLineEdit, ctkDirectoryButton, ctkFlowLayout, ctkCheckablePushButton,
                           ctkColorPickerButton])


SLICER_WIDGETS = (qMRMLWidget, qMRMLNodeComboBox, qMRMLSliderWidget, qMRMLSpinBox, qMRMLRangeWidget,
                  qMRMLCheckableNodeComboBox)


# ---------------------------------------------------------------------------------------------
# slicer.app stand-in: IO manager, layout manager, module manager
# ---------------------------------------------------------------------------------------------
_EXTENSIONS = (".seg.nrrd", ".seg.nii.gz", ".nii.gz", ".mrk.json", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd",
               ".tif", ".tiff", ".png", ".jpg", ".csv", ".tsv", ".h5", ".tfm", ".txt", ".mrml", ".mrb")


def _known_extension(filename: str) -> str:
    low = str(filename).lower()
    return next((e for e in _EXTENSIONS if low.endswith(e)), os.path.splitext(low)[1])


class CoreIOManager:
    """qSlicerCoreIOManager's file-level API, done with the real MRML logics and storage nodes the
    way the C++ readers / qSlicerNodeWriter do it (saveNodes re-points the node's own storage
    node to the new file; exportNodes writes through a temporary copy and leaves it alone)."""

    def __init__(self, box):
        self.box = box

    def fileType(self, filename):
        ext = _known_extension(filename)
        return {".seg.nrrd": "SegmentationFile", ".seg.nii.gz": "SegmentationFile", ".mrml": "SceneFile",
                ".mrb": "SceneFile", ".csv": "TableFile", ".tsv": "TableFile", ".h5": "TransformFile",
                ".tfm": "TransformFile", ".mrk.json": "MarkupsFile"}.get(ext, "VolumeFile")

    def fileWriterFileType(self, node):
        for cls, kind in (("vtkMRMLSegmentationNode", "SegmentationFile"), ("vtkMRMLVolumeNode", "VolumeFile"),
                          ("vtkMRMLTransformNode", "TransformFile"), ("vtkMRMLTableNode", "TableFile"),
                          ("vtkMRMLMarkupsNode", "MarkupsFile")):
            if node.IsA(cls):
                return kind
        return "NoFile"

    def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None):
        import slicer

        props = dict(properties)
        path = str(props["fileName"])
        if fileType == "VolumeFile":
            logic = self.box.volumes_logic
            options = (1 if props.get("labelmap") else 0) | (2 if props.get("center") else 0) | \
                (4 if props.get("singleFile") else 0)
            name = props.get("name") or Path(path).name.split(".")[0]
            node = logic.AddArchetypeVolume(path, name, options)
            if node is None:
                return False
            if props.get("show", True):  # qSlicerVolumesReader: show the loaded volume
                sel = self.box.app_logic.GetSelectionNode()
                if node.IsA("vtkMRMLLabelMapVolumeNode"):
                    sel.SetActiveLabelVolumeID(node.GetID())
                else:
                    sel.SetActiveVolumeID(node.GetID())
                self.box.app_logic.PropagateVolumeSelection(0)
        elif fileType == "SegmentationFile":
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName(props.get("name") or Path(path).name.split(".")[0])
            self.box.scene.AddNode(node)
            storage = node.CreateDefaultStorageNode()
            self.box.scene.AddNode(storage)
            storage.SetFileName(path)
            node.SetAndObserveStorageNodeID(storage.GetID())
            if not storage.ReadData(node):
                return False
            node.CreateDefaultDisplayNodes()
        else:
            raise NotImplementedError(f"the harness cannot load {fileType}")
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True

    def saveNodes(self, fileType, properties, userMessages=None):
        node = self.box.scene.GetNodeByID(properties["nodeID"])
        storage = node.GetStorageNode()
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
        storage.SetFileName(str(properties["fileName"]))
        ext = _known_extension(properties["fileName"])
        storage.SetWriteFileFormat(ext.lstrip("."))
        return bool(storage.WriteData(node))

    def extractKnownExtension(self, filename, node):
        return _known_extension(filename)

    #: what Slicer's writers list when slicer-core's storage node lists nothing (its ITK has
    #: fewer IO factories than Slicer's)
    _WRITER_FORMATS = {"vtkMRMLVolumeNode": ["NRRD (.nrrd)", "NRRD (.nhdr)", "NIfTI (.nii)", "NIfTI (.nii.gz)",
                                             "MetaImage (.mha)", "MetaImage (.mhd)"],
                       "vtkMRMLSegmentationNode": ["Segmentation (.seg.nrrd)", "Segmentation (.nrrd)",
                                                   "Segmentation (.seg.nii.gz)", "Segmentation (.nii.gz)"]}

    def fileWriterExtensions(self, node):
        storage = node.CreateDefaultStorageNode()
        types_ = storage.GetSupportedWriteFileTypes()
        found = [types_.GetValue(k) for k in range(types_.GetNumberOfValues())]
        if not found:
            found = next((v for k, v in self._WRITER_FORMATS.items() if node.IsA(k)), [])
        return found

    def exportNodes(self, nodeIDs, fileNames, properties, hardenTransform, userMessages=None):
        import slicer
        import vtk

        ok = True
        for nid, fname in zip(nodeIDs, fileNames):
            node = self.box.scene.GetNodeByID(nid)
            scratch = slicer.vtkMRMLScene()
            copy = scratch.AddNewNodeByClass(node.GetClassName())
            copy.Copy(node)
            if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
                img = vtk.vtkImageData()
                img.DeepCopy(node.GetImageData())
                copy.SetAndObserveImageData(img)
            if hardenTransform and node.GetParentTransformNode() is not None:
                m = vtk.vtkMatrix4x4()
                node.GetParentTransformNode().GetMatrixTransformToWorld(m)
                copy.ApplyTransformMatrix(m)
            storage = copy.CreateDefaultStorageNode()
            scratch.AddNode(storage)
            storage.SetFileName(str(fname))
            storage.SetWriteFileFormat(_known_extension(fname).lstrip("."))
            ok = bool(storage.WriteData(copy)) and ok
        return ok


class SliceWidget:
    """qMRMLSliceWidget: its slice node, composite node and a real slice logic (renderable offscreen)."""

    def __init__(self, logic):
        self._logic = logic

    def sliceLogic(self):
        return self._logic

    def mrmlSliceNode(self):
        return self._logic.GetSliceNode()

    def mrmlSliceCompositeNode(self):
        return self._logic.GetSliceCompositeNode()

    def sliceView(self):
        return types.SimpleNamespace(forceRender=lambda: None, scheduleRender=lambda: None)

    def sliceController(self):
        return types.SimpleNamespace(setSliceVisible=lambda v: None)


class LayoutManager(QObject):
    SIGNALS = ("layoutChanged",)

    def __init__(self, box):
        super().__init__()
        import slicer

        self.box = box
        self._widgets = {}
        import vtk

        logics = vtk.vtkCollection()
        box.app_logic.SetSliceLogics(logics)
        for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(box.app_logic)
            logic.SetMRMLScene(box.scene)
            node = box.scene.GetSingletonNode(name, "vtkMRMLSliceNode")  # made by the layout logic
            if node is None:
                node = logic.AddSliceNode(name)
            else:
                logic.SetSliceNode(node)
            node.SetOrientation(orientation)
            node.SetDimensions(400, 400, 1)
            logics.AddItem(logic)
            self._widgets[name] = SliceWidget(logic)

    def sliceViewNames(self):
        return list(self._widgets)

    def sliceWidget(self, name):
        return self._widgets.get(name)

    def setLayout(self, arrangement):
        node = self.box.scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
        if node is not None:
            node.SetViewArrangement(int(arrangement))
        self.layoutChanged.emit(int(arrangement))

    @property
    def layout(self):
        node = self.box.scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
        return node.GetViewArrangement() if node is not None else 0

    def resetSliceViews(self):
        for w in self._widgets.values():
            w.sliceLogic().FitSliceToAll()

    def threeDWidget(self, n):
        return None


class ModuleManager(QObject):
    SIGNALS = ("moduleAboutToBeUnloaded", "moduleLoaded")

    def __init__(self, box):
        super().__init__()
        self.box = box

    def module(self, name):
        return getattr(sys.modules["slicer"].modules, name.lower(), None)


class App(QObject):
    """slicer.app: what scripted modules and Slicer's Python call on it."""

    SIGNALS = ("startupCompleted",)

    def __init__(self, box):
        super().__init__()
        self.box = box
        self.applicationName = "Slicer"
        self.applicationVersion = box.version.lstrip("v")
        major_minor = ".".join(self.applicationVersion.split(".")[:2])
        self.documentationBaseUrl = f"https://slicer.readthedocs.io/en/{major_minor}"
        self.temporaryPath = str(box.tmp / "temporary")
        self.cachePath = str(box.tmp / "cache")
        os.makedirs(self.temporaryPath, exist_ok=True)
        os.makedirs(self.cachePath, exist_ok=True)
        self._io = CoreIOManager(box)
        self._modules = ModuleManager(box)
        self._layout = None

    def mrmlScene(self):
        return self.box.scene

    def applicationLogic(self):
        return self.box.app_logic

    def coreIOManager(self):
        return self._io

    def ioManager(self):
        return self._io

    def moduleManager(self):
        return self._modules

    def layoutManager(self):
        if self._layout is None:
            self._layout = LayoutManager(self.box)
        return self._layout

    def testingEnabled(self):
        return True

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True, disableMessageHandlers=True)

    def topLevelWidgets(self):
        return []

    def processEvents(self, *args):
        pass

    def setOverrideCursor(self, cursor):
        QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        QApplication.restoreOverrideCursor()

    def pauseRender(self):
        pass

    def resumeRender(self):
        pass

    def moduleDocumentationUrl(self, moduleName):
        # what qSlicerCoreApplication returns: a page of Slicer's own documentation
        return f"{self.documentationBaseUrl}/user_guide/modules/{moduleName.lower()}.html"

    def translate(self, context, text):
        return text

    def userSettings(self):
        return QSettings()

    def settings(self):
        return QSettings()


class ModuleProxy:
    """slicer.modules.<name>: what the application knows of a loaded module."""

    def __init__(self, name, path=None, logic=None):
        self.name, self.path, self._logic = name, path, logic
        self.widgetRepresentation = lambda: None

    def logic(self):
        return self._logic


class ModuleParent(QWidget):
    """The C++ side of a scripted module (qSlicerScriptedLoadableModule + its widget): the
    metadata properties the Python class fills in, the panel's layout and isEntered."""

    def __init__(self, path):
        super().__init__()
        self.path = str(path)
        self.title = ""
        self.categories, self.dependencies, self.contributors = [], [], []
        self.helpText = self.acknowledgementText = ""
        self.icon = None
        self.hidden = False
        self.isEntered = False
        self.setLayout(QVBoxLayout())
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene


# ---------------------------------------------------------------------------------------------
# The box
# ---------------------------------------------------------------------------------------------
_PATCHED_MODULES = ("qt", "ctk", "SampleData", "MSKdeX", "PyTorchUtils")
_SLICER_PY = ("slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper",
              "slicer.modules", "slicer.moduleNames")


class SlicerBox:
    """One Slicer session: scene, application stand-in, Slicer's Python of ``version``, the module."""

    def __init__(self, version: str, tmp: Path):
        self.version, self.tmp = version, Path(tmp)
        self.ref = reference_dir(version)
        self.errors: list[str] = []
        self._saved_modules: dict = {}
        self._saved_attrs: dict = {}
        self._saved_path: list = []
        self._handler = None
        self.module = None
        self.widget = None

    # --- session ----------------------------------------------------------------------------
    def start(self):
        import slicer  # slicer-core: the real MRML
        import vtk

        if self.ref is None:
            raise RuntimeError(f"Slicer {self.version} reference sources not found in {REFERENCE}")
        self.slicer = slicer
        self._locale = locale.setlocale(locale.LC_ALL)  # C++ libraries may change it; put back at stop()
        for name in list(sys.modules):
            if name in _PATCHED_MODULES or name in _SLICER_PY or name.startswith("slicer.parameterNodeWrapper."):
                self._saved_modules[name] = sys.modules.pop(name)
        for attr in ("util", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper", "app", "mrmlScene",
                     "modules", "moduleNames", "selfTests") + tuple(c.__name__ for c in SLICER_WIDGETS):
            if hasattr(slicer, attr):
                self._saved_attrs[attr] = getattr(slicer, attr)
                delattr(slicer, attr)
        self._saved_path = (list(slicer.__path__), list(sys.path))
        sys.modules["qt"] = make_qt()
        sys.modules["ctk"] = make_ctk()
        for c in SLICER_WIDGETS:
            setattr(slicer, c.__name__, c)
        QSettings.STORE = {}
        QFileDialog.nextSavePath = ""
        QApplication.cursorDepth = 0
        # Slicer's own Python first on the slicer package's path (before slicer-core's util.py)
        slicer.__path__.insert(0, str(self.ref / "Base" / "Python" / "slicer"))
        sys.path.insert(0, str(self.ref / "Modules" / "Scripted" / "SampleData"))
        sys.path.insert(0, str(MODULE_DIR))
        for sub in ("modules", "moduleNames"):
            m = types.ModuleType(f"slicer.{sub}")
            sys.modules[f"slicer.{sub}"] = m
            setattr(slicer, sub, m)

        # the scene and the logics the application creates at start-up
        self.scene = slicer.vtkMRMLScene()
        self.remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.remote_io.SetMRMLScene(self.scene)
        self.remote_io.AddDataIOToScene()
        self.scene.GetCacheManager().SetRemoteCacheDirectory(str(self.tmp / "cache"))
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.color_logic = slicer.vtkSlicerColorLogic()
        self.color_logic.SetMRMLApplicationLogic(self.app_logic)
        self.color_logic.SetMRMLScene(self.scene)
        self.app_logic.SetColorLogic(self.color_logic)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)
        self.layout_logic = slicer.vtkMRMLLayoutLogic()
        self.layout_logic.SetMRMLScene(self.scene)
        self.volumes_logic = slicer.vtkSlicerVolumesLogic()
        self.volumes_logic.SetMRMLApplicationLogic(self.app_logic)
        self.volumes_logic.SetMRMLScene(self.scene)
        self.plots_logic = slicer.vtkSlicerPlotsLogic()
        self.plots_logic.SetMRMLApplicationLogic(self.app_logic)
        self.plots_logic.SetMRMLScene(self.scene)
        self.tables_logic = slicer.vtkSlicerTablesLogic()
        self.tables_logic.SetMRMLScene(self.scene)
        slicer.mrmlScene = self.scene
        slicer.app = App(self)
        slicer.app.layoutManager()
        for name, logic in (("volumes", self.volumes_logic), ("plots", self.plots_logic),
                            ("tables", self.tables_logic)):
            setattr(slicer.modules, name, ModuleProxy(name, logic=logic))

        import slicer.i18n  # noqa: F401  (Slicer's own, from the reference)
        import slicer.util
        import slicer.ScriptedLoadableModule  # noqa: F401
        import slicer.parameterNodeWrapper  # noqa: F401

        assert Path(slicer.util.__file__).is_relative_to(self.ref), slicer.util.__file__
        self._handler = _ErrorCollector(self.errors)
        logging.getLogger().addHandler(self._handler)
        import SampleData

        self._load_sample_data_module(SampleData)
        del vtk
        return self

    def _load_sample_data_module(self, SampleData):
        parent = ModuleParent(Path(SampleData.__file__))
        self.sample_data_module = SampleData.SampleData(parent)
        self.slicer.modules.sampledata = ModuleProxy("sampledata", parent.path)

    def load_module(self):
        """Module discovery: import MSKdeX.py, instantiate the module class, then startupCompleted."""
        import MSKdeX

        self.py = MSKdeX
        self.parent = ModuleParent(MODULE_DIR / "MSKdeX.py")
        self.module = MSKdeX.MSKdeX(self.parent)
        self.slicer.modules.mskdex = ModuleProxy("mskdex", self.parent.path)
        self.slicer.modules.MSKdeXInstance = self.module
        self.slicer.app.startupCompleted.emit()
        return self.module

    def create_widget(self):
        """What Slicer does the first time the module is shown: the widget, then setup()."""
        panel = ModuleParent(MODULE_DIR / "MSKdeX.py")
        panel.setMRMLScene(self.scene)
        self.widget = self.py.MSKdeXWidget(panel)
        self.widget.setup()
        self.slicer.modules.MSKdeXWidget = self.widget
        return self.widget

    def enter(self):
        self.widget.parent.isEntered = True
        self.widget.enter()

    def exit(self):
        self.widget.exit()
        self.widget.parent.isEntered = False

    def close_scene(self):
        """File > Close Scene (qSlicerCoreApplication: mrmlScene()->Clear(false))."""
        self.scene.Clear(0)

    def unload(self):
        """Application exit / module unload: moduleAboutToBeUnloaded -> widget.cleanup()."""
        self.slicer.app.moduleManager().moduleAboutToBeUnloaded.emit("MSKdeX")

    def process_events(self, until=None, timeout=120.0, sleep=0.02):
        """Run the event loop: fire active timers until ``until()`` is true (or once without it)."""
        t_end = time.time() + timeout
        while True:
            for t in [t for t in list(QTimer.ALL) if t.isActive()]:
                t.fire()
            if until is None or until():
                return
            if time.time() > t_end:
                raise TimeoutError(f"still waiting after {timeout} s")
            time.sleep(sleep)

    @staticmethod
    def active_timers():
        return [t for t in list(QTimer.ALL) if t.isActive()]

    def stop(self):
        import slicer

        locale.setlocale(locale.LC_ALL, self._locale)
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        for t in list(QTimer.ALL):
            t.stop()
        # detach the logics before the scene goes (VTK observers of a dead scene crash)
        if getattr(self, "scene", None) is not None:
            for combo in list(qMRMLNodeComboBox.ALL):
                combo.setMRMLScene(None)
            if self.widget is not None:
                self.widget.removeObservers()
            layout = self.slicer.app.layoutManager() if hasattr(self.slicer, "app") else None
            widgets = list(layout._widgets.values()) if layout is not None else []
            for w in widgets:
                w.sliceLogic().SetMRMLScene(None)
            for logic in (self.plots_logic, self.tables_logic, self.volumes_logic, self.layout_logic,
                          self.color_logic, self.app_logic, self.remote_io):
                logic.SetMRMLScene(None)
        for name in list(sys.modules):
            if name in _PATCHED_MODULES or name in _SLICER_PY or name.startswith("slicer.parameterNodeWrapper."):
                del sys.modules[name]
        sys.modules.update(self._saved_modules)
        for attr in ("util", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper", "app", "mrmlScene",
                     "modules", "moduleNames", "selfTests") + tuple(c.__name__ for c in SLICER_WIDGETS):
            if hasattr(slicer, attr):
                delattr(slicer, attr)
        for attr, value in self._saved_attrs.items():
            setattr(slicer, attr, value)
        if self._saved_path:
            slicer.__path__[:] = self._saved_path[0]
            sys.path[:] = self._saved_path[1]


class _ErrorCollector(logging.Handler):
    """Error messages the module shows (slicer.util.errorDisplay logs them in testing mode)."""

    def __init__(self, sink):
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record):
        self.sink.append(record.getMessage())
