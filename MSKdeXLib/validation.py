"""Checks for numbers a user gives (options, config fields, settings) and numbers we compute.

Every check raises :class:`~MSKdeXLib.errors.UserError` (for user input) or
:class:`NonFiniteError` (for a computed quantity) with a one-line message naming the option,
field or quantity. Settings dataclasses call these in ``__post_init__``; argparse options use
:func:`finite_float` / :func:`bounded_int` as ``type=``.

Example::

    check_number("--sid", sid, low=1.0, low_open=False)          # finite, >= 1
    check_number("lr", lr, low=0.0, low_open=True)               # finite, > 0
    p.add_argument("--sid", type=finite_float(min=1.0))          # argparse does the same
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import UserError


class NonFiniteError(UserError):
    """A computed quantity (pose, similarity, loss, weight, estimate) became NaN or infinite."""


def _range_text(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """``value`` as a float (or int with ``integer``) after checking it is a finite number within
    [low, high] (open ends with ``low_open`` / ``high_open``); UserError naming ``name`` otherwise."""
    if isinstance(value, bool) or value is None:
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if integer:
        if x != int(x):
            raise UserError(f"{name} must be a whole number, got {value!r}")
        x = int(x)
    bad = ((low is not None and (x < low or (low_open and x == low)))
           or (high is not None and (x > high or (high_open and x == high))))
    if bad:
        raise UserError(f"{name} must be {_range_text(low, high, low_open, high_open)}, got {value!r}")
    return x


def check_positive(name: str, value: Any) -> float:
    """Finite and > 0."""
    return check_number(name, value, low=0.0, low_open=True)


def check_non_negative(name: str, value: Any) -> float:
    """Finite and >= 0."""
    return check_number(name, value, low=0.0)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """A whole number within [low, high]."""
    return int(check_number(name, value, low, high, integer=True))


def check_numbers(name: str, values: Iterable[Any], length: int | None = None, **bounds) -> tuple:
    """A tuple of finite numbers (each within bounds as in :func:`check_number`), optionally of
    exactly ``length`` items."""
    try:
        items = list(values)
    except TypeError:
        raise UserError(f"{name} must be a list of numbers, got {values!r}") from None
    if length is not None and len(items) != length:
        raise UserError(f"{name} must have {length} numbers, got {len(items)}")
    return tuple(check_number(f"{name}[{i}]" if length != 1 else name, v, **bounds)
                 for i, v in enumerate(items))


def check_window(name: str, window: Sequence[Any]) -> tuple[float, float]:
    """A (low, high) pair of finite numbers with low < high (e.g. an HU window)."""
    lo, hi = check_numbers(name, window, length=2)
    if not lo < hi:
        raise UserError(f"{name} must be (low, high) with low < high, got ({lo:g}, {hi:g})")
    return lo, hi


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    options = list(choices)
    if value not in options:
        raise UserError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")
    return value


def check_finite_fields(obj: Any, skip: Iterable[str] = ()) -> None:
    """UserError naming ``Class.field`` when a number (or a number in a tuple/list) of the
    dataclass ``obj`` is NaN or infinite: a one-line guard for a settings object's
    ``__post_init__`` before its own range checks (``None`` and non-numbers are left alone)."""
    import dataclasses

    skipped = set(skip)
    for f in dataclasses.fields(obj):
        if f.name in skipped:
            continue
        value = getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and not math.isfinite(float(v)):
                raise UserError(f"{type(obj).__name__}.{f.name} must be finite, got {value!r}")


# ---------------------------------------------------------------- argparse types


def finite_float(min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False):
    """An argparse ``type=`` accepting finite floats in [min, max] (open ends as asked).
    argparse reports the failure as ``argument --NAME: ...`` on one line, exit 2."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if ((min is not None and (x < min or (min_open and x == min)))
                or (max is not None and (x > max or (max_open and x == max)))):
            raise argparse.ArgumentTypeError(
                f"must be {_range_text(min, max, min_open, max_open)}, got {text!r}")
        return x

    parse.__name__ = "finite number"
    return parse


def bounded_int(min: int | None = None, max: int | None = None):
    """An argparse ``type=`` accepting whole numbers in [min, max]."""

    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if (min is not None and x < min) or (max is not None and x > max):
            raise argparse.ArgumentTypeError(f"must be {_range_text(min, max, False, False)}, got {text!r}")
        return x

    parse.__name__ = "whole number"
    return parse


# ---------------------------------------------------------------- computed quantities


def require_finite(name: str, value: Any, where: str | None = None) -> Any:
    """Return ``value`` unchanged when every element is finite; NonFiniteError naming ``name``
    (and ``where``, e.g. 'step 12' or a file) with the count of non-finite elements otherwise.
    Accepts Python numbers, numpy arrays and torch tensors."""
    arr = _as_numpy(value)
    bad = ~np.isfinite(arr)
    if bad.any():
        n = int(bad.sum())
        total = arr.size
        at = f" at {where}" if where else ""
        raise NonFiniteError(f"{name} is not finite{at} ({n} of {total} values NaN or infinite)")
    return value


def is_finite(value: Any) -> bool:
    """True when every element of ``value`` is finite."""
    return bool(np.isfinite(_as_numpy(value)).all())


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().float().cpu().numpy()
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return np.asarray([np.nan])


def nonfinite_summary(array: np.ndarray, spacing: Sequence[float] | None = None) -> str:
    """One line: the count of non-finite voxels and their bounding box in index (i, j, k) order,
    e.g. '1000 non-finite voxels (NaN 1000, inf 0) in index box [10:20, 5:15, 0:10]'."""
    a = np.asarray(array)
    bad = ~np.isfinite(a)
    n = int(bad.sum())
    if n == 0:
        return "0 non-finite voxels"
    idx = np.nonzero(bad)
    box = ", ".join(f"{int(i.min())}:{int(i.max()) + 1}" for i in idx)
    n_nan = int(np.isnan(a).sum())
    return f"{n} non-finite voxels (NaN {n_nan}, inf {n - n_nan}) in array index box [{box}]"


def finite_or_none(obj: Any) -> Any:
    """A copy of a JSON-able structure with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj
