"""Training the decomposition network (GAN + paired + intensity-sum losses).

``train(config, data_dir, out_dir, ...)`` runs on CPU, one GPU, or several GPUs / nodes under
``torchrun`` (DistributedDataParallel; DistributedSampler; rank 0 writes). All randomness is a
function of the seed, the epoch and the record index, so ``resume=True`` continues from the
last checkpoint with exactly the losses of an uninterrupted run.

Per step: (1) the discriminator (multi-scale PatchGAN, LSGAN) learns real vs generated
channels of the ``gan_kinds`` (default: muscles, the unpaired ones); (2) the generator
minimises the weighted sum of the losses in ``config["losses"]`` (weight 0 switches a loss
off, for ablations):

* ``l1`` (100) and ``gradient_correlation`` (1): paired non-muscle channels (``paired`` flag);
* ``muscle_l1`` (0): L1 on paired muscle channels (virtual cohort data);
* ``gan`` (1) and ``feature_matching`` (10): unpaired adversarial terms on ``gan_kinds``;
* ``cycle`` (1): radiograph rebuilt from the channels by a small learned head vs the input;
* ``intensity_sum`` (1): OWIS, mean_c |sum(pred_c) - truth_c| / truth_c, on every channel;
* ``intensity_sum_sq`` (0): its squared form, mean_c ((sum(pred_c) - truth_c) / truth_c)^2;
* ``intensity_sum_log`` (0): its log-ratio form, mean_c |log(sum(pred_c) / truth_c)|.
The intensity-sum losses average over the channels of ``intensity_sum_kinds`` (null: all).

Pixel losses use channels divided by their scale (``channel_scales``, per-pixel values in g or
cm^3; "auto" = mean of the positive target pixels of the training split).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import __version__
from ..devices import resolve_device
from ..errors import UserError
from ..io.documents import read_json
from ..io.outputs import atomic_path, prepare_out_dir, write_json
from ..progress import Progress
from ..validation import NonFiniteError
from . import losses as L
from .checkpoint import MODEL_FORMAT, load_checkpoint, save_checkpoint, save_model
from .config_checks import check_training_config
from .dataset.records import DEFAULT_AUGMENT, RecordDataset, load_dataset_info, load_record
from .resimulation import DEFAULT_RESIMULATE
from .inference import DEFAULT_TTA, FLOOR_FRACTION, INTERVAL, calibrate_on_split, load_model
from .networks.discriminator import MultiScaleDiscriminator
from .networks.generator import DEFAULT_ARCH, build_generator, min_image_size, resolve_arch

DEFAULT_LOSSES = {"l1": 100.0, "gradient_correlation": 1.0, "gan": 1.0, "feature_matching": 10.0,
                  "cycle": 1.0, "intensity_sum": 1.0, "muscle_l1": 0.0, "intensity_sum_sq": 0.0,
                  "intensity_sum_log": 0.0}

#: balance of the adversarial game (see ``default_config()["_doc"]["adversarial"]``)
DEFAULT_ADVERSARIAL = {"start_step": 0, "ramp_steps": 0, "d_lr_ratio": 1.0, "instance_noise": 0.0,
                       "real_label": 1.0}

#: percentiles of the normalised radiograph recorded per record (out-of-distribution check)
XRAY_QUANTILES = (5.0, 25.0, 50.0, 75.0, 95.0)

#: keys that may change between a run and its resumption
#: interval calibration after training (:func:`MSKdeXLib.learning.inference.calibrate`): its level, TTA
#: passes and relative floor are the inference defaults, so a model's interval matches `predict`
DEFAULT_CALIBRATION = {"enabled": True, "split": "val", "level": INTERVAL, "tta": DEFAULT_TTA,
                       "floor_fraction": FLOOR_FRACTION}
RESUMABLE_KEYS = ("steps", "checkpoint_every", "log_every", "val_every", "calibration")


def default_config() -> dict[str, Any]:
    """The default training configuration (JSON-ready; every key documented in ``_doc``)."""

    return {
        "_doc": {
            "seed": "seeds model initialisation, sample order and augmentation",
            "data": "dir: training-set folder (mskdex-dataset/1), overridden by --data; batch_size per "
                    "process; augment: joint affine (sums kept) + brightness/contrast of the radiograph; "
                    "resimulate: virtual records re-simulated per sample (MSKdeXLib.learning.resimulation) "
                    "with probability p, fresh muscle amounts (muscles) and acquisition (acquisition) drawn "
                    "from their cohort's ranges, targets scaled alike (0 = off)",
            "model": "generator: backbone 'unet' (MONAI UNet: features, strides, num_res_units) or "
                     "'basicunet' (6 features); outputs softplus * channel scale; sum_head: a per-channel "
                     "log-gain from the radiograph pooled to sum_head_pool^2 (makes the channel sums follow "
                     "the image despite instance norm)",
            "discriminator": "multi-scale PatchGAN: width, n_layers, n_scales; condition: what it sees beside the "
                             "adversarial channels, real and generated alike: 'none' (the channels alone; a PatchGAN "
                             "cannot tell where they sit), 'bones' (the true channels of the structures that are not "
                             "adversarial, e.g. the registered bone DRRs: placement relative to the bones) or 'xray' "
                             "(the radiograph)",
            "losses": "weights; 0 switches a loss off (ablation): l1 + gradient_correlation (paired bones), "
                      "muscle_l1 (paired muscles, virtual data), gan + feature_matching (unpaired, gan_kinds), "
                      "cycle, intensity_sum (OWIS, relative |sum - truth|), intensity_sum_sq (its square) and "
                      "intensity_sum_log (|log(sum / truth)|)",
            "intensity_sum_kinds": "structure kinds whose channels the intensity-sum losses average over "
                                   "(null: every channel)",
            "adversarial": "balance of generator and discriminator (step counts; a value in (0, 1) is a fraction of "
                           "'steps'): start_step (GAN + feature matching off, "
                           "discriminator not trained, before this step: the generator first learns from the "
                           "paired, intensity-sum and cycle losses), ramp_steps (their weights then rise "
                           "linearly from 0), d_lr_ratio (discriminator lr / generator lr), instance_noise "
                           "(SD of Gaussian noise added to the discriminator's normalised inputs, real and "
                           "generated, decaying linearly to 0 at the last step), real_label (LSGAN target of "
                           "real channels; < 1 = one-sided label smoothing)",
            "gan_kinds": "structure kinds whose channels get the adversarial + feature-matching losses",
            "channel_scales": "'auto' or one per-pixel scale per channel (g or cm^3 per pixel)",
            "optimizer": "AdamW for generator and discriminator; schedule 'constant' or 'cosine' (lr decays "
                         "to min_lr_fraction * lr at the last step, after warmup_steps of linear warm-up)",
            "steps": "optimisation steps in total; checkpoint_every / log_every / val_every in steps",
            "amp": "mixed precision (bfloat16 autocast) on CUDA; ignored on CPU",
            "calibration": "after the last step, split-conformal calibration of the estimates' interval on the "
                           "'split' records (level, tta passes, floor_fraction of the estimate); stored in the "
                           "model config and applied by predict; skipped (interval uncalibrated) when the split "
                           "has too few records",
        },
        "seed": 0,
        "data": {"dir": None, "train_split": "train", "val_split": "val", "batch_size": 4,
                 "num_workers": 0, "augment": dict(DEFAULT_AUGMENT), "resimulate": dict(DEFAULT_RESIMULATE)},
        "model": dict(DEFAULT_ARCH),
        "discriminator": {"width": 32, "n_layers": 3, "n_scales": 2, "condition": "none"},
        "losses": dict(DEFAULT_LOSSES),
        "adversarial": dict(DEFAULT_ADVERSARIAL),
        "gan_kinds": ["muscle"],
        "intensity_sum_kinds": None,
        "channel_scales": "auto",
        "optimizer": {"lr": 1e-4, "betas": [0.5, 0.999], "weight_decay": 0.01, "schedule": "constant",
                      "warmup_steps": 0, "min_lr_fraction": 0.0},
        "steps": 20000,
        "checkpoint_every": 1000,
        "log_every": 50,
        "val_every": 1000,
        "amp": True,
        "calibration": dict(DEFAULT_CALIBRATION),
    }


def merge_config(user: dict[str, Any] | None, source: str = "config") -> dict[str, Any]:
    """Defaults updated (one level deep) by ``user``; unknown keys raise UserError."""
    cfg = default_config()
    for key, value in (user or {}).items():
        if key not in cfg:
            raise UserError(f"unknown training config key '{key}'", source)
        if isinstance(cfg[key], dict) and key != "_doc":
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' must be an object", source)
            unknown = set(value) - set(cfg[key]) if key not in ("losses",) else set(value) - set(DEFAULT_LOSSES)
            if unknown and key != "model":
                raise UserError(f"unknown key(s) {sorted(unknown)} in config '{key}'", source)
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    check_training_config(cfg, source)
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:

    user = read_json(path, "training config")
    return merge_config(user, str(path))


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------------------------
# Data summary and scales
# ---------------------------------------------------------------------------------------------
def summarise_data(info, split: str) -> tuple[dict[str, Any], list[float]]:
    """(data summary for the model config, auto channel scales) from the un-augmented split."""

    recs = info.split(split)
    if not recs:
        raise UserError(f"data set has no '{split}' records", info.root / "dataset.json")
    c = len(info.channels)
    pos_sum, pos_n = np.zeros(c), np.zeros(c)
    means, stds, truths, quants = [], [], [], []
    for r in recs:
        t = load_record(info, r)
        y = t["targets"].double()
        pos = y > 0
        pos_sum += (y * pos).sum(dim=(1, 2)).numpy()
        pos_n += pos.sum(dim=(1, 2)).numpy()
        means.append(float(t["xray"].mean()))
        stds.append(float(t["xray"].std()))
        quants.append(np.percentile(t["xray"].numpy(), XRAY_QUANTILES))
        truths.append(t["truth"].numpy())
    scales = [float(s / n) if n > 0 else 1.0 for s, n in zip(pos_sum, pos_n)]
    truths = np.array(truths)
    summary = {
        "dataset": str(info.root), "records": {s: len(info.split(s)) for s in ("train", "val", "test")},
        "xray_mean_range": [min(means), max(means)], "xray_std_range": [min(stds), max(stds)],
        "xray_quantiles": {"percentiles": list(XRAY_QUANTILES),
                           "min": np.min(quants, 0).tolist(), "max": np.max(quants, 0).tolist()},
        "truth_range": [[float(a), float(b)] for a, b in zip(truths.min(0), truths.max(0))],
        "pixel_spacing_mm": list(info.pixel_spacing_mm), "image_size": list(info.image_size),
    }
    return summary, scales


def _with_legacy_arch(model: dict[str, Any], ckpt_model: dict[str, Any] | None) -> dict[str, Any]:
    """``model`` with the architecture keys that a checkpoint's model config lacks (written
    before they existed) set to the values that checkpoint was trained with."""

    if not ckpt_model:
        return model
    legacy = resolve_arch(ckpt_model)
    return {**model, **{k: legacy[k] for k in ("upsample", "sum_head") if k not in ckpt_model}}


def pooled_xrays(info, split: str, head) -> torch.Tensor:
    """The sum head's pooled features (N, pool * pool) of a split's un-augmented normalised
    radiographs, read one record at a time (a large split never sits in memory whole)."""

    return torch.cat([head.features(load_record(info, r)["xray"].float()[None]) for r in info.split(split)])


# ---------------------------------------------------------------------------------------------
# Losses of one step
# ---------------------------------------------------------------------------------------------
#: what the discriminator may see beside the adversarial channels (``discriminator.condition``)
DISC_CONDITIONS = ("none", "bones", "xray")


def channel_groups(channels: list[dict], gan_kinds: list[str],
                   owis_kinds: list[str] | None = None, condition: str = "none") -> dict[str, torch.Tensor]:
    """Boolean (C,) masks: muscle channels, adversarial channels, the channels of the
    intensity-sum losses (``owis_kinds`` None: every channel) and, with ``condition`` "bones",
    the channels whose true images condition the discriminator (the non-adversarial bones);
    ``condition_xray`` (0-d bool) with "xray"."""
    if condition not in DISC_CONDITIONS:
        raise UserError(f"unknown discriminator.condition '{condition}' (use one of {', '.join(DISC_CONDITIONS)})")
    muscle = torch.tensor([c.get("kind") == "muscle" for c in channels])
    gan = torch.tensor([c.get("kind") in gan_kinds for c in channels])
    owis = torch.tensor([owis_kinds is None or c.get("kind") in owis_kinds for c in channels])
    cond = torch.tensor([condition == "bones" and c.get("kind") == "bone" and c.get("kind") not in gan_kinds
                         for c in channels])
    return {"muscle": muscle, "gan": gan, "owis": owis, "condition": cond,
            "condition_xray": torch.tensor(condition == "xray")}


def discriminator_channels(groups: dict[str, torch.Tensor]) -> int:
    """Input channels of the discriminator: the adversarial channels and its condition."""
    cond = groups.get("condition")
    return (int(groups["gan"].sum()) + (int(cond.sum()) if cond is not None else 0)
            + int(bool(groups.get("condition_xray", False))))


def _disc_input(channels: torch.Tensor, targets_n: torch.Tensor, xray: torch.Tensor,
                groups: dict[str, torch.Tensor]) -> torch.Tensor:
    """The discriminator's input: its condition (the true normalised bone channels from
    ``targets_n`` = targets / channel scales, and/or the radiograph ``xray``, per ``groups``)
    stacked before the normalised adversarial ``channels``."""
    parts = []
    cond = groups.get("condition")
    if cond is not None and bool(cond.any()):
        parts.append(targets_n[:, cond.nonzero().flatten().tolist()])
    if bool(groups.get("condition_xray", False)):
        parts.append(xray.to(channels.dtype))
    return torch.cat(parts + [channels], 1) if parts else channels


def build_discriminator(cfg: dict[str, Any], channels: list[dict], weights: dict[str, float]
                        ) -> tuple[dict[str, torch.Tensor], MultiScaleDiscriminator | None]:
    """The channel groups of ``cfg`` (with its discriminator's condition) and the discriminator
    (None when no adversarial channel or loss is on), on the CPU; shared by training and the
    step-time estimate."""
    dcfg = cfg["discriminator"]
    groups = channel_groups(channels, cfg["gan_kinds"], cfg.get("intensity_sum_kinds"),
                            str(dcfg.get("condition", "none")))
    use_gan = bool(groups["gan"].any()) and (weights["gan"] > 0 or weights["feature_matching"] > 0)
    disc = MultiScaleDiscriminator(discriminator_channels(groups), int(dcfg["width"]), int(dcfg["n_layers"]),
                                   int(dcfg["n_scales"])) if use_gan else None
    return groups, disc


def generator_losses(pred: torch.Tensor, recon: torch.Tensor | None, batch: dict[str, torch.Tensor],
                     scales: torch.Tensor, groups: dict[str, torch.Tensor], weights: dict[str, float],
                     disc=None, disc_plain=None, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Each switched-on generator loss (unweighted) plus ``total`` (weighted sum). ``noise``: SD
    of the instance noise added to the discriminator's inputs (normalised channels)."""

    y = batch["targets"]
    paired = batch["paired"].bool()
    muscle = groups["muscle"].to(pred.device)[None]
    pn, yn = pred / scales, y / scales
    out: dict[str, torch.Tensor] = {}
    bone_mask = paired & ~muscle
    if weights["l1"] > 0:
        out["l1"] = L.paired_l1(pn, yn, bone_mask)
    if weights["gradient_correlation"] > 0:
        out["gradient_correlation"] = L.gradient_correlation(pn, yn, bone_mask)
    if weights["muscle_l1"] > 0:
        out["muscle_l1"] = L.paired_l1(pn, yn, paired & muscle)
    owis = groups.get("owis")
    owis = None if owis is None or bool(owis.all()) else owis.to(pred.device)[None].expand(pred.shape[0], -1)
    for key, form in (("intensity_sum", "relative"), ("intensity_sum_sq", "squared"), ("intensity_sum_log", "log")):
        if weights.get(key, 0.0) > 0:
            out[key] = L.intensity_sum(pred, batch["truth"], owis, form=form)
    if weights["cycle"] > 0 and recon is not None:
        out["cycle"] = L.cycle_l1(recon, batch["xray"])
    gan_idx = groups["gan"].nonzero().flatten().tolist()
    if disc is not None and gan_idx and (weights["gan"] > 0 or weights["feature_matching"] > 0):
        fake = disc(_noisy(_disc_input(pn[:, gan_idx], yn, batch["xray"], groups), noise))
        if weights["gan"] > 0:
            out["gan"] = L.lsgan_generator(fake)
        if weights["feature_matching"] > 0:
            with torch.no_grad():
                real = disc_plain(_noisy(_disc_input(yn[:, gan_idx], yn, batch["xray"], groups), noise))
            out["feature_matching"] = L.feature_matching(real, fake)
    out["total"] = sum(weights[k] * v for k, v in out.items())
    return out


def _noisy(x: torch.Tensor, sd: float) -> torch.Tensor:
    """``x`` plus Gaussian instance noise of SD ``sd`` (``x`` itself when ``sd`` is 0)."""
    return x + sd * torch.randn_like(x) if sd > 0 else x


def discriminator_loss(pred: torch.Tensor, batch: dict[str, torch.Tensor], scales: torch.Tensor,
                       groups: dict[str, torch.Tensor], disc, noise: float = 0.0,
                       real_label: float = 1.0) -> torch.Tensor:
    """LSGAN loss of the discriminator: real targets vs generated (detached) channels, in one
    forward call (real and fake concatenated along the batch); ``noise`` = SD of the instance
    noise on both, ``real_label`` = LSGAN target of the real ones."""

    idx = groups["gan"].nonzero().flatten().tolist()
    yn = batch["targets"] / scales
    real = _disc_input(yn[:, idx], yn, batch["xray"], groups)
    fake = _disc_input((pred.detach() / scales)[:, idx], yn, batch["xray"], groups)
    outs = disc(_noisy(torch.cat([real, fake]), noise))
    b = real.shape[0]
    return L.lsgan_discriminator([[f[:b] for f in o] for o in outs], [[f[b:] for f in o] for o in outs],
                                 real_label)


def adversarial_schedule(acfg: dict[str, Any], step: int, total: int) -> tuple[float, float]:
    """(factor of the GAN + feature-matching weights, instance-noise SD) at (0-based) ``step`` of
    ``total``: factor 0 before ``start_step``, then a linear ramp over ``ramp_steps`` to 1 (either
    a value in (0, 1) is a fraction of ``total``); the noise SD decays linearly from
    ``instance_noise`` to 0 at the last step."""
    a = {**DEFAULT_ADVERSARIAL, **(acfg or {})}
    start, ramp = (int(round(v * total)) if 0 < v < 1 else int(v) for v in (a["start_step"], a["ramp_steps"]))
    factor = 0.0 if step < start else (1.0 if ramp <= 0 else min(1.0, (step - start + 1) / ramp))
    noise = float(a["instance_noise"]) * max(0.0, 1.0 - step / max(1, total))
    return factor, noise


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out_dir: Path
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _collate(items: list[dict]) -> dict:
    return {k: (torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
                else torch.tensor([it[k] for it in items])) for k in items[0]}


def model_config(cfg: dict, info, scales: list[float], summary: dict, step: int) -> dict[str, Any]:
    """The JSON config of a model folder."""
    return {
        "code_version": __version__,
        "architecture": cfg["model"],
        "n_channels": len(info.channels),
        "channels": info.channels,
        "structures": [s.to_dict() for s in info.structures],
        "channel_scales": list(scales),
        "normalisation": info.normalisation,
        "density": info.density,
        "image_size": list(info.image_size),
        "pixel_spacing_mm": list(info.pixel_spacing_mm),
        "data_summary": summary,
        "training": {"step": step, "seed": cfg["seed"], "losses": cfg["losses"], "gan_kinds": cfg["gan_kinds"],
                     "intensity_sum_kinds": cfg.get("intensity_sum_kinds"),
                     "adversarial": cfg.get("adversarial", dict(DEFAULT_ADVERSARIAL)),
                     "resimulate": {**DEFAULT_RESIMULATE, **cfg["data"].get("resimulate", {})}},
        "units": "channels in g (mass_g) or cm^3 (volume_cm3) per pixel at pixel_spacing_mm",
    }


class Trainer:
    """One training run, in the order it happens (each part a method a newcomer can find):

    1. :meth:`_configure` - the merged config (or the checkpoint's on resume), the device, the
       data set and its checks, the channel scales;
    2. :meth:`_build` - generator, discriminator, optimisers, the sum head's input statistics,
       the state of a resumed checkpoint, DistributedDataParallel wrappers;
    3. :meth:`_loaders` - training loader (distributed sampler), validation records;
    4. :meth:`run` - the step loop (:meth:`step`: discriminator then generator update; logging,
       validation, checkpoints) and :meth:`finish` (final state, model folder, result).
    """

    def __init__(self, config: dict[str, Any] | None, data_dir: str | Path | None, out_dir: str | Path, *,
                 resume: bool = False, device: str = "auto", progress: str = "none", force: bool = False):
        self.out = Path(out_dir)
        self.progress_mode = progress
        self._configure(config, data_dir, resume, device, force)
        self._build()
        self._loaders()

    # --- 1. configuration, device, data ---------------------------------------------------------
    def _configure(self, config, data_dir, resume: bool, device: str, force: bool) -> None:
        out = self.out
        ckpt = None
        if resume:
            if not (out / "checkpoint.json").exists():
                raise UserError("nothing to resume (no checkpoint.json)", out)
            ckpt = load_checkpoint(out)
            if config is None:  # continue with the checkpoint's own config
                config = ckpt[1]["config"]
        cfg = merge_config({k: v for k, v in (config or {}).items() if k != "_doc"})
        cfg["model"] = {**cfg["model"], "recon_head": float(cfg["losses"]["cycle"]) > 0}
        if ckpt is not None:  # architecture keys added since that checkpoint keep their legacy values
            cfg["model"] = _with_legacy_arch(cfg["model"], ckpt[1]["config"].get("model"))
        dev = resolve_device(device)
        self.dist = init_distributed(dev)
        if self.dist.world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(dev)
        self.dev, self.ckpt, self.cfg = dev, ckpt, cfg
        data_dir = data_dir or cfg["data"]["dir"] or (ckpt[1]["config"]["data"]["dir"] if ckpt else None)
        if not data_dir:
            raise UserError("no training data: pass --data DIR or set data.dir in the config")
        cfg["data"]["dir"] = str(Path(data_dir).resolve())
        self.info = info = load_dataset_info(data_dir)
        h, w = info.image_size
        m = min_image_size(cfg["model"])
        if h % m or w % m:
            raise UserError(f"image size {h}x{w} must be a multiple of {m} for this model",
                            Path(data_dir) / "dataset.json")
        if ckpt is not None:
            _check_resumable(cfg, ckpt[1]["config"], out)
        elif self.dist.main:
            prepare_out_dir(out, force)
        # scales, summary (identical on every rank: computed from the same files)
        if ckpt is not None:
            self.summary, self.scales = ckpt[1]["data_summary"], ckpt[1]["channel_scales"]
        else:
            self.summary, auto = summarise_data(info, cfg["data"]["train_split"])
            self.scales = auto if cfg["channel_scales"] == "auto" else [float(s) for s in cfg["channel_scales"]]
        if len(self.scales) != len(info.channels):
            raise UserError(f"channel_scales has {len(self.scales)} entries for {len(info.channels)} channels")

    # --- 2. networks, optimisers, resumed state -------------------------------------------------
    def _build(self) -> None:
        cfg, info, dev = self.cfg, self.info, self.dev
        self.seed = int(cfg["seed"])
        torch.manual_seed(self.seed)
        self.weights = {k: float(v) for k, v in cfg["losses"].items()}
        self.gen = gen = build_generator(cfg["model"], len(info.channels), self.scales).to(dev)
        self.groups, disc = build_discriminator(cfg, info.channels, self.weights)
        self.disc = disc.to(dev) if disc is not None else None
        self.ocfg = ocfg = cfg["optimizer"]
        if ocfg.get("schedule", "constant") not in ("constant", "cosine"):
            raise UserError(f"unknown optimizer.schedule '{ocfg['schedule']}' (use constant or cosine)")
        opt_kw = dict(lr=float(ocfg["lr"]), betas=tuple(ocfg["betas"]), weight_decay=float(ocfg["weight_decay"]))
        self.opt_g = torch.optim.AdamW(gen.parameters(), **opt_kw)
        self.acfg = {**DEFAULT_ADVERSARIAL, **cfg["adversarial"]}
        self.d_ratio = float(self.acfg["d_lr_ratio"])
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), **{**opt_kw, "lr": opt_kw["lr"] * self.d_ratio}) \
            if self.disc is not None else None
        if gen.sum_head is not None and self.ckpt is None:  # standardise its input on the training split
            gen.sum_head.set_feature_stats(pooled_xrays(info, cfg["data"]["train_split"], gen.sum_head).to(dev))
        self.step_no, self.history = 0, []
        self.saved_step = None  # step of the last checkpoint on disk (for the divergence message)
        if self.ckpt is not None:
            self._restore(*self.ckpt)
        self.gen_run, self.disc_run = gen, self.disc
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dev.index] if dev.type == "cuda" else None
            self.gen_run = DDP(gen, device_ids=ids)
            self.disc_run = DDP(self.disc, device_ids=ids) if self.disc is not None else None

    def _restore(self, parts: dict, meta: dict) -> None:
        """Weights, optimiser states, RNG state, step and history of a checkpoint."""
        self.gen.load_state_dict(parts["generator"])
        self.opt_g.load_state_dict(parts["opt_g"])
        if self.disc is not None:
            self.disc.load_state_dict(parts["discriminator"])
            self.opt_d.load_state_dict(parts["opt_d"])
        if parts["rng"]["torch"] is not None:
            torch.set_rng_state(parts["rng"]["torch"])
        self.step_no, self.history = int(meta["step"]), list(meta.get("history", []))
        self.saved_step = self.step_no

    # --- 3. data loading --------------------------------------------------------------------------
    def _loaders(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.ds = RecordDataset(self.info, cfg["data"]["train_split"], cfg["data"]["augment"], self.seed,
                                resimulate_cfg=cfg["data"].get("resimulate"))
        self.sampler = DistributedSampler(self.ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                          seed=self.seed, drop_last=len(self.ds) >= dist.world * 2)
        bs = int(cfg["data"]["batch_size"])
        self.loader = DataLoader(self.ds, batch_size=bs, sampler=self.sampler,
                                 num_workers=int(cfg["data"]["num_workers"]), collate_fn=_collate,
                                 drop_last=len(self.sampler) >= bs)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise UserError("training split too small for one batch")
        self.val_ds = RecordDataset(self.info, cfg["data"]["val_split"], None, self.seed)
        self.amp = bool(cfg["amp"]) and self.dev.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.amp else nullcontext
        self.total = int(cfg["steps"])

    # --- 4. the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to ``steps`` (from the resumed step), then :meth:`finish`."""
        prog = Progress(self.progress_mode if self.dist.main else "none", total=self.total, desc="train")
        prog.n = self.step_no
        if prog._bar is not None:
            prog._bar.update(self.step_no)
        t0 = time.time()
        self.gen.train()
        ck_every = int(self.cfg["checkpoint_every"])
        while self.step_no < self.total:
            epoch, within = divmod(self.step_no, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.ds.set_epoch(epoch)
            for batch in itertools.islice(self.loader, within, None):
                if self.step_no >= self.total:
                    break
                rec = self.step(_to(batch, self.dev))
                prog.update(1, **{f"loss_{k}": rec[k] for k in ("total", "intensity_sum") if k in rec})
                if self.step_no % ck_every == 0 and self.step_no < self.total:
                    self.write_state(final=False)
        self.write_state(final=True)
        prog.event("done", step=self.step_no, total=self.total, seconds=round(time.time() - t0, 2), out=str(self.out))
        prog.close()
        return self.finish()

    def _set_learning_rate(self) -> None:
        lr = learning_rate(self.ocfg, self.step_no, self.total)
        for opt, ratio in ((self.opt_g, 1.0), (self.opt_d, self.d_ratio)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * ratio

    def step(self, batch: dict) -> dict[str, float]:
        """One optimisation step (discriminator, then generator) on a batch on the device; returns
        the step's record (losses; validation metrics when due), appended to the history when logged."""
        self._set_learning_rate()
        step, weights = self.step_no, self.weights
        adv, noise = adversarial_schedule(self.acfg, step, self.total)
        w_step = weights if adv == 1.0 else {**weights, "gan": weights["gan"] * adv,
                                             "feature_matching": weights["feature_matching"] * adv}
        with self.autocast():
            out_g = self.gen_run(batch["xray"], reconstruct=weights["cycle"] > 0)
        pred, recon = out_g if isinstance(out_g, tuple) else (out_g, None)
        rec: dict[str, float] = {"step": step + 1}
        scales = self.gen.scales
        if self.disc is not None and adv > 0:
            self.opt_d.zero_grad(set_to_none=True)
            with self.autocast():
                loss_d = discriminator_loss(pred, batch, scales, self.groups, self.disc_run, noise,
                                            float(self.acfg["real_label"]))
            _require_finite_loss({"discriminator": loss_d}, step, self.saved_step)
            loss_d.float().backward()
            self.opt_d.step()
            rec["discriminator"] = float(loss_d.detach())
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            losses = generator_losses(pred.float(), None if recon is None else recon.float(), batch, scales,
                                      self.groups, w_step, self.disc_run if adv > 0 else None, self.disc, noise)
        _require_finite_loss(losses, step, self.saved_step)
        losses["total"].float().backward()
        self.opt_g.step()
        self.step_no = step = step + 1
        rec.update({k: float(v.detach()) for k, v in losses.items()})
        if step % int(self.cfg["log_every"]) == 0 or step == self.total:
            if self.dist.main and len(self.val_ds) and (step % int(self.cfg["val_every"]) == 0 or step == self.total):
                rec.update(validate(self.gen, self.val_ds, self.dev, self.groups, scales, self.autocast))
            self.history.append(rec)
        return rec

    # --- 5. state on disk and the result --------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        return model_config(self.cfg, self.info, self.scales, self.summary, self.step_no)

    def write_state(self, final: bool) -> None:
        """Checkpoint + history (rank 0); with ``final`` also the calibration, the model folder
        and the loss curves."""
        if not self.dist.main:
            return
        mc = self.model_config()
        if final:
            mc.update(calibration_record(self.gen, self.info, self.cfg["calibration"], self.seed, self.dev))
        meta = {"step": self.step_no, "epoch": self.step_no // self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "seeds": {"seed": self.seed}, "config": self.cfg,
                "history": self.history, "channel_scales": self.scales, "data_summary": self.summary,
                "code_version": __version__, "model_config": mc, "world_size": self.dist.world, "amp": self.amp}
        save_checkpoint(self.out, generator=self.gen, discriminator=self.disc, opt_g=self.opt_g, opt_d=self.opt_d,
                        meta=meta)
        self.saved_step = self.step_no
        write_json(self.out / "history.json", self.history, force=True)
        if final:
            save_model(self.out, self.gen, mc, force=True)
            plot_history(self.history, self.out / "loss_curves.png")

    def finish(self) -> TrainResult:
        """Wait for every rank; the result with the model config as written."""
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.barrier()
        final_cfg = self.model_config()
        if self.dist.main and (self.out / "config.json").exists():
            final_cfg = json.loads((self.out / "config.json").read_text())
        return TrainResult(self.out, self.step_no, self.history, final_cfg)


def _check_resumable(cfg: dict[str, Any], ckpt_config: dict[str, Any], out: Path) -> None:
    """UserError unless ``cfg`` equals the checkpoint's config outside :data:`RESUMABLE_KEYS`."""
    old_cfg = merge_config({k: v for k, v in ckpt_config.items() if k != "_doc"})  # keys added since
    old_cfg["model"] = _with_legacy_arch(old_cfg["model"], ckpt_config.get("model"))
    old = {k: v for k, v in old_cfg.items() if k not in RESUMABLE_KEYS + ("_doc",)}
    new = {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS + ("_doc",)}
    if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
        diff = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), sort_keys=True)
                      != json.dumps(new.get(k), sort_keys=True))
        raise UserError(f"config differs from the checkpoint's in {diff}; only {list(RESUMABLE_KEYS)} "
                        "may change on --resume", out)


def train(config: dict[str, Any] | None, data_dir: str | Path | None, out_dir: str | Path, *, resume: bool = False,
          device: str = "auto", progress: str = "none", force: bool = False) -> TrainResult:
    """Train a decomposition model; writes checkpoints, history, loss curves and the model
    folder (``out_dir/model.safetensors`` + ``out_dir/config.json``). Returns the history.

    ``config`` None: the defaults, or with ``resume`` the checkpoint's config. ``data_dir`` None:
    ``config["data"]["dir"]`` (or the checkpoint's). See :class:`Trainer` for the parts."""
    return Trainer(config, data_dir, out_dir, resume=resume, device=device, progress=progress, force=force).run()


def calibration_record(gen, info, ccfg: dict[str, Any], seed: int, dev) -> dict[str, Any]:
    """{"calibration": record} of the trained generator on ``ccfg["split"]``, or
    {"calibration": None, "calibration_note": why} when disabled or too few records."""

    ccfg = {**DEFAULT_CALIBRATION, **(ccfg or {})}
    if not ccfg["enabled"]:
        return {"calibration": None, "calibration_note": "calibration switched off in the training config"}
    try:
        cal = calibrate_on_split(gen, info, str(ccfg["split"]), level=float(ccfg["level"]), tta=int(ccfg["tta"]),
                                 seed=seed, floor_fraction=float(ccfg["floor_fraction"]), device=dev)
    except UserError as exc:
        return {"calibration": None, "calibration_note": str(exc.args[0]) if exc.args else str(exc)}
    return {"calibration": cal}


def _require_finite_loss(losses: dict[str, torch.Tensor], step: int, saved_step: int | None) -> None:
    """NonFiniteError when a loss term is NaN/inf (checked before the optimiser step, so the weights
    stay finite): the run stops, no model is written, the last checkpoint (if any) is kept."""
    bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        kept = (f"; the checkpoint of step {saved_step} is kept (lower optimizer.lr, then --resume)"
                if saved_step else "")
        raise NonFiniteError(f"training diverged: loss {', '.join(bad)} is not finite at step {step + 1}; "
                             f"no model written{kept}")


def learning_rate(ocfg: dict[str, Any], step: int, total: int) -> float:
    """The learning rate of (0-based) ``step`` of ``total``: a function of the step only, so a
    resumed run follows the same schedule."""
    lr = float(ocfg["lr"])
    warm = int(ocfg.get("warmup_steps", 0))
    if warm > 0 and step < warm:
        return lr * (step + 1) / warm
    if ocfg.get("schedule", "constant") == "cosine":
        floor = float(ocfg.get("min_lr_fraction", 0.0))
        t = (step - warm) / max(1, total - warm)
        return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * min(max(t, 0.0), 1.0))))
    return lr


@torch.no_grad()
def validate(gen, val_ds, dev, groups, scales, autocast) -> dict[str, float]:
    """Validation metrics: OWIS and mean absolute relative sum error per quantity."""

    was = gen.training
    gen.eval()
    owis, l1 = [], []
    for i in range(len(val_ds)):
        b = _to(_collate([val_ds[i]]), dev)
        with autocast():
            p = gen(b["xray"]).float()
        owis.append(float(L.intensity_sum(p, b["truth"])))
        l1.append(float(L.paired_l1(p / scales, b["targets"] / scales)))
    gen.train(was)
    return {"val_intensity_sum": float(np.mean(owis)), "val_l1_all_channels": float(np.mean(l1))}


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Loss curves (log scale) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    keys = sorted({k for r in history for k in r if k != "step"})
    fig, ax = plt.subplots(figsize=(8, 5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in history if k in r and np.isfinite(r[k]) and r[k] > 0]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (unweighted)")
    ax.set_title("MSKdeX training losses")
    if keys:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, force=True) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def recalibrate(model_dir: str | Path, data_dir: str | Path, *, split: str = "val", level: float = INTERVAL,
                tta: int = DEFAULT_TTA, floor_fraction: float = FLOOR_FRACTION, seed: int = 0, device: str = "cpu",
                force: bool = False
                ) -> dict[str, Any]:
    """(Re)calibrate a model folder's interval on a data set's ``split`` (e.g. a model trained
    before calibration existed) and rewrite its config.json atomically; a model that already
    carries a calibration is only changed with ``force``. Returns the calibration record."""

    model = load_model(model_dir, device)
    info = load_dataset_info(data_dir)
    if info.channels != model.channels or list(info.image_size) != list(model.image_size):
        raise UserError("data set channels / image size differ from the model's", Path(data_dir) / "dataset.json")
    if model.config.get("calibration") and not force:
        raise UserError("model is already calibrated; pass --force to replace its calibration",
                        Path(model_dir) / "config.json")
    cal = calibrate_on_split(model.generator, info, split, level=level, tta=tta, seed=seed,
                             floor_fraction=floor_fraction, device=model.device)
    cfg = {k: v for k, v in model.config.items() if k not in ("format", "calibration_note")}
    cfg["calibration"] = {**cal, "dataset": str(Path(data_dir).resolve())}
    write_json(Path(model_dir) / "config.json", {"format": MODEL_FORMAT, **cfg}, force=True)
    return cfg["calibration"]
