"""Per-muscle change on follow-up radiographs of a subject whose CT is known (issue 14, a check of the
"known anatomy" finding with an independent change model).

For each of the first N training subjects of the specificity benchmark (cohort built with physics):

* **reader**: a ridge regression of the 10 muscles' lean mass on the 32 x 32 network input, fitted on
  re-simulations of that subject alone (:mod:`MSKdeXLib.learning.resimulation`: muscle amounts and
  acquisition drawn from the cohort's ranges; the projection-domain change model);
* **follow-ups**: the subject's realised CT changed again *in the CT* by the cohort's own functions
  (atrophy from the boundary inwards, hypertrophy into fat, fat infiltration in blobs; new draws from the
  cohort's ranges), its truth recomputed from the changed CT, a new acquisition drawn, the radiograph
  simulated from the CT at the SAME pose (no re-positioning; a registration would have to supply it).

Reported per subject over its follow-ups: mean PCC of the estimated vs true lean mass per muscle, of each
left-right asymmetry index, of each muscle's share; then the mean over subjects.

    python benchmarks/probe_followup.py --data OUT/specificity_work/dataset --subjects 5 --followups 40 --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe_specificity_learning import mean_pcc, specificity_targets  # noqa: E402

from MSKdeXLib.anatomy.ct_metrics import structure_metrics  # noqa: E402
from MSKdeXLib.evaluation.baselines import RidgeBaseline  # noqa: E402
from MSKdeXLib.evaluation.specificity import side_pairs  # noqa: E402
from MSKdeXLib.learning import cohort as co  # noqa: E402
from MSKdeXLib.learning import resimulation as rs  # noqa: E402
from MSKdeXLib.learning.dataset.builder import prepare_radiograph  # noqa: E402
from MSKdeXLib.learning.dataset.records import load_dataset_info  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0, 100.0)


def lean_masses(ct, labels, names: list[str], density) -> np.ndarray:
    """Lean mass (g) per named muscle: the truth's own definition (``structure_metrics``)."""
    by_name = {m.structure.name: m.mass_g for m in
               structure_metrics(ct, labels, [labels.table.by_name(n) for n in names], density)}
    return np.array([by_name[n] for n in names])


def followup(subject: co.RealisedSubject, names: list[str], ranges: co.CohortRanges, density, rng
             ) -> tuple[co.Volume, co.LabelMap, co.SubjectSpec]:
    """The subject's CT changed again by the cohort's own CT functions, and a new acquisition."""
    fresh = co.sample_subject(int(rng.integers(0, 2**31 - 1)), int(rng.integers(0, 2**31 - 1)), names, ranges)
    hu = subject.ct.array.astype(np.float32, copy=True)
    lab = subject.labels.label_array().astype(np.int32)
    co.change_muscles(hu, lab, subject.labels.table, subject.ct.spacing, fresh.muscle_changes, fresh.infiltration,
                      rng, density)
    ct = subject.ct.with_array(hu)
    acq = {**fresh.acquisition}
    if "sid_mm" in subject.spec.acquisition:
        acq["sid_mm"] = subject.spec.acquisition["sid_mm"]
    spec = co.SubjectSpec(index=subject.spec.index, seed=subject.spec.seed, acquisition=acq,
                          processing=dict(fresh.processing))
    return ct, co.relabel(ct, subject.labels, lab), spec


def run_subject(record: dict, info, n_resim: int, n_follow: int, seed: int) -> dict:
    folder = Path(record["source"])
    phys = rs.load_physics(folder)
    cfg = json.loads((folder.parent / "cohort.json").read_text())["config"]
    config = co.CohortConfig(**{k: v for k, v in cfg.items() if k in co.CohortConfig.__dataclass_fields__})
    spec = co.sample_subject(config.seed, int(record["index"]), co.cohort_muscles(config), config.cohort_ranges())
    subject = co.realise_subject(config, spec)
    density = config.density_model()
    names = phys.muscles
    cam = phys.camera
    cx, cy = cam.principal_point

    def net_input(codes: np.ndarray) -> np.ndarray:
        return prepare_radiograph(codes, (cam.spacing_row_mm, cam.spacing_col_mm), info.image_size,
                                  info.normalisation, (cy, cx)).ravel()

    rng = np.random.default_rng([seed, int(record["index"])])
    base = lean_masses(subject.ct, subject.labels, names, density)
    x, y = [], []
    for _ in range(n_resim):  # the reader: re-simulations of this subject only
        changes, aspec = rs.draw(rng, phys)
        x.append(net_input(rs.resimulate(phys, changes, aspec, int(rng.integers(0, 2**31 - 1)))))
        y.append(base * np.array([changes.lean_factor(n) for n in names]))
    xf, yf = [], []
    for _ in range(n_follow):  # follow-ups: changed in the CT, simulated from the CT
        ct, labels, fspec = followup(subject, names, phys.ranges, density, rng)
        moved = co.RealisedSubject(fspec, ct, labels, subject.structures, subject.camera, subject.pose, {})
        rad, _, _ = co.subject_radiograph(moved, int(rng.integers(0, 2**31 - 1)))
        xf.append(net_input(rad.pixels))
        yf.append(lean_masses(ct, labels, names, density))
    x, y, xf, yf = (np.array(v, np.float64) for v in (x, y, xf, yf))
    inner = int(0.8 * len(x))
    errors = {a: float(np.mean(np.abs(RidgeBaseline().fit(x[:inner], y[:inner], a).predict(x[inner:]) - y[inner:])))
              for a in ALPHAS}
    alpha = min(errors, key=errors.get)
    pred = RidgeBaseline().fit(x, y, alpha).predict(xf)
    a, s = specificity_targets(yf, names)
    ah, sh = specificity_targets(pred, names)
    return {"subject": folder.name, "alpha": alpha, "mass_pcc": mean_pcc(pred, yf), "asym_pcc": mean_pcc(ah, a),
            "share_pcc": mean_pcc(sh, s), "true_change_sd_percent": float(np.mean(np.std(yf / base, axis=0)) * 100),
            "pairs": {stem: float(np.corrcoef(ah[:, i], a[:, i])[0, 1]) for i, (stem, _, _) in enumerate(side_pairs(names))}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the specificity benchmark's training-set folder")
    p.add_argument("--subjects", type=int, default=5, help="first N training subjects")
    p.add_argument("--resim", type=int, default=600, help="re-simulations per subject for its reader")
    p.add_argument("--followups", type=int, default=40, help="CT-changed follow-up radiographs per subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    info = load_dataset_info(args.data)
    rows = []
    for record in info.split("train")[:args.subjects]:
        t0 = time.time()
        r = run_subject(record, info, args.resim, args.followups, args.seed)
        r["seconds"] = round(time.time() - t0, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("mass_pcc", "asym_pcc", "share_pcc")}
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "mean": mean, "args": vars(args)}, indent=1))
    if args.markdown:
        stems = list(rows[0]["pairs"])
        print("\n| subject | follow-ups | true change SD % | mass PCC | asymmetry PCC | share PCC | asymmetry: "
              + " / ".join(stems) + " |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['subject']} | {args.followups} | {r['true_change_sd_percent']:.1f} | {r['mass_pcc']:.2f} | "
                  f"{r['asym_pcc']:.2f} | {r['share_pcc']:.2f} | "
                  + " / ".join(f"{r['pairs'][k]:.2f}" for k in stems) + " |")
        pm = " / ".join(f"{np.mean([r['pairs'][k] for r in rows]):.2f}" for k in stems)
        print(f"| **mean** | | | **{mean['mass_pcc']:.2f}** | **{mean['asym_pcc']:.2f}** | **{mean['share_pcc']:.2f}** | {pm} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
