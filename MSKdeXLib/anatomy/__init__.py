"""Anatomy from CT: which label is which structure, CT number -> density, and the CT-derived truth.

* :mod:`.structures` - structure tables (TotalSegmentator v1/v2, the 22-class hip/thigh set, custom CSV/JSON);
* :mod:`.density`    - HU -> g/cm^3 and the lean-muscle HU window;
* :mod:`.ct_metrics` - per-structure volume (cm^3) and (lean) mass (g) from CT + labels;
* :mod:`.quantities` - the quantity names (``mass_g``, ``volume_cm3``) and the renderer's channel kinds.

Add a structure table in :mod:`.structures` (``BUILTIN_TABLES``); everything else reads it from there.
"""

__all__ = ["structures", "density", "ct_metrics", "quantities"]
