"""Options and helpers shared by several subcommands (so each is spelled one way)."""

from __future__ import annotations

import argparse

from ..anatomy.density import DensityModel
from ..devices import resolve_device  # noqa: F401  (the commands import it from here)
from ..progress import MODES as PROGRESS_MODES
from ..progress import Progress  # noqa: F401  (the commands import it from here)


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
    p.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
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
