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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe_specificity_learning import mean_pcc, specificity_targets  # noqa: E402

from MSKdeXLib.evaluation.baselines import RidgeBaseline, muscle_mass_columns, split_arrays  # noqa: E402
from MSKdeXLib.learning import resimulation as rs  # noqa: E402
from MSKdeXLib.learning.dataset.builder import prepare_radiograph  # noqa: E402
from MSKdeXLib.learning.dataset.records import RecordDataset, load_dataset_info  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


class CanonicalView:
    """2D similarity (scale, in-plane rotation, shift) taking a record's view of the source CT's bones to
    the cohort's base view, from the record's TRUE pose (``subject.json``; an upper bound of what a 2D-3D
    registration gives); out-of-plane rotation and the anatomy's own changes are not undone."""

    def __init__(self, cohort_dir: Path):
        from MSKdeXLib.learning import cohort as co

        cfg = json.loads((cohort_dir / "cohort.json").read_text())["config"]
        config = co.CohortConfig(**{k: v for k, v in cfg.items() if k in co.CohortConfig.__dataclass_fields__})
        ct, labels = co.load_source(config)
        self.camera0 = co.Camera.from_dict(config.camera)
        self.pose0 = co.base_view(ct, labels, self.camera0)
        bones = np.zeros(ct.array.shape, bool)
        for s in labels.select(kinds=["bone"]):
            bones |= labels.mask(s)
        self.points = co._subsampled_centres(ct, bones, 3)

    def _mm(self, camera, pose) -> np.ndarray:
        from MSKdeXLib.projection.geometry import project

        rc = project(camera, pose, self.points)
        cx, cy = camera.principal_point
        return np.stack([(rc[:, 1] - cx) * camera.spacing_col_mm, (rc[:, 0] - cy) * camera.spacing_row_mm], 1)

    def theta(self, subject_folder: Path, image_size, spacing_mm) -> "torch.Tensor":
        """``affine_grid`` matrix (canonical output -> record input, normalised coordinates)."""
        import torch

        from MSKdeXLib.projection.geometry import Camera

        doc = json.loads((Path(subject_folder) / "subject.json").read_text())
        q = self._mm(Camera.from_dict(doc["camera"]), np.asarray(doc["ct_to_camera"]))   # subject view, mm (x, y)
        q0 = self._mm(self.camera0, self.pose0)                                            # canonical view
        # least squares q = A q0 + b (similarity: A = [[a, -c], [c, a]])
        n = len(q0)
        m = np.zeros((2 * n, 4))
        m[0::2] = np.c_[q0[:, 0], -q0[:, 1], np.ones(n), np.zeros(n)]
        m[1::2] = np.c_[q0[:, 1], q0[:, 0], np.zeros(n), np.ones(n)]
        a, c, bx, by = np.linalg.lstsq(m, q.ravel(), rcond=None)[0]
        h, w = image_size
        half = np.array([w * spacing_mm[1] / 2.0, h * spacing_mm[0] / 2.0])  # mm -> normalised
        lin = np.array([[a, -c], [c, a]])
        lin_n = np.diag(1 / half) @ lin @ np.diag(half)
        return torch.tensor(np.c_[lin_n, np.array([bx, by]) / half], dtype=torch.float32)


def random_warp(x: "torch.Tensor", rng: np.random.Generator, spacing_mm, affine: bool, elastic_mm: float,
                shift_mm: float = 10.0, rotation_deg: float = 3.0, scale: float = 0.1, control: int = 4
                ) -> "torch.Tensor":
    """(1, H, W) input warped by a random in-plane affine (shift, rotation, anisotropic scale) and a smooth
    displacement (``control`` x ``control`` Gaussian control values of SD ``elastic_mm``, bicubic), both
    in detector mm: 2D stand-ins for a new anatomy's pose, size and deformation."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    half = np.array([w * spacing_mm[1] / 2.0, h * spacing_mm[0] / 2.0])
    lin, t = np.eye(2), np.zeros(2)
    if affine:
        a = np.radians(rng.uniform(-rotation_deg, rotation_deg))
        lin = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag(1 + rng.uniform(-scale, scale, 2))
        t = rng.uniform(-shift_mm, shift_mm, 2) / half
    theta = torch.tensor(np.c_[np.diag(1 / half) @ lin @ np.diag(half), t], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    if elastic_mm > 0:
        ctrl = torch.tensor(rng.normal(0, elastic_mm, (1, 2, control, control)) / half[:, None, None], dtype=torch.float32)
        flow = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        grid = grid + flow[None]
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def canonical(x: "torch.Tensor", theta: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


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


def samples(ds: RecordDataset, n: int, anatomies: int, first_epoch: int, cols: np.ndarray, thetas=None,
            warp: dict | None = None):
    xs, ms = [], []
    rng = np.random.default_rng(first_epoch)
    for k in range(n):
        ds.set_epoch(first_epoch + k)
        item = ds[k % anatomies]
        x = item["xray"] if thetas is None else canonical(item["xray"], thetas[k % anatomies])
        if warp:
            x = random_warp(x, rng, ds.info.pixel_spacing_mm, **warp)
        xs.append(x.numpy().ravel())
        ms.append(item["truth"].numpy()[cols])
    return np.array(xs, np.float64), np.array(ms)


def known_vs_new(info, data: Path, anatomies: list[int], n_samples: int, n_test: int, cfg: dict,
                 canonical_view: bool = False, warp: dict | None = None) -> list[dict]:
    cols = np.where(muscle_mass_columns(info.channels))[0]
    names = [info.channels[j]["structure"] for j in cols]
    ds = RecordDataset(info, "train", resimulate_cfg={"probability": 1.0, **cfg})
    val = split_arrays(data, "val")
    thetas = None
    if canonical_view:
        view = CanonicalView(Path(ds.records[0]["source"]).parent)
        theta = lambda r: view.theta(Path(r["source"]), info.image_size, info.pixel_spacing_mm)  # noqa: E731
        thetas = [theta(r) for r in ds.records]
        h, w = info.image_size
        val.xray = np.array([canonical(torch.from_numpy(x.reshape(1, h, w)).float(), theta(r)).numpy().ravel()
                             for x, r in zip(val.xray, info.split("val"))], np.float64)
    va, vs = specificity_targets(val.truth[:, cols], names)
    rows = []
    for n in anatomies:
        t0 = time.time()
        x, m = samples(ds, n_samples, n, 0, cols, thetas, warp)
        xt, mt = samples(ds, n_test, n, 10**6, cols, thetas)  # other epochs: fresh draws
        a, s = specificity_targets(mt, names)
        best = None
        for alpha in ALPHAS:
            model = RidgeBaseline().fit(x, m, alpha)
            ah, sh = specificity_targets(model.predict(xt), names)
            known = (mean_pcc(ah, a), mean_pcc(sh, s))
            if best is None or known[0] > best["known_asym"]:
                pv = model.predict(val.xray)
                vah, vsh = specificity_targets(pv, names)
                best = {"anatomies": n, "samples": n_samples, "alpha": alpha, "known_asym": known[0],
                        "known_share": known[1], "new_asym": mean_pcc(vah, va), "new_share": mean_pcc(vsh, vs),
                        "new_pcc": mean_pcc(pv, val.truth[:, cols])}
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
    p.add_argument("--canonical", action="store_true",
                   help="warp every input to the cohort's base view by the 2D similarity of its TRUE pose")
    p.add_argument("--warp", default=None,
                   help='JSON: warp the re-simulated TRAINING inputs, e.g. {"affine": true, "elastic_mm": 2.0}')
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    info = load_dataset_info(args.data)
    train = info.split("train")
    sig = signal_size(info, train[0])
    rows = known_vs_new(info, Path(args.data), args.anatomies, args.samples, args.test_samples,
                        json.loads(args.resimulate), args.canonical, json.loads(args.warp) if args.warp else None)
    res = {"signal_rms_z": sig, "subject": Path(train[0]["source"]).name, "rows": rows,
           "resimulate": json.loads(args.resimulate)}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.markdown:
        muscles = [k for k in sig if k != "noise"]
        print(f"\nSignal ({res['subject']}, 32 x 32 z-scored input): pixel noise rms {sig['noise']:.4f}; "
              "20 % atrophy rms " + ", ".join(f"{m} {sig[m]:.4f}" for m in muscles) + "\n")
        print("| anatomies | re-simulated samples | same anatomies, fresh draws: asym / share PCC | "
              "new anatomies (validation subjects): asym / share / mass PCC | ridge alpha |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['anatomies']} | {r['samples']} | {r['known_asym']:.2f} / {r['known_share']:.2f} | "
                  f"{r['new_asym']:.2f} / {r['new_share']:.2f} / {r['new_pcc']:.2f} | {r['alpha']:g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
