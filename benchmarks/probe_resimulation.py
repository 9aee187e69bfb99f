"""Where the per-muscle signal is lost: re-simulated radiographs of known vs new anatomies (issue 14).

Uses :mod:`MSKdeXLib.learning.resimulation` on the specificity benchmark's training set
(``bench_network.py --part specificity`` builds it; its cohorts carry ``physics.safetensors``):

1. **Signal size**: how much a 20 % atrophy of each muscle changes the network's input (the 32 x 32
   z-scored radiograph), beside the pixel noise (another noise seed), on one training subject.
2. **Known vs new anatomies**: a ridge read-out of the muscle masses (then asymmetry indices and shares)
   fitted on re-simulated samples (fresh muscle amounts and acquisition per sample) of the first N
   training anatomies, tested (a) on fresh draws of the *same* anatomies and (b) on the validation
   subjects, i.e. *new* anatomies (the cohort's own radiographs). The penalty is chosen on (a).

    python benchmarks/probe_resimulation.py --data OUT/specificity_work/dataset --markdown
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

from MSKdeXLib.evaluation.baselines import RidgeBaseline, muscle_mass_columns, split_arrays  # noqa: E402
from MSKdeXLib.learning import resimulation as rs  # noqa: E402
from MSKdeXLib.learning.dataset.builder import prepare_radiograph  # noqa: E402
from MSKdeXLib.learning.dataset.records import RecordDataset, load_dataset_info  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def signal_size(info, record: dict, change: float = -0.2) -> dict[str, float]:
    """RMS change of the network input (z units) per muscle for a relative ``change``, and of another
    noise seed (``noise``), on one virtual record."""
    phys = rs.load_physics(record["source"])
    cam = phys.camera
    cx, cy = cam.principal_point

    def record_input(changes=None, seed=None) -> np.ndarray:
        codes = rs.resimulate(phys, changes, None, seed)
        return prepare_radiograph(codes, (cam.spacing_row_mm, cam.spacing_col_mm), info.image_size,
                                  info.normalisation, (cy, cx))

    x0 = record_input()
    rms = lambda d: float(np.sqrt(np.mean(d ** 2)))  # noqa: E731
    out = {"noise": rms(record_input(seed=phys.noise_seed + 1) - x0)}
    for m in phys.muscles:
        out[m] = rms(record_input(rs.MuscleDraw(change={m: change})) - x0)
    return out


def samples(ds: RecordDataset, n: int, anatomies: int, first_epoch: int, cols: np.ndarray):
    xs, ms = [], []
    for k in range(n):
        ds.set_epoch(first_epoch + k)
        item = ds[k % anatomies]
        xs.append(item["xray"].numpy().ravel())
        ms.append(item["truth"].numpy()[cols])
    return np.array(xs, np.float64), np.array(ms)


def known_vs_new(info, data: Path, anatomies: list[int], n_samples: int, n_test: int, cfg: dict) -> list[dict]:
    cols = np.where(muscle_mass_columns(info.channels))[0]
    names = [info.channels[j]["structure"] for j in cols]
    ds = RecordDataset(info, "train", resimulate_cfg={"probability": 1.0, **cfg})
    val = split_arrays(data, "val")
    va, vs = specificity_targets(val.truth[:, cols], names)
    rows = []
    for n in anatomies:
        t0 = time.time()
        x, m = samples(ds, n_samples, n, 0, cols)
        xt, mt = samples(ds, n_test, n, 10**6, cols)  # other epochs: fresh draws
        a, s = specificity_targets(mt, names)
        best = None
        for alpha in ALPHAS:
            model = RidgeBaseline().fit(x, m, alpha)
            ah, sh = specificity_targets(model.predict(xt), names)
            known = (mean_pcc(ah, a), mean_pcc(sh, s))
            if best is None or known[0] > best["known_asym"]:
                vah, vsh = specificity_targets(model.predict(val.xray), names)
                best = {"anatomies": n, "samples": n_samples, "alpha": alpha, "known_asym": known[0],
                        "known_share": known[1], "new_asym": mean_pcc(vah, va), "new_share": mean_pcc(vsh, vs)}
        best["seconds"] = round(time.time() - t0, 1)
        rows.append(best)
        print(json.dumps(best), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the specificity benchmark's training-set folder")
    p.add_argument("--anatomies", type=int, nargs="+", default=[1, 3, 10, 30, 100])
    p.add_argument("--samples", type=int, default=1500, help="re-simulated training samples per row")
    p.add_argument("--test-samples", type=int, default=200, help="fresh draws of the same anatomies")
    p.add_argument("--resimulate", default="{}", help='JSON data.resimulate options, e.g. {"acquisition": false}')
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    info = load_dataset_info(args.data)
    train = info.split("train")
    sig = signal_size(info, train[0])
    rows = known_vs_new(info, Path(args.data), args.anatomies, args.samples, args.test_samples,
                        json.loads(args.resimulate))
    res = {"signal_rms_z": sig, "subject": Path(train[0]["source"]).name, "rows": rows,
           "resimulate": json.loads(args.resimulate)}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.markdown:
        muscles = [k for k in sig if k != "noise"]
        print(f"\nSignal ({res['subject']}, 32 x 32 z-scored input): pixel noise rms {sig['noise']:.4f}; "
              "20 % atrophy rms " + ", ".join(f"{m} {sig[m]:.4f}" for m in muscles) + "\n")
        print("| anatomies | re-simulated samples | same anatomies, fresh draws: asym / share PCC | "
              "new anatomies (validation subjects): asym / share PCC | ridge alpha |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['anatomies']} | {r['samples']} | {r['known_asym']:.2f} / {r['known_share']:.2f} | "
                  f"{r['new_asym']:.2f} / {r['new_share']:.2f} | {r['alpha']:g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
