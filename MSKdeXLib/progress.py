"""Progress of a long job on stderr: a tqdm bar for people, one JSON object per line for GUIs.

The JSON lines are the protocol between a ``mskdex`` subprocess and the Slicer module
(:mod:`MSKdeXLib.jobs` reads them): ``{"event": "progress" | "log" | "done", "stage": ...,
"elapsed_s": ..., ...}``.
"""

from __future__ import annotations

import json
import sys
import time

from .validation import finite_or_none

#: the accepted ``mode`` values (the command line's ``--progress`` choices)
MODES = ("bar", "json", "none")


class Progress:
    """Progress reporting on stderr: a tqdm bar, JSON lines, or nothing."""

    def __init__(self, mode: str = "bar", total: int | None = None, desc: str = ""):
        self.mode, self.total, self.desc, self.n, self.t0 = mode, total, desc, 0, time.time()
        self._bar = None
        if mode == "bar":
            # lazy: Slicer's Python has no tqdm, and the Slicer module runs mskdex with --progress json
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()})
        elif self.mode == "json":
            self.event("progress", step=self.n, total=self.total, **info)

    def set_total(self, total: int | None) -> None:
        """The number of steps, when it is known only once the work has begun."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def event(self, kind: str, **info) -> None:
        if self.mode == "json":
            rec = {"event": kind, "stage": self.desc, "elapsed_s": round(time.time() - self.t0, 3), **info}
            text = json.dumps(finite_or_none(rec), default=lambda o: finite_or_none(float(o)))  # strict: NaN -> null
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
