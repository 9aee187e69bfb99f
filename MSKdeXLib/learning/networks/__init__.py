"""Decomposition networks and their losses (radiograph -> per-structure channels)."""

from .discriminator import MultiScaleDiscriminator, PatchDiscriminator  # noqa: F401
from .generator import DecompositionGenerator, build_generator  # noqa: F401
