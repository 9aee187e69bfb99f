"""Settings of the registration: what all bodies share, and one group per body kind.

``RegistrationSettings`` holds the shared knobs (similarity, pyramid, optimisers, the soft-tissue
DRR) and three groups: ``first`` (:class:`SearchSettings`: the first body's and free bodies'
global search), ``joint`` (:class:`JointSettings`: a ball joint about its fitted centre, a femur
after the pelvis) and ``part`` (:class:`PartSettings`: a body inside a registered group, a vertebra
after 'spine'). Angles in degrees, lengths in mm (camera frame: x = image columns, y = rows,
z = depth). Every value is recorded in ``registration.json`` (``settings``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass

import numpy as np


@dataclass
class SearchSettings:
    """First body (and any free later body): in-plane search, CMA-ES, gradient refinement."""

    inplane_search: bool = True   # 2D rotation+shift search when no pose is given
    cma_restarts: int = 2         # CMA-ES runs (different seeds), best kept (3 before round 6; 1 in round 7's
                                  # trial defaults: less accurate on the test set, RESULTS_registration.md)
    sigma_deg: float = 6.0
    sigma_mm: float = 12.0
    bounds_deg: float = 25.0
    bounds_mm: float = 45.0
    later_body_bounds: float = 0.6  # a free later body starts near the first one's pose: smaller search
    refine_full_res: bool = True    # a last gradient refinement on the detector's own pixels (60 % of the
                                    # pelvis's time; without it, round 7, less accurate on the test set)
    full_res_steps: int = 10        # gradient steps of that refinement (0: ``refine_steps``; 40 before round 6,
                                    # 20 before round 8: 10 with ``tissue_drr_mm`` 3 as accurate on 30
                                    # calibration trials, RESULTS_registration.md)
    # the refinement starts from each of these too, and keeps the best on the scoring view (round 10,
    # benchmarks/RESULTS_registration.md: a bone-only global search is blind on radiographs whose bones
    # are faint beside the soft tissue, and left good starts for poses 50-80 mm away):
    start_candidate: bool = True    # the start pose itself
    tissue_candidate: bool = True   # one more CMA-ES run from the start with the tissue in the DRR
    # ... each only when the search's result, refined through the pyramid, scores below this on the
    # scoring view (> 1: always, as in round 10). Round 11 (calibration, RESULTS_registration.md): the
    # searches the candidates rescued scored <= 0.34 there, successful ones >= 0.57; the tissue
    # CMA-ES is half the first body's time where the search worked
    start_candidate_below: float = 2.0
    tissue_candidate_below: float = 0.45
    # doubtful below these final similarities (whole detector; calibrated:
    # benchmarks/RESULTS_registration.md): bone-only DRRs / with the soft tissue
    doubtful_below: float = 0.2
    doubtful_below_tissue: float = 0.4   # 0.3 before round 10: a pelvis lost 78 mm away on a processed
                                         # follow-up ended at 0.33 (calibration: lost <= 0.33, successes >= 0.50)
    # doubtful when the body's own DRR adds less than this to the similarity of the soft tissue moving
    # with it (first body, soft tissue on; 0: off): the tissue lines up and the bones do not. Round 14
    # (benchmarks/RESULTS_registration.md): chest calibration at 90 mm / 60 deg, gross failures
    # -0.009..0.007 (one at similarity 0.49), first bodies within 5 mm 0.023-0.041; processed follow-up
    # calibration (30010-30019): gross failures up to 0.0159, successes from 0.0165 (a thin margin)
    doubtful_gain: float = 0.0162


@dataclass
class BoundedMotion:
    """A joint / part body's search relative to its parent's pose (rotation about its centre,
    in-plane translation, a small depth), with a Gaussian prior on the motion."""

    enabled: bool = True
    sigma_deg: float = 8.0
    bounds_deg: float = 30.0
    sigma_mm: float = 1.0
    bounds_mm: float = 3.0          # in-plane translation allowed relative to the parent's pose
    bounds_depth_mm: float = 0.25   # depth (barely observable)
    prior_deg: float = 10.0         # prior SD of the rotation
    prior_mm: float = 0.0           # prior SD of the in-plane translation (0: none)
    cma_max_evals: int = 0          # evaluations per CMA-ES run of this kind (0: ``cma_max_evals``)
    # doubtful below these final similarities (in the body's window): bone-only DRRs / with the soft tissue
    doubtful_below: float = 0.53
    doubtful_below_tissue: float = 0.25   # 0.62 before round 6 (own renderer, unmoved tissue); set on the
                                          # foreign-renderer calibration trials (RESULTS_registration.md)

    def depth_bound(self, radius_mm: float | None, pixel_mm: float) -> float:
        """Depth bound (mm); a part's may grow with its size (:meth:`PartSettings.depth_bound`)."""
        return self.bounds_depth_mm

    def motion(self, radius_mm: float | None = None, pixel_mm: float = 1.5
               ) -> tuple[float, float, float, np.ndarray, np.ndarray]:
        """(CMA-ES sigma deg, rotation bound deg, prior SD deg, translation bounds mm (x, y in
        plane; z depth), CMA-ES sigma mm per axis (at most half the bound))."""
        b_mm = np.array([self.bounds_mm, self.bounds_mm, self.depth_bound(radius_mm, pixel_mm)])
        return self.sigma_deg, self.bounds_deg, self.prior_deg, b_mm, np.minimum(self.sigma_mm, b_mm / 2)


@dataclass
class JointSettings(BoundedMotion):
    """A body touching a registered one (femur - pelvis) rotates about the joint centre."""

    contact_mm: float = 7.5         # voxels this close to the registered body form the joint surface
    prior_deg: float = 20.0         # prior SD of the hip rotation (10 before round 8: it pulled femurs in
                                    # +-15 deg hip poses towards the CT's; 20 better in 25 / 27 of 30
                                    # calibration femurs, RESULTS_registration.md round 8)
    # doubtful when the joint centre ends farther than this (mm, in the image plane) from where the
    # parent's pose puts it: a femoral head out of its acetabulum (0: off)
    doubtful_shift_mm: float = 1.5  # (calibration successes: at most 1.44 mm; RESULTS_registration.md round 8)


@dataclass
class PartSettings(BoundedMotion):
    """A body inside a registered group (vertebra in 'spine') moves a little about its own centre:
    a vertebra's edges repeat every level, and soft-tissue edges beside the spine pull a bone-only
    DRR by up to 3 mm, so the prior keeps it near its group's pose."""

    sigma_deg: float = 2.0
    bounds_deg: float = 6.0
    bounds_mm: float = 3.0
    prior_deg: float = 3.0
    prior_mm: float = 1.5
    doubtful_below: float = 0.2
    doubtful_below_tissue: float = 0.3    # 0.4 before round 6; foreign-renderer calibration trials
    # depth bound set by the part's size (0: off, every part gets ``bounds_depth_mm``): a depth
    # shift moves a point at in-plane distance r from the part's centre in proportion to r on the
    # detector (magnification), so a part's depth is observed in proportion to its in-plane RMS
    # radius in pixels of its level, r / p; bound = clip(depth_per_radius_px * r / p,
    # bounds_depth_mm, bounds_depth_max_mm). E.g. 0.025: a chest spine (T6-L1, r ~ 57 mm) at
    # 1.5 mm gets 0.95 mm, a vertebra (r ~ 14-15 mm) 0.25 mm. Off by default: with refine_full_res
    # it did not help (benchmarks/RESULTS_registration.md, round 4)
    depth_per_radius_px: float = 0.0
    bounds_depth_max_mm: float = 1.0
    roi_mm: float = 0.0   # > 0: the similarity counts only pixels within this of the part's own
                          # projection (0: the wide ``roi_margin_mm`` window; 10 mm was measured worse)

    def depth_bound(self, radius_mm: float | None, pixel_mm: float = 1.5) -> float:
        """Depth bound (mm) of a part whose voxels have in-plane RMS radius ``radius_mm`` about
        its centre, searched on a level with ``pixel_mm`` pixels: ``bounds_depth_mm`` when the
        size rule is off or the radius unknown, else the rule's value clipped to
        [``bounds_depth_mm``, ``bounds_depth_max_mm``]."""
        if self.depth_per_radius_px <= 0 or radius_mm is None:
            return self.bounds_depth_mm
        return float(np.clip(self.depth_per_radius_px * radius_mm / pixel_mm, self.bounds_depth_mm,
                             max(self.bounds_depth_mm, self.bounds_depth_max_mm)))


@dataclass
class RegistrationSettings:
    """Knobs of the registration; recorded in the output."""

    similarity: str = "pgncc"
    patch_px: int = 8
    coarse_px: int = 48           # long side of the coarsest pyramid level (CMA-ES)
    fine_px: int = 96             # long side of the pyramid's finest level (capped by the detector;
                                  # 192 before round 6: then refined twice at nearly the same pixels)
    working_mm: float = 1.5       # a radiograph with finer pixels is area-averaged to about these first
                                  # (integer factor): memory and time bounded by the working grid
    cma: bool = True
    cma_popsize: int = 16
    cma_max_evals: int = 480
    refine_steps: int = 40
    refine_lr_deg: float = 0.4
    refine_lr_mm: float = 1.5
    border_px: int = 2
    roi_margin_mm: float = 40.0   # later bodies: similarity only near the body's start projection
    roi_fine_mm: float = 1.5      # joint / part bodies: one level with pixels of about this size
    roi_cma_restarts: int = 2     # joint / part bodies: CMA-ES runs (different seeds), best kept (both runs
                                  # ended at the same similarity in 20 of 20 calibration femurs, yet round 7's
                                  # defaults with 1 were less accurate on the test set)
    roi_search_mm: float = 0.0    # > roi_fine_mm: joint / part bodies' CMA-ES on a level of about these
                                  # pixels (cheaper), their refinement on ``roi_fine_mm``; 0: both on it
    prior_weight: float = 0.01    # similarity units per (motion / prior SD)^2 of joints / parts; 0: no prior
    # the first body's DRR also holds the CT's other tissue (the patient's soft tissue and bones of
    # no body, not the table: :func:`~.bodyvolume.tissue_volume`), which then stays with it as later
    # bodies' background
    soft_tissue: bool = True
    tissue_mm: float = 3.0        # voxel size of that tissue volume (smooth: coarser than the bones)
    # the bodies' voxels in that tissue volume hold tissue of this CT number, and the bodies' DRRs are
    # their attenuation in excess of it: a bone that moved displaces soft tissue instead of leaving a
    # bone-shaped hole (None: air, as before round 6; then a femur in a new hip pose left its old
    # outline dark in the DRR)
    tissue_fill_hu: float | None = 40.0
    # the tissue DRR of a view with pixels finer than this (mm) is rendered on a grid of about these
    # pixels and bilinearly up-sampled (it is smooth: its voxels are ``tissue_mm``); 0: on the view's own
    # pixels (before round 8; the full-resolution refinement's tissue DRR was 60 % of its time)
    tissue_drr_mm: float = 3.0
    tissue_search: bool = False   # the tissue in the global search too (in-plane, CMA-ES); off: there bone-only
                                  # (measured: the body outline then lured pelvis starts at 60 mm / 40 deg away)
    drr_match_blur: bool = False  # blur each level's DRR like the radiograph there (see drr_blur_sigma_mm)
    drr_blur_mm: float = 0.2      # the radiograph's own blur (Gaussian sigma at the detector, mm)
    volume_mm: float = 1.5        # bone volumes are block-averaged to about this voxel size
    max_hu: float = 0.0           # > 0: CT numbers above it (metal) count as it in the DRR
    seed: int = 0
    neighbourhood: bool = False   # record each body's truth-free neighbourhood diagnostic (13 more similarity
                                  # evaluations and a DRR per body; no rule reads it)
    first: SearchSettings = field(default_factory=SearchSettings)
    joint: JointSettings = field(default_factory=JointSettings)
    part: PartSettings = field(default_factory=PartSettings)

    def to_dict(self) -> dict:
        return asdict(self)

    def kind_settings(self, kind: str) -> SearchSettings | BoundedMotion:
        """The group of ``kind`` (first / free: ``first``; joint; part)."""
        return {"joint": self.joint, "part": self.part}.get(kind, self.first)

    def doubtful_threshold(self, kind: str) -> float:
        """Final-similarity threshold below which a body of ``kind`` is flagged doubtful (the
        soft-tissue one when ``soft_tissue``)."""
        g = self.kind_settings(kind)
        return float(g.doubtful_below_tissue if self.soft_tissue else g.doubtful_below)

    def drr_blur_sigma_mm(self, level_px_mm: float, detector_px_mm: float) -> float:
        """Gaussian sigma (mm at the detector) that makes a point-sampled DRR on a level with
        pixels of ``level_px_mm`` as blurred as the radiograph there: its own blur
        ``drr_blur_mm`` plus the area-averaging of ``detector_px_mm`` pixels into level pixels
        (a box of width w has variance w^2 / 12); 0 when ``drr_match_blur`` is off."""
        if not self.drr_match_blur:
            return 0.0
        pool = max(level_px_mm ** 2 - detector_px_mm ** 2, 0.0) / 12.0
        return float(np.sqrt(self.drr_blur_mm ** 2 + pool))

    def set(self, name: str, value) -> None:
        """Set one field by name; ``group.name`` (``part.roi_mm``) for a kind's group. A string
        value is converted to the field's type ('1', 'true', 'yes' are true)."""
        target, key = self, name
        if "." in name:
            group, key = name.split(".", 1)
            target = getattr(self, group)
        if not any(f.name == key for f in fields(target)) or is_dataclass(getattr(target, key)):
            raise ValueError(f"unknown registration setting '{name}'")
        old = getattr(target, key)
        if isinstance(value, str):
            value = value.lower() in ("1", "true", "yes") if isinstance(old, bool) else type(old)(value)
        setattr(target, key, value)
