"""How well a decomposition *places* each structure: predicted channel images against the true
projections, where the truth is known (virtual subjects, whose channels are rendered at the
radiograph's true pose).

A channel's sum can be right while its image is not (the sums carry the estimate; the images are
what a reader looks at over the radiograph). The measure per channel is the Pearson correlation
over pixels of the predicted image with the true one on the same grid (the model's grid:
:func:`MSKdeXLib.learning.dataset.builder.prepare_radiograph` resampling, so a held-out subject's training-set
record holds its true channels there): 1 for a perfect placement up to a scale, about 0 for an
unrelated image, undefined (NaN) for a constant image. Sums do not enter it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import UserError


def channel_correlation(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-channel Pearson correlation over pixels of ``pred`` and ``target`` (C, H, W), same
    grid; NaN where either channel is constant."""
    from .statistics import pearson

    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"channel images differ in shape: {p.shape} vs {t.shape} (expected (C, H, W) both)")
    return np.array([pearson(a.ravel(), b.ravel()) for a, b in zip(p, t)])


def heldout_agreement(estimates: Iterable[Any], records_dir: str | Path) -> dict[str, Any]:
    """Mean channel correlation of predictions with the true channels of their subjects.

    ``estimates``: :class:`MSKdeXLib.learning.inference.Estimates` whose ``id`` is a subject folder's name;
    ``records_dir``: a training-set folder (``mskdex build-dataset``) built from those subjects on
    the model's grid, whose records are paired (virtual). Channels pair by (structure, quantity).
    Returns ``{"per_channel": [{structure, quantity, kind, mean_r, n}], "kind_mean": {kind:
    {quantity: mean over its channels}}, "n_subjects"}``."""
    from ..learning.dataset.records import load_dataset_info, load_record

    info = load_dataset_info(records_dir)
    by_subject = {Path(r["source"]).name: r for r in info.records}
    index = {(c["structure"], c["quantity"]): i for i, c in enumerate(info.channels)}
    values: dict[tuple[str, str, str], list[float]] = {}
    n_subjects = 0
    for est in estimates:
        rec = by_subject.get(est.id)
        if rec is None:
            raise UserError(f"no record of subject '{est.id}'", Path(records_dir) / "dataset.json")
        data = load_record(info, rec)
        pairs = []  # (channel of the estimate, channel of the record), paired records only
        for j, c in enumerate(est.channels):
            i = index.get((c["structure"], c["quantity"]))
            if i is not None and bool(data["paired"][i]):
                pairs.append((j, i))
        if not pairs:
            continue
        if tuple(est.channel_images.shape[1:]) != tuple(data["targets"].shape[1:]):
            raise UserError(f"records are {tuple(data['targets'].shape[1:])} px but the model's grid is "
                            f"{tuple(est.channel_images.shape[1:])} px", Path(records_dir) / "dataset.json")
        mine, theirs = zip(*pairs)
        r = channel_correlation(est.channel_images[list(mine)], data["targets"].numpy()[list(theirs)])
        for j, v in zip(mine, r):
            c = est.channels[j]
            values.setdefault((c["structure"], c["quantity"], c.get("kind", "other")), []).append(float(v))
        n_subjects += 1
    per = [{"structure": s, "quantity": q, "kind": k, "mean_r": float(np.nanmean(v)) if np.isfinite(v).any()
            else float("nan"), "n": int(np.isfinite(v).sum())} for (s, q, k), v in values.items()]
    kind_mean: dict[str, dict[str, float]] = {}
    for k in sorted({p["kind"] for p in per}):
        for q in sorted({p["quantity"] for p in per if p["kind"] == k}):
            v = [p["mean_r"] for p in per if p["kind"] == k and p["quantity"] == q and np.isfinite(p["mean_r"])]
            if v:
                kind_mean.setdefault(k, {})[q] = float(np.mean(v))
    return {"per_channel": per, "kind_mean": kind_mean, "n_subjects": n_subjects}
