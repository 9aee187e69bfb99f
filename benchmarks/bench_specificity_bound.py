"""Is the per-muscle information in the radiograph? A linear-Gaussian bound on the specificity cohort.

For a few subjects of the specificity cohort (validation indices: no test subject is looked at),
the final simulated radiograph (detector codes after vendor processing) is differentiated by
finite differences with respect to

* each muscle's lean mass (g), by two mechanisms: extra atrophy (voxels to fat, from the boundary)
  and extra fat infiltration (blobs inside the muscle), applied on top of the subject's anatomy;
* the listed nuisance of the cohort: subcutaneous fat, rotation (3), translation (3), size (3),
  kVp, scatter, gamma, SID, focal spot, detector blur, unsharp amount and radius, LUT strength,
  each scaled to its prior standard deviation (uniform ranges of the preset);

noise comes from two renders with different noise seeds, and the unlisted nuisance (the elastic
deformation and the random voxel patterns of the changes) from ``--elastic`` re-draws of them with
everything else fixed. :mod:`MSKdeXLib.evaluation.information` turns these into the highest PCC any
estimator can reach at that operating point, per muscle mass and per left-right asymmetry index, at
the detector's resolution and pooled to coarser grids (the network's input is 32 x 32).

    python benchmarks/bench_specificity_bound.py --subjects 10000 10001 10002 --elastic 40 --markdown

One CPU thread; about 2 min per subject on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSKdeXLib.anatomy.ct_metrics import metrics_document  # noqa: E402
from MSKdeXLib.evaluation.information import asymmetry_gradient, attainable_pcc  # noqa: E402
from MSKdeXLib.evaluation.specificity import side_pairs  # noqa: E402
from MSKdeXLib.io.sample_data import pelvis_ct  # noqa: E402
from MSKdeXLib.learning import cohort as C  # noqa: E402

#: (spec field, key, finite-difference step) of the listed nuisance
NUISANCE = [("fat", None, 1.0)] + [("rotation_deg", i, 0.5) for i in range(3)] + \
           [("translation_mm", i, 1.0) for i in range(3)] + [("scale", i, 0.01) for i in range(3)] + \
           [("acquisition", "energy_kvp", 1.0), ("acquisition", "scatter", 0.02), ("acquisition", "contrast", 0.03),
            ("acquisition", "sid_mm", 10.0), ("acquisition", "focal_spot_mm", 0.1),
            ("acquisition", "detector_blur_mm", 0.05), ("processing", "unsharp_amount", 0.1),
            ("processing", "unsharp_sigma_mm", 1.0), ("processing", "lut_strength", 0.5)]
MECHANISMS = (("atrophy", 0.05), ("infiltration", 0.05))     # extra fraction of the muscle's voxels


def _uniform_var(lo: float, hi: float) -> float:
    return (float(hi) - float(lo)) ** 2 / 12.0


def nuisance_prior_var(r: C.CohortRanges, field: str, key) -> float:
    """Prior variance of one listed nuisance parameter under the cohort's (uniform) ranges."""
    sym = {"fat": r.subcutaneous_fat_mm, "rotation_deg": r.rotation_deg, "translation_mm": r.translation_mm,
           "scale": r.scale}
    if field in sym:
        return _uniform_var(-sym[field], sym[field])
    ranges = {"energy_kvp": r.energy_kvp, "scatter": r.scatter, "contrast": r.contrast, "sid_mm": r.sid_mm,
              "focal_spot_mm": r.focal_spot_mm, "detector_blur_mm": r.detector_blur_mm,
              "unsharp_amount": r.unsharp_amount, "unsharp_sigma_mm": r.unsharp_sigma_mm,
              "lut_strength": r.lut_strength}
    return _uniform_var(*ranges[key])


def perturbed(spec: C.SubjectSpec, field: str, key, step: float) -> C.SubjectSpec:
    """A copy of ``spec`` with one nuisance parameter moved by ``step`` (anatomy draws unchanged)."""
    s = copy.deepcopy(spec)
    if field == "fat":
        s.subcutaneous_fat_mm += step
    elif field in ("rotation_deg", "translation_mm", "scale"):
        v = list(getattr(s, field))
        v[key] += step
        setattr(s, field, tuple(v))
    else:
        d = getattr(s, field)
        defaults = {"sid_mm": C.SID_MM, "focal_spot_mm": 1.2, "detector_blur_mm": 0.15, "unsharp_sigma_mm": 12.0}
        d[key] = d.get(key, defaults.get(key, 0.0)) + step
        if key == "unsharp_amount":
            d.setdefault("unsharp_sigma_mm", 12.0)
    return s


def muscle_masses(subject: C.RealisedSubject, config: C.CohortConfig, names: list[str]) -> np.ndarray:
    doc = metrics_document(subject.ct, subject.labels, subject.structures, config.density_model())
    m = {d["name"]: d["mass_g"] for d in doc["structures"]}
    return np.array([m[n] for n in names])


def with_extra_change(subject: C.RealisedSubject, name: str, mechanism: str, fraction: float
                      ) -> C.RealisedSubject:
    """The subject with one muscle changed a little more (nothing else: own random generator)."""
    hu = subject.ct.array.astype(np.float32, copy=True)
    lab = subject.labels.label_array().astype(np.int32)
    label = subject.labels.table.by_name(name).label
    rng = np.random.default_rng([7, label])
    if mechanism == "atrophy":
        C.atrophy(hu, lab, label, fraction, subject.ct.spacing, rng)
    else:
        C.fat_infiltration(hu, lab, label, fraction, rng)
    ct = subject.ct.with_array(hu.astype(subject.ct.array.dtype, copy=False))
    return C.RealisedSubject(subject.spec, ct, C.relabel(ct, subject.labels, lab), subject.structures,
                             subject.camera, subject.pose, subject.applied)


def image(subject: C.RealisedSubject, seed: int = 11) -> np.ndarray:
    return C.subject_radiograph(subject, seed)[0].pixels.astype(np.float64)


def analyse_subject(config: C.CohortConfig, index: int, n_elastic: int, muscle_prior_var: np.ndarray,
                    names: list[str]) -> dict:
    """Jacobian (P, rows, cols), noise image, nuisance samples and masses of one subject."""
    ranges = config.cohort_ranges()
    spec = C.sample_subject(config.seed, index, C.cohort_muscles(config), ranges)
    base = C.realise_subject(config, spec)
    y0, m0 = image(base), muscle_masses(base, config, names)
    noise = (image(base, seed=12) - y0) / np.sqrt(2.0)
    rows, prior, labels = [], [], []
    for mechanism, fraction in MECHANISMS:
        for j, name in enumerate(names):
            changed = with_extra_change(base, name, mechanism, fraction)
            dm = muscle_masses(changed, config, names)[j] - m0[j]
            rows.append((image(changed) - y0) / dm)
            prior.append(muscle_prior_var[j] * (0.7 if mechanism == "atrophy" else 0.3))
            labels.append(f"{mechanism}:{name}")
    for field, key, step in NUISANCE:
        y = image(C.realise_subject(config, perturbed(spec, field, key, step)))
        rows.append((y - y0) / step)
        prior.append(nuisance_prior_var(ranges, field, key))
        labels.append(f"{field}:{key}")
    samples = []
    for k in range(n_elastic):
        other = copy.deepcopy(spec)
        other.index = 10**7 + 1000 * index + k          # other elastic field and voxel patterns only
        samples.append(image(C.realise_subject(config, other)) - y0)
    return {"jacobian": np.stack(rows), "prior": np.array(prior), "labels": labels, "noise": noise,
            "samples": np.stack(samples) if samples else None, "masses": m0}


def pooled(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[-2] // f * f, a.shape[-1] // f * f
    a = a[..., :h, :w]
    return a.reshape(a.shape[:-2] + (h // f, f, w // f, f)).mean(axis=(-3, -1))


def bounds(data: dict, names: list[str], pool: int, setting: str) -> dict[str, np.ndarray]:
    """Attainable PCC per muscle mass and per pair's asymmetry at one pooling and nuisance setting."""
    n_m = len(names)
    J = pooled(data["jacobian"], pool).reshape(len(data["jacobian"]), -1)
    noise = pooled(data["noise"], pool)
    var = ndimage.uniform_filter(noise ** 2, 5).ravel() + 1e-6        # local noise variance
    keep = np.arange(2 * n_m) if setting == "noise" else np.arange(len(J))
    samples = None
    if setting == "all" and data["samples"] is not None:
        samples = pooled(data["samples"], pool).reshape(len(data["samples"]), -1)
    mass_c = np.zeros((n_m, len(keep)))
    for j in range(n_m):
        mass_c[j, j] = mass_c[j, n_m + j] = 1.0
    pairs = side_pairs(names)
    asym_c = np.zeros((len(pairs), len(keep)))
    for q, (_, left, right) in enumerate(pairs):
        iL, iR = names.index(left), names.index(right)
        gl, gr = asymmetry_gradient(data["masses"][iL], data["masses"][iR])
        asym_c[q, [iL, n_m + iL]] = gl
        asym_c[q, [iR, n_m + iR]] = gr
    args = (J[keep], var, data["prior"][keep])
    return {"mass": attainable_pcc(*args, mass_c, samples), "asym": attainable_pcc(*args, asym_c, samples)}


def muscle_prior(config: C.CohortConfig, names: list[str], n: int = 2000) -> np.ndarray:
    """Prior variance (g^2) of each muscle's lean mass change, from ``n`` drawn specs (mass of the
    source muscle times its drawn change and infiltration; size is a separate nuisance)."""
    ct0, labels0 = C.load_source(config)
    structs = [s for s in labels0.select(kinds=list(config.kinds)) if s.name in names]
    base = {d["name"]: d["mass_g"] for d in metrics_document(ct0, labels0, structs, config.density_model())["structures"]}
    muscles, ranges = C.cohort_muscles(config), config.cohort_ranges()
    draws = np.array([[base[n] * ((1 + s.muscle_changes.get(n, 0.0)) * (1 - s.infiltration.get(n, 0.0)) - 1)
                       for n in names]
                      for s in (C.sample_subject(config.seed, 10**8 + i, muscles, ranges) for i in range(n))])
    return draws.var(axis=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, nargs="+", default=[10000, 10001, 10002],
                   help="cohort indices (validation range 10000..; the test range 20000.. is never used)")
    p.add_argument("--elastic", type=int, default=40, help="re-draws of the elastic field and voxel patterns")
    p.add_argument("--detector", type=int, default=96)
    p.add_argument("--voxel-mm", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--pools", type=int, nargs="+", default=[1, 3, 6, 12], help="pooling factors of the detector")
    p.add_argument("--out", default="bench_specificity_bound_out")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    if any(i >= 20000 for i in a.subjects):
        p.error("indices >= 20000 are the fixed test split of the specificity benchmark; use 10000..19999")
    import torch

    torch.set_num_threads(1)
    case = pelvis_ct()
    if case is None:
        p.error("the pelvis CT (../shared/data/pelvis_ct) is not found")
    config = C.prepare(C.CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=a.seed,
                                      rows=a.detector, cols=a.detector, voxel_mm=a.voxel_mm,
                                      ranges=C.preset_ranges("specificity").to_dict()))
    names = C.cohort_muscles(config)
    prior = muscle_prior(config, names)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for index in a.subjects:
        t0 = time.time()
        data = analyse_subject(config, index, a.elastic, prior, names)
        print(f"subject {index}: {time.time() - t0:.0f} s", flush=True)
        for pool in a.pools:
            for setting in ("noise", "listed", "all"):
                b = bounds(data, names, pool, setting)
                results.setdefault((pool, setting), []).append(b)
    pairs = [stem for stem, _, _ in side_pairs(names)]
    doc = {"subjects": a.subjects, "elastic_draws": a.elastic, "detector_px": a.detector, "muscles": names,
           "pairs": pairs, "rows": []}
    for (pool, setting), bs in results.items():
        mass = np.mean([b["mass"] for b in bs], axis=0)
        asym = np.mean([b["asym"] for b in bs], axis=0)
        doc["rows"].append({"grid_px": a.detector // pool, "nuisance": setting, "mass_pcc": mass.tolist(),
                            "asym_pcc": asym.tolist()})
    (out / "specificity_bound.json").write_text(json.dumps(doc, indent=1))
    label = {"noise": "pixel noise only", "listed": "+ listed nuisance (20)",
             "all": f"+ elastic & voxel patterns ({a.elastic} draws)"}
    if a.markdown:
        print("\n| grid | nuisance | mass PCC bound, mean (min) | asymmetry PCC bound: " + ", ".join(pairs) + " |")
        print("|---|---|---:|---:|")
        for r in doc["rows"]:
            m = np.array(r["mass_pcc"])
            print(f"| {r['grid_px']} x {r['grid_px']} | {label[r['nuisance']]} | {m.mean():.3f} ({m.min():.3f}) | "
                  + " / ".join(f"{v:.3f}" for v in r["asym_pcc"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
