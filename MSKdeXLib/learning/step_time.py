"""How long a training run will take, measured before it starts: a few warm-up steps of the
configured generator and discriminator, with the configured losses, on random inputs of the data
set's size, on the chosen device (``mskdex train`` prints it).

The estimate leaves out data loading (records are cached in memory after the first epoch),
validation and checkpoints (every ``val_every`` / ``checkpoint_every`` steps), so a run takes a
little longer; it is meant to tell minutes from days.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .networks.generator import build_generator
from .training import build_discriminator, discriminator_loss, generator_losses

#: above this estimate a CPU run gets the advice of :func:`cpu_advice`
CPU_ADVICE_SECONDS = 2 * 3600.0


def measure_step_seconds(cfg: dict[str, Any], channels: list[dict], image_size: tuple[int, int],
                         device: torch.device, repeats: int = 3) -> float:
    """Seconds per optimisation step of ``cfg`` (a merged training config) for ``channels`` at
    ``image_size``: the median of ``repeats`` timed steps after one untimed warm-up step (one timed
    step when the warm-up took over 5 s). Seeds
    and restores torch's global random state, so a run that follows is unchanged."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        return _timed_steps(cfg, channels, image_size, device, repeats)
    finally:
        torch.set_rng_state(state)


def _timed_steps(cfg: dict[str, Any], channels: list[dict], image_size: tuple[int, int], device: torch.device,
                 repeats: int) -> float:
    c, (h, w) = len(channels), image_size
    b = int(cfg["data"]["batch_size"])
    weights = {k: float(v) for k, v in cfg["losses"].items()}
    model = {**cfg["model"], "recon_head": weights.get("cycle", 0.0) > 0}
    gen = build_generator(model, c, [1.0] * c).to(device).train()
    groups, disc = build_discriminator(cfg, channels, weights)
    disc = disc.to(device) if disc is not None else None
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-6)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-6) if disc is not None else None
    targets = torch.rand(b, c, h, w, device=device)
    batch = {"xray": torch.randn(b, 1, h, w, device=device), "targets": targets,
             "paired": torch.ones(b, c, dtype=torch.bool, device=device),
             "truth": targets.double().sum(dim=(2, 3)).float()}
    scales = torch.ones(1, c, 1, 1, device=device)
    times: list[float] = []
    i = 0
    while i <= repeats:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = gen(batch["xray"], reconstruct=weights.get("cycle", 0.0) > 0)
        pred, recon = out if isinstance(out, tuple) else (out, None)
        if disc is not None:
            opt_d.zero_grad(set_to_none=True)
            discriminator_loss(pred, batch, scales, groups, disc).backward()
            opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        generator_losses(pred, recon, batch, scales, groups, weights, disc, disc)["total"].backward()
        opt_g.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i:  # the first step pays one-time costs (allocation, kernel selection)
            times.append(dt)
        elif dt > 5.0:  # a slow model: one timed step is enough (and the warm-up stays short)
            repeats = 1
        i += 1
    return float(sorted(times)[len(times) // 2])


def duration_text(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h' or '4.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cpu_advice(step_s: float, steps: int) -> str:
    """How to get a practical CPU run, said plainly."""
    fit = max(1, int(3600 / max(step_s, 1e-9)))
    return (f"that is long for a CPU: train on a GPU (--device cuda), or with fewer steps (--steps {fit} fits in "
            "about an hour at this size), or start from the CPU-sized configuration "
            "(mskdex train --write-default-config FILE --cpu: the demo's small network on 32 x 32 records; "
            "build the data set with mskdex build-dataset --size 32)")
