"""Evaluating estimates against CT-derived truth.

* :mod:`.agreement`         - per structure and quantity: PCC, ICC(2,1), MAE, MAPE, Bland-Altman, coverage;
* :mod:`.channel_agreement` - how well predicted channel *images* place each structure (pixel r).

Registration accuracy (mTRE) lives with the registration (:mod:`MSKdeXLib.registration`).
"""

__all__ = ["agreement", "channel_agreement"]
