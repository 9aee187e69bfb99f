"""Baselines that a per-muscle method must beat, fitted on a training split and evaluated on the
same split as the network (numpy only; arrays are per subject x channel).

* :class:`ConstantBaseline` - every channel's training mean (knows nothing about the subject);
* :class:`GlobalOracle` - each channel a least-squares line on the subject's *true* total muscle
  mass (g), fitted on the training split: the best that anything seeing one number per subject
  can do linearly (it is given that number exactly);
* :class:`RidgeBaseline` - ridge regression from the normalised radiograph (flattened, at the
  network's input resolution, each pixel standardised on the training split) to all channel
  sums; the penalty chosen on a validation split;
* :class:`TemplateBaseline` - a decomposition without a network: the mean training channel
  *images* (placement), scaled per subject by its true total muscle mass over the training
  mean (sums).

:func:`split_arrays` reads what they need from a training-set folder's split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

#: ridge penalties tried (the inputs are standardised pixels, the targets standardised sums)
RIDGE_ALPHAS = (1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


@dataclass
class SplitArrays:
    """One split of a training set: ``ids`` (record source folder names), ``xray`` (n, H*W)
    normalised radiographs, ``truth`` (n, C) channel truths (g or cm^3), ``images`` (n, C, H, W)
    true channel images, ``total`` (n,) true total muscle mass (g)."""

    ids: list[str]
    xray: np.ndarray
    truth: np.ndarray
    images: np.ndarray
    total: np.ndarray


def muscle_mass_columns(channels: Sequence[dict]) -> np.ndarray:
    """Bool mask of the channels that are a muscle's mass (their sum is the total muscle mass)."""
    return np.array([c.get("kind") == "muscle" and c["quantity"] == "mass_g" for c in channels])


def split_arrays(records_dir: str | Path, split: str) -> SplitArrays:
    """The arrays of a training-set folder's ``split`` (un-augmented records)."""
    from ..learning.dataset.records import load_dataset_info, load_record

    info = load_dataset_info(records_dir)
    cols = muscle_mass_columns(info.channels)
    ids, xs, ys, ims = [], [], [], []
    for r in info.split(split):
        t = load_record(info, r)
        ids.append(Path(r["source"]).name)
        xs.append(t["xray"].numpy().ravel())
        ys.append(t["truth"].numpy())
        ims.append(t["targets"].numpy())
    truth = np.array(ys, np.float64)
    return SplitArrays(ids, np.array(xs, np.float64), truth, np.array(ims, np.float32), truth[:, cols].sum(axis=1))


class ConstantBaseline:
    """The training mean of every channel."""

    def fit(self, truth: np.ndarray) -> "ConstantBaseline":
        self.mean = np.asarray(truth, np.float64).mean(axis=0)
        return self

    def predict(self, n: int) -> np.ndarray:
        return np.tile(self.mean, (n, 1))


class GlobalOracle:
    """Each channel ``y_c = a_c + b_c * T`` with ``T`` the true total muscle mass (least squares on
    the training split)."""

    def fit(self, total: np.ndarray, truth: np.ndarray) -> "GlobalOracle":
        a = np.column_stack([np.ones(len(total)), np.asarray(total, np.float64)])
        self.coef, *_ = np.linalg.lstsq(a, np.asarray(truth, np.float64), rcond=None)
        return self

    def predict(self, total: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(total)), np.asarray(total, np.float64)]) @ self.coef


class RidgeBaseline:
    """Ridge regression of the channel sums on the standardised pixels of the radiograph."""

    def fit(self, x: np.ndarray, y: np.ndarray, alpha: float) -> "RidgeBaseline":
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.alpha = float(alpha)
        self.x_mean, sd = x.mean(axis=0), x.std(axis=0)
        self.x_sd = np.maximum(sd, max(0.05 * float(np.median(sd)), 1e-12))
        self.y_mean, y_sd = y.mean(axis=0), y.std(axis=0)
        self.y_sd = np.where(y_sd > 0, y_sd, 1.0)
        z, t = (x - self.x_mean) / self.x_sd, (y - self.y_mean) / self.y_sd
        # dual form: W = Z^T (Z Z^T + alpha I)^-1 T (n subjects << pixels)
        self.w = z.T @ np.linalg.solve(z @ z.T + self.alpha * np.eye(len(z)), t)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.x_mean) / self.x_sd
        return (z @ self.w) * self.y_sd + self.y_mean

    @classmethod
    def select(cls, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               alphas: Sequence[float] = RIDGE_ALPHAS) -> tuple["RidgeBaseline", dict[float, float]]:
        """The model fitted on the training split with the penalty whose validation error (mean
        over channels of the mean |estimate - truth| / truth) is lowest; and every penalty's error."""
        errors = {}
        for a in alphas:
            p = cls().fit(train_x, train_y, a).predict(val_x)
            errors[float(a)] = float(np.mean(np.abs(p - val_y) / np.abs(val_y).clip(1e-12)))
        best = min(errors, key=errors.get)
        return cls().fit(train_x, train_y, best), errors


class TemplateBaseline:
    """The mean training channel images; sums scaled per subject by its true total muscle mass."""

    def fit(self, images: np.ndarray, total: np.ndarray) -> "TemplateBaseline":
        self.images = np.asarray(images, np.float64).mean(axis=0)
        self.total_mean = float(np.mean(total))
        return self

    @property
    def sums(self) -> np.ndarray:
        return self.images.sum(axis=(1, 2))

    def predict(self, total: np.ndarray) -> np.ndarray:
        return np.outer(np.asarray(total, np.float64) / self.total_mean, self.sums)
