"""Benchmark the MSKdeX DRR engine against DiffDRR 0.6.1 (trilinear renderer), in one run.

Same CT (the real pelvis CT and DiffDRR's chest CT), same attenuation volume (our mu array is
loaded into DiffDRR's density buffer), same cone-beam geometry (our pose converted to
DiffDRR's camera-to-world extrinsic, see ``diffdrr_extrinsic``), same detector (256^2 and
512^2 covering 410 mm at SID 1000 mm), same samples per ray, same device and the same torch
thread count (``--threads``, default 1 and 2: each setting is a separate pass, the count is
set with torch.set_num_threads and OMP_NUM_THREADS for both renderers). Each measurement runs
in its own subprocess so peak memory (VmHWM) is per renderer. Reports the median (and the
minimum) ms per DRR over the repeats, peak memory, the speed ratio of the medians and the NCC
of the two DRRs, and the 1-minute load average when each measurement ended (the machine may be
shared); plus our per-structure channels (K = 22 mass channels, and mass + volume = 2K
channels) timed in one process interleaved with the attenuation DRR (so their ratio sees the
same load), and a 512x512x300 CT memory check.

DiffDRR's imports need torchvision, which conflicts with the project venv, so run it from a
separate venv (torch 2.14.1 + torchvision 0.29.1 + diffdrr 0.6.1 + this project, no-deps):

    /work/bench-venv/bin/python benchmarks/bench_drr.py --markdown benchmarks/bench_drr_table.md

On a GPU (``--device cuda``) both renderers run on the device, timings synchronise the device
before reading the clock, and the memory columns are the peak device memory allocated by torch
(``torch.cuda.max_memory_allocated``) above what the loaded volume used; the thread count then
only affects host-side work. The issue-3 GPU targets are the 512^2 rows: attenuation <= 2 ms and
22 mass channels <= 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from MSKdeXLib.settings import DRR_DETECTOR, SID_MM

FOV_MM = DRR_DETECTOR.rows * DRR_DETECTOR.pixel_spacing_mm  # detector side at SID: 256 x 1.6 = 409.6 mm


def _load(case: str):
    from MSKdeXLib.io import sample_data
    from MSKdeXLib.io.volumes import load_ct, load_labels

    c = sample_data.pelvis_ct() if case == "pelvis" else sample_data.chest_ct()
    if c is None:
        raise SystemExit(f"sample CT '{case}' not found")
    ct = load_ct(c.ct)
    return ct, load_labels(c.labels, ct, c.table)


def _camera(size: int):
    from MSKdeXLib.projection.geometry import Camera

    return Camera(size, size, FOV_MM / size, FOV_MM / size, SID_MM)


def _stretch_to(ct, labels, slices: int):
    """The CT and labels resampled to ``slices`` slices (linear / nearest): a 512x512xN case."""
    from MSKdeXLib.io.images import Volume
    from MSKdeXLib.io.images import LabelMap

    nk = ct.array.shape[0]
    pos = (np.arange(slices) + 0.5) * nk / slices - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, nk - 1)
    i1 = np.clip(i0 + 1, 0, nk - 1)
    f = np.clip(pos - i0, 0, 1).astype(np.float32)[:, None, None]
    arr = ct.array[i0] * (1 - f) + ct.array[i1] * f
    sp = (ct.spacing[0], ct.spacing[1], ct.spacing[2] * nk / slices)
    vol = Volume(arr.astype(np.float32), sp, ct.origin, ct.direction, ct.source + f" (resampled to {slices} slices)")
    near = np.clip(np.rint(pos).astype(int), 0, nk - 1)
    lab = LabelMap(vol, [layer[near] for layer in labels.layers], labels.table, labels.entries)
    return vol, lab


def _pick(labels, k: int):
    chosen = labels.select(kinds=["muscle"]) + labels.select(kinds=["bone"])
    return chosen[:k]


def _rss_mb() -> float:
    """Peak resident memory (MB) since the last :func:`_reset_peak` (Linux VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    """Reset the peak-RSS counter (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _time(fn, repeats: int, warm: bool = True, device: str = "cpu") -> list[float]:
    """Wall-clock ms of ``fn`` per repeat; on CUDA the device is synchronised around each call."""
    if warm:
        fn()  # warm-up (also builds caches)
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _gpu_mb(device: str) -> float | None:
    """Peak device memory (MB) allocated by torch since the last reset, None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def _gpu_reset(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def diffdrr_extrinsic(pose: np.ndarray) -> np.ndarray:
    """Our ct_to_camera (LPS) -> DiffDRR's extrinsic (camera -> RAS world, orientation=None).

    DiffDRR (reverse_x_axis=True) puts pixel (row r, col c) at camera point
    (-(c - cx) * delx, -(r - cy) * dely, sdd) with the source at the origin: our camera frame
    turned 180 deg about z (F = diag(-1, -1, 1)). Its world is RAS (torchio), ours LPS
    (L = diag(-1, -1, 1)). So world = L @ inv(pose) @ F @ camera_diffdrr.
    """
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    return f @ np.linalg.inv(pose) @ f  # L and F are the same matrix


# ---------------------------------------------------------------------------------------------
# workers (one per subprocess)
# ---------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view

    dev = spec.get("device", "cpu")

    ct, labels = _load(spec["case"])
    if spec.get("slices"):
        ct, labels = _stretch_to(ct, labels, spec["slices"])
    cam = _camera(spec["size"])
    pose = default_view(ct, labels, cam)
    res: dict = {"spec": spec, "ct_shape_kji": list(ct.array.shape)}
    kind = spec["renderer"]
    if kind in ("ours", "channels", "memory"):
        structures = _pick(labels, spec.get("k", 22)) if kind != "ours" else []
        import gc

        gc.collect()
        res["rss_data_mb"] = _current_mb()  # CT + labels + torch loaded
        _reset_peak()
        _gpu_reset(dev)
        r = DRRRenderer(ct, cam, labels, structures, samples_per_ray=spec.get("samples"), device=dev)
        axis = r.dominant_axis(pose)
        res["samples_per_ray"] = r.ray_samples(axis)
        before = res["rss_data_mb"]
        with torch.no_grad():
            if kind == "ours":
                img = r.attenuation(pose)[0]
                res["ms"] = _time(lambda: r.attenuation(pose), spec["repeats"], device=dev)
                np.save(spec["image"], img.cpu().numpy())
            elif kind == "channels":  # interleaved: attenuation, K mass, K mass + K volume
                res["k"] = len(structures)
                fns = {"attenuation": lambda: r.attenuation(pose),
                       "mass": lambda: r.render_channels(pose, ("mass",)),
                       "mass_volume": lambda: r.render_channels(pose, ("mass", "volume"))}
                for fn in fns.values():
                    fn()  # warm-up (builds the plane stack and the voxel lists)
                res["ms"] = {name: [] for name in fns}
                for _ in range(spec["repeats"]):
                    for name, fn in fns.items():
                        res["ms"][name] += _time(fn, 1, warm=False, device=dev)
                res["footprint_taps"] = list(r.footprint_taps(pose))
                res["voxels"] = int(r._voxel_lists()[1].numel())
            else:  # memory: attenuation + mass and volume channels of K structures
                r.attenuation(pose)
                out = r.render_channels(pose)
                res["k"] = len(structures)
                res["inside"] = int(out.inside.sum())
        res["rss_before_mb"], res["peak_rss_mb"] = before, _rss_mb()
        res["peak_gpu_mb"] = _gpu_mb(dev)
        res["load1"] = os.getloadavg()[0]
        return res
    # DiffDRR trilinear
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import RigidTransform
    from torchio import ScalarImage

    mu = 0.02 * np.maximum(0.0, 1.0 + ct.array.astype(np.float32) / 1000.0)
    data = torch.as_tensor(np.ascontiguousarray(mu.transpose(2, 1, 0)))[None]  # (1, I, J, K), host
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.index_to_lps()  # index -> RAS
    subject = read(ScalarImage(tensor=data, affine=affine), orientation=None, center_volume=False)
    drr = DRR(subject, sdd=cam.sid_mm, height=cam.rows, delx=cam.spacing_col_mm, width=cam.cols,
              dely=cam.spacing_row_mm, renderer="trilinear", reverse_x_axis=True)
    drr.density = data[0].clone()  # our mu, not DiffDRR's own HU->density mapping
    drr = drr.to(dev)
    extr = RigidTransform(torch.as_tensor(diffdrr_extrinsic(pose), dtype=torch.float32, device=dev))
    n = spec["samples"]
    import gc

    del subject
    gc.collect()
    before = _current_mb()
    _reset_peak()
    _gpu_reset(dev)
    with torch.no_grad():
        img = drr(extr, n_points=n)[0, 0]
        res["ms"] = _time(lambda: drr(extr, n_points=n), spec["repeats"], device=dev)
    res["samples_per_ray"] = n
    res["rss_before_mb"], res["peak_rss_mb"] = before, _rss_mb()
    res["peak_gpu_mb"] = _gpu_mb(dev)
    res["load1"] = os.getloadavg()[0]
    np.save(spec["image"], img.cpu().numpy())
    return res


def _run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))})
    if out.returncode != 0:
        raise SystemExit(f"worker failed: {spec}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="+", default=["pelvis", "chest"])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats for our renderer")
    p.add_argument("--diffdrr-repeats", type=int, default=3)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts to measure")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: both renderers run there")
    p.add_argument("--no-memory-check", action="store_true", help="skip the 512x512x300 host-memory check")
    p.add_argument("--no-peer", action="store_true",
                   help="time our renderer only (where DiffDRR and its dependencies are not installed)")
    p.add_argument("--markdown", default=None, help="also write the result table to this file")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_drr_"))
    lines = ["| threads | CT (k,j,i) | detector | samples/ray | ours ms median (min) | DiffDRR ms median (min) | "
             "speed-up (medians) | ours peak MB* | DiffDRR peak MB* | NCC | load1 ours / DiffDRR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    chan_lines = ["| threads | CT | detector | K | voxels | footprint taps (rows, cols) | attenuation ms | "
                  "K mass ms | K mass + K volume ms | K mass / attenuation | 2K / attenuation | load1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    med = lambda v: float(np.median(v))  # noqa: E731
    for threads in args.threads:
        for case in args.cases:
            for size in args.sizes:
                base = {"case": case, "size": size, "threads": threads, "device": args.device}
                ours = _run({**base, "renderer": "ours", "repeats": args.repeats,
                             "image": str(tmp / f"{case}{size}_ours.npy")})
                n = ours["samples_per_ray"]
                o_ms = med(ours["ms"])
                peer = ["-", "-", "-", "-", "-"]  # DiffDRR ms, speed-up, peak MB, NCC, load1
                if not args.no_peer:
                    dd = _run({**base, "renderer": "diffdrr", "repeats": args.diffdrr_repeats,
                               "samples": n, "image": str(tmp / f"{case}{size}_dd.npy")})
                    a, b = np.load(tmp / f"{case}{size}_ours.npy"), np.load(tmp / f"{case}{size}_dd.npy")
                    d_ms = med(dd["ms"])
                    peer = [f"{d_ms:.2f} ({min(dd['ms']):.2f})", f"{d_ms / o_ms:.1f}x", f"{_peak(dd):.0f}",
                            f"{_ncc(a, b):.4f}", f"{dd['load1']:.1f}"]
                lines.append(f"| {threads} | {case} {tuple(ours['ct_shape_kji'])} | {size}^2 | {n} | "
                             f"{o_ms:.2f} ({min(ours['ms']):.2f}) | {peer[0]} | {peer[1]} | {_peak(ours):.0f} | "
                             f"{peer[2]} | {peer[3]} | {ours['load1']:.1f} / {peer[4]} |")
                print(lines[-1], flush=True)
                ch = _run({**base, "renderer": "channels", "k": 22, "repeats": args.repeats})
                t_att, t_m, t_mv = (med(ch["ms"][q]) for q in ("attenuation", "mass", "mass_volume"))
                chan_lines.append(f"| {threads} | {case} | {size}^2 | {ch['k']} | {ch['voxels']} | "
                                  f"{tuple(ch['footprint_taps'])} | {t_att:.2f} | {t_m:.2f} | {t_mv:.2f} | "
                                  f"{t_m / t_att:.2f} | {t_mv / t_att:.2f} | {ch['load1']:.1f} |")
                print(chan_lines[-1], flush=True)
    mem_line = "512x512x300 memory check skipped (--no-memory-check)"
    if not args.no_memory_check:
        mem_line = _memory_check()
    print(mem_line)
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    gpu = (f", device {args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
           else ", device cpu")
    header = (f"Machine: {cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__}, torch threads "
              f"{args.threads} (same for both renderers), load average at the end of the run "
              f"{os.getloadavg()[0]:.2f}. Times: median (min) of {args.repeats} (ours) / {args.diffdrr_repeats} "
              f"(DiffDRR) repeats after one warm-up.")
    note = ("*peak MB: peak resident memory of the renderer (construction + rendering) above the process "
            "with the CT loaded" + ("; on CUDA: peak device memory allocated by torch." if args.device != "cpu"
                                    else "."))
    text = "\n".join([header, "", *lines, note, "", *chan_lines, "", mem_line, ""])
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


def _peak(res: dict) -> float:
    """Peak memory (MB) of one measurement: device memory on CUDA, else resident memory above the
    process with the CT loaded."""
    if res.get("peak_gpu_mb") is not None:
        return res["peak_gpu_mb"]
    return res["peak_rss_mb"] - res["rss_before_mb"]


def _memory_check() -> str:
    """Host memory of a 512x512x300 CT rendered to 512^2 (attenuation + 2 x 22 channels), 1 thread."""
    mem = _run({"case": "chest", "size": 512, "renderer": "memory", "slices": 300, "k": 22, "threads": 1})
    return (f"512x512x300 CT (chest resampled), 512^2 detector, attenuation + mass and volume channels of "
            f"K={mem['k']} structures ({mem['inside']} inside): peak RSS of the process "
            f"{mem['peak_rss_mb']:.0f} MB, of which {mem['rss_before_mb']:.0f} MB is the loaded CT + labels + "
            f"torch before the renderer exists; renderer + rendering: "
            f"{mem['peak_rss_mb'] - mem['rss_before_mb']:.0f} MB")

if __name__ == "__main__":
    sys.exit(main())
