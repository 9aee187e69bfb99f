"""The ``mskdex`` command line: one module per subcommand, each with ``add_parser(sub)``.

Every subcommand's ``run(args)`` returns an exit code. A :class:`UserError` anywhere becomes
one line on stderr and exit code 2, never a traceback. Heavy libraries (torch) are imported
inside ``run`` so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .. import __version__
from ..errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from ..jobs import accept_cancel
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
    "followup": "followup_cmd",
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
    """Run one subcommand; returns its exit code (see :mod:`MSKdeXLib.errors`: 0 done, 2 user error,
    3 register finished but doubtful, 130 interrupted, 141 stdout closed early)."""
    accept_cancel()
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command line as given, for a command that must start again (demo: reproducibility.reexec_pinned);
    # None when main() was called from Python with an explicit argv
    args.command_line = list(sys.argv[1:]) if argv is None else None
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        check_options(args)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except UserError as exc:
        print(f"mskdex {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"mskdex {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`mskdex metrics ... | head`): stop quietly, as Unix tools do
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = exc.filename or ""
        print(f"mskdex {args.command}: error: {where}{': ' if where else ''}cannot write ({exc.strerror})",
              file=sys.stderr)
        return EXIT_USER_ERROR


#: OSErrors a user's environment causes (permissions, read-only or full file systems): one line, exit 2
_ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
