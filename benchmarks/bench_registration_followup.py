"""The pelvis registration alone on the follow-up radiographs of ``bench_followup.py`` (issue 17):
the specificity preset's acquisitions (strong S-shaped LUT, unsharp masking, grid-less scatter,
gamma, collimation, SID 1000-1150 mm; CT at 4 mm with 2 mm deformation; 256 px detector at
~2.2 mm), each follow-up at a new pose (+-3 deg, +-10 mm about the bones' centre) from the
baseline view, which is the registration's start. No reader is fitted.

The radiographs are exactly those of ``bench_followup.py`` (same subjects, same draws: each
subject's follow-ups are drawn in order from ``default_rng([14, index, 77])``), so the
registration rows of ``benchmarks/data/followup_session8_*.json`` are reproduced. ``--cache DIR``
keeps each follow-up's radiograph and true pose (drawn once). ``--lib DIR`` registers with the
``MSKdeXLib`` in ``DIR`` (e.g. a ``git worktree`` of an earlier commit: the old code on the same
radiographs). Success: mTRE < 2 mm; depth-only miss: mTRE >= 2 mm with mean projection
distance < 1 px; gross failure: mTRE > 5 mm with projection distance >= 1 px.

    python benchmarks/bench_registration_followup.py --subjects 30000 30001 30002 --followups 10 \\
        --cache /tmp/fucache --json out.json
    python benchmarks/bench_registration_followup.py --from-json out.json   # the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _lib_first(argv: list[str]) -> None:
    """Put ``--lib DIR`` (else this repository) first on the import path, and import MSKdeXLib
    from there before ``bench_followup`` adds this repository's root."""
    root = str(Path(__file__).resolve().parents[1])
    lib = str(Path(argv[argv.index("--lib") + 1]).resolve()) if "--lib" in argv else root
    for d in (root, lib):
        if d not in sys.path:
            sys.path.insert(0, d)
    import MSKdeXLib  # noqa: F401


if __name__ == "__main__":
    _lib_first(sys.argv)

import numpy as np  # noqa: E402

from benchmarks import bench_followup as bf  # noqa: E402
from MSKdeXLib.io import sample_data  # noqa: E402
from MSKdeXLib.learning import cohort as co  # noqa: E402
from MSKdeXLib.learning import followup as fu  # noqa: E402


def make_config(detector: int = 256, voxel_mm: float = 4.0) -> co.CohortConfig:
    """The cohort config of ``bench_followup.py`` (specificity preset, seed 14)."""
    case = sample_data.pelvis_ct() or sample_data.default_case()
    return co.prepare(co.CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=bf.SEED,
                                      rows=detector, cols=detector, voxel_mm=voxel_mm,
                                      ranges=co.preset_ranges("specificity").to_dict()))


def followups(config: co.CohortConfig, index: int, n: int, cache: str | None = None, rotation: float = 3.0,
              translation: float = 10.0):
    """(subject, [(codes, true pose, acquisition, processing)] for follow-ups 0 .. n-1) of subject
    ``index``, drawn as ``bench_followup.run_subject`` draws them (in order, one rng)."""
    spec = co.sample_subject(bf.SEED, index, co.cohort_muscles(config), config.cohort_ranges())
    subject = co.realise_subject(config, spec)
    f = Path(cache) / f"followup_{index}_{n}_{rotation:g}_{translation:g}.npz" if cache else None
    if f is not None and f.exists():
        z = np.load(f, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        return subject, [(z["codes"][k], z["poses"][k], meta[k]["acq"], meta[k]["proc"]) for k in range(n)]
    density, ranges = config.density_model(), config.cohort_ranges()
    centre = co.bone_centre(*co.load_source(config))
    rng = np.random.default_rng([bf.SEED, index, 77])
    names = [s.name for s in fu.muscles_of(subject.labels)]
    out = []
    for _ in range(n):
        state = rng.bit_generator.state
        probe = np.random.default_rng()
        probe.bit_generator.state = state
        fresh = co.sample_subject(int(probe.integers(0, 2**31 - 1)), int(probe.integers(0, 2**31 - 1)), names, ranges)
        _, _, pose, codes = bf.followup_case(subject, names, ranges, density, centre, rotation, translation, rng)
        out.append((np.asarray(codes), np.asarray(pose), {**fresh.acquisition, "sid_mm": subject.camera.sid_mm},
                    dict(fresh.processing)))
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, codes=np.stack([o[0] for o in out]), poses=np.stack([o[1] for o in out]),
                 meta=json.dumps([{"acq": o[2], "proc": o[3]} for o in out]))
        os.replace(tmp, f)
    return subject, out


def register_row(subject, codes: np.ndarray, pose: np.ndarray, options: list[str]) -> dict:
    """The pelvis registered from the baseline view (``bench_followup.register_pelvis``'s call),
    with its similarities and stages."""
    from MSKdeXLib.registration import pipeline
    from MSKdeXLib.registration.bodies import parse_bodies
    from MSKdeXLib.registration.metrics import mean_projection_distance_px, mtre_mm
    from MSKdeXLib.registration.settings import RegistrationSettings

    s = RegistrationSettings()
    for o in options:
        k, v = o.split("=", 1)
        s.set(k, v)
    bodies = parse_bodies("pelvis", subject.labels)
    t0 = time.time()
    r = pipeline.register(subject.ct, subject.labels, codes, subject.camera, bodies, subject.pose, s, "cpu", None,
                          {"pelvis": pose})[0]
    secs = time.time() - t0
    pts = subject.labels.grid.voxel_centres_lps(bodies[0].mask(subject.labels))
    stages = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()
               if k in ("stage", "similarity", "restart", "level_px", "angle_deg", "shift_px", "x", "from", "tissue", "seconds",
                        "same_as_earlier", "bound_fraction", "gain")}
              for h in r.history if h.get("stage") in ("initial", "inplane", "cma-es", "refine", "candidate", "candidate-kept", "own-gain")]
    return {"mtre_mm": float(r.mtre_mm), "mpd_px": float(r.mpd_px), "doubtful": bool(r.doubtful),
            "final_similarity": float(r.final_similarity), "initial_similarity": float(r.initial_similarity),
            "doubtful_below": r.doubtful_below,
            "start_mtre_mm": float(mtre_mm(pts, pose, subject.pose)),
            "start_mpd_px": float(mean_projection_distance_px(subject.camera, pts, pose, subject.pose)),
            "seconds": round(secs, 2), "stages": stages,
            "checks": [h for h in r.history if h.get("stage") in ("check", "doubtful-check")]}


def outcome(row: dict) -> str:
    """success (< 2 mm), depth-only (>= 2 mm, projection distance < 1 px), gross (> 5 mm, >= 1 px)
    or miss (the rest: 2-5 mm with >= 1 px)."""
    if row["mtre_mm"] < 2.0:
        return "success"
    if row["mpd_px"] < 1.0:
        return "depth-only"
    return "gross" if row["mtre_mm"] > 5.0 else "miss"


def table(rows: list[dict], label: str = "", threshold: float | None = None) -> str:
    """One markdown row: counts of the outcomes and how many of each were flagged doubtful (with
    ``threshold``: flagged = final similarity below it, the first-body rule re-applied)."""
    if not rows:
        return f"| {label} | 0 |"
    flag = (lambda r: r["doubtful"]) if threshold is None else (lambda r: r["final_similarity"] < threshold)
    by = {k: [r for r in rows if outcome(r) == k] for k in ("success", "depth-only", "miss", "gross")}
    over5 = [r for r in rows if r["mtre_mm"] > 5.0]
    fl = lambda rs: f"{sum(flag(r) for r in rs)}/{len(rs)}"  # noqa: E731
    return (f"| {label} | {len(rows)} | {len(by['success'])} | {len(by['depth-only'])} | {len(by['miss'])} | "
            f"{len(by['gross'])} | {fl(by['gross'])} | {fl(over5)} | {fl(by['success'])} | {fl(by['depth-only'])} | "
            f"{np.median([r['mtre_mm'] for r in rows]):.2f} | {np.median([r['seconds'] for r in rows]):.1f} |")


HEADER = ("| code | registrations | success (< 2 mm) | depth-only (>= 2 mm, < 1 px) | other misses (2-5 mm) | gross "
          "(> 5 mm, >= 1 px) | flagged: gross | flagged: all > 5 mm | flagged: successes | flagged: depth-only | "
          "median mTRE mm | median s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", nargs="+", type=int, default=[30000, 30001, 30002],
                   help="subject indices (specificity preset, seed 14)")
    p.add_argument("--followups", type=int, default=10, help="follow-ups per subject (drawn in order)")
    p.add_argument("--only", nargs="*", default=None, metavar="S:F", help="register only these subject:follow-up")
    p.add_argument("--cache", default=None, help="folder keeping each subject's follow-up radiographs")
    p.add_argument("--lib", default=None, help="register with the MSKdeXLib in this folder (old code)")
    p.add_argument("--set-option", nargs="*", default=[], metavar="NAME=VALUE", help="RegistrationSettings overrides")
    p.add_argument("--json", default=None, help="write every registration here (after each one)")
    p.add_argument("--from-json", nargs="+", default=None, help="only tabulate these files")
    p.add_argument("--threshold", type=float, default=None, help="with --from-json: flag a registration when its "
                   "final similarity is below this (the first-body rule re-applied), not by its recorded flag")
    args = p.parse_args(argv)
    if args.from_json:
        print(HEADER)
        for f in args.from_json:
            d = json.loads(Path(f).read_text())
            print(table(d["rows"], d.get("label", Path(f).stem), args.threshold))
        return 0
    import torch

    import MSKdeXLib
    torch.set_num_threads(1)
    print(f"registering with {Path(MSKdeXLib.__file__).parent}", file=sys.stderr, flush=True)
    only = {tuple(int(v) for v in o.split(":")) for o in args.only} if args.only else None
    config = make_config()
    rows, t0 = [], time.time()
    for index in args.subjects:
        if only is not None and not any(s == index for s, _ in only):
            continue
        subject, fus = followups(config, index, args.followups, args.cache)
        for k, (codes, pose, acq, proc) in enumerate(fus):
            if only is not None and (index, k) not in only:
                continue
            row = {"subject": index, "followup": k, **register_row(subject, codes, pose, args.set_option),
                   "acquisition": acq, "processing": proc}
            rows.append(row)
            print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()
                              if k2 not in ("stages", "acquisition", "processing", "checks")}), flush=True)
            if args.json:
                tmp = Path(args.json + ".tmp")
                tmp.write_text(json.dumps({"args": vars(args), "label": args.lib or "this code", "rows": rows,
                                           "lib": str(Path(MSKdeXLib.__file__).parent),
                                           "seconds": round(time.time() - t0)}, indent=1))
                os.replace(tmp, args.json)
    print(HEADER)
    print(table(rows, args.lib or "this code"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
