"""Choosing the torch device from a user's name for it ("auto", "cpu", "cuda", "cuda:1" ...)."""

from __future__ import annotations

from .errors import UserError


def resolve_device(name: str = "auto"):
    """A ``torch.device``: "auto" -> CUDA when available, else CPU; UserError for an unknown or
    unavailable device."""
    import torch  # lazy: the command line's parser and the Slicer module import this package without torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    return dev
