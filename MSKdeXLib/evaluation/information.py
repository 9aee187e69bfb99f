"""How much per-muscle information a radiograph carries: a linear-Gaussian (Bayesian Cramer-Rao) bound.

Around one subject, the image ``y`` (N pixels, detector codes) is linearised in the parameters
``theta`` (P: muscle masses in g, nuisance such as pose, size, kVp, processing):
``y = y0 + J^T (theta - theta0) + e``, with ``e`` Gaussian of covariance
``S = diag(noise_var) + D^T D`` (pixel noise plus any empirical nuisance given as samples ``D``, e.g.
image changes from other elastic deformations) and ``theta`` a priori independent with variances
``prior_var``. The posterior covariance is then ``C = (J S^-1 J^T + diag(1/prior_var))^-1`` whatever
the data, and the best estimate of a linear contrast ``q = c^T theta`` (a muscle's mass, or the
linearised asymmetry index of a pair) correlates with the truth at

    PCC_max = sqrt(1 - c^T C c / c^T diag(prior_var) c)

over subjects drawn from the prior. It is an *upper bound* for any estimator at that operating
point: it ignores the nonlinearity of the image in the parameters (an estimator must also learn
it, from finite data) and any nuisance that was not listed. A bound near 1 says the information is
in the image; a bound well below 1 says no method can reach a higher PCC at that resolution.
"""

from __future__ import annotations

import numpy as np

__all__ = ["posterior_covariance", "attainable_pcc", "asymmetry_gradient"]


def posterior_covariance(jacobian: np.ndarray, noise_var: np.ndarray, prior_var: np.ndarray,
                         nuisance_samples: np.ndarray | None = None) -> np.ndarray:
    """Posterior covariance (P, P) of the linear-Gaussian model.

    ``jacobian`` (P, N): image change per unit of each parameter; ``noise_var`` (N,): pixel noise
    variance (> 0); ``prior_var`` (P,): prior variance of each parameter (> 0, same units squared);
    ``nuisance_samples`` (K, N): image changes caused by an unlisted nuisance, used as an empirical
    covariance (centred, divided by K - 1) added to the noise (needs K >= 2).
    """
    J = np.asarray(jacobian, np.float64)
    var = np.asarray(noise_var, np.float64).ravel()
    prior = np.asarray(prior_var, np.float64).ravel()
    if J.ndim != 2 or J.shape != (prior.size, var.size):
        raise ValueError(f"jacobian must be (P, N) = ({prior.size}, {var.size}), got {J.shape}")
    if np.any(var <= 0) or np.any(prior <= 0):
        raise ValueError("noise and prior variances must be > 0")
    weighted = J / var                                        # J S^-1 for S = diag(var)
    if nuisance_samples is not None:
        D = np.asarray(nuisance_samples, np.float64)
        if D.ndim != 2 or D.shape[1] != var.size or len(D) < 2:
            raise ValueError(f"nuisance_samples must be (K >= 2, {var.size}), got {D.shape}")
        D = (D - D.mean(axis=0)) / np.sqrt(len(D) - 1)
        DiS = D / var                                         # D S0^-1
        inner = np.eye(len(D)) + DiS @ D.T                    # Woodbury: (S0 + D^T D)^-1
        weighted = weighted - np.linalg.solve(inner, DiS @ J.T).T @ DiS
    fisher = weighted @ J.T + np.diag(1.0 / prior)
    return np.linalg.inv(fisher)


def attainable_pcc(jacobian: np.ndarray, noise_var: np.ndarray, prior_var: np.ndarray,
                   contrasts: np.ndarray, nuisance_samples: np.ndarray | None = None) -> np.ndarray:
    """Upper bound on the PCC (over subjects from the prior) of each contrast's best estimate.

    ``contrasts`` (Q, P): rows ``c`` of the quantities ``c^T theta``. Returns (Q,) values in [0, 1].
    """
    cov = posterior_covariance(jacobian, noise_var, prior_var, nuisance_samples)
    c = np.atleast_2d(np.asarray(contrasts, np.float64))
    prior = np.asarray(prior_var, np.float64).ravel()
    post = np.einsum("qp,pr,qr->q", c, cov, c)
    before = (c * c) @ prior
    return np.sqrt(np.clip(1.0 - post / before, 0.0, 1.0))


def asymmetry_gradient(left: float, right: float) -> tuple[float, float]:
    """Derivatives of the asymmetry index ``(L - R) / (L + R)`` with respect to ``L`` and ``R``."""
    s = float(left) + float(right)
    return 2.0 * float(right) / s ** 2, -2.0 * float(left) / s ** 2
