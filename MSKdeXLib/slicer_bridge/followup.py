"""The result of ``mskdex followup`` as MRML nodes: a table of each muscle's baseline and estimated
lean mass (g), change (%) and 90 % intervals, plus left-right asymmetry rows; the change figure
(``followup.png``) as an RGB volume; and the warnings of a doubtful registration or an implausible
estimate (exit code 3). Also the pose of a transform node written as the ``registration.json`` that
``mskdex followup --registration`` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import EXIT_DOUBTFUL, UserError
from ..io.documents import read_json
from ..io.outputs import write_json
from .common import ATTR, _add, vtk_matrix
from .radiographs import RADIOGRAPH_DIRECTIONS_RAS
from .tables import table_node_from_rows
from .transforms import pose_from_transform_node

#: columns of the follow-up table: muscle rows fill the lean-mass ones (g, %), asymmetry rows
#: (``structure`` = 'asymmetry <muscle>') the asymmetry index (L - R) / (L + R) at baseline and follow-up
FOLLOWUP_COLUMNS = ("structure", "baseline_g", "estimate_g", "estimate_low_g", "estimate_high_g", "change_percent",
                    "change_low_percent", "change_high_percent", "asymmetry_baseline", "asymmetry_estimate")
#: prefix of the ``format`` of followup.json (MSKdeXLib.learning.followup.FOLLOWUP_FORMAT)
FORMAT_PREFIX = "mskdex-followup/"


@dataclass
class FollowupNodes:
    """MRML view of a ``mskdex followup`` result (its output folder ``folder``)."""

    table: object = None                            # vtkMRMLTableNode of :func:`followup_rows`
    figure: object = None                           # vtkMRMLVectorVolumeNode of followup.png (RGB), or None
    folder: str = ""
    registration_doubtful: bool = False
    implausible: list = field(default_factory=list)  # muscles whose estimate is implausible
    warnings: list = field(default_factory=list)     # one line each; empty when the result is usable

    @property
    def doubtful(self) -> bool:
        return bool(self.warnings)

    def summary(self) -> str:
        """One line: the largest estimated losses, e.g. 'gluteus_medius_left -31.2 % [-45.0, -17.3]'."""
        rows = [r for r in followup_rows_of(self.table) if not r["structure"].startswith("asymmetry ")]
        rows.sort(key=lambda r: r["change_percent"])
        return "; ".join(f"{r['structure']} {r['change_percent']:+.1f} % [{r['change_low_percent']:.1f}, "
                         f"{r['change_high_percent']:.1f}]" for r in rows[:3])


def followup_rows_of(table_node) -> list[dict]:
    """The rows of a follow-up table node (numbers as float)."""
    from .tables import rows_from_table_node

    return rows_from_table_node(table_node) if table_node is not None else []


def read_followup(path) -> tuple[dict, Path]:
    """(followup.json's document, its path) of a file or an output folder; a one-line UserError when
    it is missing or not a ``mskdex followup`` result."""
    p = Path(path)
    if p.is_dir():
        p = p / "followup.json"
    doc = read_json(p, "followup.json")
    if not str(doc.get("format", "")).startswith(FORMAT_PREFIX) or not isinstance(doc.get("muscles"), dict):
        raise UserError("not a followup.json of mskdex followup (no format / muscles)", p)
    return doc, p


def _num(v) -> float:
    """A JSON number as float (null, written for a non-finite value, as NaN)."""
    return float("nan") if v is None else float(v)


def followup_rows(doc: dict) -> list[dict]:
    """Table rows of a followup.json document: one per muscle (lean mass g, change %, 90 %
    intervals), then one per left-right pair ('asymmetry <muscle>', index (L - R) / (L + R))."""
    rows = []
    try:
        for name, m in doc["muscles"].items():
            rows.append({"structure": name, "baseline_g": _num(m["baseline_g"]), "estimate_g": _num(m["estimate_g"]),
                         "estimate_low_g": _num(m["interval_g"][0]), "estimate_high_g": _num(m["interval_g"][1]),
                         "change_percent": _num(m["change_percent"]),
                         "change_low_percent": _num(m["change_interval_percent"][0]),
                         "change_high_percent": _num(m["change_interval_percent"][1])})
        asym = doc.get("asymmetry") or {}
        est, base = asym.get("estimate") or {}, asym.get("baseline") or {}
        for stem in est:
            rows.append({"structure": f"asymmetry {stem}", "asymmetry_baseline": _num(base.get(stem)),
                         "asymmetry_estimate": _num(est[stem])})
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UserError(f"followup.json has an incomplete muscle entry ({exc})") from None
    return rows


def followup_warnings(doc: dict, exit_code: int | None = None) -> list[str]:
    """One line per reason not to trust the result: a doubtful registration, implausible estimates,
    or exit code 3 without either (never silent)."""
    out = []
    pose = doc.get("pose") or {}
    if pose.get("doubtful"):
        where = "registration/qa.png" if pose.get("source") == "registration/registration.json" else "the registration"
        out.append(f"DOUBTFUL registration ({pose.get('body') or 'first body'}): check {where} before using these")
    odd = list(doc.get("implausible_muscles") or [])
    if odd:
        out.append(f"IMPLAUSIBLE estimate ({', '.join(odd)}: no lean mass left or more than doubled): "
                   "the pose is probably wrong")
    if not out and (doc.get("doubtful") or exit_code == EXIT_DOUBTFUL):
        out.append(f"mskdex followup flagged the result as doubtful (exit code {exit_code})")
    return out


def followup_to_nodes(path, scene, exit_code: int | None = None, name: str = "MSKdeX follow-up",
                      nodes: FollowupNodes | None = None) -> FollowupNodes:
    """Read a ``mskdex followup`` output folder (or its followup.json) into a table node (columns
    :data:`FOLLOWUP_COLUMNS`; attributes MSKdeX.doubtful, MSKdeX.implausible, MSKdeX.interval_coverage,
    MSKdeX.figure), the figure ``followup.png`` as an RGB volume node (when present) and the warnings
    (``exit_code``: the job's, 3 = doubtful). Nodes of ``nodes`` are reused."""
    doc, p = read_followup(path)
    res = nodes or FollowupNodes()
    res.folder = str(p.parent)
    res.table = table_node_from_rows(followup_rows(doc), scene, name, FOLLOWUP_COLUMNS, node=res.table)
    res.registration_doubtful = bool((doc.get("pose") or {}).get("doubtful"))
    res.implausible = list(doc.get("implausible_muscles") or [])
    res.warnings = followup_warnings(doc, exit_code)
    figure = p.parent / "followup.png"
    res.table.SetAttribute(ATTR + "doubtful", "1" if res.warnings else "0")
    res.table.SetAttribute(ATTR + "implausible", ",".join(res.implausible))
    res.table.SetAttribute(ATTR + "interval_coverage", repr(float((doc.get("reader") or {}).get("interval_coverage",
                                                                                               np.nan))))
    res.table.SetAttribute(ATTR + "figure", str(figure) if figure.is_file() else "")
    res.table.SetAttribute(ATTR + "source", str(p))
    if figure.is_file():
        res.figure = image_to_vector_node(figure, scene, f"{name} figure", res.figure)
    return res


def image_to_vector_node(path, scene, name: str = "MSKdeX figure", node=None):
    """An RGB picture file (PNG) as a single-slice vector volume node, 1 mm pixels, laid out like a
    radiograph node (column -> RAS -x, row -> RAS -z: upright in the Coronal view)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the picture ({exc})", path) from None
    rows, cols, _ = rgb.shape
    img = vtk.vtkImageData()
    img.SetDimensions(cols, rows, 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(rgb).reshape(-1, 3), deep=True)
    img.GetPointData().SetScalars(scalars)
    if node is None:
        node = _add(scene, slicer.vtkMRMLVectorVolumeNode(), name)
    m = np.eye(4)
    m[:3, :3] = RADIOGRAPH_DIRECTIONS_RAS
    node.SetIJKToRASMatrix(vtk_matrix(m))
    node.SetAndObserveImageData(img)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.SetAttribute(ATTR + "figure", str(path))
    return node


def write_registration_json(transform_node, path, force: bool = True) -> Path:
    """Write the pose of a transform node (CT RAS mm -> camera mm, e.g. 'MSKdeX registered pelvis')
    as the registration.json ``mskdex followup --registration`` reads: one body with its
    ``ct_to_camera`` (CT LPS mm -> camera mm), the node's MSKdeX.doubtful / MSKdeX.similarity kept and,
    for a node of :func:`registration_to_nodes`, the camera it was registered with (``geometry``)."""
    pose = pose_from_transform_node(transform_node)
    sim = transform_node.GetAttribute(ATTR + "similarity")
    body = {"name": transform_node.GetAttribute(ATTR + "body") or transform_node.GetName(),
            "ct_to_camera": pose.tolist(), "final_similarity": float(sim) if sim else None,
            "doubtful": transform_node.GetAttribute(ATTR + "doubtful") == "1"}
    doc = {"source": f"Slicer transform node '{transform_node.GetName()}'", "bodies": [body],
           "doubtful": body["doubtful"]}
    geometry = transform_node.GetAttribute(ATTR + "geometry")
    if geometry:  # the camera it was registered with: mskdex followup checks it is the radiograph's
        doc["geometry"] = json.loads(geometry)
    write_json(Path(path), doc, force)
    return Path(path)
