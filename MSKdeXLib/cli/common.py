"""Options and helpers shared by several subcommands (so each is spelled one way)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..anatomy.density import DensityModel
from ..validation import finite_or_none


def add_ct_args(p: argparse.ArgumentParser, labels_required: bool = True) -> None:
    g = p.add_argument_group("CT and labels")
    g.add_argument("--ct", required=True, help="CT volume (NIfTI, NRRD, MHA/MHD or DICOM folder), HU")
    g.add_argument("--labels", required=labels_required,
                   help="label map (same formats) or Slicer .seg.nrrd segmentation")
    g.add_argument("--table", default=None,
                   help="structure table: totalseg_v1, totalseg_v2, hip22 or a CSV/JSON file "
                        "(default: auto-detect)")
    g.add_argument("--resample-labels", action="store_true",
                   help="resample a label map on another grid onto the CT grid (nearest neighbour)")
    g.add_argument("--nonfinite", choices=("refuse", "mask"), default="refuse",
                   help="NaN/inf voxels in the CT: refuse the CT (default), or mask them as air "
                        "(-1000 HU; their count is recorded in the outputs)")


def add_structure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structure selection")
    g.add_argument("--structures", default=None,
                   help="comma-separated structure names (any spelling: 'gluteus medius left')")
    g.add_argument("--kind", action="append", choices=("muscle", "bone", "other"),
                   help="only structures of this kind (repeatable)")


def add_density_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("density (recorded in outputs)")
    g.add_argument("--lean-window", nargs=2, type=float, metavar=("LOW_HU", "HIGH_HU"),
                   default=(-29.0, 150.0), help="HU window of lean muscle (default: -29 150)")
    g.add_argument("--density-intercept", type=float, default=1.0,
                   help="rho = max(0, intercept + slope*HU) g/cm^3; intercept (default 1.0)")
    g.add_argument("--density-slope", type=float, default=0.001,
                   help="slope in g/cm^3 per HU (default 0.001)")


def density_from_args(args) -> DensityModel:
    return DensityModel(args.density_intercept, args.density_slope, 0.0, tuple(args.lean_window))


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:1 ...")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="progress on stderr: a bar, one JSON object per line (for GUIs), or none")


def split_names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def load_case(args):
    """(ct, labels) from the shared CT options."""
    from ..io.volumes import load_ct, load_labels

    ct = load_ct(args.ct, getattr(args, "nonfinite", "refuse"))
    labels = None
    if getattr(args, "labels", None):
        labels = load_labels(args.labels, ct, args.table, args.resample_labels)
    return ct, labels


def resolve_device(name: str = "auto"):
    import torch

    from ..errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    return dev


class Progress:
    """Progress reporting on stderr: a tqdm bar, JSON lines, or nothing."""

    def __init__(self, mode: str = "bar", total: int | None = None, desc: str = ""):
        self.mode, self.total, self.desc, self.n, self.t0 = mode, total, desc, 0, time.time()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()})
        elif self.mode == "json":
            self.event("progress", step=self.n, total=self.total, **info)

    def event(self, kind: str, **info) -> None:
        if self.mode == "json":
            rec = {"event": kind, "stage": self.desc, "elapsed_s": round(time.time() - self.t0, 3), **info}
            text = json.dumps(finite_or_none(rec), default=lambda o: finite_or_none(float(o)))  # strict: NaN -> null
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
