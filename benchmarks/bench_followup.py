"""Per-muscle lean mass on follow-up radiographs of a patient whose baseline CT is known, with the
pose from the 2D-3D registration (issue 14; :mod:`MSKdeXLib.learning.followup`, ``mskdex followup``).

Subjects: the specificity preset's virtual subjects (seed 14) at indices ``--start`` .. (default
30000: a range used by no other benchmark and fixed before the first run), each realised as the
cohort does (anatomy, size, 2 mm deformation, fat; CT at ``--voxel-mm``) and seen by a
``--detector`` px detector. Its realised CT + labels are "the baseline CT".

Each follow-up: the subject's muscles changed again **in the CT** by the cohort's own functions
(boundary atrophy, hypertrophy into fat, blob fat infiltration; a fresh draw from the preset's
ranges), truth recomputed from the changed CT; a new acquisition from the preset's full ranges (the
subject's SID kept); the patient at a **new pose**: rotation uniform in +-``--rotation`` deg about each
axis and translation in +-``--translation`` mm about the bones' centre, relative to the baseline
view; radiograph simulated from the changed CT.

Readers (each fitted on ``--samples`` re-simulations of the baseline CT, muscles and acquisition
drawn from the preset's ranges, :func:`~MSKdeXLib.learning.followup.fit_reader`):

* ``registered``: at the pose found by registering the baseline CT's pelvis to the follow-up
  (default settings, start = the baseline view): what ``mskdex followup`` does;
* ``true``: at the follow-up's true pose (upper bound of a perfect registration);
* ``unregistered``: at the baseline view (what one gets without the registration).

Reported per reader: PCC of estimated vs true lean mass per muscle, of each left-right asymmetry
index and of each muscle's share, across a subject's follow-ups then averaged over subjects; the
same pooled over all follow-ups on the relative change (estimate / baseline - 1); coverage of the
90 % intervals (n = follow-ups x muscles; effective n = follow-ups). One torch thread.

    python benchmarks/bench_followup.py --subjects 3 --followups 10 --json out.json --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSKdeXLib.anatomy.ct_metrics import structure_metrics  # noqa: E402
from MSKdeXLib.evaluation.specificity import side_pairs  # noqa: E402
from MSKdeXLib.io import sample_data  # noqa: E402
from MSKdeXLib.learning import cohort as co  # noqa: E402
from MSKdeXLib.learning import followup as fu  # noqa: E402
from MSKdeXLib.projection.geometry import perturbed_pose  # noqa: E402

SEED, START = 14, 30000
READERS = ("registered", "true", "unregistered")


def lean_masses(ct, labels, names, density) -> np.ndarray:
    by = {m.structure.name: m.mass_g for m in structure_metrics(ct, labels, [labels.table.by_name(n) for n in names],
                                                                 density)}
    return np.array([by[n] for n in names])


def followup_case(subject: co.RealisedSubject, names: list[str], ranges: co.CohortRanges, density, centre,
                  rotation: float, translation: float, rng: np.random.Generator, elastic_mm: float = 0.0,
                  fat_mm: float = 0.0, spec_out: dict | None = None):
    """(changed CT, labels, pose, radiograph codes) of one follow-up: muscles changed in the CT, a new
    acquisition (SID kept), a new pose about the bones' centre; with ``elastic_mm`` the whole anatomy
    also deformed smoothly and with ``fat_mm`` the subcutaneous fat changed by U(-fat_mm, fat_mm), by
    the draws the reader's own soft-tissue spread uses (``fu.deform_soft_tissue``,
    ``fu.change_subcutaneous_fat``). ``spec_out`` (a dict), when given, receives the follow-up's
    acquisition as ``spec_out["spec"]`` (a :class:`~MSKdeXLib.learning.cohort.SubjectSpec`)."""
    fresh = co.sample_subject(int(rng.integers(0, 2**31 - 1)), int(rng.integers(0, 2**31 - 1)), names, ranges)
    hu = subject.ct.array.astype(np.float32, copy=True)
    lab = subject.labels.label_array().astype(np.int32)
    hu, lab = fu.deform_soft_tissue(hu, lab, subject.ct.spacing, elastic_mm, rng)
    co.change_muscles(hu, lab, subject.labels.table, subject.ct.spacing, fresh.muscle_changes, fresh.infiltration,
                      rng, density)
    hu, lab = fu.change_subcutaneous_fat(hu, lab, subject.ct.spacing, fat_mm, rng)
    ct = subject.ct.with_array(hu)
    labels = co.relabel(ct, subject.labels, lab)
    acq = {**fresh.acquisition, "sid_mm": subject.camera.sid_mm}
    spec = co.SubjectSpec(index=subject.spec.index, seed=subject.spec.seed, acquisition=acq,
                          processing=dict(fresh.processing))
    pose = perturbed_pose(subject.pose, tuple(rng.uniform(-rotation, rotation, 3)),
                          tuple(rng.uniform(-translation, translation, 3)), centre)
    if spec_out is not None:
        spec_out["spec"] = spec
    moved = co.RealisedSubject(spec, ct, labels, subject.structures, subject.camera, pose, {})
    rad, _, _ = co.subject_radiograph(moved, int(rng.integers(0, 2**31 - 1)))
    return ct, labels, pose, rad.pixels


def register_pelvis(subject: co.RealisedSubject, codes: np.ndarray, true_pose: np.ndarray) -> dict:
    from MSKdeXLib.registration import pipeline
    from MSKdeXLib.registration.bodies import parse_bodies
    from MSKdeXLib.registration.settings import RegistrationSettings

    t0 = time.time()
    res = pipeline.register(subject.ct, subject.labels, codes, subject.camera, parse_bodies("pelvis", subject.labels),
                            subject.pose, RegistrationSettings(), "cpu", None, {"pelvis": true_pose})[0]
    return {"pose": res.ct_to_camera, "mtre_mm": res.mtre_mm, "mpd_px": res.mpd_px, "doubtful": bool(res.doubtful),
            "seconds": round(time.time() - t0, 2)}


def run_subject(index: int, args, config: co.CohortConfig, done: Callable[[list[dict]], None] = lambda rows: None
                ) -> list[dict]:
    spec = co.sample_subject(SEED, index, co.cohort_muscles(config), config.cohort_ranges())
    subject = co.realise_subject(config, spec)
    density, ranges = config.density_model(), config.cohort_ranges()
    centre = co.bone_centre(*co.load_source(config))
    settings = fu.ReaderSettings(samples=args.samples, grid=args.grid, seed=index, poses=args.poses,
                                 calibration_samples=args.calibration_samples, fat_mm=args.reader_fat_mm,
                                 elastic_mm=args.reader_elastic_mm, warp_mm=args.reader_warp_mm)

    fitted: list[tuple[np.ndarray, fu.FollowupReader, float]] = []

    def reader_at(pose):   # a reader per pose; the same pose (e.g. no pose change) reuses the fit
        for known, reader, secs in fitted:
            if np.allclose(known, pose, atol=1e-9):
                return reader, secs
        t0 = time.time()
        views, base = fu.jittered_physics(subject.ct, subject.labels, subject.camera, pose, settings, density)
        cal = fu.ct_change_samples(subject.ct, subject.labels, subject.camera, pose, views[0].muscles, settings,
                                   density) if settings.calibration_samples else None
        fitted.append((np.array(pose, copy=True), fu.fit_reader(views, base, settings, calibration=cal),
                       time.time() - t0))
        return fitted[-1][1:]

    unregistered, t_unreg = reader_at(subject.pose) if "unregistered" in args.readers else (None, 0.0)
    rng = np.random.default_rng([SEED, index, 77])
    names = [s.name for s in fu.muscles_of(subject.labels)]
    rows = []
    conditions = args.soft_tissue or [(args.elastic_mm, args.fat_mm)]
    for f, (elastic_mm, fat_mm) in ((f, c) for f in range(args.followups) for c in conditions):
        if args.soft_tissue:   # every condition of follow-up f draws the same muscle change and acquisition
            rng = np.random.default_rng([SEED, index, 77, f])
        ct, labels, pose, codes = followup_case(subject, names, ranges, density, centre, args.rotation,
                                                args.translation, rng, elastic_mm, fat_mm)
        row = {"subject": index, "followup": f, "muscles": names, "elastic_mm": elastic_mm, "fat_mm": fat_mm,
               "truth_g": lean_masses(ct, labels, names, density).tolist()}
        for kind in args.readers:
            if kind == "unregistered":
                reader, secs = unregistered, t_unreg
            elif kind == "true":
                reader, secs = reader_at(pose)
            else:
                reg = register_pelvis(subject, codes, pose)
                row["registration"] = {k: v for k, v in reg.items() if k != "pose"}
                reader, secs = reader_at(reg["pose"])
            assert reader.muscles == names
            row[kind] = {"estimate_g": reader.predict(codes, subject.camera).tolist(),
                         "half_width_g": reader.half_width_g.tolist(), "baseline_g": reader.baseline_g.tolist(),
                         "alpha": reader.alpha, "fit_seconds": round(secs, 1)}
        rows.append(row)
        done(rows)
        print(json.dumps({k: row[k] for k in ("subject", "followup", "elastic_mm", "fat_mm")}
                         | {"registration": row.get("registration")}), flush=True)
    return rows


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def summarise(rows: list[dict], kind: str) -> dict:
    """The reader ``kind``'s agreement with the truth over ``rows`` (see the module's doc)."""
    names = rows[0]["muscles"]
    pairs = side_pairs(names)
    li = [names.index(lft) for _, lft, _ in pairs]
    ri = [names.index(rgt) for _, _, rgt in pairs]

    def targets(m):
        return (m[:, li] - m[:, ri]) / (m[:, li] + m[:, ri]), m / m.sum(axis=1, keepdims=True)

    per_subject, pooled_t, pooled_e, hits = [], [], [], []
    for s in sorted({r["subject"] for r in rows}):
        rs = [r for r in rows if r["subject"] == s]
        t = np.array([r["truth_g"] for r in rs])
        e = np.array([r[kind]["estimate_g"] for r in rs])
        h = np.array([r[kind]["half_width_g"] for r in rs])
        base = np.array(rs[0][kind]["baseline_g"])
        pooled_t.append(t / base - 1.0)
        pooled_e.append(e / base - 1.0)
        hits.append(np.abs(e - t) <= h)
        if len(rs) < 4:   # a PCC across fewer follow-ups of one subject says nothing
            continue
        (at, st), (ae, se) = targets(t), targets(e)
        per_subject.append({"mass": np.mean([pcc(e[:, k], t[:, k]) for k in range(len(names))]),
                            "asym": np.mean([pcc(ae[:, k], at[:, k]) for k in range(len(pairs))]),
                            "share": np.mean([pcc(se[:, k], st[:, k]) for k in range(len(names))]),
                            "pairs": [pcc(ae[:, k], at[:, k]) for k in range(len(pairs))]})
    pt, pe, hit = np.concatenate(pooled_t), np.concatenate(pooled_e), np.concatenate(hits)
    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    return {"mass_pcc": mean([p["mass"] for p in per_subject]),
            "asym_pcc": mean([p["asym"] for p in per_subject]),
            "share_pcc": mean([p["share"] for p in per_subject]),
            "pair_asym_pcc": {stem: mean([p["pairs"][k] for p in per_subject]) for k, (stem, _, _) in enumerate(pairs)},
            "subjects_with_pcc": len(per_subject),
            "pooled_change_pcc": pcc(pe.ravel(), pt.ravel()),
            "change_mae_percent": float(np.mean(np.abs(pe - pt)) * 100),
            "true_change_sd_percent": float(np.std(pt) * 100),
            "coverage": float(hit.mean()), "coverage_n": int(hit.size), "coverage_n_eff": int(len(pt)),
            "fit_seconds_median": float(np.median([r[kind]["fit_seconds"] for r in rows]))}


def soft_tissue_condition(text: str) -> tuple[float, float]:
    """``ELASTIC_MM,FAT_MM`` -> (elastic SD mm, subcutaneous fat change bound mm)."""
    try:
        elastic, fat = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ELASTIC_MM,FAT_MM, e.g. 1,3") from None
    if elastic < 0 or fat < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: both must be >= 0")
    return elastic, fat


def condition_of(row: dict) -> tuple[float, float]:
    return float(row.get("elastic_mm", 0.0)), float(row.get("fat_mm", 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--start", type=int, default=START, help="first subject index (specificity preset, seed 14)")
    p.add_argument("--followups", type=int, default=10, help="follow-ups per subject")
    p.add_argument("--samples", type=int, default=fu.ReaderSettings.samples, help="re-simulations per reader")
    p.add_argument("--calibration-samples", type=int, default=fu.ReaderSettings.calibration_samples,
                   help="CT-simulated follow-ups that calibrate each reader's intervals (0: held-out re-simulations)")
    p.add_argument("--poses", type=int, default=fu.ReaderSettings.poses,
                   help="poses about the registered one the re-simulations are spread over (1: none)")
    p.add_argument("--grid", type=int, default=fu.ReaderSettings.grid, help="reader input grid, px")
    p.add_argument("--rotation", type=float, default=3.0, help="follow-up pose change, deg per axis (uniform +-)")
    p.add_argument("--translation", type=float, default=10.0, help="follow-up pose change, mm per axis (uniform +-)")
    p.add_argument("--elastic-mm", type=float, default=0.0, help="also deform the follow-up's anatomy smoothly "
                   "(SD of the control displacements, mm; the reader does not model it)")
    p.add_argument("--fat-mm", type=float, default=0.0, help="also change the follow-up's subcutaneous fat by "
                   "U(-x, x) mm (weight change; the reader does not model it)")
    p.add_argument("--soft-tissue", nargs="+", default=None, type=soft_tissue_condition, metavar="ELASTIC_MM,FAT_MM",
                   help="several soft-tissue conditions side by side (each follow-up drawn once per condition with "
                   "the same muscle change and acquisition); overrides --elastic-mm / --fat-mm")
    p.add_argument("--reader-fat-mm", type=float, default=fu.ReaderSettings.fat_mm,
                   help="the reader's views and calibration vary the subcutaneous fat by U(-x, x) mm")
    p.add_argument("--reader-elastic-mm", type=float, default=fu.ReaderSettings.elastic_mm,
                   help="the reader's views and calibration deform the anatomy smoothly by this SD, mm")
    p.add_argument("--reader-warp-mm", type=float, default=fu.ReaderSettings.warp_mm,
                   help="the reader's re-simulations are each moved by a smooth 2D field of this SD (mm at the object)")
    p.add_argument("--detector", type=int, default=256, help="detector side, px")
    p.add_argument("--voxel-mm", type=float, default=4.0, help="the CT's voxel (resampled), mm")
    p.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    p.add_argument("--json", default=None, help="keep every follow-up here")
    p.add_argument("--from-json", nargs="+", default=None, help="only re-make the tables from --json files "
                   "(e.g. one per subject, run side by side)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.from_json:
        docs = [json.loads(Path(f).read_text()) for f in args.from_json]
        rows, args.readers = [r for d in docs for r in d["rows"]], docs[0]["args"]["readers"]
    else:
        case = sample_data.pelvis_ct() or sample_data.default_case()
        config = co.prepare(co.CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=SEED,
                                            rows=args.detector, cols=args.detector, voxel_mm=args.voxel_mm,
                                            ranges=co.preset_ranges("specificity").to_dict()))
        rows, t0 = [], time.time()

        def save(new: list[dict]) -> None:  # after every follow-up: a run stopped early keeps what it did
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows + new,
                                                       "seconds": round(time.time() - t0)}, indent=1))

        for index in range(args.start, args.start + args.subjects):
            rows += run_subject(index, args, config, save)
    conditions = sorted({condition_of(r) for r in rows})
    summary = {}
    for cond in conditions:
        label = "" if len(conditions) == 1 else f"elastic {cond[0]:g} mm, fat +-{cond[1]:g} mm: "
        group = [r for r in rows if condition_of(r) == cond]
        summary |= {label + k: summarise(group, k) for k in args.readers}
        if "registered" in args.readers:   # what a user heeding exit code 3 keeps: not doubtful, not implausible
            for r in group:
                r["registered"]["implausible"] = fu.implausible(r["muscles"], np.array(r["registered"]["estimate_g"]),
                                                                np.array(r["registered"]["baseline_g"]))
            kept = [r for r in group if not r["registration"]["doubtful"] and not r["registered"]["implausible"]]
            if len(kept) < len(group):
                summary[label + "registered, exit code 0"] = summarise(kept, "registered")
    print(json.dumps(summary, indent=1))
    if args.markdown:
        stems = list(next(iter(summary.values()))["pair_asym_pcc"])
        print("\n| reader pose | mass PCC | asymmetry PCC | share PCC | pooled change PCC | change MAE % (true SD %) | "
              "90 % interval coverage (n, n_eff) | asymmetry: " + " / ".join(stems) + " |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, s in summary.items():
            print(f"| {k} | {s['mass_pcc']:.2f} | {s['asym_pcc']:.2f} | {s['share_pcc']:.2f} | "
                  f"{s['pooled_change_pcc']:.2f} | {s['change_mae_percent']:.1f} ({s['true_change_sd_percent']:.1f}) | "
                  f"{100 * s['coverage']:.0f} % ({s['coverage_n']}, {s['coverage_n_eff']}) | "
                  + " / ".join(f"{s['pair_asym_pcc'][t]:.2f}" for t in stems) + " |")
        regs = [r["registration"] for r in rows if r.get("registration")]
        if regs:
            flagged = ", ".join(f"{r['mtre_mm']:.1f}" for r in regs if r["doubtful"]) or "-"
            print(f"\nregistration (pelvis): median mTRE {np.median([r['mtre_mm'] for r in regs]):.2f} mm, "
                  f"median projection distance {np.median([r['mpd_px'] for r in regs]):.2f} px, "
                  f"doubtful {sum(r['doubtful'] for r in regs)}/{len(regs)} (their mTRE: {flagged} mm), "
                  f"gross failures (> 5 mm) {sum(r['mtre_mm'] > 5 for r in regs)}, projection distance > 1 px "
                  f"{sum(r['mpd_px'] > 1 for r in regs)}, implausible estimate "
                  f"{sum(bool(r['registered']['implausible']) for r in rows)}, "
                  f"median {np.median([r['seconds'] for r in regs]):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
