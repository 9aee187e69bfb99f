"""A model-based follow-up reader: the follow-up radiograph *fitted* with the baseline CT's physics
(issue 14, analysis by synthesis), an alternative to the learned ridge reader of
:mod:`MSKdeXLib.learning.followup`.

The follow-up's detector codes are modelled as the library's own chain
(:func:`~MSKdeXLib.projection.simulate.radiograph_from_paths`, then
:func:`~MSKdeXLib.learning.cohort.vendor_processing`) applied to the baseline's line integrals
(water- and bone-like paths, g/cm^2, detector pixels) changed by

* each muscle's relative lean-mass change ``r_k`` (dimensionless): water path ``+ r_k c_k M_k``, with
  ``M_k`` the muscle's lean-mass channel (g/pixel) and ``c_k`` its lean -> water coefficient
  (:func:`effective_coefficients`: the preset's mix of atrophy and fat infiltration);
* a smooth soft-tissue deformation: ``sum_j z_j (D^W_j, D^B_j)`` with deformation modes
  (:func:`deformation_modes`: the paths' first-order response to each control-point displacement of
  :func:`~MSKdeXLib.learning.cohort.elastic_deform`'s field, 1 mm, reduced by an SVD), ``z_j ~ N(0, 1)``
  for a field of SD ``elastic_mm``.

The acquisition (:class:`~MSKdeXLib.learning.cohort.SubjectSpec`'s acquisition and processing) is given.
The fit is a MAP estimate (Gaussian priors on ``r`` and ``z``, Gaussian pixel residuals on a grid
pooled by ``pool`` px) by Gauss-Newton with finite-difference Jacobians of the noise-free chain
(computed at 16 bits so that its rounding does not swamp the differences). Units: lean mass g; paths
g/cm^2; codes the radiograph's (12 bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy import ndimage

from ..io.images import Volume
from ..projection.geometry import Camera
from .cohort import CohortRanges, SubjectSpec, _zyx, acquisition_settings, sample_subject, vendor_processing
from .resimulation import SubjectPhysics

#: internal bit depth of the model's codes (the chain rounds; 16 bits keeps finite differences clean)
MODEL_BITS = 16
#: the largest code of the radiograph the chain models (12 bit); the model's codes are put on this scale
MAX_CODE = 4095.0

#: The fit's 90 % interval rule: half-width = ``INTERVAL_SCALE`` x the linearised posterior SD of each
#: muscle's relative change (:attr:`FitResult.sd_change`; pixel noise only, so far too narrow alone).
#: Provenance (session 12, validation only): the split-conformal 90 % quantile (rank ceil(0.9 (n + 1)) of n)
#: of |estimate - truth| / posterior SD over the stored validation rows of
#: ``benchmarks/data/followup_fit_validation_acquisition_3004{0,1,2}.json`` (reader: acquisition fitted,
#: 150 modes, SD 1 mm, pool 2 px): 3 subjects x 8 follow-ups x 3 deformation conditions (0 / 0.5 / 1 mm)
#: x 10 muscles = 720 values, 24 independent follow-ups (the conditions share each follow-up's muscle
#: change and acquisition). It covers 95 / 92 / 83 % at 0 / 0.5 / 1 mm (in sample); leaving one subject out,
#: 92-98 / 89-96 / 79-86 %.
INTERVAL_SCALE = 7.94


def control_grid(shape: tuple[int, int, int], spacing_ijk, control_mm: float) -> list[int]:
    """Control points per array axis of :func:`~MSKdeXLib.learning.cohort.elastic_deform`'s field."""
    extent = np.array(shape) * np.array(_zyx(spacing_ijk))
    return [max(3, int(np.ceil(e / control_mm)) + 1) for e in extent]


def control_basis(shape: tuple[int, int, int], ctrl: list[int], index: tuple[int, int, int]) -> np.ndarray:
    """The displacement (array shape, per unit control displacement) that one control point spreads over
    the volume, interpolated as :func:`~MSKdeXLib.learning.cohort.elastic_deform` does (cubic zoom)."""
    coarse = np.zeros(ctrl, np.float32)
    coarse[index] = 1.0
    fine = ndimage.zoom(coarse, [s / c for s, c in zip(shape, ctrl)], order=3, mode="nearest", grid_mode=True)
    return fine[:shape[0], :shape[1], :shape[2]]


def deformation_jacobian(ct: Volume, camera: Camera, pose: np.ndarray, spec: SubjectSpec,
                         control_mm: float = 80.0, progress=None) -> np.ndarray:
    """First-order change of the (water, bone) paths (g/cm^2 per mm; (dof, 2, rows, cols) float32) per
    1 mm displacement of each control point along each array axis: the CT's HU moved by
    ``u . grad(HU)`` and re-rendered by :func:`~MSKdeXLib.projection.simulate.material_paths`."""
    from ..projection.simulate import material_paths

    settings = acquisition_settings(spec, camera)
    hu = np.asarray(ct.array, np.float32)
    zyx = np.array(_zyx(ct.spacing))
    grads = np.gradient(hu)
    base = material_paths(ct, camera, pose, settings)
    w0, b0 = base["water"].numpy(), base["bone"].numpy()
    ctrl = control_grid(hu.shape, ct.spacing, control_mm)
    out = np.empty((3 * int(np.prod(ctrl)), 2, camera.rows, camera.cols), np.float32)
    k = 0
    for n, index in enumerate(np.ndindex(*ctrl)):
        b = control_basis(hu.shape, ctrl, index)
        for axis in range(3):
            moved = hu + b * grads[axis] / np.float32(zyx[axis])
            p = material_paths(ct.with_array(moved), camera, pose, settings)
            out[k, 0], out[k, 1] = p["water"].numpy() - w0, p["bone"].numpy() - b0
            k += 1
        if progress is not None:
            progress(n + 1, int(np.prod(ctrl)))
    return out


#: width (mm) of :func:`fat_bands`' bands
FAT_BAND_MM = 1.5


def fat_edges(fat_mm: float, band_mm: float = FAT_BAND_MM) -> tuple[float, ...]:
    """Outer edges (mm from the skin) of the bands that cover a thickness change up to ``fat_mm``."""
    return tuple(band_mm * k for k in range(1, int(np.ceil(float(fat_mm) / band_mm - 1e-9)) + 1))


#: the bands of the specificity preset's fat change, U(-9, 9) mm
FAT_EDGES_MM = fat_edges(9.0)


class _Exact:
    """A stand-in generator whose ``normal`` draws its mean: the cohort's fat change without its HU noise."""

    def normal(self, loc, scale, size):
        return np.full(size, loc, np.float64)


def fat_bands(ct: Volume, labels, camera: Camera, pose: np.ndarray, spec: SubjectSpec,
              edges_mm: tuple[float, ...] = FAT_EDGES_MM) -> np.ndarray:
    """The (water, bone) paths' change (g/cm^2; (2 B, 2, rows, cols) float64, B = ``len(edges_mm)``) of the
    subcutaneous fat made thicker (first B: air at the skin becomes fat) or thinner (last B: fat at the skin
    becomes air) within each band between consecutive ``edges_mm`` (0 first) from the skin, as the cohort
    changes it (:func:`~MSKdeXLib.learning.cohort.subcutaneous_fat`: in-plane, voxel-discrete, labelled
    voxels untouched): band k is the change by ``edges_mm[k]`` less that by ``edges_mm[k - 1]``, each
    rendered by :func:`~MSKdeXLib.projection.simulate.material_paths` (``spec``'s acquisition, ``pose``).
    A thickness change of x mm is the sum of the bands below x (the last one partly filled); a thinning's
    bands enter with a negative coefficient (-1: the band emptied)."""
    from ..projection.simulate import material_paths
    from .cohort import subcutaneous_fat

    settings = acquisition_settings(spec, camera)
    hu0 = np.asarray(ct.array, np.float32)
    lab = labels.label_array().astype(np.int32) if hasattr(labels, "label_array") else np.asarray(labels, np.int32)

    def paths(change_mm: float) -> np.ndarray:
        hu = hu0.copy()
        subcutaneous_fat(hu, lab, change_mm, ct.spacing, _Exact())   # new fat at its HU, no noise
        p = material_paths(ct.with_array(hu), camera, pose, settings)
        return np.stack([p["water"].numpy(), p["bone"].numpy()]).astype(np.float64)

    out = []
    for sign in (1.0, -1.0):
        previous = paths(0.0)
        for mm in edges_mm:
            now = paths(sign * float(mm))
            out.append(sign * (now - previous))   # thinning: the paths lost per unit of (negative) coefficient
            previous = now
    return np.stack(out)


def fat_band_sd(edges_mm: tuple[float, ...], fat_mm: float) -> np.ndarray:
    """Prior SD of :func:`fat_bands`' coefficients (thicker bands, then thinner) for a thickness change
    U(-``fat_mm``, ``fat_mm``): the RMS of a band's filled fraction, sqrt(((b - a) / 3 + max(F - b, 0)) / 2F)
    for a band (a, b] below F (a floor of 0.05 above)."""
    f = float(fat_mm)
    lo = np.r_[0.0, np.asarray(edges_mm, np.float64)[:-1]]
    hi = np.asarray(edges_mm, np.float64)
    top = np.minimum(hi, f)
    width = np.maximum(top - lo, 0.0)
    ms = (width ** 3 / np.maximum(hi - lo, 1e-9) ** 2 / 3.0 + np.maximum(f - hi, 0.0)) / (2.0 * f)
    sd = np.maximum(np.sqrt(ms), 0.05)
    return np.r_[sd, sd]


def fat_band_names(edges_mm: tuple[float, ...] = FAT_EDGES_MM) -> tuple[str, ...]:
    """Names of :func:`fat_bands`' coefficients, in its order (thicker bands, then thinner; mm from the skin)."""
    lo = (0.0, *edges_mm[:-1])
    return tuple(f"fat {kind} {a:g}-{b:g} mm" for kind in ("thicker", "thinner") for a, b in zip(lo, edges_mm))


def with_fat_bands(model: "FitModel", ct: Volume, labels, camera: Camera, pose: np.ndarray, spec: SubjectSpec,
                   fat_mm: float) -> "FitModel":
    """``model`` with :func:`fat_bands` at ``pose`` as nuisances, for a thickness change U(-``fat_mm``,
    ``fat_mm``) mm (bands of :func:`fat_edges`, prior :func:`fat_band_sd`, names :func:`fat_band_names`)."""
    edges = fat_edges(float(fat_mm))
    return model.with_nuisance(fat_bands(ct, labels, camera, pose, spec, edges), fat_band_sd(edges, float(fat_mm)),
                               fat_band_names(edges))


def deformation_modes(jacobian: np.ndarray, keep: float = 0.995, max_modes: int = 200,
                      bone_weight: float = 2.0) -> np.ndarray:
    """Modes (J, 2, rows, cols; g/cm^2 per unit z) of a field with iid N(0, 1 mm) control displacements:
    the leading left singular vectors x singular values of the Jacobian (bone rows weighted by
    ``bone_weight`` for the ranking only), as many as hold ``keep`` of its variance (at most ``max_modes``)."""
    n = len(jacobian)
    flat = jacobian.reshape(n, -1).astype(np.float64)
    half = flat.shape[1] // 2
    flat[:, half:] *= bone_weight
    gram = flat @ flat.T
    val, vec = np.linalg.eigh(gram)
    val, vec = val[::-1].clip(0.0), vec[:, ::-1]
    share = np.cumsum(val) / max(val.sum(), 1e-30)
    j = int(min(max_modes, np.searchsorted(share, keep) + 1))
    modes = vec[:, :j].T @ jacobian.reshape(n, -1).astype(np.float64)  # = U_j S_j (unweighted rows)
    return modes.reshape(j, *jacobian.shape[1:])


def effective_coefficients(physics: SubjectPhysics, ranges: CohortRanges, draws: int = 4000, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per muscle (``physics.muscles`` order): the lean -> water coefficient ``c_k`` that maps a relative
    lean-mass change to the water-path change ``r c_k M_k`` (least squares over the preset's mix of
    atrophy / growth and fat infiltration), and the preset's prior mean and SD of ``r``."""
    names = physics.muscles
    r = np.empty((draws, len(names)))
    s = np.empty_like(r)
    for d in range(draws):
        spec = sample_subject(seed, d, names, ranges)
        for k, n in enumerate(names):
            a, i = spec.muscle_changes.get(n, 0.0), spec.infiltration.get(n, 0.0)
            r[d, k] = (1.0 + a) * (1.0 - i) - 1.0
            s[d, k] = a * physics.atrophy_coefficient[n] - (1.0 + a) * i * physics.infiltration_coefficient[n]
    rc, sc = r - r.mean(0), s - s.mean(0)
    coef = (rc * sc).sum(0) / (rc * rc).sum(0)
    return coef, r.mean(0), r.std(0)


def model_settings(spec: SubjectSpec, camera: Camera):
    """The acquisition's simulation settings without noise, at :data:`MODEL_BITS`."""
    return replace(acquisition_settings(spec, camera), quantum_noise=False, electronic_noise_photons=0.0,
                   bits=MODEL_BITS)


def chain(water: torch.Tensor, bone: torch.Tensor, physics: SubjectPhysics, spec: SubjectSpec) -> np.ndarray:
    """Noise-free detector codes (float64, the radiograph's 12-bit scale) of the paths under ``spec``."""
    from ..projection.simulate import radiograph_from_paths

    settings = model_settings(spec, physics.camera)
    codes = radiograph_from_paths({"water": water, "bone": bone}, physics.camera, settings, 0,
                                  physics.magnification)[0].cpu().numpy().astype(np.float64)
    if spec.processing:
        codes = vendor_processing(codes, settings.bits, physics.camera.spacing_col_mm, spec.processing)
    return codes * (MAX_CODE / (2 ** MODEL_BITS - 1))


def pool(image: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f`` x ``f`` blocks (edges cropped) of a (..., rows, cols) array: the registration's
    :func:`~MSKdeXLib.registration.similarity.downsample` on numpy arrays."""
    from ..registration.similarity import downsample

    return image if f <= 1 else downsample(torch.from_numpy(np.asarray(image)), int(f)).numpy()


@dataclass
class FitModel:
    """Everything a follow-up fit needs for one patient at one pose: the baseline physics, the muscles'
    water-path patterns ``c_k M_k`` (g/cm^2 per unit relative change), the prior of ``r``, deformation
    modes (g/cm^2 per mm of control-point SD; may be empty)."""

    physics: SubjectPhysics
    baseline_g: np.ndarray
    patterns: np.ndarray          # (K, rows, cols)
    prior_mean: np.ndarray        # (K,)
    prior_sd: np.ndarray          # (K,)
    modes: np.ndarray             # (J, 2, rows, cols)
    #: other nuisances fitted in every stage (e.g. a fat-thickness or pose change): their (water, bone) path
    #: change (g/cm^2) per unit coefficient, each coefficient's prior SD (its own unit) and a name
    nuisance: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 0, 0)))   # (E, 2, rows, cols)
    nuisance_sd: np.ndarray = field(default_factory=lambda: np.zeros(0))           # (E,)
    nuisance_names: tuple[str, ...] = ()

    def with_nuisance(self, paths: np.ndarray, sd: np.ndarray, names: tuple[str, ...]) -> "FitModel":
        """This model with the nuisances ``paths`` ((E, 2, rows, cols) g/cm^2 per unit coefficient, prior
        N(0, ``sd``^2), named ``names``) added to any it has."""
        paths = np.asarray(paths, np.float64).reshape(-1, 2, *self.patterns.shape[1:])
        sd = np.asarray(sd, np.float64).reshape(-1)
        if len(sd) != len(paths) or len(names) != len(paths) or not np.all(sd > 0):
            raise ValueError(f"{len(paths)} nuisance paths need as many positive prior SDs and names, got {sd} {names}")
        have = self.nuisance.reshape(-1, *paths.shape[1:]) if len(self.nuisance) else paths[:0]
        return replace(self, nuisance=np.concatenate([have, paths]), nuisance_sd=np.r_[self.nuisance_sd, sd],
                       nuisance_names=tuple(self.nuisance_names) + tuple(names))

    @property
    def n_nuisance(self) -> int:
        return len(self.nuisance_sd)

    @classmethod
    def build(cls, physics: SubjectPhysics, baseline_g: np.ndarray, modes: np.ndarray | None,
              ranges: CohortRanges | None = None, draws: int = 4000) -> "FitModel":
        """The model of ``physics`` (prior from ``ranges``, default the physics' own, over ``draws`` draws)."""
        coef, mean, sd = effective_coefficients(physics, physics.ranges if ranges is None else ranges, draws)
        pats = np.stack([c * np.asarray(physics.muscle_mass[n], np.float64) for c, n in zip(coef, physics.muscles)])
        empty = np.zeros((0, 2, *pats.shape[1:]))
        return cls(physics, np.asarray(baseline_g, np.float64), pats, mean, sd, empty if modes is None else modes)

    def paths(self, r: np.ndarray, z: np.ndarray, e: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Water and bone paths (g/cm^2) with relative changes ``r``, mode coefficients ``z`` (mm) and
        nuisance coefficients ``e`` (default 0)."""
        w = self.physics.water.numpy() + np.tensordot(r, self.patterns, 1)
        b = self.physics.bone.numpy().copy()
        if len(z):
            d = np.tensordot(z, self.modes[:len(z)], 1)
            w, b = w + d[0], b + d[1]
        if e is not None and len(e):
            d = np.tensordot(e, self.nuisance[:len(e)], 1)
            w, b = w + d[0], b + d[1]
        return torch.from_numpy(w), torch.from_numpy(b)

    def codes(self, r: np.ndarray, z: np.ndarray, spec: SubjectSpec, e: np.ndarray | None = None) -> np.ndarray:
        """Noise-free codes (rows, cols) of the model at (``r``, ``z``, ``e``) under ``spec``."""
        return chain(*self.paths(r, z, e), self.physics, spec)


@dataclass
class FitResult:
    """A fitted follow-up: lean mass (g), relative change and its posterior SD (linearised) per muscle,
    mode coefficients (mm)."""

    estimate_g: np.ndarray
    change: np.ndarray
    sd_change: np.ndarray
    z: np.ndarray
    iterations: int
    cost: float
    theta: np.ndarray = field(default_factory=lambda: np.zeros(0))   # fitted acquisition (:data:`ACQUISITION`)
    nuisance: np.ndarray = field(default_factory=lambda: np.zeros(0))  # fitted nuisances (FitModel.nuisance_names)


#: the acquisition parameters a fit can estimate: (spec field, key, finite-difference step, lowest valid value)
ACQUISITION = (("acquisition", "energy_kvp", 1.0, 40.0), ("acquisition", "scatter", 0.02, 0.0),
               ("acquisition", "contrast", 0.03, 0.3), ("acquisition", "focal_spot_mm", 0.1, 0.0),
               ("acquisition", "detector_blur_mm", 0.05, 0.0), ("processing", "unsharp_amount", 0.1, 0.0),
               ("processing", "unsharp_sigma_mm", 1.0, 1.0), ("processing", "lut_strength", 0.3, 0.0))


def acquisition_prior(ranges: CohortRanges) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD of :data:`ACQUISITION` under the preset's draws (uniform ranges; scatter with and
    without a grid, unsharp masking on or off, as :func:`~MSKdeXLib.learning.cohort.sample_subject` draws)."""
    p_grid = 1.0 - ranges.no_grid_probability
    u = lambda r: (0.5 * (r[0] + r[1]), (r[1] - r[0]) ** 2 / 12.0)  # noqa: E731
    sg, sn = u(ranges.scatter), u(ranges.scatter_no_grid)
    scatter_mean = p_grid * sg[0] + (1 - p_grid) * sn[0]
    scatter_var = p_grid * (sg[1] + sg[0] ** 2) + (1 - p_grid) * (sn[1] + sn[0] ** 2) - scatter_mean ** 2
    am = u(ranges.unsharp_amount)
    q = ranges.unsharp_probability
    amount_mean, amount_var = q * am[0], q * (am[1] + am[0] ** 2) - (q * am[0]) ** 2
    parts = [u(ranges.energy_kvp), (scatter_mean, scatter_var), u(ranges.contrast), u(ranges.focal_spot_mm),
             u(ranges.detector_blur_mm), (amount_mean, amount_var), u(ranges.unsharp_sigma_mm), u(ranges.lut_strength)]
    return np.array([m for m, _ in parts]), np.sqrt([max(v, 1e-12) for _, v in parts])


def with_acquisition(spec: SubjectSpec, theta: np.ndarray) -> SubjectSpec:
    """``spec`` with :data:`ACQUISITION`'s values ``theta`` (each kept at or above its lowest valid value)."""
    acq, proc = dict(spec.acquisition), dict(spec.processing)
    for (group, key, _, low), v in zip(ACQUISITION, theta):
        (acq if group == "acquisition" else proc)[key] = max(float(v), low)
    acq["scatter"] = min(acq["scatter"], 0.9)
    return replace(spec, acquisition=acq, processing=proc)


@dataclass
class Linearisation:
    """The model's codes ``f0`` (rows, cols) at ``p`` (the muscles' ``r``, the modes' ``z`` in mm, then any
    acquisition parameters ``theta``, then the model's nuisance coefficients ``e``) and its
    forward-difference Jacobian (P, rows, cols)."""

    p: np.ndarray
    f0: np.ndarray
    jacobian: np.ndarray
    n_muscles: int
    n_modes: int
    spec: SubjectSpec            # the acquisition (with ``theta`` applied when fitted)
    n_nuisance: int = 0

    @property
    def n_theta(self) -> int:
        return len(self.p) - self.n_muscles - self.n_modes - self.n_nuisance


def _codes(model: FitModel, p: np.ndarray, nk: int, nj: int, spec: SubjectSpec) -> np.ndarray:
    ne = model.n_nuisance
    theta, e = p[nk + nj:len(p) - ne], p[len(p) - ne:]
    return model.codes(p[:nk], p[nk:nk + nj], with_acquisition(spec, theta) if len(theta) else spec, e)


def linearise(model: FitModel, spec: SubjectSpec, modes: int = 0, p: np.ndarray | None = None,
              theta: np.ndarray | None = None, step_r: float = 0.05, step_z_mm: float = 1.0) -> Linearisation:
    """The chain linearised under ``spec`` about ``p`` (default: the prior mean of ``r``, no deformation,
    ``theta`` when given (then the acquisition parameters are columns of the Jacobian too), no nuisance;
    a given ``p`` ends with the model's nuisance coefficients when it has any)."""
    nk, nj, ne = len(model.prior_mean), min(int(modes), len(model.modes)), model.n_nuisance
    if p is None:
        p = np.concatenate([model.prior_mean, np.zeros(nj), [] if theta is None else np.asarray(theta, np.float64),
                            np.zeros(ne)])
    p = np.asarray(p, np.float64)
    steps = np.concatenate([np.full(nk, step_r), np.full(nj, step_z_mm),
                            [a[2] for a in ACQUISITION][:len(p) - nk - nj - ne], model.nuisance_sd])
    f0 = _codes(model, p, nk, nj, spec)
    jac = np.empty((len(p), *f0.shape))
    for i in range(len(p)):
        q = p.copy()
        q[i] += steps[i]
        jac[i] = (_codes(model, q, nk, nj, spec) - f0) / steps[i]
    return Linearisation(p, f0, jac, nk, nj, spec, ne)


def fit_followup(model: FitModel, codes: np.ndarray, spec: SubjectSpec, lin: Linearisation,
                 elastic_mm: float = 1.0, pool_px: int = 4, noise_codes: float = 4.0, iterations: int = 20,
                 modes: int | None = None, tolerance: float = 1e-4,
                 theta_prior: tuple[np.ndarray, np.ndarray] | None = None, step_control: bool = False,
                 halvings: int = 4) -> FitResult:
    """MAP fit of the follow-up's ``codes`` (rows, cols, detector codes): the muscles' relative changes
    (prior of the preset), the first ``modes`` deformation coefficients (prior N(0, ``elastic_mm``^2) mm;
    none at 0 mm) and, when ``lin`` has them, the acquisition parameters (prior ``theta_prior``: mean, SD;
    kept within 3 SDs of the mean; else ``spec``'s acquisition is taken as known); residuals pooled
    ``pool_px`` x ``pool_px`` with SD ``noise_codes`` per pooled pixel. Gauss-Newton with ``lin``'s
    Jacobian kept fixed (chord steps, each re-evaluating the chain's residual) until no relative change
    moves by more than ``tolerance`` or after ``iterations`` steps. With ``step_control`` a step is kept only
    if it lowers the MAP cost (else halved, up to ``halvings`` times; the fit stops where none does) and each
    relative change is kept >= -1 (no negative lean mass)."""
    nk, nt, ne = lin.n_muscles, lin.n_theta, lin.n_nuisance
    nj = 0 if float(elastic_mm) <= 0 else min(lin.n_modes, lin.n_modes if modes is None else int(modes))
    use = np.r_[np.arange(nk), nk + np.arange(nj), nk + lin.n_modes + np.arange(nt + ne)].astype(int)
    obs = pool(np.asarray(codes, np.float64), pool_px).ravel()
    inside = obs > 0
    jac = pool(lin.jacobian[use], pool_px).reshape(len(use), -1)[:, inside]
    t_mean, t_sd = theta_prior if nt else (np.zeros(0), np.ones(0))
    prior_mean = np.concatenate([model.prior_mean, np.zeros(nj), t_mean, np.zeros(ne)])
    prior_sd = np.concatenate([model.prior_sd, np.full(nj, float(elastic_mm)), t_sd, model.nuisance_sd[:ne]])
    a = jac @ jac.T / noise_codes ** 2 + np.diag(1.0 / prior_sd ** 2)
    # the acquisition is kept within 3 prior SDs of the prior mean (and valid): a step beyond is cut back
    valid = np.array([v[3] for v in ACQUISITION][:nt])
    low = np.concatenate([np.full(nk, -1.0 if step_control else -np.inf), np.full(nj, -np.inf),
                          np.maximum(t_mean - 3 * t_sd, valid), np.full(ne, -np.inf)])
    high = np.concatenate([np.full(nk + nj, np.inf), t_mean + 3 * t_sd, np.full(ne, np.inf)])
    p = lin.p[use].copy()
    full = lin.p.copy()
    y = obs[inside]

    def model_codes(q: np.ndarray) -> np.ndarray:
        full[nk:nk + lin.n_modes] = 0.0
        full[use] = q
        return pool(_codes(model, full, nk, lin.n_modes, lin.spec), pool_px).ravel()[inside]

    def map_cost(q: np.ndarray, fq: np.ndarray) -> float:
        return float(((y - fq) ** 2).sum() / noise_codes ** 2 + (((q - prior_mean) / prior_sd) ** 2).sum())

    if step_control:
        p = np.clip(p, low, high)
    f = model_codes(p) if step_control else pool(lin.f0, pool_px).ravel()[inside]
    cost = map_cost(p, f)
    done = 0
    while done < int(iterations):
        g = jac @ (y - f) / noise_codes ** 2 - (p - prior_mean) / prior_sd ** 2
        step = np.linalg.solve(a, g)
        if not step_control:
            p = np.clip(p + step, low, high)
            if not np.all(np.isfinite(p)):
                raise FitDiverged(f"the fit's parameters became non-finite at iteration {done + 1}")
            f = model_codes(p)
            done += 1
            if np.abs(step[:nk]).max() < tolerance:
                break
            continue
        if not np.all(np.isfinite(step)):
            raise FitDiverged(f"the fit's step became non-finite at iteration {done + 1}")
        done += 1
        for h in range(int(halvings) + 1):   # the step, else halved, kept only if it lowers the MAP cost
            trial = np.clip(p + step * 0.5 ** h, low, high)
            f_trial = model_codes(trial)
            c_trial = map_cost(trial, f_trial)
            if np.isfinite(c_trial) and c_trial < cost:
                break
        else:
            break                            # no step along this direction lowers the cost: stop here
        taken = trial - p
        p, f, cost = trial, f_trial, c_trial
        if np.abs(taken[:nk]).max() < tolerance:
            break
    cost = map_cost(p, f)
    cov = np.linalg.inv(a)
    r = p[:nk]
    return FitResult(model.baseline_g * (1.0 + r), r, np.sqrt(np.diag(cov)[:nk]), p[nk:nk + nj], done, cost,
                     p[nk + nj:nk + nj + nt], p[nk + nj + nt:])


class FitDiverged(ArithmeticError):
    """A Gauss-Newton step of :func:`fit_followup` made the parameters non-finite (the image is far from
    what the model can make: e.g. a fat change the model has no term for)."""


def half_width_g(result: FitResult, baseline_g: np.ndarray, scale: float = INTERVAL_SCALE) -> np.ndarray:
    """The calibrated 90 % interval half-width (g) per muscle: ``scale`` x the posterior SD of the relative
    change x the baseline lean mass (:data:`INTERVAL_SCALE`)."""
    return float(scale) * np.asarray(result.sd_change) * np.asarray(baseline_g, np.float64)


def collimation_of(codes: np.ndarray) -> list[float]:
    """The collimation fractions (left, right, top, bottom of the detector's width / height) of a
    radiograph: its outer rows and columns that hold no signal (codes 0)."""
    rows = np.flatnonzero((codes > 0).any(axis=1))
    cols = np.flatnonzero((codes > 0).any(axis=0))
    h, w = codes.shape
    if len(rows) == 0 or len(cols) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [cols[0] / w, (w - 1 - cols[-1]) / w, rows[0] / h, (h - 1 - rows[-1]) / h]


def noise_of(codes: np.ndarray) -> float:
    """Pixel noise SD (codes) of a radiograph, from the median absolute difference of horizontal neighbours
    inside the field (robust to edges; white noise)."""
    x = np.asarray(codes, np.float64)
    both = (x[:, 1:] > 0) & (x[:, :-1] > 0)
    d = (x[:, 1:] - x[:, :-1])[both]
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def fit_unknown_acquisition(model: FitModel, codes: np.ndarray, spec: SubjectSpec, ranges: CohortRanges,
                            elastic_mm: float = 1.0, pool_px: int = 2, noise_codes: float | None = None,
                            rounds: int = 4, iterations: int = 20, start: FitResult | None = None,
                            step_control: bool = False) -> tuple[FitResult, SubjectSpec]:
    """The follow-up fitted with its acquisition unknown: ``spec`` gives the camera's SID (and anything not
    in :data:`ACQUISITION`); the collimation is read off the image; the acquisition parameters start at
    the preset's prior mean (:func:`acquisition_prior`). First ``rounds`` Gauss-Newton steps on the muscles
    and the acquisition (Jacobian re-made each step), then the muscles, the deformation modes and the
    acquisition together about that (:func:`fit_followup`); ``start`` (an earlier such fit of the same
    image) skips the first stage; ``step_control`` as :func:`fit_followup`'s, in both stages. Returns the fit
    and the fitted acquisition."""
    t_mean, t_sd = acquisition_prior(ranges)
    acq = {k: v for k, v in spec.acquisition.items() if k in ("sid_mm", "noise")}
    acq.setdefault("noise", float(np.mean(ranges.noise)))
    acq["collimation_fraction"] = collimation_of(codes)
    template = replace(spec, acquisition=acq, processing={})
    template = with_acquisition(template, t_mean)
    noise = noise_of(codes) / pool_px if noise_codes is None else float(noise_codes)
    nk, ne = len(model.prior_mean), model.n_nuisance
    p = np.concatenate([model.prior_mean, t_mean, np.zeros(ne)] if start is None else
                       [start.change, start.theta, start.nuisance if len(start.nuisance) == ne else np.zeros(ne)])
    for _ in range(0 if start is not None else int(rounds)):
        lin = linearise(model, template, 0, p)
        res = fit_followup(model, codes, template, lin, 0.0, pool_px, noise, 1, theta_prior=(t_mean, t_sd),
                           step_control=step_control)
        p = np.concatenate([res.change, res.theta, res.nuisance])
    lin = linearise(model, template, len(model.modes) if elastic_mm > 0 else 0,
                    np.concatenate([p[:nk], np.zeros(len(model.modes) if elastic_mm > 0 else 0), p[nk:]]))
    res = fit_followup(model, codes, template, lin, elastic_mm, pool_px, noise, iterations, theta_prior=(t_mean, t_sd),
                       step_control=step_control)
    return res, with_acquisition(template, res.theta)
