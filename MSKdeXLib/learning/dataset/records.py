"""Reading (and writing) training-set folders in the ``mskdex-dataset/1`` format.

See docs/CONTRACTS.md, "Training data set". :class:`RecordDataset` is a torch Dataset of
records (one split), with the joint augmentation of training: a random affine warp applied to
the radiograph *and* its targets (target intensities multiplied by the local area change, so
channel sums are kept), then brightness/contrast on the radiograph only. All randomness is a
function of (seed, epoch, record index), so a resumed run sees exactly the same samples.

:func:`normalise` applies a data set's ``normalisation`` record to raw radiograph pixels
(used again at inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import UserError
from ...io.documents import read_json
from ...anatomy.structures import Structure

FORMAT = "mskdex-dataset/1"
QUANTITIES = ("mass_g", "volume_cm3")

#: augmentation defaults (JSON-ready). Angles in degrees, translation as a fraction of the side.
DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "rotation_deg": 5.0,
    "scale": [0.9, 1.1],
    "translation": 0.05,
    "brightness": 0.1,   # added: U(-b, b) * std of the radiograph
    "contrast": [0.9, 1.1],
}


@dataclass
class DatasetInfo:
    """The parsed ``dataset.json`` of a training-set folder."""

    root: Path
    image_size: tuple[int, int]
    pixel_spacing_mm: tuple[float, float]
    structures: list[Structure]
    channels: list[dict[str, str]]
    normalisation: dict[str, Any]
    density: dict[str, Any]
    records: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("split", "train") == name]

    def channel_names(self) -> list[str]:
        return [f"{c['structure']}:{c['quantity']}" for c in self.channels]


def _struct_from_dict(d: dict, path: Path) -> Structure:
    try:
        return Structure(int(d["label"]), str(d["name"]), str(d.get("kind", "other")),
                         str(d.get("side", "none")), tuple(int(v) for v in d.get("color", (128, 128, 128))))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"bad structure entry {d}", path) from None


def load_dataset_info(folder: str | Path) -> DatasetInfo:
    """Parse and check ``folder/dataset.json`` (UserError naming the file when malformed)."""
    folder = Path(folder)
    path = folder / "dataset.json"
    if not path.exists():
        raise UserError("not a training-set folder (dataset.json missing)", folder)
    d = read_json(path, "dataset description")
    if d.get("format") != FORMAT:
        raise UserError(f"unsupported data-set format {d.get('format')!r} (expected {FORMAT})", path)
    try:
        size = tuple(int(v) for v in d["image_size"])
        spacing = tuple(float(v) for v in d["pixel_spacing_mm"])
        structures = [_struct_from_dict(s, path) for s in d["structures"]]
        channels = [dict(c) for c in d["channels"]]
        records = list(d["records"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"dataset.json lacks or has a bad field ({exc})", path) from None
    names = {s.name for s in structures}
    for c in channels:
        if c.get("structure") not in names:
            raise UserError(f"channel {c} names a structure not in 'structures'", path)
        if c.get("quantity") not in QUANTITIES:
            raise UserError(f"channel {c} has quantity {c.get('quantity')!r}; use {QUANTITIES}", path)
    if not channels or not records:
        raise UserError("data set has no channels or no records", path)
    known = {"format", "image_size", "pixel_spacing_mm", "structures", "channels", "normalisation",
             "density", "records"}
    return DatasetInfo(folder, size, spacing, structures, channels, dict(d.get("normalisation") or {}),
                       dict(d.get("density") or {}), records, {k: v for k, v in d.items() if k not in known})


def load_record(info: DatasetInfo, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one record, checked against the data set's size and channel count."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = info.root / record["file"]
    if not path.exists():
        raise UserError("record file missing", path)
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read record ({exc})", path) from None
    h, w = info.image_size
    c = len(info.channels)
    want = {"xray": (1, h, w), "targets": (c, h, w), "paired": (c,), "truth": (c,)}
    for k, shape in want.items():
        if k not in t or tuple(t[k].shape) != shape:
            got = None if k not in t else tuple(t[k].shape)
            raise UserError(f"record tensor '{k}' should have shape {shape}, got {got}", path)
    return {"xray": t["xray"].float(), "targets": t["targets"].float(), "paired": t["paired"].bool(),
            "truth": t["truth"].double()}


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
def random_affine(rng: np.random.Generator, cfg: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    """A (2, 3) ``affine_grid`` matrix (output -> input, normalised coordinates) drawn from
    ``cfg``: rotation, isotropic scale and translation in pixel geometry (no shear)."""
    h, w = shape
    a = math.radians(rng.uniform(-1, 1) * float(cfg["rotation_deg"]))
    s = rng.uniform(*cfg["scale"])
    tx, ty = rng.uniform(-1, 1, 2) * float(cfg["translation"]) * 2  # normalised units
    # output pixel p -> input pixel A p (about the centre): A = R / s  (s > 1 zooms in)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
    d = np.diag([2.0 / w, 2.0 / h])  # pixel -> normalised (x = column, y = row)
    a_n = d @ rot @ np.linalg.inv(d)
    return torch.tensor(np.c_[a_n, [tx, ty]], dtype=torch.float32)


def warp(image: torch.Tensor, theta: torch.Tensor, keep_sum: bool) -> torch.Tensor:
    """Warp (C, H, W) by ``theta``; with ``keep_sum`` intensities are multiplied by the area
    change |det A| so that the sum over a structure inside the field of view is kept."""
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if keep_sum:
        out = out * float(abs(torch.linalg.det(theta[:, :2])))
    return out


def augment(sample: dict[str, torch.Tensor], rng: np.random.Generator, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Joint affine of xray + targets (sums kept), then brightness/contrast of the xray."""
    if not cfg.get("enabled", True):
        return sample
    theta = random_affine(rng, cfg, tuple(sample["xray"].shape[-2:]))
    x = warp(sample["xray"], theta, keep_sum=False)
    y = warp(sample["targets"], theta, keep_sum=True)
    mean, std = x.mean(), x.std().clamp_min(1e-6)
    x = (x - mean) * float(rng.uniform(*cfg["contrast"])) + mean + float(rng.uniform(-1, 1)) * float(cfg["brightness"]) * std
    return {**sample, "xray": x, "targets": y}


class RecordDataset(torch.utils.data.Dataset):
    """Records of one split; ``augment_cfg`` None -> no augmentation. Items are dicts with
    xray (1,H,W), targets (C,H,W), paired (C,) bool, truth (C,) float64, index (int)."""

    def __init__(self, info: DatasetInfo, split: str = "train", augment_cfg: dict[str, Any] | None = None,
                 seed: int = 0, cache: bool = True):
        self.info, self.split, self.seed = info, split, int(seed)
        self.records = info.split(split)
        self.augment_cfg = None if augment_cfg is None else {**DEFAULT_AUGMENT, **augment_cfg}
        self.epoch = 0
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._cache is not None and i in self._cache:
            s = self._cache[i]
        else:
            s = load_record(self.info, self.records[i])
            if self._cache is not None:
                self._cache[i] = s
        if self.augment_cfg is not None:
            s = augment(s, np.random.default_rng([self.seed, self.epoch, i]), self.augment_cfg)
        return {**s, "index": i}


# ---------------------------------------------------------------------------------------------
# Normalisation of radiographs
# ---------------------------------------------------------------------------------------------
def normalise(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a data set's ``normalisation`` to raw radiograph pixels (bone bright).

    ``method``: "zscore" (per image: (x - mean) / std, the default), "minmax" (-> [0, 1]),
    "percentile" (``low``/``high`` percentiles -> [0, 1], default 1 / 99), "fixed"
    ((x - ``offset``) / ``scale``), "none".
    """
    x = np.asarray(pixels, dtype=np.float64)
    method = str(spec.get("method", "zscore")).lower()
    if method == "zscore":
        out = (x - x.mean()) / max(float(x.std()), 1e-12)
    elif method == "minmax":
        lo, hi = float(x.min()), float(x.max())
        out = (x - lo) / max(hi - lo, 1e-12)
    elif method == "percentile":
        lo, hi = np.percentile(x, [float(spec.get("low", 1.0)), float(spec.get("high", 99.0))])
        out = (x - lo) / max(float(hi - lo), 1e-12)
    elif method == "fixed":
        out = (x - float(spec.get("offset", 0.0))) / float(spec.get("scale", 1.0))
    elif method in ("none", "identity"):
        out = x
    else:
        raise UserError(f"unknown radiograph normalisation method '{method}'")
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_record(folder: str | Path, rec_id: str, xray: np.ndarray, targets: np.ndarray,
                 paired: Sequence[int], truth: Sequence[float]) -> str:
    """Write ``records/<id>.safetensors`` (atomically); returns the relative file name."""
    from safetensors.numpy import save_file

    from ...io.outputs import atomic_path

    rel = f"records/{rec_id}.safetensors"
    tensors = {"xray": np.ascontiguousarray(xray, dtype=np.float32),
               "targets": np.ascontiguousarray(targets, dtype=np.float32),
               "paired": np.asarray(paired, dtype=np.uint8), "truth": np.asarray(truth, dtype=np.float64)}
    with atomic_path(Path(folder) / rel, force=True) as tmp:
        save_file(tensors, str(tmp))
    return rel


def write_dataset_json(folder: str | Path, *, image_size: Sequence[int], pixel_spacing_mm: Sequence[float],
                       structures: Sequence[Structure], channels: Sequence[dict], normalisation: dict,
                       density: dict, records: Sequence[dict], force: bool = True, **extra: Any) -> Path:
    """Write ``dataset.json`` (atomically)."""
    from ...io.outputs import write_json

    d = {"format": FORMAT, "image_size": list(image_size), "pixel_spacing_mm": list(pixel_spacing_mm),
         "structures": [s.to_dict() for s in structures], "channels": list(channels),
         "normalisation": normalisation, "density": density, "records": list(records), **extra}
    return write_json(Path(folder) / "dataset.json", d, force)


def parallel_projection_dataset(ct, labels, folder: str | Path, structure_names: Sequence[str],
                                quantities: Sequence[str] = ("mass_g",), n_records: int = 4,
                                size: int = 32, seed: int = 0, paired_kinds: Sequence[str] = ("bone",),
                                val_records: int = 1, jitter: dict[str, Any] | None = None) -> DatasetInfo:
    """A small data set from one CT by *parallel* projection (sums along the CT's j axis),
    each record with a random affine jitter (sums kept). Meant for tests and smoke runs,
    not for real training (which uses the cone-beam renderer).

    Image rows follow the CT's k axis (flipped so superior is up), columns its i axis; the
    image is padded to a square and area-summed to ``size`` pixels, so each channel's sum is
    the structure's CT mass (g) / volume (cm^3). ``truth`` is the sum of each stored channel.
    The radiograph is the projected density, z-scored per image.
    """
    from ...anatomy.density import DensityModel
    from ...anatomy.ct_metrics import MM3_PER_CM3, mass_weights

    folder = Path(folder)
    density = DensityModel()
    chosen = [labels.table.by_name(n) for n in structure_names]
    voxel_cm3 = ct.voxel_volume_mm3 / MM3_PER_CM3

    def proj(vol3: np.ndarray) -> np.ndarray:  # [k, j, i] -> (rows=k flipped, cols=i)
        return vol3.sum(axis=1)[::-1].astype(np.float64)

    side = max(ct.array.shape[0], ct.array.shape[2])
    factor = int(math.ceil(side / size))

    def to_size(img: np.ndarray) -> np.ndarray:
        pad = np.zeros((size * factor, size * factor))
        r0, c0 = (pad.shape[0] - img.shape[0]) // 2, (pad.shape[1] - img.shape[1]) // 2
        pad[r0:r0 + img.shape[0], c0:c0 + img.shape[1]] = img
        return pad.reshape(size, factor, size, factor).sum(axis=(1, 3))

    xray_base = to_size(proj(density.density(ct.array.astype(np.float64))))
    channels, base = [], []
    for q in quantities:
        for s in chosen:
            m = labels.mask(s)
            w = mass_weights(ct, s, density) * m if q == "mass_g" else m * voxel_cm3
            base.append(to_size(proj(w)))
            channels.append({"structure": s.name, "quantity": q, "kind": s.kind})
    base_t = torch.tensor(np.stack(base), dtype=torch.float32)
    x_t = torch.tensor(xray_base, dtype=torch.float32)[None]
    cfg = {**DEFAULT_AUGMENT, "rotation_deg": 3.0, "scale": [0.95, 1.05], "translation": 0.03, **(jitter or {})}
    rng = np.random.default_rng(seed)
    records = []
    paired = [1 if c["kind"] in paired_kinds else 0 for c in channels]
    for n in range(n_records):
        theta = random_affine(rng, cfg, (size, size))
        x = warp(x_t, theta, keep_sum=False).numpy()[0]
        y = warp(base_t, theta, keep_sum=True).numpy()
        x = normalise(x, {"method": "zscore"})[None]
        rid = f"rec{n:03d}"
        rel = write_record(folder, rid, x, y, paired, y.astype(np.float64).sum(axis=(1, 2)))
        split = "val" if n >= n_records - val_records else "train"
        records.append({"id": rid, "file": rel, "split": split, "source": str(ct.source)})
    spacing = (ct.spacing[2] * factor, ct.spacing[0] * factor)
    write_dataset_json(folder, image_size=(size, size), pixel_spacing_mm=spacing, structures=chosen,
                       channels=channels, normalisation={"method": "zscore", "pixel_spacing_mm": list(spacing),
                                                     "image_size": [size, size]}, density=density.to_dict(),
                       records=records, projection="parallel (sum along CT j axis), test data")
    return load_dataset_info(folder)
