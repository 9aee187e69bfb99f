"""Accuracy benchmark of 2D-3D registration on simulated radiographs of the real CTs.

Two modes (``--mode``):

* ``chain`` (default): what ``mskdex register`` does. The radiograph is simulated
  (:mod:`MSKdeXLib.registration.articulated`: same physics as simulate.simulate_radiograph)
  with the first body at a random pose and every later body moved relative to it (see
  :func:`run_chain`); the first body starts from a random perturbation up to the range (random
  direction, magnitude uniform up to the range, camera frame about its centre) and all bodies
  are registered in one call. Pelvis CT: pelvis, then the femurs as ball joints (hip rotations
  up to the range's degrees; CT continued below its last slice so no artificial edge shows).
  Chest CT: every bone ('bones'), then the spine and two vertebrae as parts (small motions).
* ``independent``: each body starts from its own random perturbation of the (shared) true
  pose and is registered alone (the old protocol).

Reports per case, body and range: success rate (mTRE < 2 mm over the body's voxel centres),
median mTRE, median projection distance, runtime per body, how many successes / failures the
pipeline's doubtful rule flags, and the final similarity of successes / failures per body kind
(to calibrate the thresholds); --precision adds truth-free precision measures (restart
spread, similarity curvature) against success. ``--json`` keeps every trial; ``--from-json`` re-tabulates.

    python benchmarks/bench_registration.py --trials 10 --json trials.json --out table.md
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from MSKdeXLib.io import sample_data
from MSKdeXLib.projection.geometry import Camera, ap_pose
from MSKdeXLib.io.volumes import load_ct, load_labels
from MSKdeXLib.registration import pipeline
from MSKdeXLib.registration.articulated import extend_inferior, rotate_about, simulate_articulated
from MSKdeXLib.registration.optimize import PoseSpace
from MSKdeXLib.projection.rendering import default_view
from MSKdeXLib.projection.simulate import simulate_radiograph
from MSKdeXLib.settings import SID_MM

CASES = {"pelvis": ("pelvis_ct", "pelvis,femur_left,femur_right"),
         "chest": ("chest_ct", "bones,spine=vertebrae_T6..vertebrae_L1,vertebrae_T9,vertebrae_T12")}


def _direction(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def perturbation(rng, max_deg: float, max_mm: float) -> np.ndarray:
    return np.r_[_direction(rng) * rng.uniform(0, max_deg), _direction(rng) * rng.uniform(0, max_mm)]


def run_chain(args, case, ct, labels, bodies, base) -> list[dict]:
    """The first body, then the others in one `register` call. The radiograph is simulated with
    the first body at a random pose and every later body moved relative to it: a femur by a hip
    rotation about its joint centre (random axis, angle uniform up to the range's degrees, plus
    up to ``--hip-mm`` of joint translation), a part (the spine within 'bones', a vertebra within
    the spine) relative to its group by a small rotation about its own centre (up to
    ``--part-deg``, plus up to ``--part-mm``); every voxel is rendered at the pose of the last
    body holding it. The first
    body starts from a random perturbation up to the range, the others from the registered
    first body's pose."""
    rows = []
    parent = bodies[0]
    cam = cam_of(args)
    # a ball joint with the first body (femur - pelvis); a part of an earlier group (vertebra) is none
    joints = {b.name: None if any({st.label for st in b.structures} < {st.label for st in e.structures}
                                  for e in bodies[:i])
              else pipeline.joint_centre(labels, b, parent) for i, b in enumerate(bodies) if i > 0}
    if case == "pelvis":  # the CT stops at the lesser trochanters: continue it (no artificial edge)
        big, pad = extend_inferior(ct, labels, [b for b in bodies[1:] if joints[b.name] is not None])
    else:
        big, pad = ct, (lambda m: m)
    for max_mm, max_deg in args.ranges:
        for trial in (args.trial_ids or range(args.trials)):
            rng = np.random.default_rng(1000 * trial + int(max_mm) + 7)
            truth = PoseSpace(base, pipeline.body_centre(labels, parent)).matrix(
                np.r_[rng.uniform(-5, 5, 3), rng.uniform(-15, 15, 3)])
            true_poses, moved = {parent.name: truth}, {}
            for i, body in enumerate(bodies[1:], start=1):
                c = joints[body.name]
                if c is not None:
                    deg, mm = rng.uniform(0, max_deg), rng.uniform(0, args.hip_mm)
                else:
                    c = pipeline.body_centre(labels, body)
                    deg, mm = rng.uniform(0, args.part_deg), rng.uniform(0, args.part_mm)
                motion = rotate_about(c, _direction(rng) * deg)
                motion[:3, 3] += _direction(rng) * mm
                true_poses[body.name] = group_pose(body, bodies[:i], true_poses) @ motion
                moved[body.name] = deg
            # each voxel is rendered once, at the pose of the last body holding it
            parts, taken = [], np.zeros(ct.array.shape, dtype=bool)
            for body in bodies[:0:-1]:
                m = body.mask(labels) & ~taken
                taken |= m
                parts.append((pad(m), true_poses[body.name]))
            xray = simulate_articulated(big, cam, truth, parts, seed=trial)
            if args.scan_parts:
                rows += scan_parts(case, f"{max_mm:g} mm / {max_deg:g} deg", trial, ct, labels, bodies, xray,
                                   cam, true_poses, make_settings(args, trial))
                continue
            start = PoseSpace(truth, pipeline.body_centre(labels, parent)).matrix(perturbation(rng, max_deg, max_mm))
            settings = make_settings(args, trial)
            t0 = time.time()
            res = pipeline.register(ct, labels, xray, cam, bodies, start, settings, device=args.device,
                                   true_poses=true_poses)
            for body, r in zip(bodies, res):
                pts = labels.grid.voxel_centres_lps(body.mask(labels))
                row = {"case": case, "mode": "chain", "body": body.name, "kind": r.kind,
                       "range": f"{max_mm:g} mm / {max_deg:g} deg", "trial": trial,
                       "start_mtre_mm": pipeline.mtre_mm(pts, true_poses[body.name], r.initial_pose),
                       "moved_deg": moved.get(body.name, 0.0), "mtre_mm": r.mtre_mm, "mpd_px": r.mpd_px,
                       "similarity": r.final_similarity, "doubtful": r.doubtful, "seconds": r.runtime_s,
                       "soft_tissue": settings.soft_tissue,
                       "pose_error": [round(float(v), 3) for v in PoseSpace(
                           true_poses[body.name], pipeline.body_centre(labels, body)).params_of(r.ct_to_camera)],
                       "cma_x": [h["x"] for h in r.history if h["stage"] == "cma-es" and "x" in h],
                       "profile": next((h for h in r.history if h["stage"] == "profile"), None),
                       "initial_pose": np.asarray(r.initial_pose).tolist(),
                       "motion": next((h for h in r.history if h["stage"] in ("joint-rotation", "part-motion")), None),
                       "parent": next((h["of"] for h in r.history if h["stage"] in ("joint", "part")), None)}
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
            print(f"# trial total {time.time() - t0:.1f} s", flush=True)
    return rows


def scan_parts(case, rng_label, trial, ct, labels, bodies, xray, cam, true_poses, settings,
               half_mm: float = 3.0, step_mm: float = 0.5) -> list[dict]:
    """Diagnostic: every part body's similarity over in-plane translations (camera x = columns,
    y = rows, +-``half_mm``) about its true pose, with every other body at its true pose (what
    the part's search sees when its group is registered perfectly). Reports where the plain
    and the prior-penalised similarity peak: a peak away from (0, 0) is a bias of the objective,
    not of the search."""
    sim = pipeline.get_similarity(settings.similarity, settings.patch_px)
    full = torch.as_tensor(np.asarray(xray, dtype=np.float32))
    levels = [pipeline.Level(cam, full, settings, "cpu", torch.float32)]
    vols = pipeline.BodyVolumes(ct, labels, settings, "cpu", torch.float32)
    pen = pipeline.prior_penalty(settings.prior_weight, settings.part.prior_deg, settings.part.prior_mm)
    g = np.arange(-half_mm, half_mm + 1e-9, step_mm)
    xs = torch.as_tensor([[0, 0, 0, a, b, 0] for b in g for a in g], dtype=torch.float64)
    out = []
    for i, body in enumerate(bodies):
        registered = [(b, true_poses[b.name]) for b in bodies[:i]]
        kind = pipeline.classify(body, labels, settings, registered)
        if kind.name != "part":
            continue
        v = kind.views(levels, cam, true_poses[body.name], vols)[0][0]
        space = PoseSpace(true_poses[body.name], pipeline.body_centre(labels, body))
        with torch.no_grad():
            val = sim(v.fixed, vols.drr(body.structures, v.camera, space.matrices(xs)) + v.background, v.mask)
        val = val.double()
        a, b = int(val.argmax()), int((val - pen(xs)).argmax())
        row = {"case": case, "scan": "part-translation", "body": body.name, "range": rng_label, "trial": trial,
               "at_truth": float(val[len(xs) // 2]), "max": float(val[a]),
               "max_at_mm": xs[a, 3:5].tolist(), "penalised_max_at_mm": xs[b, 3:5].tolist(),
               "part_roi_mm": settings.part.roi_mm}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def group_pose(body, earlier, true_poses) -> np.ndarray:
    """True pose of the last earlier body holding all of ``body``'s structures (a vertebra's
    'spine', the spine's 'bones'), else of the first body: a part moves relative to its group."""
    own = {st.label for st in body.structures}
    for other in earlier[::-1]:
        if own < {st.label for st in other.structures}:
            return true_poses[other.name]
    return true_poses[earlier[0].name]


def make_settings(args, trial: int) -> pipeline.RegistrationSettings:
    """Default settings (seeded by the trial) with the ``--set NAME=VALUE`` overrides."""
    s = pipeline.RegistrationSettings(seed=trial)
    for item in args.set or []:
        key, value = item.split("=", 1)
        s.set(key, value)
    return s


def cam_of(args) -> Camera:
    return Camera(args.size, args.size, args.spacing, args.spacing, SID_MM)


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    cam = Camera(args.size, args.size, args.spacing, args.spacing, SID_MM)
    rows = []
    for case in args.cases:
        sc = getattr(sample_data, CASES[case][0])()
        if sc is None:
            print(f"skip {case}: data not found")
            continue
        ct = load_ct(sc.ct)
        labels = load_labels(sc.labels, ct)
        bodies = pipeline.parse_bodies(args.bodies.get(case, CASES[case][1]), labels)
        if args.view == "bodies":  # AP view centred on the registered bodies (femurs inside the detector)
            every = np.zeros(ct.array.shape, dtype=bool)
            for b in bodies:
                every |= b.mask(labels)
            base = ap_pose(ct.voxel_centres_lps(every).mean(0), cam)
        else:  # the default AP view (centred on all labelled bones), as `mskdex register` starts
            base = default_view(ct, labels, cam)
        if args.mode == "chain":
            rows += run_chain(args, case, ct, labels, bodies, base)
            continue
        for max_mm, max_deg in args.ranges:
            for trial in range(args.trials):
                rng = np.random.default_rng(1000 * trial + int(max_mm))
                truth = PoseSpace(base, pipeline.body_centre(labels, bodies[0])).matrix(
                    np.r_[rng.uniform(-5, 5, 3), rng.uniform(-15, 15, 3)])
                xray = simulate_radiograph(ct, cam, truth, seed=trial, labels=labels).pixels
                for body in bodies:
                    space = PoseSpace(truth, pipeline.body_centre(labels, body))
                    start = space.matrix(perturbation(rng, max_deg, max_mm))
                    settings = make_settings(args, trial)
                    t0 = time.time()
                    res = pipeline.register(ct, labels, xray, cam, [body], start, settings, device=args.device,
                                            true_poses={body.name: truth})[0]
                    pts = labels.grid.voxel_centres_lps(body.mask(labels))
                    row = {"case": case, "mode": "independent", "body": body.name, "range": f"{max_mm:g} mm / {max_deg:g} deg",
                           "trial": trial, "start_mtre_mm": pipeline.mtre_mm(pts, truth, start),
                           "mtre_mm": res.mtre_mm, "mpd_px": res.mpd_px, "similarity": res.final_similarity,
                           "doubtful": res.doubtful, "seconds": time.time() - t0, "soft_tissue": settings.soft_tissue}
                    rows.append(row)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                          flush=True)
    return rows


def flagged(row: dict, settings: pipeline.RegistrationSettings, rows: list[dict] | None = None) -> bool:
    """The pipeline's doubtful rule applied to a recorded trial with ``settings``' thresholds
    (so that a table can be re-made after calibrating them): similarity below the kind's
    threshold; for a joint / part, its motion at a bound or its parent (the first body of the
    trial, or for a vertebra its group) doubtful."""
    kind = row.get("kind", "first")
    # a trial recorded before soft tissue existed (no key) used bone-only DRRs
    settings = replace(settings, soft_tissue=bool(row.get("soft_tissue", False)))
    flag = row["similarity"] < settings.doubtful_threshold(kind)
    if row.get("motion"):
        g = settings.kind_settings(kind)
        b_deg, b_mm = g.bounds_deg, g.bounds_mm
        flag = flag or any(abs(v) >= b_deg - 1.0 for v in row["motion"]["deg"]) \
            or any(abs(v) >= b_mm - 0.05 for v in row["motion"]["translation_mm"][:2])
        parent = row.get("parent")
        if rows is not None and parent:
            same = [r for r in rows if r["case"] == row["case"] and r["range"] == row["range"]
                    and r["trial"] == row["trial"] and r["body"] == parent]
            flag = flag or any(flagged(r, settings, rows) for r in same)
    return bool(flag)


def table(rows: list[dict], args) -> str:
    st = pipeline.RegistrationSettings()
    lines = [f"Detector {args.size}x{args.size} at {args.spacing} mm, SID {SID_MM:g} mm, view '{args.view}', "
             f"{args.threads} torch thread(s), device {args.device}; settings: defaults{' + ' + ' '.join(args.set) if args.set else ''}. "
             f"Doubtful thresholds (bone-only DRRs / with soft tissue): {st.first.doubtful_below} / "
             f"{st.first.doubtful_below_tissue} (first / free), {st.joint.doubtful_below} / "
             f"{st.joint.doubtful_below_tissue} (joint), {st.part.doubtful_below} / {st.part.doubtful_below_tissue} "
             f"(part).", "",
             "| case | body (kind) | perturbation (up to) | success (mTRE < 2 mm) | median mTRE mm | median start mTRE mm "
             "| median proj. dist px | median s/body | doubtful among successes | doubtful among failures |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["case"], r["body"], r.get("kind", "first"), r["range"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        g = [r for r in rows if (r["case"], r["body"], r.get("kind", "first"), r["range"]) == k]
        ok = [r for r in g if r["mtre_mm"] < 2]
        bad = [r for r in g if r["mtre_mm"] >= 2]
        lines.append(f"| {k[0]} | {k[1]} ({k[2]}) | {k[3]} | {len(ok)}/{len(g)} ({100 * len(ok) / len(g):.0f} %) | "
                     f"{np.median([r['mtre_mm'] for r in g]):.2f} | {np.median([r['start_mtre_mm'] for r in g]):.1f} | "
                     f"{np.median([r['mpd_px'] for r in g]):.2f} | {np.median([r['seconds'] for r in g]):.1f} | "
                     f"{sum(flagged(r, st, rows) for r in ok)}/{len(ok)} | "
                     f"{sum(flagged(r, st, rows) for r in bad)}/{len(bad)} |")
    lines.append("")
    for kinds, label in ((("first", "free"), "first / free bodies"), (("joint",), "joint bodies"),
                         (("part",), "part bodies")):
        succ = [r["similarity"] for r in rows if r.get("kind", "first") in kinds and r["mtre_mm"] < 2]
        fail = [r["similarity"] for r in rows if r.get("kind", "first") in kinds and r["mtre_mm"] >= 2]
        if succ or fail:
            lines.append(f"- final similarity (pgncc), {label}: successes min {min(succ, default=float('nan')):.3f} / "
                         f"median {np.median(succ) if succ else float('nan'):.3f} (n={len(succ)}); failures max "
                         f"{max(fail, default=float('nan')):.3f} / median {np.median(fail) if fail else float('nan'):.3f} "
                         f"(n={len(fail)})")
    return "\n".join(lines) + "\n"


def scan_table(scans: list[dict]) -> str:
    """Summary of --scan-parts rows: how far the plain / penalised similarity peaks lie from the truth."""
    if not scans:
        return ""
    lines = ["", "| body | window | scans | plain peak off truth (median / max mm) | plain peak at the 3-mm edge "
             "| penalised peak off truth (median / max mm) |", "|---|---|---|---|---|---|"]
    for key in sorted({(r["body"], r["part_roi_mm"]) for r in scans}):
        g = [r for r in scans if (r["body"], r["part_roi_mm"]) == key]
        d = [float(np.hypot(*r["max_at_mm"])) for r in g]
        dp = [float(np.hypot(*r["penalised_max_at_mm"])) for r in g]
        edge = sum(max(abs(v) for v in r["max_at_mm"]) >= 3.0 - 1e-9 for r in g)
        win = f"{key[1]:g} mm of its projection" if key[1] > 0 else "wide (roi_margin_mm)"
        lines.append(f"| {key[0]} | {win} | {len(g)} | {np.median(d):.2f} / {max(d):.2f} | {edge}/{len(g)} | "
                     f"{np.median(dp):.2f} / {max(dp):.2f} |")
    return "\n".join(lines) + "\n"


def precision_table(rows: list[dict]) -> str:
    """Truth-free precision measures of recorded chain trials (rows with ``cma_x`` / ``profile``)
    against success: the spread of the CMA-ES restarts' best poses (max mTRE between them over
    the body's voxels) and the curvature of the final similarity along depth and about the image's
    row axis (-2 x the quadratic coefficient of a parabola fitted to the recorded profile, over
    the value at the pose). A measure separates near misses when the failures' values lie outside
    the successes' range."""
    rows = [r for r in rows if r.get("profile") and r.get("cma_x") is not None]
    if not rows:
        return ""
    cache: dict = {}
    for r in rows:
        if r["case"] not in cache:
            sc = getattr(sample_data, CASES[r["case"]][0])()
            ct = load_ct(sc.ct)
            cache[r["case"]] = load_labels(sc.labels, ct)
        labels = cache[r["case"]]
        body = next(b for b in pipeline.parse_bodies(CASES[r["case"]][1], labels) if b.name == r["body"])
        pts = labels.grid.voxel_centres_lps(body.mask(labels))[::20]
        space = PoseSpace(np.asarray(r["initial_pose"]), pts.mean(0))
        poses = [space.matrix(x) for x in r["cma_x"]]
        r["_spread"] = max((pipeline.mtre_mm(pts, a, b) for a in poses for b in poses), default=float("nan"))
        pr, st = r["profile"], np.asarray(r["profile"]["steps"])
        h = len(st) // 2
        xs = np.r_[st[:h], 0.0, st[h:]]
        for key in ("depth_mm", "rot_y_deg"):
            c = np.polyfit(xs, np.r_[pr[key][:h], pr["at"], pr[key][h:]], 2)
            r["_curv_" + key] = float(-2 * c[0] / max(pr["at"], 1e-6))
    lines = ["", "| body | measure | successes min / median / max (n) | failures (mTRE >= 2 mm) |", "|---|---|---|---|"]
    for body in sorted({r["body"] for r in rows}):
        for key, label in (("_spread", "restarts' spread mm"), ("_curv_depth_mm", "depth curvature /mm^2"),
                           ("_curv_rot_y_deg", "row-axis rotation curvature /deg^2"), ("similarity", "final pgncc")):
            ok = [r[key] for r in rows if r["body"] == body and r["mtre_mm"] < 2]
            bad = [r[key] for r in rows if r["body"] == body and r["mtre_mm"] >= 2]
            okt = f"{min(ok):.4f} / {np.median(ok):.4f} / {max(ok):.4f} ({len(ok)})" if ok else "-"
            lines.append(f"| {body} | {label} | {okt} | {', '.join(f'{v:.4f}' for v in bad) or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["pelvis", "chest"], choices=list(CASES))
    p.add_argument("--pelvis-bodies", default=None)
    p.add_argument("--chest-bodies", default=None)
    p.add_argument("--ranges", nargs="+", default=["15,10", "30,20"], help="MM,DEG pairs")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--trial-ids", nargs="+", type=int, default=None,
                   help="chain mode: run only these trial numbers (same random draws as in a full run)")
    p.add_argument("--scan-parts", action="store_true",
                   help="chain mode, diagnostic: scan each part's similarity over in-plane translations about "
                        "its truth (others at truth) instead of registering")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--spacing", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the registration (cpu, cuda[:N])")
    p.add_argument("--view", choices=("default", "bodies"), default=None,
                   help="true view: the default AP view (centred on all labelled bones), or centred on the "
                        "benchmarked bodies (default: 'bodies' in chain mode - an AP hip view holding the "
                        "proximal femurs - else 'default')")
    p.add_argument("--mode", choices=("chain", "independent"), default="chain",
                   help="pelvis case: 'chain' registers pelvis then femurs (hip rotations simulated); "
                        "'independent' registers each body alone from its own perturbation")
    p.add_argument("--hip-mm", type=float, default=1.0, help="chain mode: max joint translation, mm")
    p.add_argument("--part-deg", type=float, default=3.0, help="chain mode: max rotation of a part (vertebra), deg")
    p.add_argument("--part-mm", type=float, default=1.0, help="chain mode: max translation of a part, mm")
    p.add_argument("--set", nargs="*", default=None, metavar="NAME=VALUE",
                   help="override RegistrationSettings fields (NAME or GROUP.NAME, e.g. joint.bounds_depth_mm=0.25, part.roi_mm=10)")
    p.add_argument("--json", default=None, help="write every trial as JSON")
    p.add_argument("--from-json", nargs="+", default=None, help="only tabulate trials recorded with --json")
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    p.add_argument("--precision", action="store_true",
                   help="also tabulate truth-free precision measures (restart spread, similarity curvature) "
                        "of the trials against their success")
    args = p.parse_args()
    if args.view is None:
        args.view = "bodies" if args.mode == "chain" else "default"
    args.ranges = [tuple(float(v) for v in r.split(",")) for r in args.ranges]
    args.bodies = {k: v for k, v in (("pelvis", args.pelvis_bodies), ("chest", args.chest_bodies)) if v}
    if args.from_json:  # re-make the table of recorded trials (e.g. after calibrating thresholds)
        rows = []
        for f in args.from_json:
            with open(f) as fh:
                rows += json.load(fh)
    else:
        rows = run(args)
    scans = [r for r in rows if r.get("scan")]
    rows = [r for r in rows if not r.get("scan")]
    text = (table(rows, args) if rows else "") + scan_table(scans) if rows or scans else "no results\n"
    if args.precision:
        text += precision_table(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows + scans, fh, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("## Registration\n\n" + text)


if __name__ == "__main__":
    main()
