"""The ``mskdex`` command line: one module per subcommand, each with ``add_parser(sub)``.

Every subcommand's ``run(args)`` returns an exit code. A :class:`UserError` anywhere becomes
one line on stderr and exit code 2, never a traceback. Heavy libraries (torch) are imported
inside ``run`` so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import UserError
from ..validation import finite_float
from .common import fill_settings_help
from .option_checks import check_options

#: subcommand name -> module (relative to this package) defining add_parser(subparsers)
SUBCOMMANDS = {
    "metrics": "metrics_cmd",
    "drr": "drr_cmd",
    "simulate-xray": "simulate_cmd",
    "register": "register_cmd",
    "cohort": "cohort_cmd",
    "build-dataset": "dataset_cmd",
    "train": "train_cmd",
    "predict": "predict_cmd",
    "evaluate": "evaluate_cmd",
    "demo": "demo_cmd",
}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # every ``type=float`` option (in groups too: they share this registry) refuses NaN/inf
        self.register("type", float, finite_float())

    def format_help(self) -> str:
        fill_settings_help(self)  # defaults of settings in heavy modules: read only when help is shown
        return super().format_help()

    def error(self, message: str):  # one line, exit code 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mskdex", description="MSKdeX: per-muscle lean mass and volume from a "
                     "plain hip radiograph, by decomposing it into per-structure projections.")
    parser.add_argument("--version", action="version", version=f"mskdex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(module):
                continue  # subcommand not implemented in this build
            raise
        mod.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_options(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"mskdex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mskdex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
