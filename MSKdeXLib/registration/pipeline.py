"""Rigid 2D-3D registration of CT bones to a radiograph.

Each *body* (a rigid group of bone structures: pelvis = hip_left + hip_right + sacrum, a femur,
a vertebra, a 'spine' of several vertebrae ...) gets its own ``ct_to_camera`` pose. Bodies are
registered one after the other (the first one carries the big search); while a body moves, the
bodies already registered are rendered at their registered poses and added to its DRR as a
fixed background. A body is of one *kind*:

* ``first``: start pose (given, or the default AP view), a 2D search over in-plane rotation and
  shift (:func:`~.initialise.inplane_search`), global CMA-ES over the 6 pose parameters on the
  coarsest pyramid level, then gradient refinement (Adam through the differentiable DRR) on
  each finer level, and (``refine_full_res``) once more on the detector's own pixels;
* ``joint``: a body touching an already registered one (a femur after the pelvis:
  :func:`joint_centre`) is a *ball joint*: it starts from that body's registered pose and its
  parameters are rotations about the joint centre (+-``joint_bounds_deg``, Gaussian prior of SD
  ``joint_prior_deg``) and small translations;
* ``part``: a body whose structures are a subset of a registered body's (a vertebra after a
  'spine' group) starts from that group's pose and moves a little about its own centre
  (+-``part_bounds_deg``, prior SD ``part_prior_deg``; in-plane translations +-``part_bounds_mm``,
  prior SD ``part_prior_mm``: a vertebra's edges repeat every level, and soft-tissue edges beside
  the spine pull a bone-only DRR by up to 3 mm, so the prior keeps it near its group's pose);
  optionally its depth bound grows with its size in pixels
  (:meth:`RegistrationSettings.part_depth_bound`, off by default);
* ``free``: any other later body (the first body's path with smaller bounds).

Joint and part bodies are searched (CMA-ES, ``roi_cma_restarts`` runs, then gradient
refinement) on one level of about ``roi_fine_mm`` pixels, in a detector window around their
projection (``roi_margin_mm``): small bones get fine pixels at little cost. Every body's DRR is
rendered from its own cropped, block-averaged bone volume (:mod:`.bodyvolume`).

The similarity compares the radiograph with a DRR (line integral of attenuation) of the bodies'
bones and, with ``soft_tissue`` (default), of the CT's other tissue (:func:`~.bodyvolume.tissue_volume`:
the patient's voxels outside every body, at ``tissue_mm`` voxels), which moves with the first body
and is background for the later ones. A bone-only DRR (``soft_tissue`` off) needs no model of the
radiograph's soft tissue, but that tissue's edges (skin, lungs, fat planes) then pull the pose:
measured on the chest CT, the first body's depth was off by up to 2.3 mm with bone-only DRRs and
about 0.1 mm with a bone-only radiograph (benchmarks/RESULTS_registration.md, round 5). Contrast
needs no model either way (the similarities are normalised).
A body whose final similarity is below its kind's threshold (``doubtful_below`` for first /
free bodies, ``doubtful_below_joint`` / ``doubtful_below_part`` for joint / part bodies, whose
similarity is measured in their window) is flagged *doubtful*; so is a joint / part body whose
rotation or in-plane translation ends at its bound, or whose parent is doubtful.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..projection.geometry import Camera
from ..io.images import LabelMap
from ..io.images import Volume
from ..anatomy.structures import Structure
from . import initialise
from .bodyvolume import body_volume, crop_camera, mask_box, tissue_volume
from .optimize import PoseSpace, cma_search, gradient_refine
from .similarity import get_similarity, valid_mask

#: named groups of structures that move together
DEFAULT_GROUPS = {
    "pelvis": ("hip_left", "hip_right", "sacrum"),
}
DEFAULT_BODIES = "pelvis,femur_left,femur_right"
#: body name meaning every bone structure of the label map (e.g. a chest: spine, ribs, sternum ...)
ALL_BONES = "bones"


@dataclass
class Body:
    """A rigid body: a name and the label-map structures that move with it."""

    name: str
    structures: list[Structure]

    def mask(self, labels: LabelMap) -> np.ndarray:
        m = np.zeros(labels.grid.array.shape, dtype=bool)
        for s in self.structures:
            m |= labels.mask(s)
        return m


def _expand_range(item: str, labels: LabelMap) -> list[str]:
    """'a..b' -> the structures of the label map's table from a to b (inclusive, table order,
    either direction) that are present in the label map."""
    a, b = (v.strip() for v in item.split("..", 1))
    found = []
    for n in (a, b):
        st = labels.table.find(n)
        if st is None:
            raise UserError(f"range '{item}': unknown structure '{n}' (table '{labels.table.name}')",
                            labels.notes.get("source"))
        found.append(st.label)
    lo, hi = sorted(found)
    return [st.name for st in labels.structures if lo <= st.label <= hi]


def parse_bodies(text: str | None, labels: LabelMap) -> list[Body]:
    """Bodies from 'pelvis,femur_left,name=a+b+c,spine=vertebrae_T6..vertebrae_L1'
    (comma-separated; 'pelvis' is hip_left+hip_right+sacrum; 'bones' is every bone structure of
    the label map; 'a..b' is every structure of the label map from a to b in table order).
    Unknown or absent structures raise UserError."""
    text = text or DEFAULT_BODIES
    bodies = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if "=" in item:
            name, members = (v.strip() for v in item.split("=", 1))
            names = []
            for m in (m.strip() for m in members.split("+")):
                if m:
                    names += _expand_range(m, labels) if ".." in m else [m]
            if any(".." in m for m in members.split("+")) and not names:
                raise UserError(f"body '{name}': no structure of the range is in the label map",
                                labels.notes.get("source"))
        elif item in DEFAULT_GROUPS:
            name, names = item, list(DEFAULT_GROUPS[item])
        elif item == ALL_BONES:
            name, names = item, [st.name for st in labels.select(kinds=["bone"])]
            if not names:
                raise UserError("body 'bones': the label map has no bone structures", labels.notes.get("source"))
        else:
            name, names = item, [item]
        if not name or not names:
            raise UserError(f"bad body specification '{item}' (use NAME or NAME=a+b+c)")
        structs = []
        for n in names:
            if labels.table.find(n) is None:
                raise UserError(f"body '{name}': unknown structure '{n}' (table '{labels.table.name}')",
                                labels.notes.get("source"))
            structs.append(labels.resolve(n))  # raises when absent from the label map
        bodies.append(Body(name, structs))
    names = [b.name for b in bodies]
    if len(set(names)) != len(names):
        raise UserError(f"body names must be unique, got {names}")
    return bodies


@dataclass
class RegistrationSettings:
    """Knobs of the registration; recorded in the output."""

    similarity: str = "pgncc"
    patch_px: int = 8
    coarse_px: int = 48           # long side of the coarsest pyramid level (CMA-ES)
    fine_px: int = 192            # long side of the finest level (capped by the detector)
    inplane_search: bool = True   # 2D rotation+shift search when no pose is given
    cma: bool = True
    cma_popsize: int = 16
    cma_max_evals: int = 480
    cma_restarts: int = 3         # first / free bodies: CMA-ES runs (different seeds), best kept
    sigma_deg: float = 6.0
    sigma_mm: float = 12.0
    bounds_deg: float = 25.0
    bounds_mm: float = 45.0
    refine_steps: int = 40
    refine_lr_deg: float = 0.4
    refine_lr_mm: float = 1.5
    border_px: int = 2
    roi_margin_mm: float = 40.0   # later bodies: similarity only near the body's start projection
    later_body_bounds: float = 0.6  # later bodies start near the first one's pose: smaller search
    joint_pivot: bool = True      # a body touching a registered one (femur - pelvis) rotates about the joint
    joint_contact_mm: float = 7.5  # voxels this close to the registered body form the joint surface
    joint_sigma_deg: float = 8.0
    joint_bounds_deg: float = 30.0  # hip rotation searched, about the joint centre, relative to the parent
    joint_sigma_mm: float = 1.0
    joint_bounds_mm: float = 3.0    # in-plane joint translation allowed relative to the parent's pose
    joint_bounds_depth_mm: float = 0.25  # depth (unobservable): the head stays in the acetabulum
    joint_prior_deg: float = 10.0   # prior SD of the joint rotation (relative to the CT's posture)
    joint_prior_weight: float = 0.01  # similarity units per (rotation / prior SD)^2; 0: no prior
    part_of_group: bool = True     # a body inside a registered group (vertebra in 'spine') moves a little
    part_sigma_deg: float = 2.0
    part_bounds_deg: float = 6.0    # rotation about its own centre, relative to the group's pose
    part_sigma_mm: float = 1.0
    part_bounds_mm: float = 3.0     # in-plane translation relative to the group's pose
    part_bounds_depth_mm: float = 0.25  # depth is barely observable: stays with the group
    # depth bound set by the part's size (0: off, every part gets ``part_bounds_depth_mm``): a depth
    # shift moves a point at in-plane distance r from the part's centre in proportion to r on the
    # detector (magnification), so a part's depth is observed in proportion to its in-plane RMS
    # radius in pixels of its level, r / p; bound = clip(part_depth_per_radius_px * r / p,
    # part_bounds_depth_mm, part_bounds_depth_max_mm). E.g. 0.025: a chest spine (T6-L1, r ~ 57 mm)
    # at 1.5 mm gets 0.95 mm, a vertebra (r ~ 14-15 mm) 0.25 mm, a sacrum at 3 mm pixels 0.29 mm.
    # Off by default: with refine_full_res it did not help (chest 30 / 20: T12 8/10 -> 7/10;
    # the spine's depth ends at its +-1 mm bound in most trials), benchmarks/RESULTS_registration.md
    part_depth_per_radius_px: float = 0.0
    part_bounds_depth_max_mm: float = 1.0
    part_prior_deg: float = 3.0     # prior SD of a part's rotation (weight: joint_prior_weight)
    part_prior_mm: float = 1.5      # prior SD of a part's in-plane translation, mm (0: none)
    part_roi_mm: float = 0.0        # > 0: a part counts only pixels within this of its own projection
                                    # (0: the wide ``roi_margin_mm`` window; 10 mm was measured worse)
    roi_fine_mm: float = 1.5        # joint / part bodies: one level with pixels of about this size
    roi_cma_restarts: int = 2       # joint / part bodies: CMA-ES runs (different seeds), best kept
    refine_full_res: bool = True    # first / free bodies: a last gradient refinement on the detector's own pixels
    # the first body's DRR also holds the CT's other tissue (the patient's soft tissue and bones of
    # no body, not the table: :func:`~.bodyvolume.tissue_volume`), which then stays with it as later
    # bodies' background
    soft_tissue: bool = True
    tissue_mm: float = 3.0          # voxel size of that tissue volume (smooth: coarser than the bones)
    tissue_search: bool = False     # the tissue in the global search too (in-plane, CMA-ES); off: there bone-only
                                    # (measured: the body outline then lured pelvis starts at 60 mm / 40 deg away)
    drr_match_blur: bool = False    # blur each level's DRR like the radiograph there (see drr_blur_sigma_mm)
    drr_blur_mm: float = 0.2        # the radiograph's own blur (Gaussian sigma at the detector, mm; the
                                    # simulation's focal spot + detector unsharpness is about this)
    volume_mm: float = 1.5          # bone volumes are block-averaged to about this voxel size
    max_hu: float = 0.0             # > 0: CT numbers above it (metal) count as it in the DRR
    # doubtful below these final similarities (calibrated: benchmarks/RESULTS_registration.md)
    doubtful_below: float = 0.2        # first / free bodies (whole detector), bone-only DRRs
    doubtful_below_joint: float = 0.53  # joint bodies (similarity in their window), bone-only DRRs
    doubtful_below_part: float = 0.2   # part bodies (similarity in their window), bone-only DRRs
    # the same with soft_tissue (the DRR explains more of the radiograph: higher similarities);
    # calibrated on deliberately failed starts, benchmarks/RESULTS_registration.md (round 5)
    doubtful_below_tissue: float = 0.3
    doubtful_below_joint_tissue: float = 0.62
    doubtful_below_part_tissue: float = 0.4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def part_depth_bound(self, radius_mm: float | None, pixel_mm: float = 1.5) -> float:
        """Depth bound (mm) of a part body whose voxels have in-plane RMS radius ``radius_mm``
        about its centre (camera frame), searched on a level with ``pixel_mm`` pixels:
        ``part_bounds_depth_mm`` when the size rule is off (``part_depth_per_radius_px`` = 0) or
        the radius is unknown, else the rule's value clipped to [``part_bounds_depth_mm``,
        ``part_bounds_depth_max_mm``]."""
        if self.part_depth_per_radius_px <= 0 or radius_mm is None:
            return self.part_bounds_depth_mm
        return float(np.clip(self.part_depth_per_radius_px * radius_mm / pixel_mm, self.part_bounds_depth_mm,
                             max(self.part_bounds_depth_mm, self.part_bounds_depth_max_mm)))

    def drr_blur_sigma_mm(self, level_px_mm: float, detector_px_mm: float) -> float:
        """Gaussian sigma (mm at the detector) that makes a point-sampled DRR on a level with
        pixels of ``level_px_mm`` as blurred as the radiograph there: its own blur
        ``drr_blur_mm`` plus the area-averaging of ``detector_px_mm`` pixels into level pixels
        (a box of width w has variance w^2 / 12); 0 when ``drr_match_blur`` is off."""
        if not self.drr_match_blur:
            return 0.0
        pool = max(level_px_mm ** 2 - detector_px_mm ** 2, 0.0) / 12.0
        return float(np.sqrt(self.drr_blur_mm ** 2 + pool))

    def bounded_motion(self, kind: str, radius_mm: float | None = None, pixel_mm: float = 1.5
                       ) -> tuple[float, float, float, np.ndarray, np.ndarray]:
        """Search of a ``joint`` or ``part`` body relative to its parent's pose, from the
        ``<kind>_*`` settings: (CMA-ES sigma deg, rotation bound deg, prior SD deg, translation
        bounds mm (x, y in plane; z depth), CMA-ES sigma mm per axis (at most half the bound)).
        ``radius_mm`` (a part's in-plane RMS radius) and ``pixel_mm`` (its level's pixels) set a
        part's depth bound (:meth:`part_depth_bound`)."""
        get = lambda name: getattr(self, f"{kind}_{name}")  # noqa: E731
        depth = self.part_depth_bound(radius_mm, pixel_mm) if kind == "part" else get("bounds_depth_mm")
        b_mm = np.array([get("bounds_mm"), get("bounds_mm"), depth])
        return (get("sigma_deg"), get("bounds_deg"), get("prior_deg"), b_mm,
                np.minimum(get("sigma_mm"), b_mm / 2))

    def doubtful_threshold(self, kind: str) -> float:
        """Final-similarity threshold below which a body of ``kind`` is flagged doubtful."""
        suffix = "_tissue" if self.soft_tissue else ""
        name = {"joint": "doubtful_below_joint", "part": "doubtful_below_part"}.get(kind, "doubtful_below")
        return float(getattr(self, name + suffix))


@dataclass
class BodyResult:
    name: str
    structures: list[str]
    ct_to_camera: np.ndarray
    initial_pose: np.ndarray
    initial_similarity: float
    final_similarity: float
    doubtful: bool
    runtime_s: float
    history: list = field(default_factory=list)
    kind: str = "first"           # first | free | joint (ball joint) | part (of a registered group)
    doubtful_below: float | None = None
    mtre_mm: float | None = None
    mpd_px: float | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "structures": self.structures,
             "ct_to_camera": np.asarray(self.ct_to_camera).tolist(),
             "initial_ct_to_camera": np.asarray(self.initial_pose).tolist(),
             "initial_similarity": self.initial_similarity, "final_similarity": self.final_similarity,
             "doubtful": self.doubtful, "doubtful_below": self.doubtful_below, "kind": self.kind,
             "runtime_s": round(self.runtime_s, 3), "history": self.history}
        if self.mtre_mm is not None:
            d["mtre_mm"] = self.mtre_mm
            d["mean_projection_distance_px"] = self.mpd_px
        return d


def pyramid_factors(camera: Camera, coarse_px: int, fine_px: int) -> list[float]:
    """Down-sampling factors, coarse to fine: the finest level has at most ``fine_px`` pixels
    on its long side, each coarser level half as many, the coarsest about ``coarse_px``."""
    long_side = max(camera.rows, camera.cols)
    f = max(1.0, long_side / fine_px)
    factors = [f]
    while long_side / (factors[-1] * 2) >= coarse_px * 0.99:
        factors.append(factors[-1] * 2)
    return factors[::-1]


def resample_to(pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Area-average a (H, W) image onto (rows, cols) covering the same field of view."""
    if tuple(pixels.shape) == (rows, cols):
        return pixels
    return F.adaptive_avg_pool2d(pixels[None, None], (rows, cols))[0, 0]


def body_centre(labels: LabelMap, body: Body) -> np.ndarray:
    """Centre (LPS mm) of the body's voxels."""
    return labels.grid.voxel_centres_lps(body.mask(labels)).mean(0)


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere (centre mm, radius mm) through (N, 3) points (algebraic fit)."""
    p = np.asarray(points, dtype=np.float64)
    a = np.c_[2 * p, np.ones(len(p))]
    sol, *_ = np.linalg.lstsq(a, (p * p).sum(1), rcond=None)
    centre = sol[:3]
    return centre, float(np.sqrt(max(sol[3] + centre @ centre, 0.0)))


def joint_centre(labels: LabelMap, body: Body, parent: Body, contact_mm: float = 7.5,
                 radius_mm: tuple[float, float] = (10.0, 45.0)) -> np.ndarray | None:
    """Centre (LPS mm) of the ball joint between ``body`` and ``parent`` (e.g. the femoral head
    in the acetabulum): a sphere fitted to the body's voxels within ``contact_mm`` of the
    parent's voxels. None when they do not touch or the fit is not a plausible joint
    (radius outside ``radius_mm``, centre far from the contact surface)."""
    from scipy import ndimage

    own, other = body.mask(labels), parent.mask(labels)
    if not own.any() or not other.any():
        return None
    spacing = np.asarray(labels.grid.spacing, dtype=np.float64)[::-1]  # array axes (k, j, i)
    # work in the body's bounding box grown by the contact distance (large CTs stay fast)
    idx = np.argwhere(own)
    pad = np.ceil(contact_mm / spacing).astype(int) + 1
    lo, hi = np.maximum(idx.min(0) - pad, 0), idx.max(0) + pad + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = ndimage.distance_transform_edt(~other[box], sampling=spacing)
    contact = np.zeros_like(own)
    contact[box] = own[box] & (dist <= contact_mm)
    if contact.sum() < 10:
        return None
    pts = labels.grid.voxel_centres_lps(contact)
    centre, radius = fit_sphere(pts)
    if not (radius_mm[0] <= radius <= radius_mm[1]):
        return None
    if np.linalg.norm(centre - pts.mean(0)) > radius_mm[1]:
        return None
    return centre


def mtre_mm(points_lps: np.ndarray, true_pose: np.ndarray, estimate: np.ndarray) -> float:
    """Mean target registration error: mean distance (mm) between ``points_lps`` mapped by the
    true and the estimated ct_to_camera poses."""
    p = np.asarray(points_lps, dtype=np.float64)
    a = p @ true_pose[:3, :3].T + true_pose[:3, 3]
    b = p @ estimate[:3, :3].T + estimate[:3, 3]
    return float(np.linalg.norm(a - b, axis=1).mean())


def mean_projection_distance_px(camera: Camera, points_lps: np.ndarray, true_pose, estimate) -> float:
    """Mean distance (detector pixels) between the points projected with both poses."""
    from ..projection.geometry import project

    return float(np.linalg.norm(project(camera, true_pose, points_lps) - project(camera, estimate, points_lps),
                                axis=1).mean())


class _Level:
    """One pyramid level of the whole detector: its camera, the radiograph and the valid mask."""

    def __init__(self, camera: Camera, pixels: torch.Tensor, settings, device, dtype):
        self.camera, self.source = camera, pixels
        self.fixed = resample_to(pixels, camera.rows, camera.cols).to(device=device, dtype=dtype)
        self.mask = torch.from_numpy(valid_mask(self.fixed.cpu().numpy(), settings.border_px)).to(device)
        self.device, self.dtype = device, dtype


#: key of the tissue volume among the bone volumes (:class:`_Volumes`)
TISSUE = ("tissue",)


class _Volumes:
    """Bone-only volumes (:func:`~.bodyvolume.body_volume`) per set of structures, and their
    renderers per camera; built on first use, kept for the whole registration."""

    def __init__(self, ct: Volume, labels: LabelMap, settings, device, dtype, bodies: list[Body] = ()):
        self.ct, self.labels, self.s, self.device, self.dtype = ct, labels, settings, device, dtype
        self._vols: dict = {}
        self._renderers: dict = {}
        #: the structures of every body: not part of the tissue volume
        self.body_structures = list({st.label: st for b in bodies for st in b.structures}.values())

    def renderer(self, structures, camera: Camera):
        """Renderer of the bone-only volume of ``structures`` (None: the tissue volume)."""
        from ..projection.rendering import DRRRenderer

        key = TISSUE if structures is None else tuple(sorted(st.label for st in structures))
        if key not in self._vols:
            max_hu = self.s.max_hu if self.s.max_hu > 0 else None
            self._vols[key] = (tissue_volume(self.ct, self.labels, self.body_structures, self.s.tissue_mm, max_hu=max_hu)
                               if structures is None else
                               body_volume(self.ct, self.labels, structures, target_mm=self.s.volume_mm, max_hu=max_hu))
        rkey = (key, camera)
        if rkey not in self._renderers:
            if len(self._renderers) > 24:  # bounded: drop the oldest
                self._renderers.pop(next(iter(self._renderers)))
            self._renderers[rkey] = DRRRenderer(self._vols[key], camera, device=self.device)
        return self._renderers[rkey]

    def drr(self, structures, camera: Camera, poses) -> torch.Tensor:
        """(B, rows, cols) bone-only DRR of ``structures`` at ``poses`` ((B,)4x4); None: of the
        tissue volume."""
        poses = torch.as_tensor(poses)
        if poses.dim() == 2:
            poses = poses[None]
        return self.renderer(structures, camera).attenuation(poses.to(device=self.device, dtype=self.dtype))


class _View:
    """What one body is compared with on one level: a detector window (the whole detector, or
    the box around the body's region of interest), the radiograph and mask in it, and the DRR
    of the bodies already registered (fixed background)."""

    def __init__(self, camera: Camera, fixed: torch.Tensor, mask: torch.Tensor, background: torch.Tensor):
        self.camera, self.fixed, self.mask, self.background = camera, fixed, mask, background


def _parent_group(body: Body, registered: list[tuple[Body, np.ndarray]]) -> tuple[Body, np.ndarray] | None:
    """The last registered body that holds all of ``body``'s structures and more (a vertebra
    inside a registered 'spine'), with its pose; else None."""
    own = {st.label for st in body.structures}
    for other, pose in reversed(registered):
        theirs = {st.label for st in other.structures}
        if own < theirs:
            return other, pose
    return None


def _background_groups(body: Body, registered: list[tuple[Body, np.ndarray]]) -> list[tuple[list, np.ndarray]]:
    """[(structures, pose)]: every registered structure not in ``body``, at the pose of the
    last registered body that holds it."""
    own = {st.label for st in body.structures}
    latest: dict[int, tuple[Structure, int]] = {}
    for i, (other, _) in enumerate(registered):
        for st in other.structures:
            latest[st.label] = (st, i)
    groups: dict[int, list] = {}
    for label, (st, i) in latest.items():
        if label not in own:
            groups.setdefault(i, []).append(st)
    return [(sts, registered[i][1]) for i, sts in sorted(groups.items())]


def register(ct: Volume, labels: LabelMap, pixels: np.ndarray, camera: Camera, bodies: list[Body],
             initial_pose: np.ndarray | None = None, settings: RegistrationSettings | None = None,
             device="cpu", progress: Callable[..., None] | None = None,
             true_poses: dict[str, np.ndarray] | None = None,
             initial_poses: dict[str, np.ndarray] | None = None) -> list[BodyResult]:
    """Register each body of ``bodies`` (in order) to the radiograph ``pixels`` (rows, cols; bone
    bright) seen by ``camera``. ``initial_pose``: start for the first body (default: the AP view
    of the renderer's :func:`default_view`); later bodies start from the previous body's result
    (a joint or part body: from its parent's) unless ``initial_poses`` names them.
    ``true_poses`` (body name -> pose, e.g. from a simulated radiograph's sidecar) adds
    ``mtre_mm``. ``progress(event, **info)`` is called per step."""
    from ..projection.rendering import default_view

    s = settings or RegistrationSettings()
    if tuple(np.shape(pixels)) != (camera.rows, camera.cols):
        raise UserError(f"radiograph is {np.shape(pixels)} pixels but the camera is {camera.rows}x{camera.cols}")
    if not bodies:
        raise UserError("no bodies to register")
    dtype = torch.float32
    sim = get_similarity(s.similarity, s.patch_px)
    full = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
    levels = [_Level(camera.scaled(f) if f != 1.0 else camera, full, s, device, dtype)
              for f in pyramid_factors(camera, s.coarse_px, s.fine_px)]
    vols = _Volumes(ct, labels, s, device, dtype, bodies)
    if initial_pose is None:
        initial_pose = default_view(ct, labels, camera)
    notify = progress or (lambda *a, **k: None)
    results: list[BodyResult] = []
    registered: list[tuple[Body, np.ndarray]] = []
    prev = np.asarray(initial_pose, dtype=np.float64)
    for body in bodies:
        t0 = time.time()
        group = _parent_group(body, registered) if s.part_of_group else None
        joint = _joint(labels, body, registered, s) if s.joint_pivot and group is None else None
        kind = "joint" if joint is not None else "part" if group is not None else "free"
        if not results:
            kind = "first"
        if joint is not None:  # a ball joint: start from the parent's pose, rotate about the joint
            _, parent_pose, centre = joint
            start = np.asarray((initial_poses or {}).get(body.name, parent_pose), dtype=np.float64)
            space = PoseSpace(start, centre)
        elif group is not None:  # part of a registered group: small motions about its own centre
            start = np.asarray((initial_poses or {}).get(body.name, group[1]), dtype=np.float64)
            space = PoseSpace(start, body_centre(labels, body))
        else:
            start = np.asarray((initial_poses or {}).get(body.name, prev), dtype=np.float64)
            space = PoseSpace(start, body_centre(labels, body))
        views = _views(body, kind, start, registered, levels, camera, vols, s, device, dtype)
        last = len(views) - 1
        if s.refine_full_res and kind in ("first", "free") and _shape(views[-1]) != (camera.rows, camera.cols):
            views += _views(body, kind, start, registered, [_level_at(levels, camera, 1.0, s, device, dtype)],
                            camera, vols, s, device, dtype)
        det_px = min(camera.spacing_row_mm, camera.spacing_col_mm)

        # a first body's tissue: in its refinement and final score, and (tissue_search) its global search
        refine_tissue = s.soft_tissue and kind == "first"
        search_tissue = refine_tissue and s.tissue_search

        def moving_drr(cam: Camera, poses, tissue: bool) -> torch.Tensor:
            """The body's DRR at ``poses`` (with ``tissue``: plus the tissue that moves with it)."""
            d = vols.drr(body.structures, cam, poses)
            return d + vols.drr(None, cam, poses) if tissue else d

        def objective_at(i, tissue: bool = refine_tissue):
            v = views[i]
            sig = s.drr_blur_sigma_mm(min(v.camera.spacing_row_mm, v.camera.spacing_col_mm), det_px)
            sig_px = (sig / v.camera.spacing_row_mm, sig / v.camera.spacing_col_mm)
            return lambda poses: sim(v.fixed, blur_batch(moving_drr(v.camera, poses, tissue) + v.background, sig_px),
                                     v.mask)

        def score(i, x, tissue: bool = refine_tissue):
            with torch.no_grad():
                return float(objective_at(i, tissue)(space.matrices(torch.as_tensor(x, dtype=torch.float64)[None]))[0])

        history = []
        x = np.zeros(6)
        init_sim = score(last, x)
        history.append({"stage": "initial", "kind": kind, "level_px": list(_shape(views[last])),
                        "similarity": init_sim})
        if joint is not None:
            history.append({"stage": "joint", "of": joint[0].name,
                            "centre_lps_mm": [round(float(v), 2) for v in joint[2]]})
        if group is not None:
            history.append({"stage": "part", "of": group[0].name})
        if s.inplane_search and kind == "first" and initial_poses is None:
            v = views[0]
            with torch.no_grad():
                drr = (moving_drr(v.camera, space.matrices(torch.zeros(1, 6, dtype=torch.float64)), search_tissue)
                       + v.background)[0]
            from ..projection.geometry import project

            c_rc = project(v.camera, start, space.centre_lps[None])[0]
            ang, dr, dc, val = initialise.inplane_search(v.fixed, drr, v.mask, sim, (float(c_rc[0]), float(c_rc[1])))
            x_ip = initialise.inplane_params(ang, (dr, dc), v.camera, float(space.centre_camera[2]))
            if score(0, x_ip, search_tissue) > score(0, x, search_tissue):
                x = x_ip
            history.append({"stage": "inplane", "level_px": list(_shape(v)), "similarity": score(0, x, search_tissue),
                            "angle_deg": ang, "shift_px": [dr, dc]})
            notify("inplane", body=body.name, similarity=history[-1]["similarity"])
        box, penalty, restarts = None, None, max(1, s.cma_restarts)
        if kind in ("joint", "part"):
            radius = inplane_radius_mm(labels, body, start) if kind == "part" else None
            px = min(views[0].camera.spacing_row_mm, views[0].camera.spacing_col_mm)
            sig_deg, b_deg, prior_sd, b_mm, sig_mm = s.bounded_motion(kind, radius, px)
            if kind == "part":
                history.append({"stage": "part-bounds", "inplane_radius_mm": round(float(radius), 1),
                                "pixel_mm": round(float(px), 3), "depth_mm": round(float(b_mm[2]), 3)})
            half = np.r_[[b_deg] * 3, b_mm]
            box = (-half, half)
            restarts = max(1, s.roi_cma_restarts)
            if s.joint_prior_weight > 0:
                penalty = _prior_penalty(s.joint_prior_weight, prior_sd,
                                         s.part_prior_mm if kind == "part" else 0.0)
        else:
            shrink = s.later_body_bounds if registered else 1.0
            sig_deg, sig_mm = s.sigma_deg * shrink, s.sigma_mm * shrink
            b_deg, b_mm = s.bounds_deg * shrink, s.bounds_mm * shrink
        if s.cma:
            best = None
            for r in range(restarts):
                res = cma_search(objective_at(0, search_tissue), space, x, sig_deg, sig_mm, b_deg, b_mm,
                                 s.cma_popsize, s.cma_max_evals, s.seed + 1000 * r, dtype, device,
                                 callback=lambda n, f: notify("cma", body=body.name, step=n, similarity=f),
                                 penalty=penalty)
                history.append({"stage": "cma-es", "level_px": list(_shape(views[0])), "similarity": res.similarity,
                                "evaluations": res.evaluations, "seconds": round(res.seconds, 3), "restart": r,
                                "x": [round(float(v), 4) for v in res.x]})
                if best is None or res.similarity > best.similarity:
                    best = res
            pen0 = float(penalty(torch.as_tensor(x, dtype=torch.float64)[None])[0]) if penalty else 0.0
            if best.similarity > score(0, x, search_tissue) - pen0:
                x = best.x
        for i in range(len(views)):  # (a full-resolution level after the pyramid when refine_full_res)
            div = 2 if box is not None else i + 1  # steps shrink on finer levels
            res = gradient_refine(objective_at(i), space, x, s.refine_steps, s.refine_lr_deg / div,
                                  s.refine_lr_mm / div, dtype, device,
                                  callback=lambda n, f: notify("refine", body=body.name, step=n, similarity=f),
                                  bounds=box, penalty=penalty)
            x = res.x
            history.append({"stage": "refine", "level_px": list(_shape(views[i])), "similarity": res.similarity,
                            "steps": res.evaluations, "seconds": round(res.seconds, 3)})
        pose = space.matrix(x)
        final = score(last, x)
        history.append(_profile(objective_at(last), space, x, dtype, device))
        threshold = s.doubtful_threshold(kind)
        doubtful = final < threshold
        if box is not None:
            # a motion stuck at its bound is not a plausible posture (or the body slid along a
            # repeated pattern: a vertebra onto its neighbour's edges); a doubtful parent
            # makes its joint / part doubtful too
            at_bound = bool(np.any(np.abs(x[:3]) >= b_deg - 1.0) or np.any(np.abs(x[3:5]) >= b_mm[:2] - 0.05))
            parent = (joint[0] if joint is not None else group[0]).name
            doubtful = doubtful or at_bound or any(r.doubtful for r in results if r.name == parent)
            history.append({"stage": "joint-rotation" if kind == "joint" else "part-motion",
                            "deg": [round(float(v), 2) for v in x[:3]],
                            "translation_mm": [round(float(v), 2) for v in x[3:]]})
        result = BodyResult(body.name, [st.name for st in body.structures], pose, start, init_sim, final,
                            bool(doubtful), time.time() - t0, history, kind=kind, doubtful_below=threshold)
        if true_poses and body.name in true_poses:
            pts = labels.grid.voxel_centres_lps(body.mask(labels))
            result.mtre_mm = mtre_mm(pts, np.asarray(true_poses[body.name]), pose)
            result.mpd_px = mean_projection_distance_px(camera, pts, np.asarray(true_poses[body.name]), pose)
        results.append(result)
        registered.append((body, pose))
        prev = pose
        notify("body-done", body=body.name, similarity=final, doubtful=result.doubtful)
    return results


#: offsets of the similarity profile recorded about a final pose (mm of depth, deg about the image's rows axis)
PROFILE_STEPS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)


def _profile(objective, space: PoseSpace, x: np.ndarray, dtype, device) -> dict:
    """Similarity about the final parameters ``x`` along depth (camera z, mm) and the rotation
    about the camera y axis (deg): how sharply the pose is determined in its two weakest
    directions (a diagnostic recorded in the history; no truth used)."""
    xs = [np.asarray(x, dtype=np.float64)]
    for axis in (5, 1):
        for d in PROFILE_STEPS:
            v = xs[0].copy()
            v[axis] += d
            xs.append(v)
    with torch.no_grad():
        f = objective(space.matrices(torch.as_tensor(np.stack(xs))).to(dtype=dtype, device=device)).double().cpu()
    f = [round(float(v), 5) for v in f]
    n = len(PROFILE_STEPS)
    return {"stage": "profile", "steps": list(PROFILE_STEPS), "at": f[0], "depth_mm": f[1:1 + n],
            "rot_y_deg": f[1 + n:]}


def inplane_radius_mm(labels: LabelMap, body: Body, pose: np.ndarray) -> float:
    """In-plane RMS radius (mm) of the body's voxel centres about their centre, in the camera
    frame of ``pose`` (ct_to_camera): depth (camera z) is left out."""
    p = labels.grid.voxel_centres_lps(body.mask(labels)) @ np.asarray(pose)[:3, :3].T
    d = p[:, :2] - p[:, :2].mean(0)
    return float(np.sqrt((d * d).sum(1).mean()))


def blur_batch(img: torch.Tensor, sigma_px: tuple[float, float]) -> torch.Tensor:
    """Gaussian blur (separable, edges replicated, differentiable) of (B, H, W) images with
    sigma (rows, cols) in pixels; unchanged when both are below 0.05 px."""
    from ..projection.filters import separable_gaussian

    if max(sigma_px) < 0.05:
        return img
    return separable_gaussian(img[:, None], sigma_px, 0.05)[:, 0]


def _prior_penalty(weight: float, sd_deg: float, sd_mm: float = 0.0):
    """Gaussian prior on a joint / part motion as a penalty (similarity units): ``weight`` per
    (rotation deg / ``sd_deg``)^2, plus per (in-plane translation mm / ``sd_mm``)^2 when
    ``sd_mm`` > 0; maps (B, 6) parameters to (B,)."""
    def penalty(xt: torch.Tensor) -> torch.Tensor:
        p = ((xt[:, :3] / sd_deg) ** 2).sum(-1)
        if sd_mm > 0:
            p = p + ((xt[:, 3:5] / sd_mm) ** 2).sum(-1)
        return weight * p

    return penalty


def _views(body: Body, kind: str, start: np.ndarray, registered, levels: list[_Level], camera: Camera,
           vols: _Volumes, s: RegistrationSettings, device, dtype) -> list[_View]:
    """The levels a body is registered on (coarse to fine), each cut to its region of interest.

    The first and free bodies use the whole pyramid and the whole detector. Later bodies count
    only pixels within ``roi_margin_mm`` of their projection at the start pose, and their
    DRRs are rendered in that window only; joint and part bodies (small, starting close) use
    one level whose pixels are about ``roi_fine_mm`` (never finer than the detector). With
    ``part_roi_mm`` > 0 a part counts only pixels within that distance of its own projection
    (off by default: it made a vertebra's bias worse, benchmarks/RESULTS_registration.md)."""
    if kind in ("joint", "part"):
        f = max(1.0, s.roi_fine_mm / min(camera.spacing_row_mm, camera.spacing_col_mm))
        lv_list = [_level_at(levels, camera, f, s, device, dtype)]
    else:
        lv_list = levels
    groups = _background_groups(body, registered)
    if s.soft_tissue and registered:  # the tissue (None) stays with the first body
        groups = [(None, registered[0][1])] + groups
    views = []
    with torch.no_grad():
        for lv in lv_list:
            cam, fixed, mask = lv.camera, lv.fixed, lv.mask
            if registered and s.roi_margin_mm > 0:
                own = vols.drr(body.structures, cam, torch.as_tensor(start))[0] > 0
                margin = s.part_roi_mm if kind == "part" and s.part_roi_mm > 0 else s.roi_margin_mm
                k = 2 * int(round(margin / cam.spacing_col_mm)) + 1
                roi = F.max_pool2d(own[None, None].float(), k, stride=1, padding=k // 2)[0, 0] > 0
                roi = roi & mask
                b = mask_box(roi.cpu().numpy())
                if b is not None:
                    r0, r1, c0, c1 = b
                    cam = crop_camera(cam, r0, r1, c0, c1)
                    fixed, mask = fixed[r0:r1, c0:c1], roi[r0:r1, c0:c1]
            bg = torch.zeros(1, cam.rows, cam.cols, dtype=dtype, device=device)
            for sts, pose in groups:
                bg = bg + vols.drr(sts, cam, torch.as_tensor(pose))
            views.append(_View(cam, fixed, mask, bg))
    return views


def _level_at(levels: list[_Level], camera: Camera, factor: float, s, device, dtype) -> _Level:
    """A level with pixels ``factor`` times the detector's: one of ``levels`` when it matches,
    else re-sampled from the full radiograph."""
    for lv in levels:
        if lv.camera == (camera.scaled(factor) if factor > 1.0 else camera):
            return lv
    return _Level(camera.scaled(factor) if factor > 1.0 else camera, levels[-1].source, s, device, dtype)


def _joint(labels: LabelMap, body: Body, registered: list[tuple[Body, np.ndarray]],
           s: RegistrationSettings) -> tuple[Body, np.ndarray, np.ndarray] | None:
    """(parent body, its registered pose, joint centre LPS mm) when ``body`` forms a ball joint
    with an already registered body (the femoral head in the pelvis's acetabulum), else None."""
    for parent, pose in registered:
        c = joint_centre(labels, body, parent, s.joint_contact_mm)
        if c is not None:
            return parent, np.asarray(pose, dtype=np.float64), c
    return None


def _shape(level: _Level) -> tuple[int, int]:
    return (level.camera.rows, level.camera.cols)
