"""Training-set records for torch: loading, the joint augmentation, radiograph normalisation.

The folder format itself (``dataset.json``, record tensors) is :mod:`.format`.
:class:`RecordDataset` is a torch Dataset of records (one split), with the joint augmentation of training: a random affine warp applied to
the radiograph *and* its targets (target intensities multiplied by the local area change, so
channel sums are kept), then brightness/contrast on the radiograph only. All randomness is a
function of (seed, epoch, record index), so a resumed run sees exactly the same samples.

"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn import functional as F

from ...errors import UserError
from .format import DatasetInfo, load_dataset_info, normalise  # noqa: F401  (training and inference read these here)

#: augmentation defaults (JSON-ready). Angles in degrees, translation as a fraction of the side.
DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "rotation_deg": 5.0,
    "scale": [0.9, 1.1],
    "translation": 0.05,
    "brightness": 0.1,   # added: U(-b, b) * std of the radiograph
    "contrast": [0.9, 1.1],
}


def load_record(info: DatasetInfo, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one record, checked against the data set's size and channel count."""
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
    """Records of one split; ``augment_cfg`` None -> no augmentation; ``resimulate_cfg`` (training option
    ``data.resimulate``, :mod:`MSKdeXLib.learning.resimulation`): virtual records re-simulated with fresh
    muscle amounts and acquisition, before the augmentation. Items are dicts with
    xray (1,H,W), targets (C,H,W), paired (C,) bool, truth (C,) float64, index (int)."""

    def __init__(self, info: DatasetInfo, split: str = "train", augment_cfg: dict[str, Any] | None = None,
                 seed: int = 0, cache: bool = True, resimulate_cfg: dict[str, Any] | None = None):
        from ..resimulation import Resimulator

        self.info, self.split, self.seed = info, split, int(seed)
        self.resimulator = Resimulator(info, resimulate_cfg or {})
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
        if self.resimulator.enabled:
            s = self.resimulator(self.records[i], s, np.random.default_rng([self.seed, self.epoch, i, 1]))
        if self.augment_cfg is not None:
            s = augment(s, np.random.default_rng([self.seed, self.epoch, i]), self.augment_cfg)
        return {**s, "index": i}
