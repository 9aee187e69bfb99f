"""Defaults and choice lists of MSKdeX, each written once.

The command line (argparse defaults, choices and help), the demo, the benchmarks and the Slicer
module build from these objects; nothing else spells the numbers out again
(``Testing/Python/test_defaults.py`` walks the command line's parser and checks).

Where each default lives:

* density and the lean-muscle HU window [-29, 150]: :class:`MSKdeXLib.anatomy.density.DensityModel`;
* detector geometry, one preset per use (SID 1000 mm everywhere): :class:`Detector` below;
* radiograph physics (kVp, scatter, noise, ...): :class:`MSKdeXLib.projection.simulate.SimulationSettings`;
* virtual-cohort variation: :class:`MSKdeXLib.learning.cohort.CohortRanges`;
* training sets: :class:`MSKdeXLib.learning.dataset.builder.DatasetSettings`;
* registration: :class:`MSKdeXLib.registration.settings.RegistrationSettings` (one group per body kind);
* the demo's sizes: :class:`MSKdeXLib.demo.DemoSettings`.

Choice lists: structure kinds and built-in tables (:data:`MSKdeXLib.anatomy.structures.KINDS`,
``BUILTIN_TABLES``), quantities (:mod:`MSKdeXLib.anatomy.quantities`), similarity measures
(:data:`MSKdeXLib.registration.similarity.MEASURES`), progress modes (:data:`MSKdeXLib.progress.MODES`).

This module imports nothing heavy: the command line's parser and the Slicer module read it at start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .validation import check_int, check_positive

#: source-to-image distance of every default view, mm (the AP pelvis radiograph's usual distance)
SID_MM = 1000.0
#: linear attenuation of water for attenuation DRRs, 1/mm (about 70 keV)
MU_WATER_PER_MM = 0.02


@dataclass(frozen=True)
class Detector:
    """A flat-panel detector for one use: ``rows`` x ``cols`` pixels of ``pixel_spacing_mm`` (mm at the
    detector, square; None: taken from the radiograph or fitted to the anatomy) at ``sid_mm`` from the
    source. Checked on creation (one line naming the field)."""

    rows: int
    cols: int
    pixel_spacing_mm: float | None
    sid_mm: float = SID_MM

    def __post_init__(self) -> None:
        check_int("detector rows", self.rows, low=1)
        check_int("detector cols", self.cols, low=1)
        if self.pixel_spacing_mm is not None:
            check_positive("detector pixel spacing (mm)", self.pixel_spacing_mm)
        check_positive("source-to-image distance (mm)", self.sid_mm)

    def to_dict(self) -> dict:
        return asdict(self)


#: ``mskdex drr`` and the Slicer module's DRR panel: 256^2 pixels of 1.6 mm (a 410 mm field)
DRR_DETECTOR = Detector(rows=256, cols=256, pixel_spacing_mm=1.6)
#: ``mskdex simulate-xray``: a radiograph-like 512^2 pixels of 0.8 mm (the same 410 mm field)
RADIOGRAPH_DETECTOR = Detector(rows=512, cols=512, pixel_spacing_mm=0.8)
#: ``mskdex cohort``: 256^2 pixels, spacing fitted so that the labelled anatomy fills the field
COHORT_DETECTOR = Detector(rows=256, cols=256, pixel_spacing_mm=None)
#: ``mskdex build-dataset``: records of 256^2 pixels at the first case's detector spacing
DATASET_IMAGE = Detector(rows=256, cols=256, pixel_spacing_mm=None)

#: every preset by use (the defaults test and docs/architecture.md list them)
DETECTORS = {"drr": DRR_DETECTOR, "simulate-xray": RADIOGRAPH_DETECTOR, "cohort": COHORT_DETECTOR,
             "build-dataset": DATASET_IMAGE}
