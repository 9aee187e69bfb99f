"""Reading the project's JSON documents (configs, sidecars, registration, estimates ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError


def read_json(path: str | Path, what: str, require_object: bool = True) -> Any:
    """The parsed JSON of ``path``; a one-line UserError naming the file when it is missing,
    unreadable, not JSON, or (with ``require_object``) not a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found", p)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{what} is not valid JSON ({getattr(exc, 'msg', exc)})", p) from None
    if require_object and not isinstance(doc, dict):
        raise UserError(f"{what} is not a JSON object", p)
    return doc
