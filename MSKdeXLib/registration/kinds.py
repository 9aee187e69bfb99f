"""The four kinds of body, one class each behind one interface (:class:`BodyKind`).

* :class:`FirstBody`: the first body (start pose given, or the default AP view): in-plane
  search, CMA-ES over the 6 pose parameters on the coarsest pyramid level, gradient refinement
  on each finer level and (``first.refine_full_res``) on the detector's own pixels; its DRR
  holds the CT's other tissue (``soft_tissue``), which then stays with it;
* :class:`FreeBody`: any later body that is neither a joint nor a part: the first body's path
  with bounds shrunk by ``first.later_body_bounds``, in a window around it;
* :class:`JointBody`: a body touching a registered one (a femur after the pelvis,
  :func:`~.bodies.joint_centre`) is a ball joint: it starts from that body's registered pose
  and rotates about the joint centre (bounded, Gaussian prior), with small translations;
* :class:`PartBody`: a body whose structures are a subset of a registered body's (a vertebra
  after 'spine') starts from that group's pose and moves a little about its own centre.

Joint and part bodies are searched on one level of about ``roi_fine_mm`` pixels in a detector
window around them. A kind says where a body starts, on which views it is compared, how far its
search may go, and when its result is doubtful; :mod:`.pipeline` runs the stages.
"""

from __future__ import annotations

import numpy as np
import torch

from ..io.images import LabelMap
from ..projection.geometry import Camera
from .bodies import Body, body_centre, inplane_radius_mm, joint_centre, parent_group
from .optimize import Penalty, PoseSpace, _six
from .settings import BoundedMotion, RegistrationSettings
from .views import BodyVolumes, Level, View, body_views, level_at


def own_gain_too_small(own_gain: float | None, settings: RegistrationSettings) -> bool:
    """The first-body rule ``first.doubtful_gain`` (0: off): its own DRR added less than that to the
    similarity of the soft tissue moving with it (``own_gain``; None: not measured)."""
    limit = settings.first.doubtful_gain
    return own_gain is not None and limit > 0 and own_gain < limit


def prior_penalty(weight: float, sd_deg: float, sd_mm: float = 0.0) -> Penalty:
    """Gaussian prior on a joint / part motion as a penalty (similarity units): ``weight`` per
    (rotation deg / ``sd_deg``)^2, plus per (in-plane translation mm / ``sd_mm``)^2 when
    ``sd_mm`` > 0; maps (B, 6) parameters to (B,)."""
    def penalty(xt: torch.Tensor) -> torch.Tensor:
        p = ((xt[:, :3] / sd_deg) ** 2).sum(-1)
        if sd_mm > 0:
            p = p + ((xt[:, 3:5] / sd_mm) ** 2).sum(-1)
        return weight * p

    return penalty


class Search:
    """How far a body's search goes: CMA-ES sigmas and bounds (deg, mm; scalars or per axis),
    restarts, an optional box for the gradient refinement and a prior penalty."""

    def __init__(self, sigma_deg, sigma_mm, bounds_deg, bounds_mm, restarts: int,
                 box: tuple[np.ndarray, np.ndarray] | None = None, penalty: Penalty | None = None,
                 note: dict | None = None, max_evals: int = 0):
        self.sigma_deg, self.sigma_mm, self.bounds_deg, self.bounds_mm = sigma_deg, sigma_mm, bounds_deg, bounds_mm
        self.restarts, self.box, self.penalty = max(1, int(restarts)), box, penalty
        self.note = note  # a history entry describing the bounds (a part's size rule), or None
        self.max_evals = int(max_evals)  # evaluations per CMA-ES run (0: the settings' cma_max_evals)

    def bound_fraction(self, dx: np.ndarray) -> float:
        """How far a CMA-ES result moved from the search's start (``dx``: 6 parameters, deg and mm)
        as a fraction of its bounds, the largest over the parameters (1: at the box's edge)."""
        return round(float(np.max(np.abs(np.asarray(dx, dtype=np.float64)) / _six(self.bounds_deg, self.bounds_mm))), 4)


class BodyKind:
    """One body's role in the registration (subclasses: first, free, joint, part)."""

    name = "free"
    #: the first body's DRR holds the tissue in its refinement and final score
    carries_tissue = False

    def __init__(self, body: Body, labels: LabelMap, settings: RegistrationSettings,
                 registered: list[tuple[Body, np.ndarray]]):
        self.body, self.labels, self.s, self.registered = body, labels, settings, registered
        self.notes: list[dict] = []   # history entries describing the kind

    # -- where it starts ------------------------------------------------------------------
    def default_start(self, previous: np.ndarray) -> np.ndarray:
        return previous

    def pivot(self) -> np.ndarray:
        """Centre (LPS mm) the body rotates about."""
        return body_centre(self.labels, self.body)

    def space(self, start: np.ndarray) -> PoseSpace:
        return PoseSpace(start, self.pivot())

    # -- what it is compared with -----------------------------------------------------------
    def margin_mm(self) -> float:
        return self.s.roi_margin_mm

    def views(self, levels: list[Level], camera: Camera, start: np.ndarray, vols: BodyVolumes
              ) -> tuple[list[View], int]:
        """(views coarse to fine, index of the view of the initial / final similarity): the
        pyramid, and last the detector's own pixels when ``first.refine_full_res``; the score is
        on the pyramid's finest level, where the doubtful thresholds were calibrated."""
        views = body_views(self.body, levels, start, self.registered, vols, self.margin_mm(), self.s)
        last = len(views) - 1
        if self.s.first.refine_full_res and views[-1].shape != (camera.rows, camera.cols):
            full = level_at(levels, camera, 1.0, self.s, levels[-1].device, levels[-1].dtype)
            views += body_views(self.body, [full], start, self.registered, vols, self.margin_mm(), self.s)
            self._full_res = True
        return views, last

    # -- how far it searches ------------------------------------------------------------------
    def inplane(self) -> bool:
        return False

    def search(self, views: list[View], start: np.ndarray) -> Search:
        g, shrink = self.s.first, self.s.first.later_body_bounds
        return Search(g.sigma_deg * shrink, g.sigma_mm * shrink, g.bounds_deg * shrink, g.bounds_mm * shrink,
                      g.cma_restarts)

    def refine_divisor(self, level: int) -> float:
        """Gradient steps shrink on finer levels."""
        return level + 1

    def refined(self, views: list[View]) -> range:
        """Indices of the views the gradient refinement runs on (coarse to fine)."""
        return range(len(views))

    def refine_steps(self, views: list[View], level: int) -> int:
        """Gradient steps on view ``level`` (the full-resolution view after the pyramid may take fewer)."""
        n = self.s.first.full_res_steps
        return n if n > 0 and level == len(views) - 1 and self._full_res else self.s.refine_steps

    _full_res = False

    # -- how it is judged ----------------------------------------------------------------------
    def doubtful(self, final: float, x: np.ndarray, search: Search, parent_doubtful: bool,
                 own_gain: float | None = None) -> bool:
        """Whether any of :meth:`doubtful_reasons` holds."""
        return bool(self.doubtful_reasons(final, x, search, parent_doubtful, own_gain))

    def doubtful_reasons(self, final: float, x: np.ndarray, search: Search, parent_doubtful: bool,
                         own_gain: float | None = None) -> list[str]:
        """Why the result is doubtful, one short sentence per rule that fires (empty: not doubtful):
        here, a final similarity below the kind's threshold; ``own_gain``: what the body's own DRR adds
        to the similarity (:meth:`.pipeline.BodyRun.own_gain`; None when not measured)."""
        threshold = self.s.doubtful_threshold(self.name)
        return [f"similarity {final:.3f} below {threshold:.2f}"] if final < threshold else []

    def parent_name(self) -> str | None:
        return None

    def motion_note(self, x: np.ndarray) -> dict | None:
        """A history entry describing the final motion relative to the parent, or None."""
        return None


class FirstBody(BodyKind):
    """The first body: the whole search, on the whole detector."""

    name = "first"

    def __init__(self, *a, inplane: bool = True, **k):
        super().__init__(*a, **k)
        self._inplane = inplane
        self.carries_tissue = self.s.soft_tissue

    def inplane(self) -> bool:
        return self._inplane and self.s.first.inplane_search

    def search(self, views: list[View], start: np.ndarray) -> Search:
        g = self.s.first
        return Search(g.sigma_deg, g.sigma_mm, g.bounds_deg, g.bounds_mm, g.cma_restarts)

    def doubtful_reasons(self, final: float, x: np.ndarray, search: Search, parent_doubtful: bool,
                         own_gain: float | None = None) -> list[str]:
        """Also doubtful when its own bones add less than ``first.doubtful_gain`` to the similarity
        of the soft tissue moving with it: a pose where the tissue lines up and the bones do not."""
        reasons = super().doubtful_reasons(final, x, search, parent_doubtful, own_gain)
        if own_gain_too_small(own_gain, self.s):
            reasons.append(f"its own bones add {own_gain:.3f} < {self.s.first.doubtful_gain:.4g} to the soft "
                           "tissue's similarity")
        return reasons


class FreeBody(BodyKind):
    """A later body that neither touches nor belongs to a registered one."""

    name = "free"


class BoundedBody(BodyKind):
    """A joint or part: small bounded motions from its parent's pose, on one fine level in a
    window, with a prior; doubtful also at its bound or with a doubtful parent."""

    motion: BoundedMotion

    def __init__(self, body, labels, settings, registered, parent: Body, parent_pose: np.ndarray):
        super().__init__(body, labels, settings, registered)
        self.parent, self.parent_pose = parent, np.asarray(parent_pose, dtype=np.float64)

    def default_start(self, previous: np.ndarray) -> np.ndarray:
        return self.parent_pose

    def parent_name(self) -> str | None:
        return self.parent.name

    def views(self, levels: list[Level], camera: Camera, start: np.ndarray, vols: BodyVolumes
              ) -> tuple[list[View], int]:
        """One level of about ``roi_fine_mm`` pixels (scored and refined), after a coarser one of
        about ``roi_search_mm`` for the CMA-ES when that is set."""
        det = min(camera.spacing_row_mm, camera.spacing_col_mm)
        sizes = [self.s.roi_fine_mm] if self.s.roi_search_mm <= self.s.roi_fine_mm else \
            [self.s.roi_search_mm, self.s.roi_fine_mm]
        lvs = [level_at(levels, camera, max(1.0, mm / det), self.s, levels[-1].device, levels[-1].dtype) for mm in sizes]
        views = body_views(self.body, lvs, start, self.registered, vols, self.margin_mm(), self.s)
        return views, len(views) - 1

    def refined(self, views: list[View]) -> range:
        return range(len(views) - 1, len(views))

    def radius_mm(self, start: np.ndarray) -> float | None:
        return None

    def search(self, views: list[View], start: np.ndarray) -> Search:
        px = min(views[0].camera.spacing_row_mm, views[0].camera.spacing_col_mm)
        radius = self.radius_mm(start)
        sig_deg, b_deg, prior_sd, b_mm, sig_mm = self.motion.motion(radius, px)
        half = np.r_[[b_deg] * 3, b_mm]
        penalty = prior_penalty(self.s.prior_weight, prior_sd, self.motion.prior_mm) if self.s.prior_weight > 0 else None
        note = None if radius is None else {"stage": "part-bounds", "inplane_radius_mm": round(float(radius), 1),
                                            "pixel_mm": round(float(px), 3), "depth_mm": round(float(b_mm[2]), 3)}
        return Search(sig_deg, sig_mm, b_deg, b_mm, self.s.roi_cma_restarts, (-half, half), penalty, note,
                      self.motion.cma_max_evals)

    def refine_divisor(self, level: int) -> float:
        return 2

    def at_bound(self, x: np.ndarray, search: Search) -> bool:
        """A motion stuck at its bound is not a plausible posture (or the body slid along a
        repeated pattern: a vertebra onto its neighbour's edges)."""
        return bool(np.any(np.abs(x[:3]) >= search.bounds_deg - 1.0)
                    or np.any(np.abs(x[3:5]) >= np.asarray(search.bounds_mm)[:2] - 0.05))

    def doubtful_reasons(self, final: float, x: np.ndarray, search: Search, parent_doubtful: bool,
                         own_gain: float | None = None) -> list[str]:
        reasons = super().doubtful_reasons(final, x, search, parent_doubtful, own_gain)
        if self.at_bound(x, search):
            reasons.append("its motion ended at its bound")
        if parent_doubtful:
            reasons.append(f"its parent {self.parent.name} is doubtful")
        return reasons

    def motion_note(self, x: np.ndarray) -> dict | None:
        return {"stage": "joint-rotation" if self.name == "joint" else "part-motion",
                "deg": [round(float(v), 2) for v in x[:3]], "translation_mm": [round(float(v), 2) for v in x[3:]]}


class JointBody(BoundedBody):
    """A ball joint: rotations about the joint centre (a femoral head in its acetabulum)."""

    name = "joint"

    def __init__(self, body, labels, settings, registered, parent, parent_pose, centre: np.ndarray):
        super().__init__(body, labels, settings, registered, parent, parent_pose)
        self.motion, self.centre = settings.joint, np.asarray(centre, dtype=np.float64)
        self.notes.append({"stage": "joint", "of": parent.name, "centre_lps_mm": [round(float(v), 2) for v in centre]})

    def pivot(self) -> np.ndarray:
        return self.centre

    def dislocated(self, x: np.ndarray) -> bool:
        """The joint centre moved more than ``joint.doubtful_shift_mm`` in the image plane (the
        rotation is about it, so the in-plane translation is its shift from the parent's pose)."""
        limit = self.motion.doubtful_shift_mm
        return bool(limit > 0 and np.hypot(x[3], x[4]) > limit)

    def doubtful_reasons(self, final: float, x: np.ndarray, search: Search, parent_doubtful: bool,
                         own_gain: float | None = None) -> list[str]:
        reasons = super().doubtful_reasons(final, x, search, parent_doubtful, own_gain)
        if self.dislocated(x):
            reasons.append(f"its joint centre moved {float(np.hypot(x[3], x[4])):.1f} mm in the image plane "
                           f"(> {self.motion.doubtful_shift_mm:g})")
        return reasons


class PartBody(BoundedBody):
    """Part of a registered group: small motions about its own centre."""

    name = "part"

    def __init__(self, body, labels, settings, registered, parent, parent_pose):
        super().__init__(body, labels, settings, registered, parent, parent_pose)
        self.motion = settings.part
        self.notes.append({"stage": "part", "of": parent.name})

    def margin_mm(self) -> float:
        wide = self.s.roi_margin_mm
        return self.s.part.roi_mm if wide > 0 and self.s.part.roi_mm > 0 else wide

    def radius_mm(self, start: np.ndarray) -> float:
        return inplane_radius_mm(self.labels, self.body, start)


def classify(body: Body, labels: LabelMap, settings: RegistrationSettings, registered: list[tuple[Body, np.ndarray]],
             inplane: bool = True) -> BodyKind:
    """The kind of ``body`` given the bodies ``registered`` before it: first (none registered),
    part (inside a registered group), joint (touching a registered body), else free.
    ``inplane``: the first body may run the in-plane search (no start pose was given)."""
    if not registered:
        return FirstBody(body, labels, settings, registered, inplane=inplane)
    if settings.part.enabled:
        group = parent_group(body, registered)
        if group is not None:
            return PartBody(body, labels, settings, registered, group[0], group[1])
    if settings.joint.enabled:
        for parent, pose in registered:
            c = joint_centre(labels, body, parent, settings.joint.contact_mm)
            if c is not None:
                return JointBody(body, labels, settings, registered, parent, pose, c)
    return FreeBody(body, labels, settings, registered)
