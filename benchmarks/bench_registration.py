"""Accuracy and speed benchmark of 2D-3D registration (``mskdex register``'s pipeline) on
radiographs of the real CTs made by a forward model we did not write, with moved soft tissue.

Each trial (``--set calibration`` or ``test``; seeds ``SEED_BASE[set] + 1000 * trial + range mm``,
fixed before any test run):

1. **Poses**: the first body at a random pose (+-5 deg, +-15 mm about an AP view centred on the
   bodies); pelvis CT: each femur in a hip pose (flexion, abduction, rotation about the femoral
   head, each uniform within +-15 deg (``--hip-deg``), :func:`benchmarks.moved_tissue.hip_motion`) plus up
   to 1 mm joint translation; chest CT: the spine (T6-L1) relative to the other bones and T9 / T12
   relative to the spine, each up to 3 deg about its centre plus up to 1 mm.
2. **Moved soft tissue** (:mod:`benchmarks.moved_tissue`): a smooth displacement field
   (3-8 mm, correlation 30-60 mm, tapered to 0 near bone), subcutaneous fat -8..+8 mm, 0-4 gas
   pockets and existing bowel gas filled at random; bones rigid per body, displacing soft tissue.
3. **Foreign renderer and detector** (:mod:`benchmarks.foreign`): DiffDRR's Siddon ray
   tracer, another HU -> attenuation map, beam hardening, heel effect, scatter (SPR 0.4-1.2), quantum
   noise at 3e4-2e5 quanta/mm^2 unattenuated, scintillator spread, vendor processing (unsharp mask, dynamic
   range compression, sigmoid LUT, 10 bits), and electronic shutters hiding the CT's cut ends (the
   pelvis CT continued 90 mm below its last slice first, so that the femoral shafts go on).
   ``--renderer own`` uses the project's own simulation instead (the previous protocol).
4. **Registration**: the first body starts from a random perturbation up to the range (random
   direction, magnitude uniform up to it; camera frame about its centre), the others from the
   registered first body; everything in one :func:`~MSKdeXLib.registration.pipeline.register` call with
   the CT's own (unmoved) soft tissue and the default settings (``--set-option`` overrides).
   ``--old-code DIR`` registers the same radiograph from the same start with the code in ``DIR``
   (e.g. a ``git worktree`` of the previous commit; ``benchmarks/register_once.py``), one after
   the other, for a side-by-side time comparison under the same load.

Success: mTRE < 2 mm over the body's voxel centres; gross failure: mTRE > 5 mm. ``--json`` keeps
every trial; ``--from-json`` re-makes the tables (with the current doubtful rule). ``--cache DIR``
keeps each trial's radiograph and start (the Siddon rendering runs once per trial; a cached trial
must draw the same poses from its seed), ``--render-only`` just fills it.

    python benchmarks/bench_registration.py --cases pelvis --set test --trials 10 --json t.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks.* below

from MSKdeXLib.io import sample_data
from MSKdeXLib.io.volumes import load_ct, load_labels
from MSKdeXLib.projection.geometry import Camera, ap_pose, project
from MSKdeXLib.registration import pipeline
from MSKdeXLib.registration.articulated import extend_inferior, rotate_about, simulate_articulated
from MSKdeXLib.registration.kinds import own_gain_too_small
from MSKdeXLib.registration.optimize import PoseSpace
from MSKdeXLib.settings import SID_MM

from benchmarks.foreign import DetectorChain, foreign_radiograph, shutters_hiding  # noqa: E402
from benchmarks.moved_tissue import TissueMotion, cut_ends, femur_axis, hip_motion, moved_scene  # noqa: E402

CASES = {"pelvis": ("pelvis_ct", "pelvis,femur_left,femur_right"),
         "chest": ("chest_ct", "bones,spine=vertebrae_T6..vertebrae_L1,vertebrae_T9,vertebrae_T12")}
#: seed bases of the trial sets, fixed before the test set was run: calibration trials set every
#: threshold and option, test trials only measure
SEED_BASE = {"calibration": 100_000, "test": 200_000}
GROSS_MM = 5.0


def direction(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def perturbation(rng, max_deg: float, max_mm: float) -> np.ndarray:
    return np.r_[direction(rng) * rng.uniform(0, max_deg), direction(rng) * rng.uniform(0, max_mm)]


class Case:
    """A CT, its bodies, their anatomy and the view they are seen in."""

    def __init__(self, name: str, spec: str | None, cam: Camera):
        sc = getattr(sample_data, CASES[name][0])()
        if sc is None:
            raise FileNotFoundError(name)
        self.name, self.paths, self.cam = name, (str(sc.ct), str(sc.labels)), cam
        self.ct = load_ct(sc.ct)
        self.labels = load_labels(sc.labels, self.ct)
        self.spec = spec or CASES[name][1]
        self.spec_key = hashlib.sha1(self.spec.encode()).hexdigest()[:8]
        self.bodies = pipeline.parse_bodies(self.spec, self.labels)
        every = np.zeros(self.ct.array.shape, dtype=bool)
        for b in self.bodies:
            every |= b.mask(self.labels)
        self.base = ap_pose(self.ct.voxel_centres_lps(every).mean(0), cam)
        first = self.bodies[0]
        self.kinds = {}
        for i, b in enumerate(self.bodies[1:], start=1):
            k = pipeline.classify(b, self.labels, pipeline.RegistrationSettings(), [(e, self.base) for e in self.bodies[:i]])
            self.kinds[b.name] = k
        self.joints = [b for b in self.bodies[1:] if self.kinds[b.name].name == "joint"]
        self.axes = {b.name: femur_axis(self.labels, b) for b in self.joints}
        if self.joints:  # the CT stops at the lesser trochanters: continue it (the femoral shafts go on)
            self.big, pad = extend_inferior(self.ct, self.labels, self.joints)
        else:
            self.big, pad = self.ct, (lambda m: m)
        self.masks = {b.name: pad(b.mask(self.labels)) for b in self.bodies}
        self.ends = cut_ends(self.big)
        self.first_centre = pipeline.body_centre(self.labels, first)


def true_poses(case: Case, rng, hip_deg: float = 15.0) -> tuple[dict, dict]:
    """({body: true ct_to_camera}, {body: description of its motion}); each hip angle uniform
    within +-``hip_deg`` (the benchmark's standard trials: 15)."""
    first = case.bodies[0]
    truth = {first.name: PoseSpace(case.base, case.first_centre).matrix(np.r_[rng.uniform(-5, 5, 3),
                                                                              rng.uniform(-15, 15, 3)])}
    moved = {}
    for i, body in enumerate(case.bodies[1:], start=1):
        kind = case.kinds[body.name]
        if kind.name == "joint":
            motion, moved[body.name] = hip_motion(kind.centre, case.axes[body.name], rng, max_deg=hip_deg)
            mm = rng.uniform(0, 1.0)
        else:
            deg, mm = rng.uniform(0, 3.0), rng.uniform(0, 1.0)
            motion = rotate_about(pipeline.body_centre(case.labels, body), direction(rng) * deg)
            moved[body.name] = {"deg": float(deg)}
        motion[:3, 3] += direction(rng) * mm
        parent = kind.parent if hasattr(kind, "parent") else first
        truth[body.name] = truth[parent.name] @ motion
    return truth, moved


def radiograph(case: Case, truth: dict, rng, renderer: str, seed: int) -> tuple[np.ndarray, dict]:
    """(pixels, what was simulated) of one trial."""
    if renderer == "own":  # the project's own simulation, soft tissue moving rigidly with the first body
        parts, taken = [], np.zeros(case.big.array.shape, dtype=bool)
        for body in case.bodies[:0:-1]:
            m = case.masks[body.name] & ~taken
            taken |= m
            parts.append((m, truth[body.name]))
        return simulate_articulated(case.big, case.cam, truth[case.bodies[0].name], parts, seed=seed), {}
    motion, chain = TissueMotion.sample(rng), DetectorChain.sample(rng)
    scene = moved_scene(case.big, case.labels, case.bodies, truth, motion, rng, masks=case.masks)
    # tighter collimation at the top and bottom (0-15 mm more); at the sides only where it keeps the
    # registered bodies in the field (a radiographer collimates to the region of interest)
    extra = tuple(rng.uniform(0, 15, 4))
    field = shutters_hiding(case.cam, truth[case.bodies[0].name], case.ends, 5.0, extra[:2] + (0.0, 0.0))
    keep = np.flatnonzero(case_columns(case, truth))
    narrowed = shutters_hiding(case.cam, truth[case.bodies[0].name], case.ends, 5.0, extra)
    if keep.size == 0 or narrowed[:, keep].any(0).all():
        field = narrowed
    pixels = foreign_radiograph(scene, case.cam, chain, field, rng)
    return pixels, {"tissue": vars(motion), "detector": chain.to_dict(), "field_fraction": float(field.mean())}


def case_columns(case: Case, truth: dict, margin_mm: float = 10.0) -> np.ndarray:
    """Bool (cols,): detector columns within ``margin_mm`` of a registered body's projection."""
    cols = np.zeros(case.cam.cols, dtype=bool)
    for body in case.bodies:
        c = project(case.cam, truth[body.name], case.labels.grid.voxel_centres_lps(body.mask(case.labels))[::5])[:, 1]
        m = margin_mm / case.cam.spacing_col_mm
        cols[max(0, int(c.min() - m)):min(case.cam.cols, int(c.max() + m) + 1)] = True
    return cols


def make_settings(args, trial: int) -> pipeline.RegistrationSettings:
    """Default settings (seeded by the trial) with the ``--set-option NAME=VALUE`` overrides."""
    s = pipeline.RegistrationSettings(seed=trial)
    for item in args.set_option or []:
        key, value = item.split("=", 1)
        s.set(key, value)
    return s


def run_old(case: Case, pixels, start, truth, seed: int, old_code: str, threads: int = 1) -> list[dict]:
    """The same registration by the code in ``old_code`` (register_once.py in a subprocess), with
    ``threads`` torch threads (as the new code's)."""
    meta = {"ct": case.paths[0], "labels": case.paths[1], "bodies": case.spec, "seed": seed, "threads": threads,
            "camera": {k: v for k, v in vars(case.cam).items()},
            "true_poses": {k: np.asarray(v).tolist() for k, v in truth.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "trial.npz"
        np.savez(f, pixels=pixels, start=start, meta=json.dumps(meta))
        env = {**os.environ, "PYTHONPATH": old_code, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("register_once.py")), str(f)],
                             env=env, capture_output=True, text=True, check=True, cwd=old_code)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def cache_file(args, case: Case, seed: int) -> Path | None:
    """Where ``--cache`` keeps a trial's radiograph and start (None: no cache): the simulation
    (DiffDRR's Siddon, minutes for the chest CT) is then run once per trial, whatever is registered."""
    if not args.cache:
        return None
    hips = "" if args.hip_deg == 15.0 else f"_hip{args.hip_deg:g}"
    return Path(args.cache) / f"{case.name}_{args.renderer}_{args.size}px_{args.spacing:g}mm_{case.spec_key}_{seed}{hips}.npz"


def save_trial(path: Path, pixels: np.ndarray, start: np.ndarray, truth: dict, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, pixels=pixels, start=start, info=json.dumps(info, default=float),
                        truth=json.dumps({k: np.asarray(v).tolist() for k, v in truth.items()}))
    tmp.replace(path)


def load_trial(path: Path, truth: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pixels, start, info) of a cached trial; its true poses must be the ones drawn now (same seed, same code)."""
    d = np.load(path, allow_pickle=False)
    saved = json.loads(str(d["truth"]))
    if set(saved) != set(truth) or any(not np.allclose(saved[k], truth[k], atol=1e-9) for k in truth):
        raise RuntimeError(f"{path}: cached trial does not match the poses drawn from its seed (stale cache)")
    return d["pixels"], d["start"], json.loads(str(d["info"]))


def run_trial(case: Case, trial: int, rng_mm: float, rng_deg: float, args) -> list[dict]:
    seed = SEED_BASE[args.set] + 1000 * trial + int(rng_mm)
    rng = np.random.default_rng(seed)
    truth, moved = true_poses(case, rng, args.hip_deg)
    first = case.bodies[0]
    cached = cache_file(args, case, seed)
    t0 = time.time()
    if cached is not None and cached.exists():
        pixels, start, info = load_trial(cached, truth)
    else:
        pixels, info = radiograph(case, truth, rng, args.renderer, seed)
        start = PoseSpace(truth[first.name], case.first_centre).matrix(perturbation(rng, rng_deg, rng_mm))
        if cached is not None:
            save_trial(cached, pixels, start, truth, info)
    sim_s = time.time() - t0
    if args.render_only:
        print(f"{case.name} {args.set} trial {trial} seed {seed}: rendered in {sim_s:.1f} s", flush=True)
        return []
    settings = make_settings(args, trial)
    res = pipeline.register(case.ct, case.labels, pixels, case.cam, case.bodies, start, settings, device=args.device,
                            true_poses=truth)
    hips = "" if args.hip_deg == 15.0 else f", hips +-{args.hip_deg:g} deg"
    common = {"case": case.name, "set": args.set, "renderer": args.renderer, "range": f"{rng_mm:g} mm / {rng_deg:g} deg{hips}",
              "trial": trial, "seed": seed, "simulation_s": round(sim_s, 1), "soft_tissue": settings.soft_tissue}
    if args.hip_deg != 15.0:
        common["hip_deg"] = args.hip_deg
    rows = []
    for body, r in zip(case.bodies, res):
        pts = case.labels.grid.voxel_centres_lps(body.mask(case.labels))
        rows.append({**common, "code": "new", "body": body.name, "kind": r.kind,
                     "start_mtre_mm": pipeline.mtre_mm(pts, truth[body.name], r.initial_pose),
                     "moved": moved.get(body.name), "mtre_mm": r.mtre_mm, "mpd_px": r.mpd_px,
                     "similarity": r.final_similarity, "doubtful": r.doubtful, "seconds": r.runtime_s,
                     "motion": next((h for h in r.history if h["stage"] in ("joint-rotation", "part-motion")), None),
                     "parent": next((h["of"] for h in r.history if h["stage"] in ("joint", "part")), None),
                     "evidence": first_body_evidence(r.history) if r.kind == "first" else None,
                     "simulated": info if body is first else None})
    if args.old_code:
        for o in run_old(case, pixels, start, truth, trial, args.old_code, args.threads):
            rows.append({**common, "code": "old", **{k: v for k, v in o.items() if k != "ct_to_camera"}})
    for row in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("simulated", "motion", "evidence")}), flush=True)
    return rows


#: the first body's truth-free history entries kept in the benchmark's rows (what a flag may use)
EVIDENCE_STAGES = ("inplane", "cma-es", "candidate", "candidate-kept", "neighbourhood", "own-gain")


def first_body_evidence(history: list[dict]) -> list[dict]:
    """The first body's search as it went (in-plane search, each CMA-ES run with how far it moved
    relative to its bounds, each refined candidate's similarity, the one kept, and with the
    ``neighbourhood`` option its neighbourhood): every value is one a registration without the
    truth has, so a doubtful rule may be calibrated on them."""
    return [{k: v for k, v in h.items() if k != "x"} for h in history if h.get("stage") in EVIDENCE_STAGES]


def own_gain(row: dict) -> float | None:
    """What a first body's own DRR added to the similarity (its ``own-gain`` entry, or from a
    ``neighbourhood`` entry: ``at - without_body``); None when the row does not record it."""
    ev = row.get("evidence") or []
    g = next((h["gain"] for h in ev if h["stage"] == "own-gain"), None)
    if g is None:
        nb = next((h for h in ev if h["stage"] == "neighbourhood"), None)
        g = None if nb is None else nb["at"] - nb["without_body"]
    return g


def flagged(row: dict, settings: pipeline.RegistrationSettings, rows: list[dict]) -> bool:
    """The pipeline's doubtful rule applied to a recorded trial with ``settings``' thresholds
    (re-made after calibrating them): similarity below the kind's threshold; for a joint /
    part, its motion at a bound or its parent doubtful; for a joint, its centre shifted beyond
    ``joint.doubtful_shift_mm``; for a first body with the soft tissue, its own DRR's gain below
    ``first.doubtful_gain`` when the row records it. Old-code rows keep their own flag."""
    if row.get("code") == "old":
        return bool(row["doubtful"])
    kind = row.get("kind", "first")
    settings = replace(settings, soft_tissue=bool(row.get("soft_tissue", False)))
    flag = row["similarity"] < settings.doubtful_threshold(kind)
    if kind == "first" and settings.soft_tissue:
        flag = flag or own_gain_too_small(own_gain(row), settings)
    if row.get("motion"):
        g = settings.kind_settings(kind)
        flag = flag or any(abs(v) >= g.bounds_deg - 1.0 for v in row["motion"]["deg"]) \
            or any(abs(v) >= g.bounds_mm - 0.05 for v in row["motion"]["translation_mm"][:2])
        shift = getattr(g, "doubtful_shift_mm", 0.0)
        flag = flag or (shift > 0 and float(np.hypot(*row["motion"]["translation_mm"][:2])) > shift)
        same = [r for r in rows if r.get("code") == row.get("code") and r["case"] == row["case"]
                and r["range"] == row["range"] and r["trial"] == row["trial"] and r["set"] == row["set"]
                and r["body"] == row.get("parent")]
        flag = flag or any(flagged(r, settings, rows) for r in same)
    return bool(flag)


def table(rows: list[dict], args) -> str:
    st = make_settings(args, 0)
    lines = [f"Detector {args.size}x{args.size} at {args.spacing} mm, SID 1000 mm, {args.threads} torch thread(s); "
             f"settings: defaults{' + ' + ' '.join(args.set_option) if args.set_option else ''}; doubtful "
             f"thresholds (soft tissue): {st.first.doubtful_below_tissue} first / free, "
             f"{st.joint.doubtful_below_tissue} joint, {st.part.doubtful_below_tissue} part.", "",
             "| code | set | case | body (kind) | start (up to) | trials | success (< 2 mm) | median mTRE mm "
             "| max mTRE mm | median s/body | max s/body | doubtful: successes | doubtful: gross failures (> 5 mm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r.get("code", "new"), r["set"], r["case"], r["body"], r.get("kind", "?"), r["range"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        g = [r for r in rows if (r.get("code", "new"), r["set"], r["case"], r["body"], r.get("kind", "?"), r["range"]) == k]
        ok = [r for r in g if r["mtre_mm"] < 2]
        gross = [r for r in g if r["mtre_mm"] > GROSS_MM]
        mt, sec = [r["mtre_mm"] for r in g], [r["seconds"] for r in g]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} ({k[4]}) | {k[5]} | {len(g)} | {len(ok)}/{len(g)} "
                     f"({100 * len(ok) / len(g):.0f} %) | {np.median(mt):.2f} | {max(mt):.2f} | {np.median(sec):.1f} | "
                     f"{max(sec):.1f} | {sum(flagged(r, st, rows) for r in ok)}/{len(ok)} | "
                     f"{sum(flagged(r, st, rows) for r in gross)}/{len(gross)} |")
    lines.append("")
    for kinds, label in ((("first", "free"), "first / free"), (("joint",), "joint"), (("part",), "part")):
        sel = [r for r in rows if r.get("code", "new") == "new" and r.get("kind") in kinds]
        succ = [r["similarity"] for r in sel if r["mtre_mm"] < 2]
        fail = [r["similarity"] for r in sel if r["mtre_mm"] >= 2]
        if sel:
            lines.append(f"- final similarity, {label} bodies (new code): successes min "
                         f"{min(succ, default=float('nan')):.3f} / median {np.median(succ) if succ else float('nan'):.3f} "
                         f"(n={len(succ)}); failures max {max(fail, default=float('nan')):.3f} (n={len(fail)})")
    return "\n".join(lines) + "\n"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["pelvis", "chest"], choices=list(CASES))
    p.add_argument("--pelvis-bodies", default=None)
    p.add_argument("--chest-bodies", default=None)
    p.add_argument("--set", choices=list(SEED_BASE), default="calibration",
                   help="trial set: calibration (for every decision) or test (seeds fixed before, only measured)")
    p.add_argument("--ranges", nargs="+", default=["15,10"], help="MM,DEG pairs")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--trial-ids", nargs="+", type=int, default=None, help="only these trial numbers")
    p.add_argument("--hip-deg", type=float, default=15.0,
                   help="hip angles uniform within +-this (deg; 15 = the standard trials; wider makes femur failures)")
    p.add_argument("--renderer", choices=("foreign", "own"), default="foreign")
    p.add_argument("--old-code", default=None, help="also register every trial with the MSKdeXLib in this folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--spacing", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set-option", nargs="*", default=None, metavar="NAME=VALUE",
                   help="override RegistrationSettings (NAME or GROUP.NAME, e.g. part.roi_mm=10)")
    p.add_argument("--cache", default=None, help="folder keeping each trial's radiograph and start (rendered once)")
    p.add_argument("--render-only", action="store_true", help="only fill --cache with the trials' radiographs")
    p.add_argument("--json", default=None, help="write every trial as JSON")
    p.add_argument("--from-json", nargs="+", default=None, help="only tabulate trials recorded with --json")
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    args = p.parse_args()
    args.ranges = [tuple(float(v) for v in r.split(",")) for r in args.ranges]
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.from_json:
        for f in args.from_json:
            rows += json.loads(Path(f).read_text())
    else:
        cam = Camera(args.size, args.size, args.spacing, args.spacing, SID_MM)
        for name in args.cases:
            case = Case(name, getattr(args, f"{name}_bodies"), cam)
            for mm, deg in args.ranges:
                for trial in (args.trial_ids or range(args.trials)):
                    rows += run_trial(case, trial, mm, deg, args)
                    if args.json:  # kept as it goes: a stopped run keeps its trials
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    text = table(rows, args) if rows else "no results\n"
    print(text)
    if args.out:
        Path(args.out).write_text("## Registration\n\n" + text)


if __name__ == "__main__":
    main()
