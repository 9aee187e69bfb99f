"""Rigid 2D-3D registration of CT bones to a radiograph: :func:`register`.

Each *body* (a rigid group of bone structures: pelvis = hip_left + hip_right + sacrum, a femur,
a vertebra, a 'spine' of several vertebrae ...; :mod:`.bodies`) gets its own ``ct_to_camera``
pose. Bodies are registered one after the other (the first one carries the big search); while a
body moves, the bodies already registered are rendered at their registered poses and added to
its DRR as a fixed background (:mod:`.views`). Each body is of one *kind* (:mod:`.kinds`: first,
free, joint, part), which sets where it starts, its views, how far it searches and when it is
doubtful; this module runs the same stages for every kind: in-plane search (first body only,
:func:`~.initialise.inplane_search`), CMA-ES (``restarts`` runs, best kept), gradient refinement
(Adam through the differentiable DRR) on each view, the final score and a profile. The first
body's refinement also starts from its start pose and, when the global search's result scores low
on the scoring view (``first.tissue_candidate_below``), from a CMA-ES run whose DRR holds the
tissue; the candidate best on the scoring view is kept (:meth:`BodyRun.refine_candidates`).

The similarity compares the radiograph with a DRR (line integral of attenuation) of the bodies'
bones and, with ``soft_tissue`` (default), of the CT's other tissue (:func:`~.bodyvolume.tissue_volume`:
the patient's voxels outside every body, at ``tissue_mm`` voxels), which moves with the first body
and is background for the later ones. A bone-only DRR (``soft_tissue`` off) needs no model of the
radiograph's soft tissue, but that tissue's edges (skin, lungs, fat planes) then pull the pose:
measured on the chest CT, the first body's depth was off by up to 2.3 mm with bone-only DRRs and
about 0.1 mm with a bone-only radiograph (benchmarks/RESULTS_registration.md, round 5). Contrast
needs no model either way (the similarities are normalised).
A body whose final similarity is below its kind's threshold
(:meth:`~.settings.RegistrationSettings.doubtful_threshold`; joint / part bodies' similarity is
measured in their window) is flagged *doubtful*; so is a joint / part body whose rotation or
in-plane translation ends at its bound, or whose parent is doubtful, and a joint whose centre ended more
than ``joint.doubtful_shift_mm`` from its parent's (a femoral head out of its acetabulum).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..io.images import LabelMap, Volume
from ..projection.geometry import Camera, project
from ..projection.rendering import default_view
from . import initialise
from .bodies import (ALL_BONES, DEFAULT_BODIES, DEFAULT_GROUPS, Body, background_groups, body_centre,  # noqa: F401
                     fit_sphere, inplane_radius_mm, joint_centre, parent_group, parse_bodies)
from .kinds import BodyKind, Search, classify, prior_penalty  # noqa: F401
from .metrics import mean_projection_distance_px, mtre_mm  # noqa: F401
from .optimize import PoseSpace, cma_search, gradient_refine
from .settings import RegistrationSettings
from .similarity import Similarity, get_similarity
from .views import BodyVolumes, Level, View, blur_batch, pyramid_factors, resample_to, working_grid  # noqa: F401


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
    doubtful_reasons: list[str] = field(default_factory=list)   # why ``doubtful`` (one sentence per rule)

    def to_dict(self) -> dict:
        d = {"name": self.name, "structures": self.structures,
             "ct_to_camera": np.asarray(self.ct_to_camera).tolist(),
             "initial_ct_to_camera": np.asarray(self.initial_pose).tolist(),
             "initial_similarity": self.initial_similarity, "final_similarity": self.final_similarity,
             "doubtful": self.doubtful, "doubtful_reasons": self.doubtful_reasons,
             "doubtful_below": self.doubtful_below, "kind": self.kind,
             "runtime_s": round(self.runtime_s, 3), "history": self.history}
        if self.mtre_mm is not None:
            d["mtre_mm"] = self.mtre_mm
            d["mean_projection_distance_px"] = self.mpd_px
        return d


@dataclass
class Context:
    """What every body of one registration shares: the radiograph's levels, the bodies' volumes,
    the similarity, and the bodies registered so far."""

    camera: Camera
    labels: LabelMap
    settings: RegistrationSettings
    levels: list[Level]
    vols: BodyVolumes
    sim: Similarity
    notify: Callable[..., None]
    device: object = "cpu"
    dtype: torch.dtype = torch.float32
    registered: list[tuple[Body, np.ndarray]] = field(default_factory=list)
    results: list[BodyResult] = field(default_factory=list)


class BodyRun:
    """The stages of one body's registration (same for every kind; the kind sets the rest)."""

    def __init__(self, kind: BodyKind, ctx: Context, start: np.ndarray):
        self.kind, self.ctx, self.s = kind, ctx, ctx.settings
        self.start = np.asarray(start, dtype=np.float64)
        self.space = kind.space(self.start)
        self.views, self.last = kind.views(ctx.levels, ctx.camera, self.start, ctx.vols)
        self.det_px = min(ctx.camera.spacing_row_mm, ctx.camera.spacing_col_mm)
        self.refine_tissue = kind.carries_tissue
        self.search_tissue = self.refine_tissue and self.s.tissue_search
        self.history: list[dict] = []
        self.x = np.zeros(6)

    def moving_drr(self, cam: Camera, poses, tissue: bool) -> torch.Tensor:
        """The body's DRR at ``poses`` (with ``tissue``: plus the tissue that moves with it)."""
        vols = self.ctx.vols
        d = vols.drr(self.kind.body.structures, cam, poses)
        return d + vols.tissue_drr(cam, poses) if tissue else d

    def objective(self, i: int, tissue: bool | None = None):
        """(B, 4, 4) poses -> (B,) similarity on view ``i``."""
        tissue = self.refine_tissue if tissue is None else tissue
        v = self.views[i]
        sig = self.s.drr_blur_sigma_mm(min(v.camera.spacing_row_mm, v.camera.spacing_col_mm), self.det_px)
        sig_px = (sig / v.camera.spacing_row_mm, sig / v.camera.spacing_col_mm)
        return lambda poses: self.ctx.sim(v.fixed, blur_batch(self.moving_drr(v.camera, poses, tissue)
                                                               + v.background, sig_px), v.mask)

    def score(self, i: int, x, tissue: bool | None = None) -> float:
        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=torch.float64)[None]
            return float(self.objective(i, tissue)(self.space.matrices(xt))[0])

    def inplane(self) -> None:
        """2D rotation + shift of the body's DRR over the radiograph (first body, no start given)."""
        v, body = self.views[0], self.kind.body
        with torch.no_grad():
            drr = (self.moving_drr(v.camera, self.space.matrices(torch.zeros(1, 6, dtype=torch.float64)),
                                   self.search_tissue) + v.background)[0]
        c_rc = project(v.camera, self.start, self.space.centre_lps[None])[0]
        ang, dr, dc, _ = initialise.inplane_search(v.fixed, drr, v.mask, self.ctx.sim, (float(c_rc[0]), float(c_rc[1])))
        x_ip = initialise.inplane_params(ang, (dr, dc), v.camera, float(self.space.centre_camera[2]))
        if self.score(0, x_ip, self.search_tissue) > self.score(0, self.x, self.search_tissue):
            self.x = x_ip
        self.history.append({"stage": "inplane", "level_px": list(v.shape),
                             "similarity": self.score(0, self.x, self.search_tissue),
                             "angle_deg": ang, "shift_px": [dr, dc]})
        self.ctx.notify("inplane", body=body.name, similarity=self.history[-1]["similarity"])

    def global_search(self, search: Search) -> None:
        """CMA-ES on the first view, ``search.restarts`` runs with different seeds, best kept."""
        name, best = self.kind.body.name, None
        for r in range(search.restarts):
            res = cma_search(self.objective(0, self.search_tissue), self.space, self.x, search.sigma_deg,
                             search.sigma_mm, search.bounds_deg, search.bounds_mm, self.s.cma_popsize,
                             search.max_evals or self.s.cma_max_evals, self.s.seed + 1000 * r, self.ctx.dtype, self.ctx.device,
                             callback=lambda n, f: self.ctx.notify("cma", body=name, step=n, similarity=f),
                             penalty=search.penalty)
            self.history.append({"stage": "cma-es", "level_px": list(self.views[0].shape),
                                 "similarity": res.similarity, "evaluations": res.evaluations,
                                 "seconds": round(res.seconds, 3), "restart": r,
                                 "x": [round(float(v), 4) for v in res.x],
                                 "bound_fraction": search.bound_fraction(res.x - self.x)})
            if best is None or res.similarity > best.similarity:
                best = res
        pen0 = float(search.penalty(torch.as_tensor(self.x, dtype=torch.float64)[None])[0]) if search.penalty else 0.0
        if best.similarity > self.score(0, self.x, self.search_tissue) - pen0:
            self.x = best.x

    def refine(self, search: Search, views=None) -> None:
        """Adam through the DRR on ``views`` (indices; default every view the kind refines, coarse
        to fine, last the full-resolution one)."""
        name = self.kind.body.name
        for i in (self.kind.refined(self.views) if views is None else views):
            div = self.kind.refine_divisor(i)
            res = gradient_refine(self.objective(i), self.space, self.x, self.kind.refine_steps(self.views, i),
                                  self.s.refine_lr_deg / div,
                                  self.s.refine_lr_mm / div, self.ctx.dtype, self.ctx.device,
                                  callback=lambda n, f: self.ctx.notify("refine", body=name, step=n, similarity=f),
                                  bounds=search.box, penalty=search.penalty)
            self.x = res.x
            self.history.append({"stage": "refine", "level_px": list(self.views[i].shape),
                                 "similarity": res.similarity, "steps": res.evaluations,
                                 "seconds": round(res.seconds, 3)})

    def candidates(self, search: Search, x_search: np.ndarray, f_search: float):
        """Where else the first body's refinement may start (name, parameters), lazily, after the
        global search's result (``x_search``) scored ``f_search`` on the scoring view once refined:
        (``first.start_candidate``) the start itself, and (``first.tissue_candidate``, when the
        global search is bone-only) one more CMA-ES run from the start whose DRR holds the tissue;
        each only while ``f_search`` is below its ``*_candidate_below`` threshold. A bone-only search
        is blind when the radiograph's bones are faint beside its soft tissue (strong LUT, grid-less
        scatter: benchmarks/RESULTS_registration.md, rounds 10-11)."""
        g = self.s.first
        if g.start_candidate and np.any(x_search != 0) and f_search < g.start_candidate_below:
            yield "start", np.zeros(6)
        if (g.tissue_candidate and self.s.cma and self.refine_tissue and not self.search_tissue
                and f_search < g.tissue_candidate_below):
            res = cma_search(self.objective(0, True), self.space, np.zeros(6), search.sigma_deg, search.sigma_mm,
                             search.bounds_deg, search.bounds_mm, self.s.cma_popsize, self.s.cma_max_evals,
                             self.s.seed + 7919, self.ctx.dtype, self.ctx.device, penalty=search.penalty)
            self.history.append({"stage": "cma-es", "level_px": list(self.views[0].shape), "tissue": True,
                                 "similarity": res.similarity, "evaluations": res.evaluations,
                                 "seconds": round(res.seconds, 3), "x": [round(float(v), 4) for v in res.x],
                                 "bound_fraction": search.bound_fraction(res.x)})
            yield "tissue-search", res.x

    def refine_candidates(self, search: Search) -> None:
        """Refine the global search's result on the coarsest view, then on the other pyramid levels,
        and score it on the scoring view; then each further :meth:`candidates` the same way (one
        that ends on the coarsest view where an earlier one did, within ``SAME_POSE``, is dropped);
        keep the one with the highest similarity on the scoring view and refine it on the remaining
        (full-resolution) view. Every candidate is refined the same way whatever the others did."""
        g = self.s.first
        if self.kind.name != "first" or not (g.start_candidate or g.tissue_candidate):
            self.refine(search)
            return
        order = list(self.kind.refined(self.views))
        first, pyramid = order[:1], [i for i in order[1:] if i <= self.last]
        rest = [i for i in order if i > self.last]
        x_search, coarse, best = self.x.copy(), [], None

        def one(name: str, x: np.ndarray):
            nonlocal best
            self.x = np.asarray(x, dtype=np.float64)
            self.refine(search, first)
            if any(np.all(np.abs(self.x - y) <= SAME_POSE) for y in coarse):
                self.history.append({"stage": "candidate", "from": name, "same_as_earlier": True})
                return
            coarse.append(self.x.copy())
            self.refine(search, pyramid)
            f = self.score(self.last, self.x)
            self.history.append({"stage": "candidate", "from": name, "similarity": round(f, 5)})
            if best is None or f > best[0]:
                best = (f, self.x.copy(), name)

        one("search", x_search)
        n = 1
        for name, x in self.candidates(search, x_search, best[0]):
            one(name, x)
            n += 1
        self.x = best[1]
        self.history.append({"stage": "candidate-kept", "from": best[2], "similarity": round(best[0], 5),
                             "candidates": n})
        self.refine(search, rest)

    def run(self, t0: float) -> BodyResult:
        kind, body = self.kind, self.kind.body
        init_sim = self.score(self.last, self.x)
        self.history.append({"stage": "initial", "kind": kind.name, "level_px": list(self.views[self.last].shape),
                             "similarity": init_sim})
        self.history += kind.notes
        if kind.inplane():
            self.inplane()
        search = kind.search(self.views, self.start)
        if search.note:
            self.history.append(search.note)
        if self.s.cma:
            self.global_search(search)
        self.refine_candidates(search)
        return self.finish(search, init_sim, t0)

    def neighbourhood(self, x: np.ndarray, without_body: float) -> dict:
        """Truth-free evidence of the final pose, on the scoring view: the similarity at ``x``, at
        +-``NEIGHBOUR_STEPS`` along each of the 6 parameters, and ``without_body`` (the similarity
        without the body's own DRR, :meth:`similarity_without_body`: what the rest of the image explains)."""
        xs = [np.asarray(x, dtype=np.float64)]
        for axis, d in enumerate(NEIGHBOUR_STEPS):
            for sign in (-1.0, 1.0):
                v = xs[0].copy()
                v[axis] += sign * d
                xs.append(v)
        with torch.no_grad():
            f = self.objective(self.last)(self.space.matrices(torch.as_tensor(np.stack(xs))).to(self.ctx.dtype))
        f = [round(float(a), 5) for a in f]
        return {"stage": "neighbourhood", "steps": list(NEIGHBOUR_STEPS), "at": f[0], "minus": f[1::2][:6],
                "plus": f[2::2][:6], "without_body": round(without_body, 5)}

    def similarity_without_body(self, x: np.ndarray) -> float:
        """Similarity on the scoring view of the DRR without the body's own bones: the registered
        bodies' and, when the body carries it, the soft tissue at pose ``x`` (0 when nothing is left)."""
        v = self.views[self.last]
        with torch.no_grad():
            rest = v.background + (self.ctx.vols.drr(None, v.camera, self.space.matrices(torch.as_tensor(
                np.asarray(x, dtype=np.float64)[None]))) if self.refine_tissue else 0.0)
            if torch.as_tensor(rest).abs().sum() == 0:
                return 0.0
            return float(self.ctx.sim(v.fixed, rest.expand(1, *v.shape), v.mask)[0])

    def own_gain(self, final: float, without_body: float | None) -> float | None:
        """What the body's own DRR adds to the similarity of the rest of its DRR (``final`` minus
        ``without_body``, :meth:`similarity_without_body`), for a first body whose DRR holds something
        else (the soft tissue moving with it); None otherwise. Near 0: the tissue lines up, the bones do not."""
        if without_body is None:
            return None
        gain = final - without_body
        self.history.append({"stage": "own-gain", "similarity": round(final, 5), "gain": round(gain, 5),
                             "doubtful_below": self.s.first.doubtful_gain})
        return gain

    def finish(self, search: Search, init_sim: float, t0: float) -> BodyResult:
        kind, x = self.kind, self.x
        final = self.score(self.last, x)
        self.history.append(profile(self.objective(self.last), self.space, x, self.ctx.dtype, self.ctx.device))
        # one DRR and score without the body's bones, shared by the diagnostic and the first body's gain rule
        gain_rule = kind.name == "first" and self.refine_tissue
        without = self.similarity_without_body(x) if gain_rule or self.s.neighbourhood else None
        if self.s.neighbourhood:
            self.history.append(self.neighbourhood(x, without))
        parent = kind.parent_name()
        parent_doubtful = parent is not None and any(r.doubtful for r in self.ctx.results if r.name == parent)
        reasons = kind.doubtful_reasons(final, x, search, parent_doubtful,
                                        self.own_gain(final, without if gain_rule else None))
        if kind.motion_note(x):
            self.history.append(kind.motion_note(x))
        return BodyResult(kind.body.name, [st.name for st in kind.body.structures], self.space.matrix(x), self.start,
                          init_sim, final, bool(reasons), time.time() - t0, self.history, kind=kind.name,
                          doubtful_below=self.s.doubtful_threshold(kind.name), doubtful_reasons=reasons)


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
    s = settings or RegistrationSettings()
    if tuple(np.shape(pixels)) != (camera.rows, camera.cols):
        raise UserError(f"radiograph is {np.shape(pixels)} pixels but the camera is {camera.rows}x{camera.cols}")
    if not bodies:
        raise UserError("no bodies to register")
    dtype = torch.float32
    detector = camera
    camera, full = working_grid(detector, pixels, s.working_mm)
    levels = [Level(camera.scaled(f) if f != 1.0 else camera, full, s, device, dtype)
              for f in pyramid_factors(camera, s.coarse_px, s.fine_px)]
    ctx = Context(camera, labels, s, levels, BodyVolumes(ct, labels, s, device, dtype, bodies),
                  get_similarity(s.similarity, s.patch_px), progress or (lambda *a, **k: None), device, dtype)
    prev = np.asarray(default_view(ct, labels, camera) if initial_pose is None else initial_pose, dtype=np.float64)
    for body in bodies:
        t0 = time.time()
        kind = classify(body, labels, s, ctx.registered, inplane=initial_poses is None)
        start = (initial_poses or {}).get(body.name, kind.default_start(prev))
        result = BodyRun(kind, ctx, start).run(t0)
        if true_poses and body.name in true_poses:
            pts = labels.grid.voxel_centres_lps(body.mask(labels))
            result.mtre_mm = mtre_mm(pts, np.asarray(true_poses[body.name]), result.ct_to_camera)
            result.mpd_px = mean_projection_distance_px(detector, pts, np.asarray(true_poses[body.name]),
                                                        result.ct_to_camera)
        ctx.results.append(result)
        ctx.registered.append((body, result.ct_to_camera))
        prev = result.ct_to_camera
        ctx.notify("body-done", body=body.name, similarity=result.final_similarity, doubtful=result.doubtful)
    return ctx.results


#: candidates of the first body's refinement closer than this after the coarsest level are one
#: (rx, ry, rz deg, tx, ty, tz mm; depth is weakly determined, hence wider)
SAME_POSE = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 6.0])

#: steps of :meth:`BodyRun.neighbourhood` along (rx, ry, rz deg, tx, ty, tz mm)
NEIGHBOUR_STEPS = (2.0, 2.0, 2.0, 2.0, 2.0, 4.0)

#: offsets of the similarity profile recorded about a final pose (mm of depth, deg about the image's rows axis)
PROFILE_STEPS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)


def profile(objective, space: PoseSpace, x: np.ndarray, dtype, device) -> dict:
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
