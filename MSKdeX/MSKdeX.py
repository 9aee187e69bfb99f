"""MSKdeX: per-muscle lean mass and volume from a plain hip radiograph (3D Slicer module).

Module (metadata, sample data), Widget (GUI only, bound to Resources/UI/MSKdeX.ui through the
parameter node), Logic (delegates to MSKdeXLib; long work runs as ``mskdex`` subprocesses with
JSON-lines progress through MSKdeXLib.jobs) and the self-test. Nothing heavy (torch, the
core's numerical modules) is imported at module load: only inside the functions that need it.
"""

import logging
import os
import sys
from typing import Annotated, Optional, Union

import ctk
import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLLinearTransformNode, vtkMRMLMarkupsFiducialNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _add_library_path() -> str:
    """Put the folder holding MSKdeXLib on sys.path: next to this file (CMake build, where the
    package is copied beside the module) or one level up (source checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "MSKdeXLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return folder
    raise ImportError(f"MSKdeXLib not found next to {here} or in its parent folder")


LIBRARY_PARENT = _add_library_path()

# Light core modules only at start-up (torch and the numerical modules load in the functions
# that need them, so the module loads in a Slicer without PyTorch).
from MSKdeXLib import dependencies  # noqa: E402
from MSKdeXLib.anatomy.density import DensityModel  # noqa: E402
from MSKdeXLib.anatomy.structures import BUILTIN_TABLES  # noqa: E402
from MSKdeXLib.projection.geometry import Camera  # noqa: E402

#: the module's documentation (the repository's docs/slicer.md)
HOMEPAGE = "https://github.com/mskdex/SlicerMSKdeX"
DOCUMENTATION_URL = f"{HOMEPAGE}/blob/main/docs/slicer.md"
_DENSITY, _CAMERA = DensityModel(), Camera()

#: sample data (DESIGN.md section 5): TotalSegmentator test files, Apache-2.0
_TS = "https://raw.githubusercontent.com/wasserth/TotalSegmentator"
SAMPLE_CT_URL = f"{_TS}/0e65a448d557382b1e925276212b3bec7f5aff83/tests/reference_files/example_ct.nii.gz"
SAMPLE_CT_SHA256 = "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"
SAMPLE_LABELS_URL = f"{_TS}/5de6e4dcf702d525e0b2813683575b2c9e998aee/tests/reference_files/example_seg.nii.gz"
SAMPLE_LABELS_SHA256 = "ca2adb3a99f02b178a10fbfe1abedc3cff68b0becf8c8bc662deb7b6eaf74a90"

CITATION = (
    "Gu Y, Otake Y, Uemura K, Takao M, Soufi M, Hiasa Y, Talbot H, Okada S, Sugano N, Sato Y. "
    "MSKdeX: Musculoskeletal (MSK) decomposition from an X-ray image for fine-grained estimation "
    "of lean muscle mass and muscle volume. MICCAI 2023. arXiv:2305.19920.")
TOTALSEG_CITATION = ("Wasserthal J, et al. TotalSegmentator: robust segmentation of 104 anatomical "
                     "structures in CT images. Radiology: Artificial Intelligence 2023.")


#
# Module
#
class MSKdeX(ScriptedLoadableModule):
    """Module description (title, category, help, acknowledgement) and sample data."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MSKdeX")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["MSKdeX contributors"]
        self.parent.helpText = _(
            "Estimates per-muscle lean mass (g) and volume (cm^3) from a plain AP hip radiograph by "
            "decomposing it into per-structure projections learned from CT. Inputs: a CT with a "
            "TotalSegmentator (or 22-class hip) segmentation to compute CT metrics, render DRRs, "
            "register bones and build/train models; a radiograph and a trained model to estimate; the CT "
            "as a baseline and a follow-up radiograph to read each muscle's lean-mass change. "
            "Long tasks run in a background process and can be cancelled.")
        self.parent.helpText += ("<p>" + _("See the {start}MSKdeX documentation{end}.").format(
            start=f'<a href="{DOCUMENTATION_URL}">', end="</a>") + "</p>")
        self.parent.acknowledgementText = _(
            "Open implementation of the method of: ") + CITATION + " " + _(
            "Sample data and label tables from TotalSegmentator (Apache-2.0): ") + TOTALSEG_CITATION
        slicer.app.connect("startupCompleted()", registerSampleData)


#: Sample Data sources (category MSKdeX): (name, file, URL, SHA-256, load properties)
SAMPLES = (
    ("MSKdeXPelvisCT", "MSKdeXPelvisCT.nii.gz", SAMPLE_CT_URL, SAMPLE_CT_SHA256, {}),
    ("MSKdeXPelvisLabels", "MSKdeXPelvisLabels.nii.gz", SAMPLE_LABELS_URL, SAMPLE_LABELS_SHA256, {"labelmap": True}),
)


def registerSampleData():
    """The pelvis CT and its TotalSegmentator v1 labels, by URL and SHA-256: one Sample Data
    source each (SampleData applies one set of load properties to all files of a source)."""
    import SampleData

    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "MSKdeX.png")
    for name, fileName, url, sha256, properties in SAMPLES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="MSKdeX", sampleName=name, uris=url, fileNames=fileName, nodeNames=name,
            thumbnailFileName=icon, checksums=f"SHA256:{sha256}", loadFileType="VolumeFile",
            loadFileProperties=dict(properties))


@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """ctkPathLineEdit <-> a str parameter: an unset path stays an empty field (Slicer's own
    pathlib.Path connector writes Path() as '.')."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        from slicer.parameterNodeWrapper import unannotatedType

        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) else None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self):
        return str(self._widget.currentPath)

    def write(self, value) -> None:
        self._widget.currentPath = value or ""


#
# Parameter node
#
@parameterNodeWrapper
class MSKdeXParameterNode:
    """Everything the GUI edits, saved with the scene. Units in names: mm, deg, HU."""

    ctVolume: Optional[vtkMRMLScalarVolumeNode]
    segmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    radiograph: Optional[vtkMRMLScalarVolumeNode]
    # CT metrics
    leanLowHU: Annotated[float, WithinRange(-1024.0, 3071.0)] = float(_DENSITY.lean_window_hu[0])
    leanHighHU: Annotated[float, WithinRange(-1024.0, 3071.0)] = float(_DENSITY.lean_window_hu[1])
    metricsTable: Optional[vtkMRMLTableNode]
    # DRR
    sidMm: Annotated[float, WithinRange(300.0, 3000.0)] = float(_CAMERA.sid_mm)
    detectorRows: Annotated[int, WithinRange(16, 2048)] = int(_CAMERA.rows)
    detectorCols: Annotated[int, WithinRange(16, 2048)] = int(_CAMERA.cols)
    pixelSpacingMm: Annotated[float, WithinRange(0.05, 10.0)] = float(_CAMERA.spacing_row_mm)
    poseTransform: Optional[vtkMRMLLinearTransformNode]
    rotationLRDeg: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    rotationPADeg: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    rotationISDeg: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    translationLRMm: Annotated[float, WithinRange(-200.0, 200.0)] = 0.0
    translationPAMm: Annotated[float, WithinRange(-200.0, 200.0)] = 0.0
    translationISMm: Annotated[float, WithinRange(-200.0, 200.0)] = 0.0
    drrVolume: Optional[vtkMRMLScalarVolumeNode]
    liveUpdate: bool = False
    # Registration
    registrationBones: str = ""
    landmarks: Optional[vtkMRMLMarkupsFiducialNode]
    radiographLandmarks: Optional[vtkMRMLMarkupsFiducialNode]
    registrationTransform: Optional[vtkMRMLLinearTransformNode]
    qaOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showCheckerboard: bool = False
    # Training
    datasetFolder: str = ""
    trainConfig: str = ""
    trainOutputFolder: str = ""
    trainDevice: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    resumeTraining: bool = False
    # Estimate
    modelFolder: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    estimatesTable: Optional[vtkMRMLTableNode]
    # Follow-up (the baseline CT and segmentation are ctVolume / segmentation)
    followupRadiograph: Optional[vtkMRMLScalarVolumeNode]
    followupRegistration: Optional[vtkMRMLLinearTransformNode]
    #: ``mskdex followup --reader`` (MSKdeXLib.learning.followup_run.READERS; the first is the default)
    followupReader: Annotated[str, Choice(["ridge", "fit"])] = "ridge"
    followupTable: Optional[vtkMRMLTableNode]


def _isSet(path) -> bool:
    """True when a path parameter was chosen."""
    return bool(path) and str(path) not in ("", ".")


#
# Widget
#
class MSKdeXWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: widgets <-> parameter node, buttons -> Logic, job progress -> widgets."""

    DRR_THROTTLE_MS = 150

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = ""
        self._layers = None
        self._jobNote = ""
        self._qaShown = None
        self._followupInputs = None

    # --- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MSKdeX.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MSKdeXLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._drrTimer = qt.QTimer()
        self._drrTimer.setSingleShot(True)
        self._drrTimer.setInterval(self.DRR_THROTTLE_MS)
        self._drrTimer.timeout.connect(self.onUpdateDRR)
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.timeout.connect(self.onJobTimer)

        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.computeMetricsButton.connect("clicked(bool)", self.onComputeMetrics)
        self.ui.updateDRRButton.connect("clicked(bool)", self.onUpdateDRR)
        self.ui.resetPoseButton.connect("clicked(bool)", self.onResetPose)
        for slider in (self.ui.rotationLRSlider, self.ui.rotationPASlider, self.ui.rotationISSlider,
                       self.ui.translationLRSlider, self.ui.translationPASlider, self.ui.translationISSlider):
            slider.connect("valueChanged(double)", self.onPoseSliderChanged)
        self.ui.runRegistrationButton.connect("clicked(bool)", self.onRunRegistration)
        self.ui.cancelRegistrationButton.connect("clicked(bool)", self.onCancelJob)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelJob)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelEstimateButton.connect("clicked(bool)", self.onCancelJob)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onOverlayOpacity)
        self.ui.structureVisibilityListWidget.connect("itemChanged(QListWidgetItem*)", self.onStructureToggled)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.readFollowupButton.connect("clicked(bool)", self.onReadFollowup)
        self.ui.cancelFollowupButton.connect("clicked(bool)", self.onCancelJob)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowLog)
        self.ui.drrChannelComboBox.addItem(_("attenuation"))

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module unloaded / application exit: stop the job, the timers and every observer."""
        self._drrTimer.stop()
        self._jobTimer.stop()
        if self._job is not None:
            self._job.cancel(grace_s=2.0)
            self._job = None
        self.removeObservers()
        self._setParameterNode(None)
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self._setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node and node.GetImageData() and node.GetImageData().GetDimensions()[2] > 1:
                self._parameterNode.ctVolume = node

    def _setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = node
        self._qaShown = None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._checkCanApply()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Any parameter changed (GUI or code): buttons, and the registration QA view when its
        opacity / checkerboard changed (read here, after the parameter node has the new value)."""
        self._checkCanApply()
        self._offerFollowupRegistration()
        p = self._parameterNode
        if p is not None and self._qaShown is not None and self._qaShown != (p.qaOpacity, p.showCheckerboard):
            self.onQAChanged()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self._job is not None
        hasCase = bool(p.ctVolume and p.segmentation)
        self.ui.computeMetricsButton.enabled = hasCase
        self.ui.updateDRRButton.enabled = bool(p.ctVolume)
        self.ui.runRegistrationButton.enabled = hasCase and bool(p.radiograph) and not busy
        self.ui.startTrainingButton.enabled = _isSet(p.datasetFolder) and _isSet(p.trainOutputFolder) and not busy
        self.ui.applyButton.enabled = bool(p.radiograph) and _isSet(p.modelFolder) and not busy
        self.ui.exportCsvButton.enabled = bool(p.estimatesTable or p.metricsTable)
        self.ui.readFollowupButton.enabled = hasCase and bool(p.followupRadiograph) and not busy
        for b in (self.ui.cancelRegistrationButton, self.ui.cancelTrainingButton, self.ui.cancelEstimateButton,
                  self.ui.cancelFollowupButton):
            b.enabled = busy

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    # --- inputs -----------------------------------------------------------------------------
    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            ct, labels = self.logic.loadSampleData()
            self._parameterNode.ctVolume = ct
            self._parameterNode.segmentation = labels

    def onSegmentationChanged(self, node) -> None:
        table = self.ui.structuresTableWidget
        table.clear()
        table.setRowCount(0)
        if node is None or self._parameterNode is None or not self._parameterNode.ctVolume:
            self.ui.structureTableLabel.text = _("(no segmentation)")
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot read the segmentation."), waitCursor=True):
            labels = self.logic.labelMap(self._parameterNode.ctVolume, node)
            rows = self.logic.structureRows(labels)
            match = labels.match.describe() if labels.match is not None else labels.table.name
            self.ui.structureTableLabel.text = match
            cols = ["label", "name", "kind", "side", "voxels"]
            table.setColumnCount(len(cols))
            table.setHorizontalHeaderLabels(cols)
            table.setRowCount(len(rows))
            for r, row in enumerate(rows):
                for c, key in enumerate(cols):
                    table.setItem(r, c, qt.QTableWidgetItem(str(row[key])))
            self.ui.drrChannelComboBox.clear()
            self.ui.drrChannelComboBox.addItem(_("attenuation"))
            for row in rows:
                self.ui.drrChannelComboBox.addItem(row["name"])

    # --- CT metrics -------------------------------------------------------------------------
    def onComputeMetrics(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute CT metrics."), waitCursor=True):
            p = self._parameterNode
            p.metricsTable = self.logic.computeMetrics(p.ctVolume, p.segmentation, p.leanLowHU,
                                                       p.leanHighHU, p.metricsTable)
            self.logic.showTable(p.metricsTable)

    # --- DRR --------------------------------------------------------------------------------
    def onPoseSliderChanged(self, value=None) -> None:
        if self._parameterNode and self._parameterNode.liveUpdate:
            self._drrTimer.start()  # throttled: renders once the sliders rest for DRR_THROTTLE_MS

    def onResetPose(self) -> None:
        p = self._parameterNode
        for name in ("rotationLRDeg", "rotationPADeg", "rotationISDeg",
                     "translationLRMm", "translationPAMm", "translationISMm"):
            setattr(p, name, 0.0)
        self.onUpdateDRR()

    def onUpdateDRR(self) -> None:
        p = self._parameterNode
        if p is None or not p.ctVolume:
            return
        channel = self.ui.drrChannelComboBox.currentText
        if not self.logic.ensureDependencies(askUser=True):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to render the DRR."), waitCursor=True):
            p.drrVolume, p.poseTransform = self.logic.renderDRR(
                p.ctVolume, p.segmentation, self.logic.cameraOf(p), self.logic.sliderPose(p),
                None if channel == _("attenuation") else channel, p.drrVolume, p.poseTransform)
            self.logic.showInSliceView(p.drrVolume)

    # --- registration -----------------------------------------------------------------------
    def onRunRegistration(self) -> None:
        p = self._parameterNode
        if not self.logic.ensureDependencies(askUser=True):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            self._startJob("registration", self.logic.startRegistration(
                p.ctVolume, p.segmentation, p.radiograph, p.registrationBones, p.landmarks,
                p.radiographLandmarks, float(p.sidMm)))

    def onQAChanged(self) -> None:
        p = self._parameterNode
        if p and p.radiograph and p.drrVolume:
            self._qaShown = (p.qaOpacity, p.showCheckerboard)
            self.logic.showQA(p.radiograph, p.drrVolume, p.qaOpacity, p.showCheckerboard)

    # --- training ---------------------------------------------------------------------------
    def onStartTraining(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            self._startJob("training", self.logic.startTraining(
                p.datasetFolder, p.trainOutputFolder, p.trainConfig if _isSet(p.trainConfig) else None,
                p.trainDevice, p.resumeTraining))

    # --- estimate ---------------------------------------------------------------------------
    def onApply(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the estimate."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            self._startJob("estimate", self.logic.startEstimate(p.radiograph, p.modelFolder, p.device))

    def onOverlayOpacity(self, value) -> None:
        self.logic.setOverlayOpacity(value)

    def onStructureToggled(self, item) -> None:
        if self._layers is not None:
            row = self.ui.structureVisibilityListWidget.row(item)
            self.logic.setStructureVisible(self._layers, row, item.checkState() == qt.Qt.Checked,
                                           self._parameterNode.overlayOpacity)

    def onExportCsv(self) -> None:
        p = self._parameterNode
        table = p.estimatesTable or p.metricsTable
        path = qt.QFileDialog.getSaveFileName(None, _("Export table"), f"{table.GetName()}.csv", "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to export the table."), waitCursor=True):
                self.logic.exportCsv(table, path)

    # --- follow-up --------------------------------------------------------------------------
    def onReadFollowup(self) -> None:
        p = self._parameterNode
        if not self.logic.ensureDependencies(askUser=True):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the follow-up reading."), waitCursor=True):
            self.ui.followupStatusLabel.text = ""
            self._startJob("followup", self.logic.startFollowup(
                p.ctVolume, p.segmentation, p.followupRadiograph, p.followupRegistration, float(p.sidMm),
                reader=p.followupReader))

    def _offerFollowupRegistration(self, force: bool = False) -> None:
        """When the baseline CT or the follow-up radiograph changed (or a registration finished),
        select the registration made on them (MSKdeXLogic.followupRegistrationChoice)."""
        p = self._parameterNode
        if p is None:
            return
        inputs = tuple(n.GetID() if n else None for n in (p.ctVolume, p.followupRadiograph))
        if inputs == self._followupInputs and not force:
            return
        self._followupInputs = inputs
        current = p.followupRegistration
        choice = self.logic.followupRegistrationChoice(current, p.ctVolume, p.followupRadiograph)
        if choice is not None and (current is None or choice.GetID() != current.GetID()):
            p.followupRegistration = choice
            self.ui.followupStatusLabel.text = _("Using the registration of this CT and radiograph: {name}").format(
                name=choice.GetName())

    # --- background jobs --------------------------------------------------------------------
    def _progressBar(self, kind: str):
        return {"registration": self.ui.registrationProgressBar, "training": self.ui.trainingProgressBar,
                "estimate": self.ui.estimateProgressBar, "followup": self.ui.followupProgressBar}[kind]

    def _startJob(self, kind: str, job) -> None:
        self._job, self._jobKind = job, kind
        bar = self._progressBar(kind)
        bar.visible, bar.value, bar.maximum = True, 0, 0  # busy until the total is known
        self.ui.showLogButton.enabled = True
        self._status(_("{kind} running...").format(kind=kind))
        self._jobTimer.start()
        self._checkCanApply()

    def onJobTimer(self) -> None:
        job, kind = self._job, self._jobKind
        if job is None:
            self._jobTimer.stop()
            return
        bar = self._progressBar(kind)
        for event in job.poll():
            if event.get("total"):
                bar.maximum, bar.value = int(event["total"]), int(event.get("step", 0))
            losses = self.logic.lossesOf(event) if kind == "training" else {}
            if losses:
                self.logic.appendLoss(event)
                self.ui.trainingStatusLabel.text = f"step {event.get('step')}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in losses.items())
        if not job.finished:
            return
        self._jobTimer.stop()
        bar.visible = False
        self._job = None
        if job.cancelled:
            self._status(_("{kind} cancelled").format(kind=kind))
        elif not job.succeeded:
            slicer.util.errorDisplay(_("{kind} failed.").format(kind=kind), detailedText=job.summary())
        else:
            self._jobNote = ""
            with slicer.util.tryWithErrorDisplay(_("Failed to read the results."), waitCursor=True):
                self._finishJob(kind, job)
            self._status(_("{kind} finished").format(kind=kind) + self._jobNote)
        self._checkCanApply()

    def _finishJob(self, kind: str, job) -> None:
        p = self._parameterNode
        if kind == "registration":
            result = self.logic.readRegistration(job, p.radiograph)
            p.registrationTransform = next(iter(result.transforms.values()))
            self._offerFollowupRegistration(force=True)
            if result.drr is not None:
                p.drrVolume = result.drr
                self.onQAChanged()
            self.ui.similarityLabel.text = result.summary()
            doubtful = [b["name"] for b in result.bodies if b["doubtful"]]
            self.ui.doubtfulLabel.text = (_("doubtful: {names}; check visually").format(names=", ".join(doubtful))
                                          if doubtful else _("all bodies converged"))
        elif kind == "training":
            p.modelFolder = p.trainOutputFolder
        elif kind == "estimate":
            self._layers, p.estimatesTable = self.logic.readEstimate(job, p.radiograph, p.estimatesTable,
                                                                     p.overlayOpacity)
            lst = self.ui.structureVisibilityListWidget
            lst.clear()
            for w in self._layers.warnings:
                logging.warning(f"MSKdeX estimate: {w}")
            if self._layers.warnings:
                self._jobNote = _(" with warnings: ") + "; ".join(self._layers.warnings)
            if p.estimatesTable and p.estimatesTable.GetAttribute("MSKdeX.interval_calibrated") != "true":
                self._jobNote += _(" (90 % intervals uncalibrated)")
            for name in self.logic.lastStructureNames:
                item = qt.QListWidgetItem(name)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked)
                lst.addItem(item)
            self.logic.showTable(p.estimatesTable)
        elif kind == "followup":
            result = self.logic.readFollowup(job, p.followupTable)
            p.followupTable = result.table
            self.logic.showTable(result.table)
            self.logic.showFollowupFigure(result)
            if result.warnings:
                for w in result.warnings:
                    logging.warning(f"MSKdeX follow-up: {w}")
                self.ui.followupStatusLabel.text = _("WARNING: ") + "; ".join(result.warnings)
                self._jobNote = _(" with a WARNING: ") + "; ".join(result.warnings)
            else:
                self.ui.followupStatusLabel.text = result.summary()
            logging.info(f"MSKdeX follow-up: outputs in {result.folder} (figure {result.folder}/followup.png)")

    def onCancelJob(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def onShowLog(self) -> None:
        text = self.logic.lastJob.summary() if self.logic.lastJob else ""
        slicer.util.infoDisplay(_("Log of the last background task."), detailedText=text)


#
# Logic
#
class MSKdeXLogic(ScriptedLoadableModuleLogic):
    """Node handling for the module; computation is delegated to MSKdeXLib (core) and run
    in-process for quick work (metrics, one DRR) or as ``mskdex`` subprocesses (registration,
    training, estimates). Usable from the Python console without the GUI."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastJob = None
        self.lastStructureNames = []
        self._lossTable = None
        self._lossColumns = []
        self._workDir = None
        self._outputs = {}
        self._registration = None
        self._registrationInputs = (None, None)  # (CT, radiograph) of the last registration started
        self._estimateRadiograph = None
        self._estimateLayers = None
        self._followup = None
        #: extra ``mskdex register`` options (advanced: set from the Python console)
        self.registrationExtraArgs = []
        #: extra ``mskdex followup`` options, e.g. ["--samples", "300"] (advanced: the Python console)
        self.followupExtraArgs = []
        self._scene = slicer.mrmlScene
        self._closeTag = self._scene.AddObserver(self._scene.EndCloseEvent, self._onSceneClosed)

    def getParameterNode(self):
        return MSKdeXParameterNode(super().getParameterNode())

    def _onSceneClosed(self, caller=None, event=None) -> None:
        """File > Close Scene removed every node: forget the ones this logic reuses."""
        self._registration = None
        self._registrationInputs = (None, None)
        self._estimateRadiograph = None
        self._estimateLayers = None
        self._followup = None
        self._lossTable = None

    def cleanup(self) -> None:
        """Stop observing the scene (the module is being unloaded)."""
        if self._closeTag is not None:
            self._scene.RemoveObserver(self._closeTag)
            self._closeTag = None

    # --- dependencies -----------------------------------------------------------------------
    @staticmethod
    def torchVersion() -> Optional[str]:
        """Installed torch version, or None (checked without importing torch)."""
        return dependencies.installed_version("torch")

    def ensureDependencies(self, askUser: bool = True) -> bool:
        """Make the core's runtime packages available (MSKdeXLib.dependencies, one list): torch
        through the PyTorch extension's installer (the build matching the GPU), the rest with
        pip, the versions of what Slicer ships pinned. Asks first; True when all are present."""
        missing = dependencies.missing()
        if not missing:
            return True
        names = ", ".join(dependencies.distribution(r) for r in missing)
        if askUser and not slicer.util.confirmOkCancelDisplay(_(
                "MSKdeX needs these Python packages, which are not installed: {names}. Install them now "
                "(a download of up to a few GB with PyTorch)? Slicer may need a restart afterwards.").format(
                names=names)):
            return False
        torch = [r for r in missing if dependencies.distribution(r) == "torch"]
        if torch and not self._installTorch():
            return False
        rest = [r for r in missing if dependencies.distribution(r) != "torch"]
        if rest:
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write(dependencies.pip_constraints())
            with slicer.util.WaitCursor():
                slicer.util.pip_install(["-c", f.name, *rest])
            os.remove(f.name)
        still = dependencies.missing()
        if still:
            slicer.util.errorDisplay(_("Could not install: {names}. See the Python console.").format(
                names=", ".join(still)))
            return False
        return True

    def _installTorch(self) -> bool:
        """torch through SlicerPyTorch's PyTorchUtils (the PyTorch extension, a declared dependency)."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(_(
                "MSKdeX needs PyTorch. Install the 'PyTorch' extension (SlicerPyTorch) from the "
                "Extensions Manager, restart Slicer, then try again."))
            return False
        with slicer.util.WaitCursor():
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        if torch is None:
            slicer.util.errorDisplay(_("PyTorch installation failed; see the Python console."))
            return False
        return True

    # --- inputs -----------------------------------------------------------------------------
    def loadSampleData(self):
        """(CT node, label map node) of the registered sample (downloaded, SHA-256 checked)."""
        import SampleData

        registerSampleData()
        logic = SampleData.SampleDataLogic()
        ct, labels = (logic.downloadSample(name) for name, *_ in SAMPLES)
        if ct is None or labels is None or not labels.IsA("vtkMRMLLabelMapVolumeNode"):
            raise RuntimeError(_("The sample data could not be downloaded or loaded; see the Python console."))
        return ct, labels

    def labelMap(self, ctNode, segmentationNode):
        """Core LabelMap of a segmentation or label map node on the CT's grid."""
        from MSKdeXLib import slicer_bridge as sb

        if segmentationNode.IsA("vtkMRMLSegmentationNode"):
            return sb.labelmap_from_segmentation(segmentationNode, ctNode)
        return sb.labelmap_from_node(segmentationNode, sb.volume_from_node(ctNode))

    def structureRows(self, labels):
        from MSKdeXLib import slicer_bridge as sb

        return sb.structure_rows(labels)

    # --- CT metrics -------------------------------------------------------------------------
    def computeMetrics(self, ctNode, segmentationNode, leanLowHU=_DENSITY.lean_window_hu[0],
                       leanHighHU=_DENSITY.lean_window_hu[1], tableNode=None):
        """Per-structure volume_cm3 / mass_g of muscles and bones into a table node."""
        from MSKdeXLib import slicer_bridge as sb
        from MSKdeXLib.anatomy.ct_metrics import structure_metrics

        ct = sb.volume_from_node(ctNode)
        labels = self.labelMap(ctNode, segmentationNode)
        chosen = labels.select(kinds=["muscle", "bone"]) or labels.structures
        density = DensityModel(lean_window_hu=(float(leanLowHU), float(leanHighHU)))
        rows = [m.to_dict() for m in structure_metrics(ct, labels, chosen, density)]
        return sb.metrics_table_node(rows, slicer.mrmlScene, node=tableNode)

    def showTable(self, tableNode) -> None:
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    # --- DRR --------------------------------------------------------------------------------
    @staticmethod
    def cameraOf(p):
        from MSKdeXLib.projection.geometry import Camera

        return Camera(int(p.detectorRows), int(p.detectorCols), float(p.pixelSpacingMm),
                      float(p.pixelSpacingMm), float(p.sidMm))

    @staticmethod
    def sliderPose(p):
        """(rotation_deg, translation_mm) about/along the patient L, P, S axes (core's convention)."""
        return ((p.rotationLRDeg, p.rotationPADeg, p.rotationISDeg),
                (p.translationLRMm, p.translationPAMm, p.translationISMm))

    def renderDRR(self, ctNode, segmentationNode, camera, sliders, channel=None, drrNode=None, poseNode=None):
        """Render the attenuation DRR, or one structure's mass channel, at the default view
        perturbed by the sliders; returns (DRR node, pose transform node)."""
        from MSKdeXLib import slicer_bridge as sb
        from MSKdeXLib.projection.geometry import perturbed_pose
        from MSKdeXLib.io.images import Radiograph
        from MSKdeXLib.projection.rendering import DRRRenderer, default_view, isocentre_of

        ct = sb.volume_from_node(ctNode)
        labels = self.labelMap(ctNode, segmentationNode) if segmentationNode else None
        base = default_view(ct, labels, camera)
        iso = isocentre_of(ct, labels)
        pose = perturbed_pose(base, sliders[0], sliders[1], iso)
        if channel:
            structure = labels.resolve(channel)
            renderer = DRRRenderer(ct, camera, labels=labels, structures=[structure])
            image = renderer.channels(pose, quantity="mass")[0, 0]
        else:
            renderer = DRRRenderer(ct, camera, labels=labels)
            image = renderer.attenuation(pose)[0]
        pixels = image.detach().cpu().numpy()
        spacing = (camera.spacing_row_mm, camera.spacing_col_mm)
        drrNode = sb.radiograph_to_node(Radiograph(pixels, spacing, "drr"), slicer.mrmlScene, "MSKdeX DRR", drrNode)
        poseNode = sb.pose_to_transform_node(pose, slicer.mrmlScene, node=poseNode)
        return drrNode, poseNode

    def showInSliceView(self, background, label=None, view: str = "Red") -> None:
        """Show a radiograph-like node (and a label layer over it) face-on in a slice view: the
        view turned into the volume's own plane (a 2D image loaded from a file lies in the axial
        plane, a DRR of this module in the coronal one), other layers cleared, then fitted."""
        from MSKdeXLib import slicer_bridge as sb

        sliceWidget = slicer.app.layoutManager().sliceWidget(view)
        composite = sliceWidget.mrmlSliceCompositeNode()
        composite.SetForegroundVolumeID(None)  # only these layers: the view is fitted to them
        composite.SetLabelVolumeID(None)
        sb.set_overlay(composite, background=background, label=label)
        sliceWidget.mrmlSliceNode().RotateToVolumePlane(background)
        sliceWidget.sliceLogic().FitSliceToAll()

    # --- background jobs --------------------------------------------------------------------
    def workDir(self) -> str:
        """This session's private scratch folder (inputs written for the subprocesses, outputs)."""
        if self._workDir is None:
            import tempfile

            self._workDir = tempfile.mkdtemp(prefix="MSKdeX-", dir=slicer.app.temporaryPath)
        return self._workDir

    def _newOutput(self, kind: str) -> str:
        """A fresh (not yet existing) output folder for one run of ``kind``: nothing is overwritten."""
        n = 1
        while os.path.exists(os.path.join(self.workDir(), f"{kind}-{n}")):
            n += 1
        self._outputs[kind] = os.path.join(self.workDir(), f"{kind}-{n}")
        return self._outputs[kind]

    def _save(self, node, name: str) -> str:
        """Write ``node`` for a subprocess, in world coordinates (parent transforms applied),
        without touching the node's own storage (the user's file stays the node's file)."""
        path = os.path.join(self.workDir(), name)
        if not slicer.util.exportNode(node, path, {}, world=True):
            raise RuntimeError(f"cannot write {node.GetName()} to {path}")
        return path

    def _saveRadiograph(self, radiographNode, name: str = "xray.tif"):
        """(path, (row, col) spacing mm or None) of the radiograph written as float32 TIFF, the way
        ``mskdex`` reads it back with identical pixels (slicer_bridge.write_radiograph_file)."""
        from MSKdeXLib import slicer_bridge as sb

        path = os.path.join(self.workDir(), name)
        rg = sb.write_radiograph_file(radiographNode, path, force=True)
        return path, rg.pixel_spacing

    def _start(self, argv):
        """Start ``mskdex ARGV`` (argv from MSKdeXLib.jobs.*_args) in the background."""
        from MSKdeXLib import jobs

        self.lastJob = jobs.Job(jobs.mskdex_command(*argv)).start()
        return self.lastJob

    def startRegistration(self, ctNode, segmentationNode, radiographNode, bones="", ctLandmarksNode=None,
                          radiographLandmarksNode=None, sidMm: float = _CAMERA.sid_mm):
        """``mskdex register``: bones (comma-separated bodies), optional paired landmarks (points on
        the CT and on the radiograph, written as CSV x,y,z,row,col), radiograph geometry from its
        spacing and ``sidMm``."""
        from MSKdeXLib import jobs
        from MSKdeXLib import slicer_bridge as sb

        xray, spacing = self._saveRadiograph(radiographNode)
        if spacing is None:
            raise ValueError(_("The radiograph has no pixel spacing: registration needs it (mm per pixel)."))
        landmarks = None
        if (ctLandmarksNode and radiographLandmarksNode and ctLandmarksNode.GetNumberOfControlPoints()
                and radiographLandmarksNode.GetNumberOfControlPoints()):
            names, lps, rc = sb.landmark_pairs(ctLandmarksNode, radiographLandmarksNode, radiographNode)
            landmarks = str(sb.write_landmarks_csv(os.path.join(self.workDir(), "landmarks.csv"), lps, rc, names))
        table = self._builtinTable(ctNode, segmentationNode)
        argv = jobs.register_args(self._save(ctNode, "ct.nii.gz"), self._labelsFile(segmentationNode), xray,
                                  self._newOutput("registration"), bones=bones or None, landmarks=landmarks,
                                  sid_mm=sidMm, spacing_mm=spacing, table=table, extra=self.registrationExtraArgs)
        self._registrationInputs = (ctNode, radiographNode)
        return self._start(argv)

    def _labelsFile(self, segmentationNode) -> str:
        return self._save(segmentationNode, "labels.seg.nrrd" if segmentationNode.IsA("vtkMRMLSegmentationNode")
                          else "labels.nii.gz")

    def readRegistration(self, job=None, radiographNode=None):
        """Result of the last ``mskdex register``: one pose transform node per body (similarity and
        doubtful flag as node attributes; references to the CT and radiograph it was run on, which
        the follow-up reading looks for), a table of the bodies and the registered bones over the
        radiograph (slicer_bridge.RegistrationNodes)."""
        from MSKdeXLib import slicer_bridge as sb

        ctNode, registered = self._registrationInputs
        self._registration = sb.registration_to_nodes(self._outputs["registration"], slicer.mrmlScene,
                                                      registered or radiographNode, nodes=self._registration,
                                                      ct_node=ctNode)
        return self._registration

    #: colour of the registered bones over the radiograph (a Slicer default colour table)
    QA_COLOR_NODE_ID = "vtkMRMLColorTableNodeRed"

    def showQA(self, radiographNode, drrNode, opacity: float, checkerboard: bool) -> None:
        """Registration QA: the registered bones (red) over the radiograph with ``opacity``, or a
        checkerboard of both on the radiograph's own grid."""
        from MSKdeXLib import slicer_bridge as sb

        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        if checkerboard:
            a, b = sb.radiograph_from_node(radiographNode), sb.radiograph_from_node(drrNode)
            board = a.__class__(sb.checkerboard(a.pixels, b.pixels), a.pixel_spacing, a.spacing_source)
            node = slicer.mrmlScene.GetFirstNodeByName("MSKdeX checkerboard")
            node = sb.radiograph_to_node(board, slicer.mrmlScene, "MSKdeX checkerboard", node)
            matrix = vtk.vtkMatrix4x4()
            radiographNode.GetIJKToRASMatrix(matrix)
            node.SetIJKToRASMatrix(matrix)  # where the radiograph is
            node.SetAndObserveTransformNodeID(radiographNode.GetTransformNodeID())
            composite.SetForegroundVolumeID(None)
            self.showInSliceView(node)
        else:
            self.showInSliceView(radiographNode)
            display = drrNode.GetDisplayNode()
            if display is not None and slicer.mrmlScene.GetNodeByID(self.QA_COLOR_NODE_ID) is not None:
                display.SetAndObserveColorNodeID(self.QA_COLOR_NODE_ID)
            sb.set_overlay(composite, foreground=drrNode, foreground_opacity=opacity)

    def startTraining(self, datasetFolder, outputFolder, configFile=None, device="auto", resume=False):
        """``mskdex train --data DATASET --out MODEL [--config FILE] [--resume] --device D``."""
        from MSKdeXLib import jobs

        self._lossTable = None
        return self._start(jobs.train_args(datasetFolder, outputFolder, config=configFile or None,
                                           resume=bool(resume), device=device))

    @staticmethod
    def lossesOf(event: dict) -> dict:
        """{'total': ..., 'intensity_sum': ...} of a training progress event (keys loss_*)."""
        from MSKdeXLib import jobs

        return jobs.losses_of(event)

    def appendLoss(self, event: dict) -> None:
        """Add a training step's losses to the live loss plot (table + chart in the plot view)."""
        losses = self.lossesOf(event)
        if not losses:
            return
        if self._lossTable is None:
            self._lossTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "MSKdeX training loss")
            self._lossColumns = ["step"] + list(losses)
            for name in self._lossColumns:
                self._lossTable.AddColumn(vtk.vtkDoubleArray()).SetName(name)
            chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", "MSKdeX training")
            for name in self._lossColumns[1:]:
                series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"loss {name}")
                series.SetAndObserveTableNodeID(self._lossTable.GetID())
                series.SetXColumnName("step")
                series.SetYColumnName(name)
                series.SetPlotType(series.PlotTypeScatter)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            chart.SetXAxisTitle("step")
            chart.SetYAxisTitle("loss")
            slicer.modules.plots.logic().ShowChartInLayout(chart)
        table = self._lossTable.GetTable()
        row = table.InsertNextBlankRow()
        table.SetValue(row, 0, float(event.get("step", row)))
        for c, name in enumerate(self._lossColumns[1:], start=1):
            table.SetValue(row, c, float(losses.get(name, float("nan"))))
        table.Modified()

    def startEstimate(self, radiographNode, modelFolder, device="auto"):
        """``mskdex predict --model MODEL --xray XRAY --out OUT --device D [--pixel-spacing R C]``."""
        from MSKdeXLib import jobs

        xray, spacing = self._saveRadiograph(radiographNode)
        self._estimateRadiograph = radiographNode
        return self._start(jobs.predict_args(modelFolder, xray, self._newOutput("estimate"), device=device,
                                             pixel_spacing_mm=spacing))

    def readEstimate(self, job, radiographNode, tableNode=None, opacity=0.5):
        """Show the last ``mskdex predict``: every channel as a volume placed over the radiograph
        (model grid, slicer_bridge.channels_from_prediction), the dominant-structure label map,
        the estimates table (mass_g / volume_cm3 with 90 % intervals) and a bar chart."""
        from MSKdeXLib import slicer_bridge as sb

        layers = self._estimateLayers or sb.ChannelLayers()  # nodes of the last estimate are reused
        layers.table = tableNode or layers.table
        layers = sb.channels_from_prediction(self._outputs["estimate"], radiographNode, slicer.mrmlScene,
                                             layers=layers)
        self._estimateLayers = layers
        self.lastStructureNames = [s.name for s in layers.structures]
        rows = sb.rows_from_table_node(layers.table)
        ycols = [c for c in ("mass_g", "volume_cm3") if rows and c in rows[0]]
        chart = sb.bar_chart(layers.table, slicer.mrmlScene, x_column="structure", y_columns=ycols[:1],
                             name="MSKdeX estimates chart")
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        self.showInSliceView(radiographNode, layers.label)
        self.setOverlayOpacity(opacity)
        return layers, layers.table

    def followupRegistrationFor(self, ctNode, radiographNode):
        """The first body's transform node of the last Registration run on ``ctNode`` and
        ``radiographNode`` (slicer_bridge.registration_for), or None."""
        from MSKdeXLib import slicer_bridge as sb

        return sb.registration_for(slicer.mrmlScene, ctNode, radiographNode)

    def followupRegistrationChoice(self, currentNode, ctNode, radiographNode):
        """The registration the follow-up should use: ``currentNode`` unless it is none or a registration
        of another CT / radiograph and one of these exists (then that one)."""
        from MSKdeXLib import slicer_bridge as sb

        if currentNode is not None and sb.registration_mismatch(currentNode, ctNode, radiographNode) is None:
            return currentNode
        return self.followupRegistrationFor(ctNode, radiographNode) or currentNode

    def startFollowup(self, ctNode, segmentationNode, radiographNode, registrationNode=None,
                      sidMm: float = _CAMERA.sid_mm, reader: Optional[str] = None):
        """``mskdex followup``: the baseline CT + segmentation, the follow-up radiograph (its spacing,
        ``sidMm``) and, when ``registrationNode`` (a pose transform node, CT RAS -> camera mm, e.g. the
        one :meth:`followupRegistrationFor` finds) is given, its pose written as registration.json (with
        the camera it was registered with, which ``mskdex followup`` checks); else the CT's pelvis is
        registered first. A registration made on another CT or radiograph is refused (ValueError).
        ``reader``: ``--reader`` (ridge or fit; None: the command's default)."""
        from MSKdeXLib import jobs
        from MSKdeXLib import slicer_bridge as sb

        if registrationNode is not None:
            mismatch = sb.registration_mismatch(registrationNode, ctNode, radiographNode)
            if mismatch:
                raise ValueError(mismatch)
        xray, spacing = self._saveRadiograph(radiographNode, "followup.tif")
        if spacing is None:
            raise ValueError(_("The follow-up radiograph has no pixel spacing: the reading needs it (mm per pixel)."))
        registration = None
        if registrationNode is not None:
            registration = str(sb.write_registration_json(registrationNode,
                                                          os.path.join(self.workDir(), "followup-registration.json")))
        argv = jobs.followup_args(self._save(ctNode, "ct.nii.gz"), self._labelsFile(segmentationNode), xray,
                                  self._newOutput("followup"), registration=registration, sid_mm=sidMm,
                                  spacing_mm=spacing, table=self._builtinTable(ctNode, segmentationNode),
                                  reader=reader, extra=self.followupExtraArgs)
        return self._start(argv)

    def _builtinTable(self, ctNode, segmentationNode) -> Optional[str]:
        """--table for a label map whose table is a built-in one (None for a segmentation node)."""
        if segmentationNode.IsA("vtkMRMLSegmentationNode"):
            return None
        labels = self.labelMap(ctNode, segmentationNode)
        return labels.table.name if labels.table.name in BUILTIN_TABLES else None

    def readFollowup(self, job=None, tableNode=None):
        """Result of the last ``mskdex followup`` (slicer_bridge.FollowupNodes): the table (per muscle
        baseline / estimated lean mass g, change %, 90 % intervals; asymmetry rows), the figure as an
        RGB volume, and the warnings (a doubtful registration, implausible estimates: exit code 3)."""
        from MSKdeXLib import slicer_bridge as sb

        nodes = self._followup or sb.FollowupNodes()
        nodes.table = tableNode or nodes.table
        self._followup = sb.followup_to_nodes(self._outputs["followup"], slicer.mrmlScene,
                                              exit_code=job.returncode if job is not None else None, nodes=nodes)
        return self._followup

    def showFollowupFigure(self, result, view: str = "Yellow") -> None:
        """The follow-up's change figure (followup.png) in a slice view (the table stays in its view)."""
        if result.figure is not None and slicer.app.layoutManager().sliceWidget(view) is not None:
            self.showInSliceView(result.figure, view=view)

    def setOverlayOpacity(self, opacity: float) -> None:
        for name in ("Red", "Yellow", "Green"):
            widget = slicer.app.layoutManager().sliceWidget(name)
            if widget:
                widget.mrmlSliceCompositeNode().SetLabelOpacity(float(opacity))

    def setStructureVisible(self, layers, index: int, visible: bool, opacity: float = 1.0) -> None:
        from MSKdeXLib import slicer_bridge as sb

        sb.set_structure_visible(layers.colors, index + 1, visible)

    def exportCsv(self, tableNode, path: str) -> None:
        """Write a table node as CSV (atomically, via the core's writer)."""
        from MSKdeXLib import slicer_bridge as sb
        from MSKdeXLib.io.outputs import write_text

        rows = sb.rows_from_table_node(tableNode)
        cols = list(rows[0]) if rows else []
        lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
        write_text(path, "\n".join(lines) + "\n", force=True)  # the file dialog asked already


#
# Test
#
class MSKdeXTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the main workflow on the sample pelvis CT."""

    #: ``mskdex register`` / ``mskdex followup`` options that keep the background jobs to seconds
    TINY_REGISTRATION = ["--max-evals", "0", "--refine-steps", "2", "--fine-px", "32"]
    TINY_FOLLOWUP = ["--samples", "40", "--grid", "16", "--poses", "1", "--calibration-samples", "0"]
    JOB_TIMEOUT_S = 600

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_metrics_and_overlay()
        self.setUp()
        self.test_followup()

    def _sample(self):
        """The pelvis CT: the local copy when MSKDEX_DATA or ../shared/data has it, else download."""
        from MSKdeXLib.io import sample_data

        case = sample_data.pelvis_ct()
        if case is not None:
            ct = slicer.util.loadVolume(str(case.ct))
            labels = slicer.util.loadLabelVolume(str(case.labels))
            return ct, labels
        return MSKdeXLogic().loadSampleData()

    def test_metrics_and_overlay(self):
        import numpy as np

        from MSKdeXLib import slicer_bridge as sb
        from MSKdeXLib.io.images import Radiograph
        from MSKdeXLib.anatomy.ct_metrics import structure_metrics

        self.delayDisplay("Loading the sample pelvis CT")
        ctNode, labelNode = self._sample()
        logic = MSKdeXLogic()
        labels = logic.labelMap(ctNode, labelNode)
        self.assertEqual(labels.table.name, "totalseg_v1")

        self.delayDisplay("CT metrics")
        table = logic.computeMetrics(ctNode, labelNode)
        rows = sb.rows_from_table_node(table)
        ct = sb.volume_from_node(ctNode)
        expected = {m.structure.name: m for m in structure_metrics(ct, labels)}
        self.assertGreater(len(rows), 5)
        for row in rows:
            self.assertAlmostEqual(row["mass_g"], expected[row["name"]].mass_g, places=3)

        self.delayDisplay("Segmentation node -> same structures")
        # segments named by structure (a TotalSegmentator .seg.nrrd): from a label map whose colour
        # table holds the detected table's names (the loaded file's own colours name no structures)
        named = sb.labelmap_to_node(labels, slicer.mrmlScene, "MSKdeX named labels")
        seg = sb.labelmap_to_segmentation(named, slicer.mrmlScene)
        fromSeg = logic.labelMap(ctNode, seg)
        self.assertEqual({s.name for s in fromSeg.structures}, {s.name for s in labels.structures})

        self.delayDisplay("Channels over a radiograph")
        muscles = labels.select(kinds=["muscle"])
        xray = np.clip(ct.array + 1000.0, 0, None).sum(axis=1)[::-1, ::-1].astype(np.float32)
        masks = np.stack([labels.mask(s).sum(axis=1)[::-1, ::-1] for s in muscles]).astype(np.float32)
        rgNode = sb.radiograph_to_node(Radiograph(xray, (ct.spacing[2], ct.spacing[0])), slicer.mrmlScene)
        layers = sb.channels_to_nodes(masks, muscles, rgNode, slicer.mrmlScene)
        logic.showInSliceView(rgNode, layers.label)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetLabelVolumeID(), layers.label.GetID())

        if self._hasTorch():
            self.delayDisplay("DRR")
            widgetParams = logic.getParameterNode()
            widgetParams.detectorRows = widgetParams.detectorCols = 64
            widgetParams.pixelSpacingMm = 6.0
            drr, pose = logic.renderDRR(ctNode, labelNode, logic.cameraOf(widgetParams),
                                        ((0, 0, 0), (0, 0, 0)))
            self.assertEqual(sb.radiograph_from_node(drr).shape, (64, 64))
        self.delayDisplay("Test passed")

    def test_followup(self):
        """Registration (background job, tiny settings) of the sample CT to a radiograph simulated from
        it, then Follow-up on that radiograph: the follow-up finds that registration and reads with it."""
        if not self._hasTorch():
            self.delayDisplay("Follow-up skipped: PyTorch is not installed")
            return
        import json

        import numpy as np

        from MSKdeXLib import slicer_bridge as sb
        from MSKdeXLib.projection.geometry import Camera
        from MSKdeXLib.projection.rendering import default_view
        from MSKdeXLib.projection.simulate import SimulationSettings, simulate_radiograph

        self.delayDisplay("Follow-up: a radiograph simulated from the sample CT")
        ctNode, labelNode = self._sample()
        logic = MSKdeXLogic()
        ct, labels = sb.volume_from_node(ctNode), logic.labelMap(ctNode, labelNode)
        camera = Camera(64, 64, 6.0, 6.0, 1000.0)
        pose = np.asarray(default_view(ct, labels, camera))
        xray = simulate_radiograph(ct, camera, pose, SimulationSettings(kvp=78, noise_level=0.003,
                                                                        scatter_fraction=0.2), seed=1)
        xrayNode = sb.radiograph_to_node(xray, slicer.mrmlScene, "MSKdeX follow-up radiograph")

        self.delayDisplay("Follow-up: registration of the CT to it")
        logic.registrationExtraArgs = list(self.TINY_REGISTRATION)
        job = logic.startRegistration(ctNode, labelNode, xrayNode, "pelvis", sidMm=camera.sid_mm)
        self.assertIn(job.wait(self.JOB_TIMEOUT_S), (0, 3), job.summary())
        registered = logic.readRegistration(job).transforms["pelvis"]
        found = logic.followupRegistrationFor(ctNode, xrayNode)
        self.assertIsNotNone(found)
        self.assertEqual(found.GetID(), registered.GetID())
        other = sb.radiograph_to_node(xray, slicer.mrmlScene, "another radiograph")
        self.assertIsNone(logic.followupRegistrationFor(ctNode, other))
        with self.assertRaises(ValueError):  # a registration of another radiograph is refused
            logic.startFollowup(ctNode, labelNode, other, registered, camera.sid_mm)

        self.delayDisplay("Follow-up: reading with that registration")
        logic.followupExtraArgs = list(self.TINY_FOLLOWUP)
        job = logic.startFollowup(ctNode, labelNode, xrayNode, found, camera.sid_mm)
        self.assertIn(job.wait(self.JOB_TIMEOUT_S), (0, 3), job.summary())
        result = logic.readFollowup(job)
        with open(os.path.join(result.folder, "followup.json"), encoding="utf-8") as f:
            doc = json.load(f)
        np.testing.assert_allclose(doc["pose"]["ct_to_camera"], sb.pose_from_transform_node(registered), atol=1e-6)
        rows = [r for r in sb.rows_from_table_node(result.table) if not r["structure"].startswith("asymmetry ")]
        metrics = {r["name"]: r["mass_g"] for r in sb.rows_from_table_node(logic.computeMetrics(ctNode, labelNode))}
        self.assertGreater(len(rows), 5)
        for row in rows:  # the baseline is the CT's lean mass, as CT metrics computes it
            self.assertAlmostEqual(row["baseline_g"], metrics[row["structure"]], places=3)
            self.assertLessEqual(row["estimate_low_g"], row["estimate_g"])
            self.assertLessEqual(row["estimate_g"], row["estimate_high_g"])
        self.assertEqual(result.table.GetAttribute("MSKdeX.doubtful"), "1" if result.warnings else "0")
        self.delayDisplay("Follow-up passed")

    @staticmethod
    def _hasTorch() -> bool:
        return MSKdeXLogic.torchVersion() is not None
