"""Inference: a trained model + a radiograph -> per-structure mass (g) and volume (cm^3).

:func:`load_model` reads a model folder (``model.safetensors`` + ``config.json`` only, never
pickle; the weights must match the config's channels). :func:`predict` resamples the
radiograph onto the model's grid (pixel spacing at the detector plane, image size) exactly as
the training set was built (:func:`MSKdeXLib.learning.dataset.builder.prepare_radiograph`), normalises it, runs
the generator and sums each channel (g or cm^3 per pixel -> g or cm^3).

Uncertainty: test-time augmentation (TTA) with ``tta`` extra passes on small random shifts,
scales, rotations and brightness/contrast changes of the normalised input (the training
augmentation keeps channel sums, so sums should be invariant); the estimate is the mean over
all passes (identity included).

The 90 % interval is *calibrated* when the model config holds a ``calibration`` record
(written by training, :func:`calibrate`): split-conformal on held-out (validation) records,
per channel, with the nonconformity score |truth - estimate| / u, u = max(TTA standard
deviation, ``floor_fraction`` * |estimate|); the interval is estimate +- q_c * u with q_c the
conformal quantile of channel c (pooled over channels when there are too few records). Two
quantile sets are stored: ``tta`` (for predictions with >= 3 passes) and ``single`` (fewer: u is
the floor, i.e. a relative-error interval). Without calibration (older models) the interval is
the 5th-95th percentile of the TTA sums and is reported as uncalibrated (it is usually far too
narrow: TTA spread is not the model's error).

Warnings flag inputs unlike the training data: no pixel spacing, spacing far from the
model's, intensity quantiles outside the training range, estimates outside the training range.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, listing
from ..io.images import Radiograph
from ..anatomy.structures import Structure
from ..validation import NonFiniteError

#: default test-time augmentation ranges (small; see data_loading.DEFAULT_AUGMENT for keys)
TTA_AUGMENT = {"enabled": True, "rotation_deg": 2.0, "scale": [0.97, 1.03], "translation": 0.02,
               "brightness": 0.05, "contrast": [0.95, 1.05]}
INTERVAL = 0.90
#: test-time augmentation passes beyond the plain one, when neither the caller nor the model's
#: calibration says otherwise: 1 + 4 passes take 0.72 s at 256 x 256 on 2 CPU cores (the issue's
#: <= 1 s budget; 1 + 8 take 1.26 s), see benchmarks/RESULTS_network.md
DEFAULT_TTA = 4
CALIBRATION_FORMAT = "mskdex-calibration/1"
#: relative floor of the interval scale u (fraction of the estimate), so a zero TTA spread
#: (or no TTA) still gives a non-degenerate, relative-error interval
FLOOR_FRACTION = 0.01
#: below this many calibration records the conformal quantile is pooled over channels
MIN_PER_CHANNEL = 20


@dataclass
class Model:
    """A loaded decomposition model (generator in eval mode) and its config."""

    generator: torch.nn.Module
    config: dict[str, Any]
    folder: Path
    device: torch.device

    @property
    def channels(self) -> list[dict]:
        return self.config["channels"]

    @property
    def structures(self) -> list[Structure]:
        return [Structure(int(s["label"]), s["name"], s.get("kind", "other"), s.get("side", "none"),
                          tuple(int(c) for c in s.get("color", (128, 128, 128)))) for s in self.config["structures"]]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.config["image_size"])  # type: ignore[return-value]

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        return tuple(float(v) for v in self.config["pixel_spacing_mm"])  # type: ignore[return-value]


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Model:
    """Load a model folder; UserError (one line) for pickle files, missing/mismatched files."""
    from .checkpoint import load_model_files
    from .networks.generator import build_generator

    folder = Path(folder)
    weights, config = load_model_files(folder)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    arch = dict(config["architecture"])
    arch["recon_head"] = any(k.startswith("recon.") for k in weights)
    n = len(config["channels"])
    if int(config.get("n_channels", n)) != n:
        raise UserError(f"config says {config.get('n_channels')} channels but lists {n}", folder / "config.json")
    try:
        gen = build_generator(arch, n, config["channel_scales"])
        gen.load_state_dict(weights, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"weights do not match the config's architecture / {n} channels ({first})",
                        folder / "model.safetensors") from None
    gen.to(dev).eval()
    return Model(gen, config, folder, dev)


@dataclass
class Estimates:
    """Per-channel sums of one radiograph. ``samples`` (N, C): channel sums of every TTA pass
    (row 0 = un-augmented); ``channel_images`` (C, H, W) the un-augmented channels (g or cm^3
    per pixel at ``pixel_spacing_mm``); ``input_image`` (H, W) the normalised model input."""

    id: str
    structures: list[Structure]
    channels: list[dict]
    samples: np.ndarray
    channel_images: np.ndarray
    input_image: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    #: structure name -> warnings about that structure's estimates (e.g. outside the training range)
    structure_warnings: dict[str, list[str]] = field(default_factory=dict)

    def warnings_of(self, structure: str) -> list[str]:
        """The warnings that concern ``structure``: its own, then the radiograph-wide ones."""
        return list(self.structure_warnings.get(structure, [])) + list(self.warnings)

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(axis=0)

    @property
    def level(self) -> float:
        """Nominal coverage of :meth:`interval` (the calibration's level when calibrated)."""
        return float(self.calibration["level"]) if self.calibration else INTERVAL

    def interval(self, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per channel: calibrated (conformal) when the model carries a calibration
        and ``level`` is None or its level; else the TTA percentiles (uncalibrated)."""
        cal = self.calibration
        if cal is not None and (level is None or abs(level - float(cal["level"])) < 1e-9):
            passes = self.samples.shape[0]
            q = calibration_quantiles(cal, passes)
            m = self.mean
            spread = self.samples if calibration_mode(cal, passes) == "tta" else m[None]  # single: floor only
            half = q * interval_scale(spread, float(cal.get("floor_fraction", FLOOR_FRACTION)))
            return np.maximum(m - half, 0.0), m + half
        a = (1 - (INTERVAL if level is None else level)) / 2 * 100
        return np.percentile(self.samples, a, axis=0), np.percentile(self.samples, 100 - a, axis=0)

    def interval_method(self) -> dict[str, Any]:
        """How :meth:`interval` was made (recorded in estimates.json)."""
        cal = self.calibration
        if cal is None:
            return {"calibrated": False, "level": INTERVAL,
                    "method": f"{(1 - INTERVAL) / 2 * 100:g}th-{(1 + INTERVAL) / 2 * 100:g}th percentiles of "
                              f"{self.samples.shape[0]} test-time-augmentation passes",
                    "note": "uncalibrated: the model has no calibration record, so the interval's coverage of "
                            "the truth is unknown (TTA spread alone usually under-covers); re-train or "
                            "calibrate the model"}
        mode = calibration_mode(cal, self.samples.shape[0])
        return {"calibrated": True, "level": float(cal["level"]), "method": cal.get("method"),
                "mode": mode, "score": cal.get("score"), "floor_fraction": cal.get("floor_fraction"),
                "calibration_split": cal.get("split"), "calibration_records": cal.get("n"),
                "pooled_over_channels": bool(cal.get(mode, {}).get("pooled")),
                "calibration_tta_passes": cal.get("tta", {}).get("passes") if mode == "tta" else 1,
                "quantiles": [float(v) for v in calibration_quantiles(cal, self.samples.shape[0])]}

    def rows(self) -> list[dict[str, Any]]:
        """Long format: {id, structure, kind, quantity, value, low, high} per channel."""
        lo, hi = self.interval()
        kinds = {s.name: s.kind for s in self.structures}
        return [{"id": self.id, "structure": c["structure"], "kind": kinds.get(c["structure"], c.get("kind")),
                 "quantity": c["quantity"], "value": float(m), "low": float(a), "high": float(b)}
                for c, m, a, b in zip(self.channels, self.mean, lo, hi)]

    def table(self) -> list[dict[str, Any]]:
        """Wide format: one row per structure with mass_g / volume_cm3 and their intervals."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.rows():
            row = out.setdefault(r["structure"], {"id": self.id, "structure": r["structure"], "kind": r["kind"],
                                                  "warnings": self.warnings_of(r["structure"])})
            q = r["quantity"]
            row[q], row[f"{q}_low"], row[f"{q}_high"] = r["value"], r["low"], r["high"]
        return list(out.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": "mskdex-estimates/1", "id": self.id, "interval": self.level,
                "interval_method": self.interval_method(), "tta_passes": int(self.samples.shape[0]),
                "pixel_spacing_mm": list(self.pixel_spacing_mm),
                "structures": self.table(), "rows": self.rows(), "warnings": self.warnings, **self.info}

    def to_csv(self) -> str:
        cols = ["id", "structure", "kind", "mass_g", "mass_g_low", "mass_g_high", "volume_cm3",
                "volume_cm3_low", "volume_cm3_high", "warnings"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.table():
            w.writerow({c: (f"{r[c]:.6g}" if isinstance(r.get(c), float) else
                            "; ".join(r[c]) if isinstance(r.get(c), list) else r.get(c, "")) for c in cols})
        return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Calibration of the interval (split conformal)
# ---------------------------------------------------------------------------------------------
def interval_scale(samples: np.ndarray, floor_fraction: float = FLOOR_FRACTION) -> np.ndarray:
    """u (C,): the TTA standard deviation of the channel sums (0 with a single pass), at least
    ``floor_fraction`` * |mean| (same units as the sums)."""
    s = np.asarray(samples, np.float64)
    sd = s.std(axis=0, ddof=1) if s.shape[0] > 1 else np.zeros(s.shape[1])
    return np.maximum(sd, floor_fraction * np.abs(s.mean(axis=0)) + 1e-12)


def conformal_scores(samples: np.ndarray, truth: np.ndarray, floor_fraction: float = FLOOR_FRACTION) -> np.ndarray:
    """Nonconformity scores (C,) of one record: |truth - mean| / u."""
    s = np.asarray(samples, np.float64)
    return np.abs(np.asarray(truth, np.float64) - s.mean(axis=0)) / interval_scale(s, floor_fraction)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal quantile of 1-D ``scores``: the ceil((n + 1) level)-th smallest
    (inf when n is too small for ``level``)."""
    v = np.sort(np.asarray(scores, np.float64).ravel())
    k = int(np.ceil((len(v) + 1) * level))
    return float(v[k - 1]) if 1 <= k <= len(v) else float("inf")


def quantile_set(scores: np.ndarray, level: float, min_per_channel: int = MIN_PER_CHANNEL) -> dict[str, Any]:
    """Per-channel conformal quantiles of scores (n, C); pooled over channels (one quantile for
    all) when n < ``min_per_channel``."""
    n, c = scores.shape
    if n >= min_per_channel:
        return {"quantiles": [conformal_quantile(scores[:, j], level) for j in range(c)], "pooled": False}
    return {"quantiles": [conformal_quantile(scores, level)] * c, "pooled": True}


def calibration_mode(cal: dict[str, Any], passes: int) -> str:
    """"tta" (TTA-spread-scaled quantiles) for predictions with >= 3 passes (a spread estimate
    from fewer is too noisy), else "single" (relative-error quantiles)."""
    return "tta" if passes >= 3 and "tta" in cal else "single"


def calibration_quantiles(cal: dict[str, Any], passes: int) -> np.ndarray:
    """The quantiles (C,) of a calibration record for a prediction with ``passes`` passes."""
    return np.asarray(cal[calibration_mode(cal, passes)]["quantiles"], np.float64)


@torch.no_grad()
def channel_sums(generator: torch.nn.Module, x: np.ndarray, tta: int, seed: int, device: torch.device,
                 batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(sums (1 + tta, C) of every pass, un-augmented channels (C, H, W)) of one normalised
    input (H, W); row 0 is the un-augmented pass. A generator's sum head reads the
    un-augmented input in every pass (its gain is not a geometric-TTA quantity)."""
    batch = _tta_batch(x, max(0, int(tta)), seed)
    sums, first = [], None
    for i in range(0, batch.shape[0], batch_size):
        part = batch[i:i + batch_size].to(device)
        kw = {"sum_input": batch[:1].to(device).expand_as(part)} if getattr(generator, "sum_head", None) else {}
        y = generator(part, **kw).float()
        if first is None:
            first = y[0].cpu().numpy()
        sums.append(y.double().sum(dim=(2, 3)).cpu().numpy())
    return np.concatenate(sums), first


def calibrate(generator: torch.nn.Module, xrays: list[np.ndarray], truths: list[np.ndarray], *,
              level: float = INTERVAL, tta: int = DEFAULT_TTA, seed: int = 0, floor_fraction: float = FLOOR_FRACTION,
              device: str | torch.device = "cpu", split: str = "val",
              min_per_channel: int = MIN_PER_CHANNEL) -> dict[str, Any]:
    """The calibration record (JSON-ready) of a generator from held-out normalised inputs
    (each (H, W)) and their truths (C,): split-conformal quantiles for TTA and single-pass
    predictions. Needs enough records: n >= level / (1 - level) per channel, or pooled."""
    if not xrays:
        raise UserError(f"no '{split}' records to calibrate the interval on")
    dev = torch.device(device)
    was = generator.training
    generator.eval()
    s_tta, s_one = [], []
    try:
        for i, (x, t) in enumerate(zip(xrays, truths)):
            samples, _ = channel_sums(generator, np.asarray(x, np.float32), tta, seed + i, dev)
            s_tta.append(conformal_scores(samples, t, floor_fraction))
            s_one.append(conformal_scores(samples[:1], t, floor_fraction))
    finally:
        generator.train(was)
    s_tta, s_one = np.array(s_tta), np.array(s_one)
    out = {"format": CALIBRATION_FORMAT, "method": "split conformal, per channel (pooled when few records)",
           "score": "|truth - estimate| / max(TTA SD, floor_fraction * |estimate|)",
           "level": float(level), "floor_fraction": float(floor_fraction), "split": split, "n": len(xrays),
           "tta": {"passes": 1 + int(tta), "seed": int(seed), **quantile_set(s_tta, level, min_per_channel)},
           "single": {"passes": 1, **quantile_set(s_one, level, min_per_channel)}}
    if not np.all(np.isfinite(out["tta"]["quantiles"] + out["single"]["quantiles"])):
        raise UserError(f"too few '{split}' records ({len(xrays)}) to calibrate a {level:.0%} interval")
    return out


def calibrate_on_split(generator: torch.nn.Module, info, split: str = "val", **kw) -> dict[str, Any]:
    """:func:`calibrate` on the (un-augmented) records of a data set's split."""
    from .dataset.records import load_record

    recs = info.split(split)
    tensors = [load_record(info, r) for r in recs]
    return calibrate(generator, [t["xray"][0].numpy() for t in tensors], [t["truth"].numpy() for t in tensors],
                     split=split, **kw)


def prepare_input(model: Model, radiograph: Radiograph) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(normalised model input (H, W) float32, warnings, placement) of a radiograph, resampled
    about its centre (or ``radiograph.metadata["principal_point_rc"]`` when known), as the data
    set was. ``placement`` records the input spacing used (mm, row/col; assumed when the
    radiograph is uncalibrated) and the principal point (row, col) px or None for the centre."""
    from .dataset.builder import prepare_radiograph

    h, w = model.image_size
    sp = model.pixel_spacing_mm
    warnings: list[str] = []
    pix = np.asarray(radiograph.pixels, dtype=np.float64)
    if radiograph.pixel_spacing is None:
        s = max(h * sp[0] / pix.shape[0], w * sp[1] / pix.shape[1])
        spacing = (s, s)
        warnings.append("radiograph has no pixel spacing: assumed it spans the model's field of view "
                        f"({h * sp[0]:.0f} x {w * sp[1]:.0f} mm); masses and volumes scale with that guess")
    else:
        spacing = tuple(float(v) for v in radiograph.pixel_spacing)
        ratio = max(spacing[0] / sp[0], sp[0] / spacing[0], spacing[1] / sp[1], sp[1] / spacing[1])
        if ratio > 4:
            warnings.append(f"pixel spacing {spacing[0]:.3g} x {spacing[1]:.3g} mm is far from the model's "
                            f"{sp[0]:.3g} x {sp[1]:.3g} mm (factor {ratio:.1f})")
    norm = {**model.config["normalisation"]}
    norm.setdefault("pixel_spacing_mm", list(sp))
    pp = radiograph.metadata.get("principal_point_rc") if radiograph.metadata else None
    x = prepare_radiograph(pix, spacing, (h, w), norm, pp)
    q = model.config.get("data_summary", {}).get("xray_quantiles")
    if q:
        got = np.percentile(x, q["percentiles"])
        lo, hi = np.asarray(q["min"]), np.asarray(q["max"])
        margin = 0.25 * (hi - lo) + 0.25
        bad = [f"p{p:g}={g:.2f} (training {a:.2f}..{b:.2f})" for p, g, a, b in zip(q["percentiles"], got, lo, hi)
               if g < a - margin[0] or g > b + margin[0]] if len(lo) else []
        if bad:
            warnings.append("radiograph intensities unlike the training data: " + listing(bad, 3))
    placement = {"input_pixel_spacing_mm": [float(v) for v in spacing],
                 "input_spacing_assumed": radiograph.pixel_spacing is None,
                 "principal_point_rc": None if pp is None else [float(v) for v in pp]}
    return x.astype(np.float32), warnings, placement


def _tta_batch(x: np.ndarray, n: int, seed: int) -> torch.Tensor:
    from .dataset.records import augment

    base = torch.from_numpy(x)[None]
    out = [base]
    rng = np.random.default_rng(seed)
    dummy = torch.zeros(1, *x.shape)
    for _ in range(n):
        out.append(augment({"xray": base, "targets": dummy}, rng, TTA_AUGMENT)["xray"])
    return torch.stack(out)


#: file stems that name a role, not a case: the case id is then the parent folder's name
GENERIC_STEMS = ("xray", "radiograph", "image", "dx", "estimates", "metrics", "truth", "prediction",
                 "predictions", "results")


def case_id_from_path(path: str | Path) -> str:
    """The case id of a file: its name without suffixes ('case7.dcm' -> 'case7'), or the parent
    folder's name for generic names ('subject-0007/xray.dcm' -> 'subject-0007')."""
    p = Path(path)
    stem = p.name.split(".")[0]
    if stem.lower() in GENERIC_STEMS and p.parent.name:
        return p.parent.name
    return stem or p.name


def default_tta(model: Model) -> int:
    """Extra TTA passes matching the model's calibration (its interval is valid for the number of
    passes it was calibrated with), else :data:`DEFAULT_TTA`."""
    cal = model.config.get("calibration") or {}
    passes = (cal.get("tta") or {}).get("passes")
    return int(passes) - 1 if passes else DEFAULT_TTA


@torch.no_grad()
def predict(model: Model, radiograph: Radiograph, tta: int | None = None, seed: int = 0, rec_id: str | None = None,
            batch_size: int = 8) -> Estimates:
    """Estimates of one radiograph (mean over 1 + ``tta`` passes, default :func:`default_tta`;
    90 % interval, calibrated when the model carries a calibration record)."""
    if tta is None:
        tta = default_tta(model)
    x, warnings, placement = prepare_input(model, radiograph)
    samples, first = channel_sums(model.generator, x, tta, seed, model.device, batch_size)
    bad = [f"{c['structure']} {c['quantity']}" for c, ok in zip(model.channels, np.isfinite(samples).all(0)) if not ok]
    if bad:
        raise NonFiniteError(f"estimates are not finite for {listing(bad)}", radiograph.source or None)
    rng = model.config.get("data_summary", {}).get("truth_range")
    per_structure: dict[str, list[str]] = {}
    if rng and len(rng) == samples.shape[1]:
        out = []
        for c, (a, b), v in zip(model.channels, rng, samples.mean(0)):
            if v < 0.5 * a or v > 1.5 * b:
                out.append(f"{c['structure']} {c['quantity']}")
                per_structure.setdefault(c["structure"], []).append(
                    f"{c['quantity']} {v:.4g} outside the training range {a:.4g}..{b:.4g}")
        if out:
            warnings.append("estimates outside the training range for: " + listing(out))
    rid = rec_id or (case_id_from_path(radiograph.source) if radiograph.source else "radiograph")
    info = {"model": str(model.folder), "radiograph": radiograph.source,
            **placement, "code_version": model.config.get("code_version")}
    return Estimates(rid, model.structures, model.channels, samples, first, x, model.pixel_spacing_mm,
                     warnings, info, model.config.get("calibration"), per_structure)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def overlay_rgb(est: Estimates) -> tuple[np.ndarray, list[tuple[str, tuple[float, float, float]]]]:
    """(RGB float image (H, W, 3) in 0..1, legend [(name, rgb)]): each structure's channel
    (mass, else volume) blended in its colour over the grey radiograph."""
    from ..visualize import window

    grey = window(est.input_image, 1, 99).astype(np.float64)
    rgb = np.repeat(grey[..., None], 3, axis=2) * 0.8
    colours = {s.name: tuple(c / 255 for c in s.color) for s in est.structures}
    legend, seen = [], set()
    order = sorted(range(len(est.channels)), key=lambda i: est.channels[i]["quantity"] != "mass_g")
    for i in order:
        name = est.channels[i]["structure"]
        if name in seen:
            continue
        seen.add(name)
        ch = est.channel_images[i].astype(np.float64)
        peak = np.percentile(ch, 99.5)
        if peak <= 0:
            continue
        alpha = np.clip(ch / peak, 0, 1)[..., None] * 0.6
        col = np.asarray(colours.get(name, (0.5, 0.5, 0.5)))
        rgb = rgb * (1 - alpha) + col * alpha
        legend.append((name.replace("_", " "), tuple(col)))
    return np.clip(rgb, 0, 1), legend


def write_overlay(path: Path, est: Estimates, force: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..io.outputs import atomic_path

    rgb, legend = overlay_rgb(est)
    h, w = rgb.shape[:2]
    aspect = est.pixel_spacing_mm[0] / est.pixel_spacing_mm[1]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.imshow(rgb, aspect=aspect, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{est.id}: decomposed structures")
    if legend:
        ax.legend(handles=[Patch(color=c, label=n) for n, c in legend], loc="center left",
                  bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_channel_image(path: Path, image: np.ndarray, spacing_rc: tuple[float, float], force: bool = False) -> Path:
    """A 2D channel image (g or cm^3 per pixel) as NRRD / NIfTI with its pixel spacing."""
    import SimpleITK as sitk

    from ..io.outputs import atomic_path

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    img.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0])))
    with atomic_path(path, force=force) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path


def write_outputs(out_dir: str | Path, est: Estimates, force: bool = False, image_format: str = "nrrd") -> dict[str, Path]:
    """Write estimates.csv, estimates.json, overlay.png and channels/<structure>__<quantity>.<fmt>."""
    from ..io.outputs import prepare_out_dir, remove_stale, write_json, write_text

    names = ("estimates.csv", "estimates.json", "overlay.png", "channels")
    out = prepare_out_dir(out_dir, force, expected=names)
    ext = {"nrrd": ".nrrd", "nifti": ".nii.gz", "nii": ".nii.gz"}.get(image_format)
    if ext is None:
        raise UserError(f"unknown image format '{image_format}' (use nrrd or nifti)")
    files = {"csv": write_text(out / "estimates.csv", est.to_csv(), force),
             "json": write_json(out / "estimates.json", est.to_json(), force),
             "overlay": write_overlay(out / "overlay.png", est, force)}
    for c, img in zip(est.channels, est.channel_images):
        p = out / "channels" / f"{c['structure']}__{c['quantity']}{ext}"
        files[f"{c['structure']}:{c['quantity']}"] = write_channel_image(p, img, est.pixel_spacing_mm, force)
    if force:  # an earlier run's channels that this model does not predict would mislead
        remove_stale(out / "channels", [v for k, v in files.items() if ":" in k])
    return files
