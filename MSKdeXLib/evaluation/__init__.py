"""Evaluating estimates against CT-derived truth.

* :mod:`.agreement`         - per structure and quantity: PCC, ICC(2,1), MAE, MAPE, Bland-Altman, coverage;
* :mod:`.channel_agreement` - how well predicted channel *images* place each structure (pixel r);
* :mod:`.specificity`       - share, left-right asymmetry and partial PCCs (beyond one number per subject);
* :mod:`.baselines`         - constant, global-scalar oracle, ridge on the radiograph, template decomposition;
* :mod:`.comparison`        - a method beside the baselines on one test split, in one table;
* :mod:`.information`       - how much per-muscle information an image carries (linear-Gaussian bound);
* :mod:`.statistics`        - Pearson r and ICC(2,1).

Registration accuracy (mTRE) lives with the registration (:mod:`MSKdeXLib.registration`).
"""

__all__ = ["agreement", "baselines", "channel_agreement", "comparison", "information", "specificity", "statistics"]
