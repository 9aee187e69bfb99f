"""The quantities MSKdeX measures per structure, named once.

A structure's *mass* (g; lean mass for muscles) and *volume* (cm^3). The renderer draws one
channel per structure and kind (``"mass"``: g per pixel, ``"volume"``: cm^3 per pixel); every
table, data set, estimate and evaluation names the quantity with its unit (``mass_g``,
``volume_cm3``).
"""

from __future__ import annotations

#: renderer channel kind -> quantity name with its unit (the name every output uses)
QUANTITY_NAMES: dict[str, str] = {"mass": "mass_g", "volume": "volume_cm3"}
#: the renderer's channel kinds, in order
CHANNEL_KINDS: tuple[str, ...] = tuple(QUANTITY_NAMES)
#: quantity names with units, in order (columns of metrics, data sets, estimates, evaluations)
QUANTITIES: tuple[str, ...] = tuple(QUANTITY_NAMES.values())
#: quantity name -> renderer channel kind
CHANNEL_OF: dict[str, str] = {v: k for k, v in QUANTITY_NAMES.items()}
