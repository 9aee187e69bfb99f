"""Rigid 2D-3D registration of CT bones to a radiograph.

Each *body* (a rigid group of bone structures: pelvis = hip_left + hip_right + sacrum, a femur,
a vertebra ...) gets its own ``ct_to_camera`` pose. Bodies are registered one after the other
(the pelvis first); while a body moves, the bodies already registered are rendered at their
registered poses and added to its DRR as a fixed background. Per body:

1. start pose (given, or the previous body's, or the default AP view) and, optionally, a 2D
   search over in-plane rotation and shift (:func:`~.initialise.inplane_search`). A body that
   touches an already registered one (a femur after the pelvis: :func:`joint_centre`) is a
   *ball joint*: it starts from that body's registered pose and its 6 parameters become
   rotations about the joint centre (+-``joint_bounds_deg``, with a Gaussian prior of SD
   ``joint_prior_deg`` on them) and small translations (+-``joint_bounds_mm`` in the image
   plane, +-``joint_bounds_depth_mm`` in depth), searched on the finest level, with the
   similarity restricted to ``roi_margin_mm`` around the body's projection;
2. global CMA-ES over the 6 pose parameters on the coarsest pyramid level;
3. gradient refinement (Adam through the differentiable DRR) on each finer level.

The similarity compares the radiograph with the bone-only DRR (line integral of attenuation of
the bodies' voxels), so the radiograph's soft tissue and contrast do not need to be modelled.
A body whose final similarity is below ``doubtful_below`` is flagged *doubtful*; so is a joint
body whose rotation ends at its bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..geometry import Camera
from ..io.volumes import LabelMap
from ..image import Volume
from ..structures import Structure
from . import initialise
from .optimize import PoseSpace, cma_search, gradient_refine
from .similarity import get_similarity, valid_mask

#: named groups of structures that move together
DEFAULT_GROUPS = {
    "pelvis": ("hip_left", "hip_right", "sacrum"),
}
DEFAULT_BODIES = "pelvis,femur_left,femur_right"


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


def parse_bodies(text: str | None, labels: LabelMap) -> list[Body]:
    """Bodies from 'pelvis,femur_left,name=a+b+c' (comma-separated; 'pelvis' is
    hip_left+hip_right+sacrum). Unknown or absent structures raise UserError."""
    text = text or DEFAULT_BODIES
    bodies = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if "=" in item:
            name, members = (v.strip() for v in item.split("=", 1))
            names = [m.strip() for m in members.split("+") if m.strip()]
        elif item in DEFAULT_GROUPS:
            name, names = item, list(DEFAULT_GROUPS[item])
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
    joint_bounds_depth_mm: float = 1.0  # depth (unobservable): the head stays in the acetabulum
    joint_prior_deg: float = 10.0   # prior SD of the joint rotation (relative to the CT's posture)
    joint_prior_weight: float = 0.01  # similarity units per (rotation / prior SD)^2; 0: no prior
    joint_search_fine: bool = True  # CMA-ES of a joint body on the finest level (small bones)
    doubtful_below: float = 0.2   # calibrated on simulated radiographs (benchmarks/RESULTS_registration.md)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


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
    mtre_mm: float | None = None
    mpd_px: float | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "structures": self.structures,
             "ct_to_camera": np.asarray(self.ct_to_camera).tolist(),
             "initial_ct_to_camera": np.asarray(self.initial_pose).tolist(),
             "initial_similarity": self.initial_similarity, "final_similarity": self.final_similarity,
             "doubtful": self.doubtful, "runtime_s": round(self.runtime_s, 3), "history": self.history}
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
    from ..geometry import project

    return float(np.linalg.norm(project(camera, true_pose, points_lps) - project(camera, estimate, points_lps),
                                axis=1).mean())


class _Level:
    """One pyramid level: a renderer on a scaled camera and the matching radiograph."""

    def __init__(self, ct, labels, camera: Camera, structures, pixels: torch.Tensor, settings, device, dtype):
        from ..rendering import DRRRenderer

        self.camera = camera
        self.renderer = DRRRenderer(ct, camera, labels=labels, structures=structures, device=device)
        self.fixed = resample_to(pixels, camera.rows, camera.cols).to(device=device, dtype=dtype)
        self.mask = torch.from_numpy(valid_mask(self.fixed.cpu().numpy(), settings.border_px)).to(device)
        self.device, self.dtype = device, dtype

    def drr(self, poses: torch.Tensor, structures) -> torch.Tensor:
        return self.renderer.attenuation(poses.to(device=self.device, dtype=self.dtype), structures=structures)


def register(ct: Volume, labels: LabelMap, pixels: np.ndarray, camera: Camera, bodies: list[Body],
             initial_pose: np.ndarray | None = None, settings: RegistrationSettings | None = None,
             device="cpu", progress: Callable[..., None] | None = None,
             true_poses: dict[str, np.ndarray] | None = None,
             initial_poses: dict[str, np.ndarray] | None = None) -> list[BodyResult]:
    """Register each body of ``bodies`` (in order) to the radiograph ``pixels`` (rows, cols; bone
    bright) seen by ``camera``. ``initial_pose``: start for the first body (default: the AP view
    of the renderer's :func:`default_view`); later bodies start from the previous body's result
    unless ``initial_poses`` names them. ``true_poses`` (body name -> pose, e.g. from a simulated
    radiograph's sidecar) adds ``mtre_mm``. ``progress(event, **info)`` is called per step."""
    from ..rendering import default_view

    s = settings or RegistrationSettings()
    if tuple(np.shape(pixels)) != (camera.rows, camera.cols):
        raise UserError(f"radiograph is {np.shape(pixels)} pixels but the camera is {camera.rows}x{camera.cols}")
    if not bodies:
        raise UserError("no bodies to register")
    dtype = torch.float32
    sim = get_similarity(s.similarity, s.patch_px)
    all_structs = [st for b in bodies for st in b.structures]
    full = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
    levels = [_Level(ct, labels, camera.scaled(f) if f != 1.0 else camera, all_structs, full, s, device, dtype)
              for f in pyramid_factors(camera, s.coarse_px, s.fine_px)]
    if initial_pose is None:
        initial_pose = default_view(ct, labels, camera)
    notify = progress or (lambda *a, **k: None)
    results: list[BodyResult] = []
    registered: list[tuple[Body, np.ndarray]] = []
    prev = np.asarray(initial_pose, dtype=np.float64)
    for body in bodies:
        t0 = time.time()
        joint = _joint(labels, body, registered, s) if s.joint_pivot else None
        if joint is not None:  # a ball joint: start from the parent's pose, rotate about the joint
            parent_pose, centre = joint
            start = np.asarray((initial_poses or {}).get(body.name, parent_pose), dtype=np.float64)
            space = PoseSpace(start, centre)
        else:
            start = np.asarray((initial_poses or {}).get(body.name, prev), dtype=np.float64)
            space = PoseSpace(start, body_centre(labels, body))
        backgrounds = []
        with torch.no_grad():
            for lv in levels:
                bg = torch.zeros(1, lv.camera.rows, lv.camera.cols, dtype=dtype, device=device)
                for other, pose in registered:
                    bg = bg + lv.drr(torch.as_tensor(pose)[None], other.structures)
                backgrounds.append(bg)

        masks = [lv.mask for lv in levels]
        if registered and s.roi_margin_mm > 0:
            # later bodies: only the region around the body's projection at the start pose counts
            masks = []
            with torch.no_grad():
                for lv in levels:
                    own = lv.drr(torch.as_tensor(start)[None], body.structures)[0] > 0
                    k = 2 * int(round(s.roi_margin_mm / lv.camera.spacing_col_mm)) + 1
                    roi = F.max_pool2d(own[None, None].float(), k, stride=1, padding=k // 2)[0, 0] > 0
                    masks.append(lv.mask & roi)

        def objective_at(i):
            lv, bg, mk = levels[i], backgrounds[i], masks[i]
            return lambda poses: sim(lv.fixed, lv.drr(poses, body.structures) + bg, mk)

        def score(i, x):
            with torch.no_grad():
                return float(objective_at(i)(space.matrices(torch.as_tensor(x, dtype=torch.float64)[None]))[0])

        history = []
        x = np.zeros(6)
        init_sim = score(len(levels) - 1, x)
        history.append({"stage": "initial", "level_px": list(_shape(levels[-1])), "similarity": init_sim})
        if joint is not None:
            history.append({"stage": "joint", "centre_lps_mm": [round(float(v), 2) for v in joint[1]]})
        if s.inplane_search and not results and initial_poses is None:
            lv = levels[0]
            with torch.no_grad():
                drr = (lv.drr(space.matrices(torch.zeros(1, 6, dtype=torch.float64)), body.structures)
                       + backgrounds[0])[0]
            from ..geometry import project

            c_rc = project(lv.camera, start, space.centre_lps[None])[0]
            ang, dr, dc, val = initialise.inplane_search(lv.fixed, drr, lv.mask, sim, (float(c_rc[0]), float(c_rc[1])))
            x_ip = initialise.inplane_params(ang, (dr, dc), lv.camera, float(space.centre_camera[2]))
            if score(0, x_ip) > score(0, x):
                x = x_ip
            history.append({"stage": "inplane", "level_px": list(_shape(lv)), "similarity": score(0, x),
                            "angle_deg": ang, "shift_px": [dr, dc]})
            notify("inplane", body=body.name, similarity=history[-1]["similarity"])
        box, penalty = None, None
        if joint is not None:
            sig_deg, b_deg = s.joint_sigma_deg, s.joint_bounds_deg
            b_mm = np.array([s.joint_bounds_mm, s.joint_bounds_mm, s.joint_bounds_depth_mm])
            sig_mm = np.minimum(s.joint_sigma_mm, b_mm / 2)
            half = np.r_[[b_deg] * 3, b_mm]
            box = (-half, half)
            if s.joint_prior_weight > 0:
                w, sd = s.joint_prior_weight, s.joint_prior_deg
                penalty = lambda xt: w * ((xt[:, :3] / sd) ** 2).sum(-1)  # noqa: E731
        else:
            shrink = s.later_body_bounds if registered else 1.0
            sig_deg, sig_mm = s.sigma_deg * shrink, s.sigma_mm * shrink
            b_deg, b_mm = s.bounds_deg * shrink, s.bounds_mm * shrink
        # a joint body moves little from its parent's pose: search it at the finest level
        cl = len(levels) - 1 if joint is not None and s.joint_search_fine else 0
        if s.cma:
            res = cma_search(objective_at(cl), space, x, sig_deg, sig_mm, b_deg, b_mm,
                             s.cma_popsize, s.cma_max_evals, s.seed, dtype, device,
                             callback=lambda n, f: notify("cma", body=body.name, step=n, similarity=f),
                             penalty=penalty)
            if res.similarity > score(cl, x):
                x = res.x
            history.append({"stage": "cma-es", "level_px": list(_shape(levels[cl])), "similarity": res.similarity,
                            "evaluations": res.evaluations, "seconds": round(res.seconds, 3)})
        for i in range(cl, len(levels)):
            res = gradient_refine(objective_at(i), space, x, s.refine_steps, s.refine_lr_deg / (i + 1),
                                  s.refine_lr_mm / (i + 1), dtype, device,
                                  callback=lambda n, f: notify("refine", body=body.name, step=n, similarity=f),
                                  bounds=box, penalty=penalty)
            x = res.x
            history.append({"stage": "refine", "level_px": list(_shape(levels[i])), "similarity": res.similarity,
                            "steps": res.evaluations, "seconds": round(res.seconds, 3)})
        pose = space.matrix(x)
        final = score(len(levels) - 1, x)
        doubtful = final < s.doubtful_below
        if joint is not None:  # a joint rotation stuck at its bound is not a plausible hip posture
            doubtful = doubtful or bool(np.any(np.abs(x[:3]) >= s.joint_bounds_deg - 1.0))
            history.append({"stage": "joint-rotation", "deg": [round(float(v), 2) for v in x[:3]],
                            "translation_mm": [round(float(v), 2) for v in x[3:]]})
        result = BodyResult(body.name, [st.name for st in body.structures], pose, start, init_sim, final,
                            bool(doubtful), time.time() - t0, history)
        if true_poses and body.name in true_poses:
            pts = labels.grid.voxel_centres_lps(body.mask(labels))
            result.mtre_mm = mtre_mm(pts, np.asarray(true_poses[body.name]), pose)
            result.mpd_px = mean_projection_distance_px(camera, pts, np.asarray(true_poses[body.name]), pose)
        results.append(result)
        registered.append((body, pose))
        prev = pose
        notify("body-done", body=body.name, similarity=final, doubtful=result.doubtful)
    return results


def _joint(labels: LabelMap, body: Body, registered: list[tuple[Body, np.ndarray]],
           s: RegistrationSettings) -> tuple[np.ndarray, np.ndarray] | None:
    """(parent's registered pose, joint centre LPS mm) when ``body`` forms a ball joint with an
    already registered body (the femoral head in the pelvis's acetabulum), else None."""
    for parent, pose in registered:
        c = joint_centre(labels, body, parent, s.joint_contact_mm)
        if c is not None:
            return np.asarray(pose, dtype=np.float64), c
    return None


def _shape(level: _Level) -> tuple[int, int]:
    return (level.camera.rows, level.camera.cols)
