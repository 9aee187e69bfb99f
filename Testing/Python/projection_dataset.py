"""A small training set made by *parallel* projection of a real CT: test data for the learning
and Slicer tests (it used to ship in the library as ``records.parallel_projection_dataset``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from MSKdeXLib.anatomy.ct_metrics import MM3_PER_CM3, mass_weights
from MSKdeXLib.anatomy.density import DensityModel
from MSKdeXLib.learning.dataset.format import (DatasetInfo, dataset_header, load_dataset_info, write_dataset_json,
                                               write_record)
from MSKdeXLib.learning.dataset.records import DEFAULT_AUGMENT, normalise, random_affine, warp


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
        rel = write_record(folder, rid, {"xray": x, "targets": y, "paired": paired,
                                         "truth": y.astype(np.float64).sum(axis=(1, 2))})
        split = "val" if n >= n_records - val_records else "train"
        records.append({"id": rid, "file": rel, "split": split, "source": str(ct.source)})
    spacing = (ct.spacing[2] * factor, ct.spacing[0] * factor)
    header = dataset_header((size, size), spacing, chosen, channels,
                            {"method": "zscore", "pixel_spacing_mm": list(spacing), "image_size": [size, size]},
                            density.to_dict())
    write_dataset_json(folder, header, records, projection="parallel (sum along CT j axis), test data")
    return load_dataset_info(folder)
