"""Probe: a follow-up radiograph *fitted* with the baseline CT's physics (analysis by synthesis,
:mod:`MSKdeXLib.learning.followup_fit`) against the ridge reader, on the follow-up benchmark's
validation subjects (issue 14, sessions 11-13).

The follow-ups are exactly ``bench_followup.py --soft-tissue 0,0 0.5,0 1,0 --rotation 0 --translation 0
--followups 8`` 's (same draws: muscles changed in the CT, a fresh acquisition from the specificity
preset, the whole anatomy deformed smoothly with SD 0 / 0.5 / 1 mm, true pose); the ridge reader's
estimates of the same follow-ups are read from that run's stored JSON (``--ridge-json``; each
follow-up's truth is checked against it). The fit knows the acquisition (oracle: the follow-up's own
kVp, scatter, gamma, blur, collimation, vendor processing); it fits the 10 muscles' relative lean-mass
changes and, with ``elastic`` > 0, deformation modes of the baseline's paths (first-order response to
each control point of the cohort's elastic field, reduced by an SVD; cached under ``--cache``).
Variants: assumed deformation SD (0 = no modes), residual pooling, model-error floor, number of modes;
``--acquisition fitted`` estimates the acquisition too
(:func:`~MSKdeXLib.learning.followup_fit.fit_unknown_acquisition`).
The fit's intervals are its linearised posterior's (pixel noise only: not calibrated).

    export OMP_NUM_THREADS=1; for s in 30040 30041 30042; do   # session 11 (RESULTS_network.md)
      (nice -n 10 python benchmarks/probe_followup_fit.py --subjects $s --json fit_$s.json    # known acquisition
       nice -n 10 python benchmarks/probe_followup_fit.py --subjects $s --acquisition fitted --elastic 0 1 \\
           --pool 2 --json acq_$s.json) &
    done; wait
    python benchmarks/probe_followup_fit.py --from-json fit_300*.json acq_300*.json --markdown   # the table
    python benchmarks/probe_followup_fit.py --from-json benchmarks/data/followup_fit_validation_acquisition_300*.json \
        --calibrate 'acq-fit e1 p2'                          # session 12: INTERVAL_SCALE from validation rows

Session 13 (its assumptions broken, validation subjects only): ``--soft-tissue 0,3 0,9`` changes the
follow-ups' subcutaneous fat (the fit has no term for it); ``--rotation 3 --translation 10`` moves the
patient, registers the pelvis to each follow-up and reads it at the registered pose with the product's
reader (``followup_fit_reader.fit_followup_reading``: modes made at that pose), the ridge from a
``bench_followup.py --readers registered`` run of the same follow-ups:

    nice -n 10 python benchmarks/probe_followup_fit.py --soft-tissue 0,3 0,9 --acquisition fitted --elastic 0 1 \
        --pool 2 --json fat_fit.json
    nice -n 10 python benchmarks/bench_followup.py --start 30040 --subjects 3 --followups 8 --readers true \
        --rotation 0 --translation 0 --soft-tissue 0,3 0,9 --json fat_ridge.json
    nice -n 10 python benchmarks/bench_followup.py --start 30040 --subjects 1 --followups 6 --readers registered \
        --rotation 3 --translation 10 --soft-tissue 0,0 --json pose_ridge_30040.json
    nice -n 10 python benchmarks/probe_followup_fit.py --subjects 30040 --followups 6 --soft-tissue 0,0 \
        --rotation 3 --translation 10 --ridge-json pose_ridge_30040.json --json pose_fit_30040.json
    python benchmarks/probe_followup_fit.py --from-json fat_fit.json pose_fit_*.json \
        --ridge-json fat_ridge.json pose_ridge_*.json --markdown

Known acquisition: ~20 s per follow-up (150 modes), fitted: ~35 s, on a shared 2-core machine; the
deformation Jacobian ~2.5 min per subject once (cached under ``--cache``, 283 MB), the follow-ups too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_followup as bf  # noqa: E402
from MSKdeXLib.errors import UserError  # noqa: E402
from MSKdeXLib.io import sample_data  # noqa: E402
from MSKdeXLib.learning import cohort as co  # noqa: E402
from MSKdeXLib.learning import followup as fu  # noqa: E402
from MSKdeXLib.learning import followup_fit as ff  # noqa: E402

CONDITIONS = (0.0, 0.5, 1.0)   # the follow-ups' elastic SD (mm), as the ridge run's (the cache holds all)
#: how a fit can fail on a follow-up it does not model (session 13: a fat change drove one to non-finite
#: parameters, now ``FitDiverged`` from the fit, a one-line ``UserError`` from the product's reader)
FIT_FAILURES = (UserError, np.linalg.LinAlgError, ff.FitDiverged)
RIDGE_JSON = Path(__file__).resolve().parent / "data" / "followup_warp_validation_noreaderspread.json"
#: session 14's variants of the fitted-acquisition reader: (step control, fat term)
VARIANTS = {"shipped": (False, False), "sc": (True, False), "sc fat": (True, True), "fat": (False, True)}


def setup(detector: int = 256, voxel_mm: float = 4.0) -> co.CohortConfig:
    case = sample_data.pelvis_ct()
    if case is None:   # no silent fallback: the benchmark's subjects are derived from the real pelvis CT
        raise SystemExit("the real pelvis CT is missing (../shared/data/pelvis_ct beside the checkout, or $MSKDEX_DATA)")
    return co.prepare(co.CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=bf.SEED,
                                      rows=detector, cols=detector, voxel_mm=voxel_mm,
                                      ranges=co.preset_ranges("specificity").to_dict()))


def condition_key(row: dict) -> tuple:
    """(elastic SD mm, fat bound mm, rotation deg, translation mm) of a follow-up row (absent: 0)."""
    return tuple(float(row.get(k, 0.0)) for k in ("elastic_mm", "fat_mm", "rotation_deg", "translation_mm"))


def row_key(row: dict) -> tuple:
    return (row["subject"], row["followup"], *condition_key(row))


def followups(subject, index: int, names, config, conditions, n: int, cache: Path, rotation: float = 0.0,
              translation: float = 0.0, first: int = 0) -> list[dict]:
    """The benchmark's follow-ups of one subject (each cached): codes, truth, acquisition spec, true pose, for
    every (elastic SD, fat bound) of ``conditions`` and the pose change +-``rotation`` deg / +-``translation`` mm,
    drawn as ``bench_followup.py --soft-tissue`` draws them (follow-ups ``first`` .. ``n`` - 1)."""
    density, ranges = config.density_model(), config.cohort_ranges()
    centre = None
    rows = []
    for f in range(int(first), n):
        for elastic, fat in conditions:
            stem = cache / f"followup_{index}_{f}_e{elastic:g}_f{fat:g}_r{rotation:g}_t{translation:g}"
            path, meta = stem.with_suffix(".npz"), stem.with_suffix(".json")
            if path.exists() and meta.exists():
                row = json.loads(meta.read_text())
                row["codes"] = np.load(path)["codes"]
                rows.append(row)
                continue
            if centre is None:
                centre = co.bone_centre(*co.load_source(config))
            rng = np.random.default_rng([bf.SEED, index, 77, f])
            out: dict = {}
            ct, labels, pose, codes = bf.followup_case(subject, names, ranges, density, centre, rotation, translation,
                                                       rng, elastic, fat, out)
            row = {"subject": index, "followup": f, "elastic_mm": elastic, "fat_mm": fat, "rotation_deg": rotation,
                   "translation_mm": translation, "muscles": names,
                   "truth_g": bf.lean_masses(ct, labels, names, density).tolist(), "spec": out["spec"].to_dict(),
                   "pose": np.asarray(pose).tolist()}
            np.savez(path, codes=np.asarray(codes, np.float32))
            meta.write_text(json.dumps(row))
            row["codes"] = np.asarray(codes, np.float32)
            rows.append(row)
            print(f"follow-up {index}/{f} elastic {elastic:g} fat {fat:g} pose +-{rotation:g} deg +-{translation:g} mm",
                  flush=True)
    return rows


def registered(subject, row: dict, cache: Path) -> dict:
    """The pelvis registered to the follow-up (``bench_followup.register_pelvis``, cached beside it)."""
    path = cache / (f"registration_{row['subject']}_{row['followup']}_e{row['elastic_mm']:g}_f{row['fat_mm']:g}"
                    f"_r{row['rotation_deg']:g}_t{row['translation_mm']:g}.json")
    if not path.exists():
        reg = bf.register_pelvis(subject, row["codes"], np.array(row["pose"]))
        path.write_text(json.dumps({**reg, "pose": np.asarray(reg["pose"]).tolist()}))
    reg = json.loads(path.read_text())
    reg["pose"] = np.array(reg["pose"])
    return reg


def modes_of(subject, physics, index: int, cache: Path, keep: float, max_modes: int) -> np.ndarray:
    path = cache / f"jacobian_{index}.npy"
    if not path.exists():
        t0 = time.time()
        jac = ff.deformation_jacobian(subject.ct, subject.camera, subject.pose, physics.spec,
                                      fu.ELASTIC_CONTROL_MM)
        np.save(path, jac)
        print(f"deformation Jacobian {index}: {jac.shape} in {time.time() - t0:.0f} s", flush=True)
    jac = np.load(path)
    return ff.deformation_modes(jac, keep, max_modes)


def noise_sd(model: ff.FitModel, spec: co.SubjectSpec, seed: int) -> float:
    """SD (codes) of the acquisition's pixel noise: a noisy baseline render minus the noise-free one."""
    from MSKdeXLib.learning.resimulation import resimulate

    noisy = resimulate(model.physics, None, spec, seed).astype(np.float64)
    clean = model.codes(model.prior_mean * 0, np.zeros(0), spec)
    inside = noisy > 0
    return float(np.std((noisy - clean)[inside]))


def ridge_rows(paths: list[str]) -> dict:
    """The ridge reader's rows (``bench_followup.py --json``) by :func:`row_key` (its pose change from the
    run's arguments)."""
    out = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        pose = {"rotation_deg": doc["args"].get("rotation", 0.0), "translation_mm": doc["args"].get("translation", 0.0)}
        for r in doc["rows"]:
            out[row_key({**pose, **r})] = r
    return out


def with_ridge(row: dict | None, rr: dict | None, key) -> None:
    """Give ``row`` (a fit row, if any and without one) the ridge's estimate ``rr`` of the same follow-up
    ``key``, after checking that both are the same follow-up (equal truth): its reader at the true pose,
    or at the registered one for a follow-up with a pose change (then the registration checked equal too)."""
    if row is None or rr is None or "ridge" in row:
        return
    assert np.allclose(rr["truth_g"], row["truth_g"], rtol=1e-6), f"follow-up {key} is not the ridge run's"
    if "registration" in row:
        assert np.isclose(rr["registration"]["mtre_mm"], row["registration"]["mtre_mm"], rtol=1e-4, atol=1e-3), \
            f"follow-up {key}: the ridge run's registration differs"
        row["ridge"] = rr["registered"]
    else:
        row["ridge"] = rr["true"]


def attach_ridge(merged: dict, paths: list[str]) -> None:
    """Give every merged fit row without one the ridge's estimate of the same follow-up (truth checked)."""
    for key, rr in ridge_rows(paths).items():
        with_ridge(merged.get(key), rr, key)


def rescale(rows: list[dict], scale: float, stored: float) -> None:
    """The fit rows' 90 % half-widths made ``scale`` x their posterior SD (``sd_g``, or the stored half-width
    over the run's own scale ``stored``): runs made before :data:`INTERVAL_SCALE` read with it."""
    for r in rows:
        for k, v in r.items():
            if k.startswith(("fit ", "acq-fit ", "reader-fit")) and "failed" not in v:
                sd = np.array(v["sd_g"]) if "sd_g" in v else np.array(v["half_width_g"]) / stored
                v["half_width_g"] = (scale * sd).tolist()


def conformal_scale(ratio: np.ndarray, coverage: float = 0.9) -> float:
    """Split-conformal quantile of ``|error| / SD`` values: the ceil(coverage (n + 1))-th smallest."""
    v = np.sort(np.asarray(ratio, np.float64).ravel())
    return float(v[min(len(v), int(np.ceil(coverage * (len(v) + 1)))) - 1])


def calibrate(rows: list[dict], kind: str) -> dict:
    """The interval scale of reader ``kind`` (|estimate - truth| / posterior SD, every row and muscle pooled;
    :data:`~MSKdeXLib.learning.followup_fit.INTERVAL_SCALE`), its coverage per condition, and leaving
    one subject out (the scale from the others)."""
    sd = np.array([r[kind]["sd_g"] if "sd_g" in r[kind] else np.array(r[kind]["half_width_g"]) / 1.645 for r in rows])
    ratio = np.abs(np.array([r[kind]["estimate_g"] for r in rows]) - np.array([r["truth_g"] for r in rows])) / sd
    cond, subj = np.array([r["elastic_mm"] for r in rows]), np.array([r["subject"] for r in rows])
    q = conformal_scale(ratio)
    out = {"kind": kind, "scale": q, "values": int(ratio.size),
           "followups": len({(r["subject"], r["followup"]) for r in rows}),
           "coverage": {f"{c:g}": float((ratio[cond == c] <= q).mean()) for c in sorted(set(cond))}, "leave_one_out": {}}
    for s in sorted(set(subj)):
        qs = conformal_scale(ratio[subj != s])
        out["leave_one_out"][str(s)] = {"scale": qs, **{f"{c:g}": float((ratio[(subj == s) & (cond == c)] <= qs).mean())
                                                          for c in sorted(set(cond))}}
    return out


def condition_label(cond: tuple) -> str:
    elastic, fat, rotation, translation = cond
    posed = f", pose +-{rotation:g} deg +-{translation:g} mm, registered" if rotation or translation else ""
    return f"elastic {elastic:g} mm" + (f", fat +-{fat:g} mm" if fat else "") + posed


def exit_code_0(rows: list[dict], kind: str) -> list[dict]:
    """The rows ``mskdex followup`` would end with exit code 0 for reader ``kind``: registration not doubtful,
    no implausible estimate (``followup.implausible``)."""
    return [r for r in rows if not r.get("registration", {}).get("doubtful", False)
            and not fu.implausible(r["muscles"], np.array(r[kind]["estimate_g"]), np.array(r[kind]["baseline_g"]))]


def table(rows: list[dict], markdown: bool) -> dict:
    """Each reader's agreement with the truth per follow-up condition (``bench_followup.summarise``), for the
    readers every row of the condition has, over the rows every one of them read (a failed fit's row is left out for all and
    counted), and also over the rows each reader's exit code 0 keeps; printed as JSON, and as a markdown
    table with ``markdown``."""
    summary = {}
    for cond in sorted({condition_key(r) for r in rows}):
        every = [r for r in rows if condition_key(r) == cond]
        kinds = [k for k in every[0] if k == "ridge" or k.startswith(("fit ", "acq-fit ", "reader-fit"))]
        kinds = [k for k in kinds if all(k in r for r in every)]
        group = [r for r in every if not any("failed" in r[k] for k in kinds)]   # every reader read it
        label = condition_label(cond)
        if len(group) < len(every):
            failed = {k: sum("failed" in r[k] for r in every) for k in kinds}
            label += f" ({len(every) - len(group)} of {len(every)} left out: fit failed " + \
                ", ".join(f"{k} {n}" for k, n in failed.items() if n) + ")"
        for k in kinds:
            summary[f"{label}: {k}"] = bf.summarise(group, k)
            kept = exit_code_0(group, k)
            if len(kept) < len(group):
                summary[f"{label}: {k}, exit code 0 ({len(kept)}/{len(group)})"] = bf.summarise(kept, k)
    print(json.dumps({k: {m: v for m, v in s.items() if m != "pair_asym_pcc"} for k, s in summary.items()}, indent=1))
    if markdown:
        print("| follow-up condition: reader | mass PCC | asymmetry PCC | share PCC | pooled change PCC | "
              "change MAE % (true SD %) | 90 % coverage (n, n_eff) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k, s in summary.items():
            print(f"| {k} | {s['mass_pcc']:.2f} | {s['asym_pcc']:.2f} | {s['share_pcc']:.2f} | "
                  f"{s['pooled_change_pcc']:.2f} | {s['change_mae_percent']:.1f} ({s['true_change_sd_percent']:.1f}) | "
                  f"{100 * s['coverage']:.0f} % ({s['coverage_n']}, {s['coverage_n_eff']}) |")
        regs = [r["registration"] for r in rows if "registration" in r]
        if regs:
            print(f"\nregistration (pelvis, {len(regs)}): median mTRE {np.median([g['mtre_mm'] for g in regs]):.2f} mm, "
                  f"median projection distance {np.median([g['mpd_px'] for g in regs]):.2f} px, doubtful "
                  f"{sum(g['doubtful'] for g in regs)}, mTRE > 5 mm {sum(g['mtre_mm'] > 5 for g in regs)}")
    return summary


def pose_variants(args) -> list[tuple[str, tuple[float, float, float], int]]:
    """(reader key suffix, pose SDs (rotation deg, in-plane mm, depth mm), re-linearisations) of ``--pose-sd`` x
    ``--pose-rounds`` (session 14); (0, 0, 0) is the shipped reader (no pose term; suffix '')."""
    out = []
    for text in args.pose_sd:
        sd = tuple(float(v) for v in text.split(","))
        for rounds in (args.pose_rounds if any(sd) else [0]):
            out.append(("" if not any(sd) else f" pose {text}" + (f" r{rounds}" if rounds else ""), sd, int(rounds)))
    return out


def read_registered(subject, row: dict, cache: Path, args) -> None:
    """The follow-up read as ``mskdex followup --reader fit`` reads it: the pelvis registered
    (:func:`registered`), then :func:`read_at` that pose."""
    reg = registered(subject, row, cache)
    row["registration"] = {k: v for k, v in reg.items() if k != "pose"}
    read_at(subject, row, reg["pose"], None, args)


def read_at(subject, row: dict, pose: np.ndarray, modes: tuple | None, args) -> None:
    """The follow-up read by :func:`~MSKdeXLib.learning.followup_fit_reader.fit_followup_reading` at ``pose``
    (its defaults: the shipped 'acq-fit e1 p2' with modes made at that pose, or ``modes``), stored as
    ``reader-fit``, and with each ``--pose-sd`` / ``--pose-rounds`` variant (the pose fitted as a nuisance; the same
    modes) as ``reader-fit pose ...``."""
    from MSKdeXLib.learning import followup_fit_reader as ffr

    t0 = time.time()
    if modes is None:
        physics, _ = fu.baseline_physics(subject.ct, subject.labels, subject.camera, pose, ffr.FitSettings().ranges())
        modes = ffr.deformation_modes_of(subject.ct, subject.labels, subject.camera, pose, physics.spec,
                                         ffr.FitSettings())
    t_modes = time.time() - t0
    for suffix, sd, rounds in pose_variants(args):
        t0 = time.time()
        key = "reader-fit" + suffix
        try:
            out = ffr.fit_followup_reading(subject.ct, subject.labels, subject.camera, pose, row["codes"],
                                           ffr.FitSettings(interval_scale=args.interval_scale, pose_sd=sd,
                                                           pose_rounds=rounds), modes=modes)
        except FIT_FAILURES as e:
            row[key] = {"failed": str(e)}
            print(f"{row_key(row)}: {key} failed: {e}", flush=True)
            continue
        assert out.muscles == row["muscles"]
        row[key] = {"estimate_g": out.estimate_g.tolist(), "half_width_g": out.half_width_g.tolist(),
                    "sd_g": (out.result.sd_change * out.baseline_g).tolist(), "baseline_g": out.baseline_g.tolist(),
                    "fit_seconds": time.time() - t0 + t_modes, "cost": out.result.cost,
                    "iterations": out.result.iterations, "acquisition": out.acquisition, "info": out.info}
        print(f"{row_key(row)}: {key} MAE {100 * np.mean(np.abs(out.estimate_g / np.array(row['truth_g']) - 1)):.1f} % "
              f"pose change {out.info.get('pose_change')} ({time.time() - t0:.0f} s)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, nargs="+", default=[30040, 30041, 30042])
    p.add_argument("--followups", type=int, default=8)
    p.add_argument("--first-followup", type=int, default=0, help="run follow-ups FIRST .. --followups - 1 only "
                   "(e.g. the rest of a run made with fewer)")
    p.add_argument("--conditions", type=float, nargs="+", default=list(CONDITIONS), choices=CONDITIONS,
                   help="follow-up elastic SD, mm (a subset of the benchmark's)")
    p.add_argument("--soft-tissue", nargs="+", default=None, type=bf.soft_tissue_condition, metavar="ELASTIC_MM,FAT_MM",
                   help="follow-up conditions as bench_followup.py's (e.g. 0,3 0,9: subcutaneous fat changed by "
                   "U(-3, 3) / U(-9, 9) mm); overrides --conditions")
    p.add_argument("--rotation", type=float, default=0.0, help="follow-up pose change, deg per axis (uniform +-), as "
                   "bench_followup.py's; > 0 (or --translation): the pelvis registered to each follow-up and read at "
                   "the registered pose by the product's fit reader (followup_fit_reader, its defaults) and the "
                   "ridge run's 'registered' reader")
    p.add_argument("--translation", type=float, default=0.0, help="follow-up pose change, mm per axis (uniform +-)")
    p.add_argument("--elastic", type=float, nargs="+", default=[0.0, 1.0], help="the fit's assumed SD, mm")
    p.add_argument("--pool", type=int, nargs="+", default=[2, 4, 8], help="residual pooling, px")
    p.add_argument("--floor", type=float, nargs="+", default=[0.0], help="model-error SD per pooled px, codes")
    p.add_argument("--keep", type=float, default=0.995, help="share of the deformation variance the modes keep")
    p.add_argument("--max-modes", type=int, default=150)
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--acquisition", nargs="+", default=["known"], choices=["known", "fitted"],
                   help="known: the follow-up's own acquisition (oracle); fitted: estimated from the preset's prior")
    p.add_argument("--variants", nargs="+", default=["shipped"], choices=list(VARIANTS),
                   help="with --acquisition fitted: the fit as shipped, with step control ('sc': a step kept only if "
                   "it lowers the MAP cost, changes >= -100 %%), and with step control and the fat-thickness term "
                   "('sc fat': followup_fit.fat_bands, prior from --fat-mm); each stored as 'acq-fit eE pP' + ' ' + variant (session 14)")
    p.add_argument("--fat-mm", type=float, default=9.0, help="the fat term's prior: a thickness change U(-x, x) mm "
                   "(followup_fit.fat_band_sd); default the specificity preset's 9 mm")
    p.add_argument("--cache", default="/tmp/fit11")
    p.add_argument("--ridge-json", nargs="+", default=[str(RIDGE_JSON)],
                   help="bench_followup.py --json runs of the same follow-ups (the ridge reader, pose 'true', or "
                   "'registered' with a pose change; its --soft-tissue, --rotation, --translation as here)")
    p.add_argument("--interval-scale", type=float, default=ff.INTERVAL_SCALE,
                   help="90 %% half-width = this x the posterior SD (with --from-json: the stored rows' half-widths "
                   "re-made with it; session 11's rows were stored with 1.645)")
    p.add_argument("--pose-sd", nargs="+", default=["0,0,0"], metavar="ROT_DEG,INPLANE_MM,DEPTH_MM",
                   help="session 14: the pose's error fitted as a nuisance with these prior SDs (0,0,0: the shipped "
                   "reader, no pose term); read by the product's reader (its other defaults) at the registered pose "
                   "(--rotation/--translation) or, with --reader-at-true-pose, at the true pose")
    p.add_argument("--pose-rounds", type=int, nargs="+", default=[0],
                   help="with a pose term, times the physics is re-made at the fitted pose (registered pose only)")
    p.add_argument("--reader-at-true-pose", action="store_true",
                   help="without a pose change: read each follow-up with the product's reader (and its --pose-sd / "
                   "--pose-rounds variants) at the true pose, modes from the cached Jacobian, instead of the fits above")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", nargs="+", default=None, help="only re-make the table from --json files (rows of "
                   "the same follow-ups merged: e.g. one file per subject and per run)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--followups-under", type=int, default=None, metavar="N", help="with --from-json: only each "
                   "subject's follow-ups 0 .. N-1 (runs of fewer follow-ups beside stored runs of more)")
    p.add_argument("--calibrate", default=None, metavar="READER", help="with --from-json: the interval scale of "
                   "READER (e.g. 'acq-fit e1 p2') on those rows (session 12: INTERVAL_SCALE), its coverage per condition "
                   "and leaving one subject out")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.from_json:
        merged: dict = {}
        for f in args.from_json:
            doc = json.loads(Path(f).read_text())
            rescale(doc["rows"], args.interval_scale, doc["args"].get("interval_scale", 1.645))
            for r in doc["rows"]:
                if args.followups_under is not None and r["followup"] >= args.followups_under:
                    continue
                have = merged.setdefault(row_key(r), {})
                assert "truth_g" not in have or np.allclose(have["truth_g"], r["truth_g"], rtol=1e-6), \
                    f"{f}: follow-up {row_key(r)} differs from another file's"
                have.update(r)
        attach_ridge(merged, args.ridge_json)
        if args.calibrate:
            print(json.dumps(calibrate(list(merged.values()), args.calibrate), indent=1))
            return 0
        table(list(merged.values()), args.markdown)
        return 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ridge = ridge_rows(args.ridge_json)
    config = setup()
    conditions = args.soft_tissue or [(c, 0.0) for c in CONDITIONS]
    posed = args.rotation > 0 or args.translation > 0
    rows = []
    for index in args.subjects:
        spec = co.sample_subject(bf.SEED, index, co.cohort_muscles(config), config.cohort_ranges())
        subject = co.realise_subject(config, spec)
        names = [m.name for m in fu.muscles_of(subject.labels)]
        if not posed:
            physics, base = fu.baseline_physics(subject.ct, subject.labels, subject.camera, subject.pose,
                                                config.cohort_ranges(), config.density_model())
            assert list(physics.muscles) == names
            modes = modes_of(subject, physics, index, cache, args.keep, args.max_modes)
            model = ff.FitModel.build(physics, base, modes)
            models = {"shipped": model}
            if any(VARIANTS[v][1] for v in args.variants):
                models["fat"] = ff.with_fat_bands(model, subject.ct, subject.labels, subject.camera, subject.pose,
                                                  physics.spec, args.fat_mm)
            print(f"subject {index}: {len(modes)} modes", flush=True)
        for row in followups(subject, index, names, config, conditions, args.followups, cache, args.rotation,
                             args.translation, args.first_followup):
            if not args.soft_tissue and row["elastic_mm"] not in args.conditions:
                continue
            t0 = time.time()
            key = row_key(row)
            if posed:
                read_registered(subject, row, cache, args)
                with_ridge(row, ridge.get(key), key)
                del row["codes"]
                rows.append(row)
                print(f"{key}: registration {row['registration']['seconds']:.1f} s (mTRE "
                      f"{row['registration']['mtre_mm']:.2f} mm), fit reader {time.time() - t0:.1f} s", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}))
                continue
            with_ridge(row, ridge.get(key), key)
            if args.reader_at_true_pose:
                read_at(subject, row, subject.pose, (modes, {"modes": len(modes), "control_points": 0}), args)
                del row["codes"]
                rows.append(row)
                print(f"{key}: read at the true pose in {time.time() - t0:.1f} s", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}))
                continue
            fspec = co.SubjectSpec.from_dict(row["spec"])
            sigma = noise_sd(model, fspec, 1000 + row["followup"])
            t_lin = 0.0
            if "known" in args.acquisition:
                lin = ff.linearise(model, fspec, len(modes) if max(args.elastic) > 0 else 0)
                t_lin = time.time() - t0
                for elastic, pool, floor in itertools.product(args.elastic, args.pool, args.floor):
                    noise = float(np.hypot(sigma / pool, floor))
                    res = ff.fit_followup(model, row["codes"], fspec, lin, elastic, pool, noise, args.iterations)
                    row[f"fit e{elastic:g} p{pool} f{floor:g}"] = {
                        "estimate_g": res.estimate_g.tolist(), "half_width_g": ff.half_width_g(res, base, args.interval_scale).tolist(),
                        "sd_g": (res.sd_change * base).tolist(),
                        "baseline_g": base.tolist(), "fit_seconds": t_lin, "cost": res.cost,
                        "iterations": res.iterations}
            if "fitted" in args.acquisition:
                blind = co.SubjectSpec(index=0, seed=0, acquisition={"sid_mm": fspec.acquisition["sid_mm"]})
                for variant, pool, elastic in itertools.product(args.variants, args.pool, sorted(args.elastic)):
                    control, with_fat = VARIANTS[variant]
                    tag = "" if variant == "shipped" else f" {variant}"
                    kind = f"acq-fit e{elastic:g} p{pool}{tag}"
                    vmodel = models["fat" if with_fat else "shipped"]
                    t1 = time.time()
                    first = row.get(f"_acq-fit e0 p{pool}{tag}") if elastic > 0 else None   # its first stage is shared
                    if isinstance(first, str):   # the product's second stage starts from its first: failed too
                        row[kind] = {"failed": f"first stage: {first}"}
                        continue
                    try:
                        res, found = ff.fit_unknown_acquisition(vmodel, row["codes"], blind, config.cohort_ranges(),
                                                                elastic, pool, iterations=args.iterations, start=first,
                                                                step_control=control)
                    except FIT_FAILURES as e:
                        row[kind] = {"failed": str(e)}
                        row[f"_acq-fit e0 p{pool}{tag}"] = str(e)
                        print(f"{key}: {kind} failed: {e}", flush=True)
                        continue
                    if elastic == 0:
                        row[f"_acq-fit e0 p{pool}{tag}"] = res
                    row[kind] = {
                        "estimate_g": res.estimate_g.tolist(), "half_width_g": ff.half_width_g(res, base, args.interval_scale).tolist(),
                        "sd_g": (res.sd_change * base).tolist(),
                        "baseline_g": base.tolist(), "fit_seconds": time.time() - t1, "cost": res.cost,
                        "iterations": res.iterations, "acquisition": {**found.acquisition, **found.processing},
                        "nuisance": res.nuisance.tolist()}
                for k in [k for k in row if k.startswith("_")]:
                    del row[k]
            row["noise_sd_codes"] = sigma
            del row["codes"]
            rows.append(row)
            print(f"{key}: linearised in {t_lin:.1f} s, fits {time.time() - t0 - t_lin:.1f} s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}))
    summary = table(rows, args.markdown)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
