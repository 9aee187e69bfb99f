"""Range checks of the command line's numeric options, by option name, for every subcommand.

argparse already refuses NaN/inf for every ``type=float`` option (the parser registers
:func:`~MSKdeXLib.validation.finite_float` for ``float``); :func:`check_options` then checks each
parsed value against :data:`OPTION_RULES`, so a wrong value stops before any work with one line
naming the option (``--sid must be > 0, got -5.0``, exit 2). Settings objects check the same
fields again for callers that do not come through the command line.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from ..errors import UserError
from ..validation import check_number, check_window

# dest -> bounds for check_number (every element of a list option is checked)
_POSITIVE = {"low": 0.0, "low_open": True}
_NON_NEGATIVE = {"low": 0.0}
_FRACTION = {"low": 0.0, "high": 1.0, "high_open": True}
_AT_LEAST_1 = {"low": 1, "integer": True}
_COUNT = {"low": 0, "integer": True}

OPTION_RULES: dict[str, dict[str, Any]] = {
    # geometry (mm)
    "sid": _POSITIVE, "sod": _POSITIVE, "spacing": _POSITIVE, "pixel_spacing": _POSITIVE, "step": _POSITIVE,
    "voxel_mm": _POSITIVE, "mu_water": _POSITIVE,
    "rows": {"low": 2, "integer": True}, "cols": {"low": 2, "integer": True},
    "detector": {"low": 2, "integer": True}, "image_size": {"low": 8, "integer": True},
    "fine_px": {"low": 8, "integer": True},
    # density
    "density_slope": _POSITIVE, "density_intercept": {},
    # radiograph simulation
    "kvp": {"low": 20.0, "high": 200.0}, "filtration": _NON_NEGATIVE, "focal_spot": _NON_NEGATIVE,
    "scatter_fraction": _FRACTION, "scatter_sigma": _POSITIVE, "photons": _POSITIVE,
    "noise_level": _NON_NEGATIVE, "electronic_noise": _NON_NEGATIVE, "bits": {"low": 8, "high": 16, "integer": True},
    "gamma": _POSITIVE,
    # cohort
    # (the body-composition fractions and --body-change are checked by cohort_cmd.ranges_from_args)
    "n": _AT_LEAST_1, "start": _COUNT, "workers": _AT_LEAST_1,
    # data set, training, inference, registration, demo
    "val_fraction": _FRACTION, "test_fraction": _FRACTION, "steps": _AT_LEAST_1, "tta": _COUNT,
    "seed": _COUNT, "max_evals": _COUNT, "refine_steps": _COUNT,
    "subjects": _AT_LEAST_1, "heldout": _AT_LEAST_1, "calibration_subjects": _AT_LEAST_1,
}

#: options that are (low, high) pairs: low < high
WINDOW_OPTIONS = ("lean_window", "window")


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_options(args: Namespace) -> None:
    """UserError naming the first option whose value is out of range (see :data:`OPTION_RULES`)."""
    for dest, bounds in OPTION_RULES.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            check_number(option_name(dest), v, **bounds)
    for dest in WINDOW_OPTIONS:
        value = getattr(args, dest, None)
        if value is not None:
            check_window(option_name(dest), value)
    val, test = getattr(args, "val_fraction", None), getattr(args, "test_fraction", None)
    if val is not None and test is not None and val + test >= 1.0:
        raise UserError(f"--val-fraction + --test-fraction must be < 1, got {val:g} + {test:g}")
