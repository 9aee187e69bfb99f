"""Options and helpers shared by several subcommands (so each is spelled one way).

Defaults and choice lists are never written here: they are read from the settings objects
(:mod:`MSKdeXLib.settings` lists where each lives). Settings that live in modules too heavy to import
while the parser is built (torch, scipy: ``mskdex --help`` must stay instant) are attached with
:func:`settings_options` (default None, the command builds the settings object from the options
given, and the help text shows the object's default when help is printed) or :class:`LazyChoices`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from ..anatomy.density import DensityModel
from ..anatomy.structures import BUILTIN_TABLES, KINDS
from ..devices import resolve_device  # noqa: F401  (the commands import it from here)
from ..errors import UserError
from ..progress import MODES as PROGRESS_MODES
from ..progress import Progress  # noqa: F401  (the commands import it from here)
from ..settings import SID_MM

_DENSITY = DensityModel()


def _load(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imports the module)."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


class LazyChoices(Sequence):
    """A choice list read from ``"module:ATTRIBUTE"`` the first time argparse needs it (to check a
    value or print help), so that building the parser imports no heavy module. Give the option a
    ``metavar`` (argparse would otherwise list the choices while the parser is built) and put
    ``%(choices)s`` in its help."""

    def __init__(self, path: str):
        self.path, self._items = path, None

    def _list(self) -> tuple:
        if self._items is None:
            self._items = tuple(_load(self.path))
        return self._items

    def __getitem__(self, i):
        return self._list()[i]

    def __len__(self) -> int:
        return len(self._list())

    def __contains__(self, value) -> bool:
        return value in self._list()

    def __iter__(self):
        return iter(self._list())

    def __repr__(self) -> str:
        return repr(self._list())


def format_default(value: Any) -> str:
    """A default as the help text shows it: 256 256, 0.1, mass_g,volume_cm3."""
    if isinstance(value, (list, tuple)):
        return (" " if all(isinstance(v, (int, float)) for v in value) else ",").join(format_default(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_options(p: argparse.ArgumentParser, settings: str, fields: dict[str, str],
                     variants: dict[str, str] | None = None) -> None:
    """Mark options ``{dest: field}`` of ``p`` as taking their default from the dataclass
    ``settings`` ("module:Class"): argparse's default stays None (see :func:`settings_values`), and
    "(default X)" with the dataclass's value is appended to their help when help is printed;
    ``variants`` {flag: classmethod} adds "; FLAG Y" with the value of ``Class.classmethod()``."""
    p.set_defaults(**{dest: None for dest in fields})
    getattr(p, "_settings_options", None) or setattr(p, "_settings_options", [])
    p._settings_options.append((settings, dict(fields), dict(variants or {})))  # type: ignore[attr-defined]


def field_default(cls, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (its default or default_factory's value)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def settings_defaults(p: argparse.ArgumentParser) -> dict[str, Any]:
    """{dest: the settings object's default} of the options attached with :func:`settings_options`."""
    out = {}
    for path, fields, _ in getattr(p, "_settings_options", []):
        cls = _load(path)
        out.update({dest: field_default(cls, f) for dest, f in fields.items()})
    return out


def _default_texts(p: argparse.ArgumentParser) -> dict[str, str]:
    """{dest: "default X; --quick Y"} of the options attached with :func:`settings_options`."""
    out = {}
    for path, fields, variants in getattr(p, "_settings_options", []):
        cls = _load(path)
        made = {flag: getattr(cls, name)() for flag, name in variants.items()}
        for dest, f in fields.items():
            out[dest] = "; ".join([f"default {format_default(field_default(cls, f))}"]
                                  + [f"{flag} {format_default(getattr(v, f))}" for flag, v in made.items()])
    return out


def fill_settings_help(p: argparse.ArgumentParser) -> None:
    """Append "(default X)" to the help of the options attached with :func:`settings_options` (once)."""
    if getattr(p, "_settings_help_filled", False):
        return
    texts = _default_texts(p)
    for action in p._actions:
        if action.dest in texts and action.help and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help} ({texts[action.dest]})"
    p._settings_help_filled = True  # type: ignore[attr-defined]


def settings_values(args, fields: dict[str, str]) -> dict[str, Any]:
    """{field: value} of the options ``{dest: field}`` the user gave (None: the settings' default)."""
    return {f: getattr(args, dest) for dest, f in fields.items() if getattr(args, dest, None) is not None}


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and says, once on stderr,
    that the old flag goes away in the next release."""

    def __init__(self, option_strings, dest, new_flag: str = "", **kw):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_pixel_spacing(p, default: float | None, help: str, old_alias: bool = True) -> None:
    """``--pixel-spacing MM [MM]`` (one value, or row col), the one spelling of the detector pixel
    spacing in every command; with ``old_alias``, the command's former ``--spacing`` still works for
    one release (deprecated alias, not shown in the help)."""
    p.add_argument("--pixel-spacing", type=float, nargs="+", metavar="MM",
                   default=None if default is None else [default],
                   help=f"{help} (one value, or ROW COL)" + ("" if default is None else f" (default {default:g})"))
    if old_alias:
        p.add_argument("--spacing", type=float, nargs="+", dest="pixel_spacing", action=DeprecatedAlias,
                       new_flag="--pixel-spacing", help=argparse.SUPPRESS)


def spacing_rc(values: Sequence[float] | None) -> tuple[float, float] | None:
    """--pixel-spacing's values as (row, col) mm; None stays None."""
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise UserError(f"--pixel-spacing takes one value or two (row col), got {len(values)}")
    return (float(values[0]), float(values[-1]))


def add_sid(p, help: str = "source-to-image distance, mm") -> None:
    p.add_argument("--sid", type=float, default=SID_MM, metavar="MM", help=f"{help} (default {SID_MM:g})")


def add_ct_args(p: argparse.ArgumentParser, labels_required: bool = True) -> None:
    g = p.add_argument_group("CT and labels")
    g.add_argument("--ct", required=True, help="CT volume (NIfTI, NRRD, MHA/MHD or DICOM folder), HU")
    g.add_argument("--labels", required=labels_required,
                   help="label map (same formats) or Slicer .seg.nrrd segmentation")
    g.add_argument("--table", default=None,
                   help=f"structure table: {', '.join(BUILTIN_TABLES)} or a CSV/JSON file (default: auto-detect)")
    g.add_argument("--resample-labels", action="store_true",
                   help="resample a label map on another grid onto the CT grid (nearest neighbour)")
    g.add_argument("--nonfinite", choices=("refuse", "mask"), default="refuse",
                   help="NaN/inf voxels in the CT: refuse the CT (default), or mask them as air "
                        "(-1000 HU; their count is recorded in the outputs)")


def add_kind(p, help: str = "only structures of this kind (repeatable)") -> None:
    p.add_argument("--kind", action="append", choices=KINDS, help=help)


def add_structure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structure selection")
    g.add_argument("--structures", default=None,
                   help="comma-separated structure names (any spelling: 'gluteus medius left')")
    add_kind(g)


def add_density_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("density (recorded in outputs)")
    lo, hi = _DENSITY.lean_window_hu
    g.add_argument("--lean-window", nargs=2, type=float, metavar=("LOW_HU", "HIGH_HU"),
                   default=_DENSITY.lean_window_hu, help=f"HU window of lean muscle (default: {lo:g} {hi:g})")
    g.add_argument("--density-intercept", type=float, default=_DENSITY.intercept_g_cm3,
                   help=f"rho = max(0, intercept + slope*HU) g/cm^3; intercept (default {_DENSITY.intercept_g_cm3:g})")
    g.add_argument("--density-slope", type=float, default=_DENSITY.slope_g_cm3_per_hu,
                   help=f"slope in g/cm^3 per HU (default {_DENSITY.slope_g_cm3_per_hu:g})")


def density_from_args(args) -> DensityModel:
    return DensityModel(args.density_intercept, args.density_slope, _DENSITY.min_density_g_cm3,
                        tuple(args.lean_window))


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:1 ...")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                   help="progress on stderr: a bar, one JSON object per line (for GUIs), or none")


def split_names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def load_case(args):
    """(ct, labels) from the shared CT options."""
    from ..io.volumes import load_ct, load_labels  # lazy: SimpleITK; keeps `mskdex --help` instant

    ct = load_ct(args.ct, getattr(args, "nonfinite", "refuse"))
    labels = None
    if getattr(args, "labels", None):
        labels = load_labels(args.labels, ct, args.table, args.resample_labels)
    return ct, labels
