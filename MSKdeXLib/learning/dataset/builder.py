"""Training-set builder: case folders -> a ``mskdex-dataset/1`` folder (docs/CONTRACTS.md).

Cases are either *virtual subjects* (folders written by ``mskdex cohort``: xray.dcm, targets,
metrics.json, subject.json) or *real cases* (a folder with a CT, its labels, a radiograph and
the ``registration.json`` of ``mskdex register``).

Geometry of the data-set grid: ``image_size`` (H, W) pixels of ``pixel_spacing_mm`` (row, col)
**at the detector plane**, centred on the principal point of the radiograph's camera (the
detector centre for radiographs without geometry). Radiograph and channel images are resampled
onto it by exact area overlap: channels by *sum* (each input pixel's content is split between
output pixels by overlap area, so a channel's sum is kept whenever it lies inside the grid),
the radiograph by *mean*. Then the radiograph is scaled with
:func:`MSKdeXLib.learning.dataset.records.normalise` (z-score by default). All of it is recorded in
``dataset.json["normalisation"]`` and repeated at inference by :func:`prepare_radiograph`.

Records are cached (a record whose inputs and settings hash equals the stored one is
skipped), resumable (records are written one by one, atomically) and shardable
(``shard=(i, n)`` builds records with index % n == i; :func:`merge` lists every record built).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from safetensors import safe_open

from ...anatomy.ct_metrics import metrics_document
from ...anatomy.density import DensityModel
from ...anatomy.quantities import CHANNEL_OF, QUANTITIES
from ...anatomy.structures import Structure, normalize_name
from ...errors import UserError, listing
from ...io.documents import read_json
from ...io.outputs import write_json
from ...io.radiographs import load_radiograph
from ...io.volumes import load_ct, load_labels
from ...projection.geometry import Camera, check_rigid
from ...settings import DATASET_IMAGE, DRR_DETECTOR
from ...validation import check_finite_fields, require_finite
from ..cohort import base_view, render_channels
from .format import FORMAT, dataset_header, normalise, record_file, write_dataset_json
from .format import write_record as write_record_tensors

DEFAULT_NORMALISATION = {"method": "zscore"}
SPLITS = ("train", "val", "test")
#: what ``DatasetSettings.split`` accepts: a split for every record, or "auto" (from a hash of the record id)
SPLIT_CHOICES = SPLITS + ("auto",)


# ------------------------------------------------------------------------------------------------
# Exact area resampling (detector-plane grids sharing a principal point)
# ------------------------------------------------------------------------------------------------
def area_matrix(n_in: int, spacing_in: float, centre_in: float, n_out: int, spacing_out: float,
                centre_out: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix W: W[o, i] = fraction of input pixel i's length inside output pixel o.

    Pixel p of a grid covers [(p - centre - 1/2) * spacing, (p - centre + 1/2) * spacing] mm
    about the shared principal point; ``centre_out`` defaults to the output's middle.
    """
    c_out = (n_out - 1) / 2.0 if centre_out is None else centre_out
    a0 = (np.arange(n_in) - centre_in - 0.5) * spacing_in
    a1 = a0 + spacing_in
    b0 = (np.arange(n_out) - c_out - 0.5) * spacing_out
    b1 = b0 + spacing_out
    overlap = np.minimum(a1[None, :], b1[:, None]) - np.maximum(a0[None, :], b0[:, None])
    return np.clip(overlap, 0.0, None) / spacing_in


def resample_sum(images: np.ndarray, spacing_in: Sequence[float], centre_in: Sequence[float],
                 size_out: Sequence[int], spacing_out: Sequence[float]) -> np.ndarray:
    """Resample (..., rows, cols) images keeping their sums (content per pixel, e.g. g/pixel).

    ``spacing_*`` are (row, col) mm; ``centre_in`` is the principal point (row, col) in input
    pixels, placed at the centre of the output grid. Content outside the output grid is lost.
    """
    wr = area_matrix(images.shape[-2], spacing_in[0], centre_in[0], size_out[0], spacing_out[0])
    wc = area_matrix(images.shape[-1], spacing_in[1], centre_in[1], size_out[1], spacing_out[1])
    return wr @ np.asarray(images, dtype=np.float64) @ wc.T


def resample_mean(image: np.ndarray, spacing_in: Sequence[float], centre_in: Sequence[float],
                  size_out: Sequence[int], spacing_out: Sequence[float], pad_value: float | None = None
                  ) -> np.ndarray:
    """Resample an intensity image (rows, cols) by area-weighted mean; output pixels the input
    does not cover get ``pad_value`` (default: the image's minimum, i.e. air)."""
    img = np.asarray(image, dtype=np.float64)
    s = resample_sum(img, spacing_in, centre_in, size_out, spacing_out)
    cover = resample_sum(np.ones_like(img), spacing_in, centre_in, size_out, spacing_out)
    fill = float(img.min()) if pad_value is None else float(pad_value)
    out = np.full(s.shape, fill)
    ok = cover > 1e-9
    # partially covered border pixels: blend with the pad value by the uncovered fraction
    area = (spacing_out[0] * spacing_out[1]) / (spacing_in[0] * spacing_in[1])
    frac = np.clip(cover / area, 0.0, 1.0)
    out[ok] = s[ok] / cover[ok] * frac[ok] + fill * (1.0 - frac[ok])
    return out


def prepare_radiograph(pixels: np.ndarray, pixel_spacing: Sequence[float], image_size: Sequence[int],
                       normalisation: dict, principal_point_rc: Sequence[float] | None = None
                       ) -> np.ndarray:
    """The data-set input (H, W) float32 of a radiograph: exact area-mean resampling to the
    data-set spacing (detector plane), centred on the principal point (default the image
    centre), padding with the image minimum, then ``normalisation`` (data_loading.normalise).
    Inference must call this with the model's ``normalisation`` to see what training saw."""
    rows, cols = pixels.shape
    centre = ((rows - 1) / 2.0, (cols - 1) / 2.0) if principal_point_rc is None else principal_point_rc
    spacing_out = normalisation.get("pixel_spacing_mm")
    if spacing_out is None:
        raise UserError("normalisation record lacks 'pixel_spacing_mm'")
    img = resample_mean(pixels, pixel_spacing, centre, image_size, spacing_out)
    return normalise(img, normalisation)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One input case folder."""

    folder: Path
    kind: str  # "virtual" | "real"
    id: str

    @property
    def files(self) -> list[Path]:
        """Input files whose content defines the record (hashed for the cache)."""
        if self.kind == "virtual":
            names = ["subject.json", "metrics.json", "targets.safetensors", "xray.dcm", "xray.json"]
            return [self.folder / n for n in names if (self.folder / n).exists()]
        f = real_case_files(self.folder)
        return [p for p in (f["ct"], f["labels"], f["radiograph"], f["registration"]) if p]


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "case"


def discover_cases(paths: Sequence[str | Path]) -> list[Case]:
    """Case folders from the given paths (a case folder, or a folder of case folders such as a
    cohort); deterministic order (given order, then sorted names). Ids are '<parent>_<folder>'."""
    out: list[Case] = []
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise UserError("case folder not found", p)
        kind = _case_kind(p)
        folders = [p] if kind else sorted(d for d in p.iterdir() if d.is_dir() and _case_kind(d))
        if not folders:
            raise UserError("no case found: expected a virtual subject (subject.json), a real case "
                            "(registration.json + CT + labels + radiograph) or a folder of them", p)
        for f in folders:
            out.append(Case(f.resolve(), _case_kind(f) or "", _safe_id(f"{f.resolve().parent.name}_{f.name}")))
    ids = [c.id for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"the same case is given twice (or two cases share a name): {dup[0]}")
    return out


def _case_kind(folder: Path) -> str | None:
    if (folder / "subject.json").exists():
        return "virtual"
    if (folder / "registration.json").exists():
        return "real"
    return None


def _first(folder: Path, patterns: Sequence[str]) -> Path | None:
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    return None


def real_case_files(folder: Path) -> dict[str, Path | None]:
    """Files of a real case folder: the CT, labels and radiograph named in its
    ``registration.json`` (keys ``ct``, ``labels``, ``xray``; absolute, relative to the folder or
    to the working directory), else found in the folder (ct.*, labels*.*, xray.dcm / *.dcm ...)."""
    reg = folder / "registration.json"
    info: dict = {}
    if reg.exists():
        try:
            info = json.loads(reg.read_text())
        except ValueError:
            raise UserError("cannot read registration.json", reg) from None

    def pick(keys: Sequence[str], patterns: Sequence[str]) -> Path | None:
        for k in keys:
            v = info.get(k)
            if isinstance(v, str) and v:
                for q in ((Path(v),) if Path(v).is_absolute() else (folder / v, Path(v))):
                    if q.exists():
                        return q
        return _first(folder, patterns)

    return {"registration": reg if reg.exists() else None,
            "ct": pick(("ct",), ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "ct"]),
            "labels": pick(("labels",), ["labels*.nii.gz", "labels*.nii", "labels*.nrrd", "*.seg.nrrd"]),
            "radiograph": pick(("xray", "radiograph"), ["xray.dcm", "*.dcm", "xray.png", "*.png", "*.tif",
                                                        "*.tiff"])}


def hash_inputs(files: Sequence[Path], settings: dict) -> str:
    """SHA-256 of the settings (canonical JSON) and the content of ``files``."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Settings and channels
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetSettings:
    image_size: tuple[int, int] = (DATASET_IMAGE.rows, DATASET_IMAGE.cols)
    # the command line passes the first case's detector spacing; this default is the DRR detector's
    pixel_spacing_mm: tuple[float, float] = (DRR_DETECTOR.pixel_spacing_mm, DRR_DETECTOR.pixel_spacing_mm)
    structures: list[str] | None = None             # names; None -> by kinds
    kinds: tuple[str, ...] = ("muscle", "bone")
    quantities: tuple[str, ...] = QUANTITIES
    bone_quantities: tuple[str, ...] = ("mass_g",)
    normalisation_method: str = "zscore"
    split: str = "auto"                             # train | val | test | auto
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if len(self.image_size) != 2 or min(self.image_size) < 4:
            raise UserError(f"--image-size needs two sizes >= 4, got {list(self.image_size)}")
        if len(self.pixel_spacing_mm) != 2 or min(self.pixel_spacing_mm) <= 0:
            raise UserError(f"--spacing must be positive mm, got {list(self.pixel_spacing_mm)}")
        bad = set(self.quantities) | set(self.bone_quantities)
        bad -= set(QUANTITIES)
        if bad:
            raise UserError(f"unknown quantity {sorted(bad)}; use {sorted(QUANTITIES)}")
        if self.split not in SPLIT_CHOICES:
            raise UserError(f"unknown split '{self.split}'; use auto, train, val or test")

    def normalisation(self) -> dict:
        return {"method": self.normalisation_method, "pixel_spacing_mm": list(self.pixel_spacing_mm),
                "image_size": list(self.image_size), "resample": "exact area mean (detector plane)",
                "centre": "principal point of the radiograph's camera (detector centre if unknown)",
                "pad": "image minimum before scaling",
                "function": "MSKdeXLib.learning.dataset.builder.prepare_radiograph"}

    def record_settings(self) -> dict:
        """What a record depends on besides its input files (for the cache hash)."""
        return {"format": FORMAT, "image_size": list(self.image_size),
                "pixel_spacing_mm": list(self.pixel_spacing_mm), "structures": self.structures,
                "kinds": list(self.kinds), "quantities": list(self.quantities),
                "bone_quantities": list(self.bone_quantities), "normalisation": self.normalisation(),
                "builder": 1}


def choose_channels(structures: Sequence[Structure], settings: DatasetSettings
                    ) -> tuple[list[Structure], list[dict]]:
    """(structures, channels) of the data set: quantity-major order over chosen structures."""
    if settings.structures:
        keys = {normalize_name(n): n for n in settings.structures}
        chosen = [s for s in structures if normalize_name(s.name) in keys]
        missing = set(keys) - {normalize_name(s.name) for s in chosen}
        if missing:
            raise UserError(f"structure(s) {sorted(keys[m] for m in missing)} not in the first case")
    else:
        chosen = [s for s in structures if s.kind in settings.kinds]
    if not chosen:
        raise UserError("no structure selected for the data set")
    channels = []
    for q in QUANTITIES:
        for s in chosen:
            wanted = settings.bone_quantities if s.kind == "bone" else settings.quantities
            if q in wanted:
                channels.append({"structure": s.name, "quantity": q, "kind": s.kind})
    return chosen, channels


def auto_split(record_id: str, settings: DatasetSettings) -> str:
    """Deterministic split from the record id (independent of shards and case order)."""
    if settings.split != "auto":
        return settings.split
    u = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < settings.test_fraction:
        return "test"
    if u < settings.test_fraction + settings.val_fraction:
        return "val"
    return "train"


def _structures_of_case(case: Case) -> list[Structure]:
    if case.kind == "virtual":
        path = case.folder / "subject.json"
        doc = read_json(path, "subject description")
        try:
            return [Structure(int(d["label"]), d["name"], d["kind"], d.get("side", "none"),
                              tuple(d.get("color", (128, 128, 128)))) for d in doc["structures"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"subject description lacks valid 'structures' ({type(exc).__name__}: {exc})",
                            path) from None
    f = real_case_files(case.folder)
    ct = load_ct(f["ct"])
    return load_labels(f["labels"], ct).structures


# ------------------------------------------------------------------------------------------------
# Building one record
# ------------------------------------------------------------------------------------------------
def _read_metrics(path: Path) -> dict[str, dict]:
    doc = read_json(path, "metrics")
    return {r["name"]: r for r in doc["structures"]}


def build_virtual_record(case: Case, channels: list[dict], settings: DatasetSettings) -> dict:
    """Arrays of a virtual subject's record (all channels paired: rendered at the true pose)."""
    tpath = case.folder / "targets.safetensors"
    try:
        with safe_open(str(tpath), "numpy") as fh:
            meta = fh.metadata() or {}
            names = json.loads(meta["structures"])
            camera = Camera.from_dict(json.loads(meta["camera"]))
            arrays = {k: fh.get_tensor(k) for k in ("mass", "volume")}
    except Exception as exc:  # safetensors raises its own error types on a truncated/corrupt file  # noqa: BLE001
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise UserError(f"targets unreadable (truncated or corrupt? {msg})", tpath) from None
    for k, a in arrays.items():
        require_finite(f"{k} targets", a, str(tpath))
    metrics = _read_metrics(case.folder / "metrics.json")
    spacing_in = (camera.spacing_row_mm, camera.spacing_col_mm)
    cx, cy = camera.principal_point
    stack, truth = [], []
    for c in channels:
        if c["structure"] not in names or c["structure"] not in metrics:
            raise UserError(f"structure '{c['structure']}' missing from this subject", case.folder)
        stack.append(arrays[CHANNEL_OF[c["quantity"]]][names.index(c["structure"])])
        truth.append(float(metrics[c["structure"]][c["quantity"]]))
    targets = resample_sum(np.stack(stack), spacing_in, (cy, cx), settings.image_size,
                           settings.pixel_spacing_mm)
    rad = load_radiograph(_radiograph_file(case.folder))
    if rad.shape != (camera.rows, camera.cols):
        raise UserError(f"radiograph shape {rad.shape} differs from the targets' camera", case.folder)
    xray = prepare_radiograph(rad.pixels, rad.pixel_spacing or spacing_in, settings.image_size,
                              settings.normalisation(), (cy, cx))
    return {"xray": xray[None], "targets": targets, "paired": np.ones(len(channels), np.uint8),
            "truth": np.asarray(truth)}


def _radiograph_file(folder: Path) -> Path:
    doc = read_json(folder / "subject.json", "subject description")
    return folder / doc.get("files", {}).get("radiograph", "xray.dcm")


@dataclass
class RegisteredBody:
    """One rigid body of a registration: its structures, pose and whether it is trustworthy."""

    name: str
    structures: list[str]
    ct_to_camera: np.ndarray
    doubtful: bool = False


def read_registration(path: Path) -> tuple[Camera, list[RegisteredBody]]:
    """(camera, bodies) from ``registration.json`` of ``mskdex register``: ``geometry`` (camera)
    and ``bodies`` [{name, structures, ct_to_camera, doubtful}]. A single top-level
    ``ct_to_camera`` (with ``camera`` or ``geometry``) is one body holding every bone."""
    doc = read_json(path, "registration")
    cam = doc.get("geometry") or doc.get("camera")
    if not isinstance(cam, dict):
        raise UserError("registration lacks its camera 'geometry'", path)
    bodies = []
    for b in doc.get("bodies") or []:
        bodies.append(RegisteredBody(str(b["name"]), [str(n) for n in b.get("structures", [])],
                                     check_rigid(np.asarray(b["ct_to_camera"], float), f"{path}: {b['name']}"),
                                     bool(b.get("doubtful", False))))
    if not bodies and doc.get("ct_to_camera") is not None:
        bodies.append(RegisteredBody("all", [], check_rigid(np.asarray(doc["ct_to_camera"], float),
                                                            f"{path}: ct_to_camera")))
    if not bodies:
        raise UserError("registration holds no pose ('bodies' or 'ct_to_camera')", path)
    try:
        return Camera.from_dict(cam), bodies
    except (KeyError, TypeError) as exc:
        raise UserError(f"bad camera geometry ({exc})", path) from None


def case_spacing(case: Case) -> tuple[float, float]:
    """(row, col) pixel spacing in mm of the case's radiograph detector: a virtual subject's camera
    (subject.json), a real case's registered camera (registration.json). The data set's default."""
    if case.kind == "virtual":
        path = case.folder / "subject.json"
        try:
            cam = read_json(path, "subject description")["camera"]
            return (float(cam["spacing_row_mm"]), float(cam["spacing_col_mm"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"subject description lacks a valid 'camera' ({type(exc).__name__}: {exc})",
                            path) from None
    camera, _ = read_registration(case.folder / "registration.json")
    return (camera.spacing_row_mm, camera.spacing_col_mm)


def build_real_record(case: Case, channels: list[dict], settings: DatasetSettings) -> dict:
    """A real case: bones of each registered body rendered at that body's pose (paired, unless
    the registration is flagged doubtful); muscles and unregistered bones at the CT's own
    default view (unpaired). Truth: the CT's metrics."""
    f = real_case_files(case.folder)
    for key in ("ct", "labels", "radiograph"):
        if f[key] is None:
            raise UserError(f"real case lacks its {key} file", case.folder)
    camera, bodies = read_registration(f["registration"])
    ct = load_ct(f["ct"])
    labels = load_labels(f["labels"], ct)
    structures = [labels.resolve(n) for n in dict.fromkeys(c["structure"] for c in channels)]
    density = DensityModel()
    metrics = {r["name"]: r for r in metrics_document(ct, labels, structures, density)["structures"]}
    groups: list[tuple[list, np.ndarray, bool]] = []
    placed: set[str] = set()
    # a structure held by several bodies (bones, then spine, then one vertebra) is placed by the
    # last of them, as `mskdex register` does (its most specific, last registered body)
    for b in reversed(bodies):
        members = [s for s in structures if s.kind == "bone" and s.name not in placed
                   and (s.name in b.structures or (b.name == "all" and not b.structures))]
        placed |= {s.name for s in members}
        if members:
            groups.append((members, b.ct_to_camera, not b.doubtful))
    rest = [s for s in structures if s.name not in placed]
    if rest:
        groups.append((rest, base_view(ct, labels, camera), False))
    rendered: dict[tuple[str, str], np.ndarray] = {}
    paired_of: dict[str, bool] = {}
    for members, view, paired in groups:
        ch = render_channels(ct, labels, members, camera, view, density)
        for idx, s in enumerate(members):
            paired_of[s.name] = paired
            for q, key in CHANNEL_OF.items():
                rendered[(s.name, q)] = ch[key][idx]
    cx, cy = camera.principal_point
    spacing_in = (camera.spacing_row_mm, camera.spacing_col_mm)
    targets = resample_sum(np.stack([rendered[(c["structure"], c["quantity"])] for c in channels]),
                           spacing_in, (cy, cx), settings.image_size, settings.pixel_spacing_mm)
    rad = load_radiograph(f["radiograph"])
    if rad.pixel_spacing is None:
        rad.pixel_spacing = spacing_in
    centre = (cy, cx) if rad.shape == (camera.rows, camera.cols) else None
    xray = prepare_radiograph(rad.pixels, rad.pixel_spacing, settings.image_size,
                              settings.normalisation(), centre)
    paired = np.array([1 if paired_of[c["structure"]] else 0 for c in channels], np.uint8)
    truth = np.array([float(metrics[c["structure"]][c["quantity"]]) for c in channels])
    return {"xray": xray[None], "targets": targets, "paired": paired, "truth": truth}


def registration_status(case: Case) -> dict:
    """How a case's bone channels are aligned with its radiograph (recorded in each record):
    ``{"status": "true pose"}`` for a virtual subject, ``"registered"`` or ``"doubtful"`` (with the
    doubtful bodies) for a real case."""
    if case.kind == "virtual":
        return {"status": "true pose", "doubtful_bodies": []}
    _, bodies = read_registration(real_case_files(case.folder)["registration"])
    doubtful = [b.name for b in bodies if b.doubtful]
    return {"status": "doubtful" if doubtful else "registered", "doubtful_bodies": doubtful}


def write_record(out: Path, rec_id: str, arrays: dict, entry: dict, input_hash: str) -> None:
    """``records/<id>.safetensors`` (contract tensors; the hash in its metadata) and its manifest
    ``records/<id>.json`` (the dataset.json record entry + hash), both atomically."""
    write_record_tensors(out, rec_id, arrays, metadata={"input_hash": input_hash, "id": rec_id})
    write_json(out / "records" / f"{rec_id}.json", {**entry, "input_hash": input_hash}, force=True)


def cached(out: Path, rec_id: str, input_hash: str) -> bool:
    """True when ``rec_id`` was already built from the same inputs and settings."""
    man = out / "records" / f"{rec_id}.json"
    rec = out / "records" / f"{rec_id}.safetensors"
    if not (man.exists() and rec.exists()):
        return False
    try:
        return json.loads(man.read_text()).get("input_hash") == input_hash
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------
# The data set
# ------------------------------------------------------------------------------------------------
def _header(structures: list[Structure], channels: list[dict], settings: DatasetSettings) -> dict:
    return dataset_header(settings.image_size, settings.pixel_spacing_mm, structures, channels,
                          settings.normalisation(), DensityModel().to_dict())


def merge(out: str | Path) -> dict:
    """Rewrite ``dataset.json`` so that it lists every record built (all shards)."""
    out = Path(out)
    head_path = out / "header.json"
    if not head_path.exists():
        raise UserError("not a data set being built (header.json missing)", out)
    head = json.loads(head_path.read_text())
    records = []
    for man in sorted((out / "records").glob("*.json")):
        e = json.loads(man.read_text())
        if (out / e["file"]).exists():
            records.append({k: v for k, v in e.items() if k != "input_hash"})
    write_dataset_json(out, head, records)
    return {**head, "records": records}


def build_dataset(case_paths: Sequence[str | Path], out: str | Path, settings: DatasetSettings,
                  shard: tuple[int, int] = (0, 1), force: bool = False,
                  on_record: Callable[[dict], None] | None = None, include_doubtful: bool = False) -> dict:
    """Build (or complete) the data set in ``out``; returns a summary.

    A data set folder holding other settings is refused unless ``force`` (then all its records
    are rebuilt). Records already built from the same inputs are skipped. A real case whose
    registration is doubtful is refused (before anything is built) unless ``include_doubtful``
    (its doubtful bodies' bones are then unpaired); each record says its ``registration`` status.
    """
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")
    cases = discover_cases(case_paths)
    mine = [case for idx, case in enumerate(cases) if idx % n == i]
    status = {case.id: registration_status(case) for case in mine}
    doubtful = [f"{c.id} ({', '.join(status[c.id]['doubtful_bodies'])})" for c in mine
                if status[c.id]["status"] == "doubtful"]
    if doubtful and not include_doubtful:
        raise UserError(f"{len(doubtful)} case(s) with a doubtful registration: {listing(doubtful)}; check "
                        "their qa.png and register again, or pass --include-doubtful to use them (doubtful "
                        "bodies' bones then unpaired)")
    structures, channels = choose_channels(_structures_of_case(cases[0]), settings)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a folder", out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    head = _header(structures, channels, settings)
    head_path = out / "header.json"
    if head_path.exists():
        old = json.loads(head_path.read_text())
        if old != json.loads(json.dumps(head)):
            if not force:
                raise UserError("data set was built with other settings or channels; pass --force "
                                "to rebuild it", out)
            for p in (out / "records").glob("*"):
                p.unlink()
    if not head_path.exists() or force:
        write_json(head_path, head, force=True)
    rec_settings = {**settings.record_settings(), "channels": channels}
    built = skipped = 0
    t0 = time.time()
    for idx, case in enumerate(cases):
        if idx % n != i:
            continue
        h = hash_inputs(case.files, rec_settings)
        if cached(out, case.id, h) and not force:
            skipped += 1
            if on_record:
                on_record({"id": case.id, "cached": True})
            continue
        arrays = (build_virtual_record if case.kind == "virtual" else build_real_record)(
            case, channels, settings)
        entry = {"id": case.id, "file": record_file(case.id),
                 "split": auto_split(case.id, settings), "source": str(case.folder),
                 "kind": case.kind, "index": idx, "registration": status[case.id],
                 "paired_note": ("virtual: all channels rendered at the radiograph's true pose"
                                 if case.kind == "virtual" else
                                 "real: bones at the registered pose, muscles at the CT's default view")}
        write_record(out, case.id, arrays, entry, h)
        built += 1
        if on_record:
            on_record({"id": case.id, "cached": False})
    doc = merge(out)
    return {"built": built, "cached": skipped, "records": len(doc["records"]), "shard": [i, n],
            "channels": len(channels), "seconds": round(time.time() - t0, 3), "out": str(out)}
