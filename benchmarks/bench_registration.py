"""Accuracy benchmark of 2D-3D registration on simulated radiographs of the real CTs.

Two modes (``--mode``):

* ``chain`` (pelvis CT, default): what ``mskdex register`` does for an AP hip radiograph. The
  radiograph is simulated (:mod:`MSKdeXLib.registration.articulated`: same physics as
  simulate.simulate_radiograph, CT continued below its last slice so no artificial edge shows)
  with the pelvis at a random pose and each femur additionally rotated about its hip joint
  centre (random axis, angle uniform up to the range's degrees, plus up to ``--hip-mm`` of
  joint translation). The pelvis starts from a random perturbation up to the range (random
  direction, magnitude uniform up to the range, camera frame about its centre); pelvis,
  femur_left, femur_right are then registered in one call (the femurs from the registered
  pelvis pose, rotating about the joint).
* ``independent``: each body starts from its own random perturbation of the (shared) true
  pose and is registered alone (the chest CT's vertebrae, and the old femur protocol).

Reports success rate (mTRE < 2 mm over the body's voxel centres), median mTRE, median
projection distance, runtime per body, and the final similarity of successes / failures (to
calibrate the 'doubtful' threshold).

    python benchmarks/bench_registration.py --trials 10 --out benchmarks/RESULTS_registration.md
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from MSKdeXLib import sample_data
from MSKdeXLib.geometry import Camera, ap_pose
from MSKdeXLib.io.volumes import load_ct, load_labels
from MSKdeXLib.registration import pipeline
from MSKdeXLib.registration.articulated import extend_inferior, rotate_about, simulate_articulated
from MSKdeXLib.registration.optimize import PoseSpace
from MSKdeXLib.rendering import default_view
from MSKdeXLib.simulate import simulate_radiograph

CASES = {"pelvis": ("pelvis_ct", "pelvis,femur_left,femur_right"),
         "chest": ("chest_ct", "vertebrae_T9,vertebrae_T12")}


def _direction(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def perturbation(rng, max_deg: float, max_mm: float) -> np.ndarray:
    return np.r_[_direction(rng) * rng.uniform(0, max_deg), _direction(rng) * rng.uniform(0, max_mm)]


def run_chain(args, case, ct, labels, bodies, base) -> list[dict]:
    """Pelvis, then each femur rotated about its hip (ball joint), in one `register` call: the
    radiograph is simulated from a CT whose femurs were rotated about their joint centres by a
    random hip rotation (random axis, angle uniform up to the range's degrees, plus up to
    ``--hip-mm`` of joint translation); the pelvis starts from a random perturbation up to the
    range, each femur from the registered pelvis pose (zero hip rotation)."""
    rows = []
    parent = bodies[0]
    for max_mm, max_deg in args.ranges:
        for trial in range(args.trials):
            rng = np.random.default_rng(1000 * trial + int(max_mm) + 7)
            truth = PoseSpace(base, pipeline.body_centre(labels, parent)).matrix(
                np.r_[rng.uniform(-5, 5, 3), rng.uniform(-15, 15, 3)])
            big, pad = extend_inferior(ct, labels, bodies[1:])
            parts, true_poses, hip = [], {parent.name: truth}, {}
            for body in bodies[1:]:
                c = pipeline.joint_centre(labels, body, parent)
                motion = rotate_about(c, _direction(rng) * rng.uniform(0, max_deg))
                motion[:3, 3] += _direction(rng) * rng.uniform(0, args.hip_mm)
                true_poses[body.name] = truth @ motion
                parts.append((pad(body.mask(labels)), true_poses[body.name]))
                hip[body.name] = float(np.degrees(np.arccos(np.clip((np.trace(motion[:3, :3]) - 1) / 2, -1, 1))))
            xray = simulate_articulated(big, cam_of(args), truth, parts, seed=trial)
            start = PoseSpace(truth, pipeline.body_centre(labels, parent)).matrix(perturbation(rng, max_deg, max_mm))
            settings = pipeline.RegistrationSettings(seed=trial)
            t0 = time.time()
            res = pipeline.register(ct, labels, xray, cam_of(args), bodies, start, settings, true_poses=true_poses)
            for body, r in zip(bodies, res):
                pts = labels.grid.voxel_centres_lps(body.mask(labels))
                row = {"case": case, "mode": "chain", "body": body.name, "range": f"{max_mm:g} mm / {max_deg:g} deg",
                       "trial": trial, "start_mtre_mm": pipeline.mtre_mm(pts, true_poses[body.name], r.initial_pose),
                       "hip_deg": hip.get(body.name, 0.0), "mtre_mm": r.mtre_mm, "mpd_px": r.mpd_px,
                       "similarity": r.final_similarity, "doubtful": r.doubtful, "seconds": r.runtime_s}
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
            print(f"# trial total {time.time() - t0:.1f} s", flush=True)
    return rows


def cam_of(args) -> Camera:
    return Camera(args.size, args.size, args.spacing, args.spacing, 1000.0)


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    cam = Camera(args.size, args.size, args.spacing, args.spacing, 1000.0)
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
        if args.mode == "chain" and case == "pelvis":
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
                    settings = pipeline.RegistrationSettings(seed=trial)
                    t0 = time.time()
                    res = pipeline.register(ct, labels, xray, cam, [body], start, settings,
                                            true_poses={body.name: truth})[0]
                    pts = labels.grid.voxel_centres_lps(body.mask(labels))
                    row = {"case": case, "mode": "independent", "body": body.name, "range": f"{max_mm:g} mm / {max_deg:g} deg",
                           "trial": trial, "start_mtre_mm": pipeline.mtre_mm(pts, truth, start),
                           "mtre_mm": res.mtre_mm, "mpd_px": res.mpd_px, "similarity": res.final_similarity,
                           "doubtful": res.doubtful, "seconds": time.time() - t0}
                    rows.append(row)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                          flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    lines = [f"Detector {args.size}x{args.size} at {args.spacing} mm, SID 1000 mm, view '{args.view}', {args.threads} CPU threads, "
             f"{args.trials} trials per body and range; default RegistrationSettings.", "",
             "| case | mode | body | perturbation (up to) | success (mTRE < 2 mm) | median mTRE mm | median start mTRE mm "
             "| median proj. dist px | median s/body | flagged doubtful |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["case"], r["mode"], r["body"], r["range"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        g = [r for r in rows if (r["case"], r["mode"], r["body"], r["range"]) == k]
        ok = sum(r["mtre_mm"] < 2 for r in g)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {ok}/{len(g)} ({100 * ok / len(g):.0f} %) | "
                     f"{np.median([r['mtre_mm'] for r in g]):.2f} | {np.median([r['start_mtre_mm'] for r in g]):.1f} | "
                     f"{np.median([r['mpd_px'] for r in g]):.2f} | {np.median([r['seconds'] for r in g]):.1f} | "
                     f"{sum(r['doubtful'] for r in g)} |")
    succ = [r["similarity"] for r in rows if r["mtre_mm"] < 2]
    fail = [r["similarity"] for r in rows if r["mtre_mm"] >= 2]
    lines += ["", f"Final similarity (pgncc): successes min {min(succ, default=float('nan')):.3f} / median "
              f"{np.median(succ) if succ else float('nan'):.3f}; failures max {max(fail, default=float('nan')):.3f} / "
              f"median {np.median(fail) if fail else float('nan'):.3f} (doubtful threshold "
              f"{pipeline.RegistrationSettings().doubtful_below})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["pelvis", "chest"], choices=list(CASES))
    p.add_argument("--pelvis-bodies", default=None)
    p.add_argument("--chest-bodies", default=None)
    p.add_argument("--ranges", nargs="+", default=["15,10", "30,20"], help="MM,DEG pairs")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--view", choices=("default", "bodies"), default=None,
                   help="true view: the default AP view (centred on all labelled bones), or centred on the "
                        "benchmarked bodies (default: 'bodies' in chain mode - an AP hip view holding the "
                        "proximal femurs - else 'default')")
    p.add_argument("--mode", choices=("chain", "independent"), default="chain",
                   help="pelvis case: 'chain' registers pelvis then femurs (hip rotations simulated); "
                        "'independent' registers each body alone from its own perturbation")
    p.add_argument("--hip-mm", type=float, default=1.0, help="chain mode: max joint translation, mm")
    p.add_argument("--json", default=None, help="write every trial as JSON")
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    args = p.parse_args()
    if args.view is None:
        args.view = "bodies" if args.mode == "chain" else "default"
    args.ranges = [tuple(float(v) for v in r.split(",")) for r in args.ranges]
    args.bodies = {k: v for k, v in (("pelvis", args.pelvis_bodies), ("chest", args.chest_bodies)) if v}
    rows = run(args)
    text = table(rows, args) if rows else "no results\n"
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("## Registration\n\n" + text)


if __name__ == "__main__":
    main()
