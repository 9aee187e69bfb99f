"""User-facing errors: one line, naming the file and the problem.

Every error a user can cause (missing file, wrong format, mismatched grids, empty label,
unknown structure ...) is raised as :class:`UserError`. The command line prints its message
on one line and exits with code 2; the Slicer module shows it in a message box.
"""

from __future__ import annotations

from pathlib import Path

#: exit codes of the ``mskdex`` command line (docs/cli.md)
EXIT_OK = 0
EXIT_INTERNAL = 1       # a bug: a traceback is printed (please report it)
EXIT_USER_ERROR = 2     # bad input, bad option, unwritable output, diverged computation: one line on stderr
EXIT_DOUBTFUL = 3       # register: finished, outputs written, but a registration is doubtful
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT (128 + 2): partial outputs removed
EXIT_BROKEN_PIPE = 141  # stdout closed early (`mskdex metrics ... | head`; 128 + SIGPIPE), quietly


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None):
        text = " ".join(str(message).split())  # always one line
        if path is not None:
            text = f"{path}: {text}"
        super().__init__(text)
        self.path = None if path is None else str(path)


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise UserError when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found", p)
    return p


def listing(items, limit: int = 5) -> str:
    """Comma-separated ``items``, the first ``limit`` of them then 'and N more' (never a silent cut)."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" and {len(items) - limit} more"
