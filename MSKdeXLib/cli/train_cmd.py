"""``mskdex train``: train the decomposition network on a training-set folder."""

from __future__ import annotations

import os

from ..errors import UserError
from ..io.outputs import resumable_folder, write_json
from .common import add_device, add_force, add_progress, resolve_device


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="train the decomposition network (CPU, GPU, or several under torchrun)",
                       description="Train radiograph -> per-structure channels. Writes OUT/model.safetensors "
                       "+ OUT/config.json (the model folder), checkpoints, history.json and loss_curves.png. "
                       "Multi-GPU: torchrun --nproc_per_node N -m MSKdeXLib train ... Before it starts it "
                       "times a few warm-up steps and prints the estimated duration. The default config is sized "
                       "for a GPU (20,000 steps at 256 x 256: days on a CPU); --write-default-config FILE --cpu "
                       "writes the demo's CPU-sized one.")
    p.add_argument("--config", default=None, help="training config JSON (missing keys take the defaults)")
    p.add_argument("--write-default-config", metavar="FILE", default=None,
                   help="write the default config (documented) to FILE and exit")
    p.add_argument("--cpu", action="store_true",
                   help="with --write-default-config: the CPU-sized config (the demo's small network and 4,800 "
                        "steps: about 5 minutes on 2 cores at 32 x 32 records, longer at larger records) instead of "
                        "the paper-sized one for a GPU (20,000 steps)")
    p.add_argument("--data", default=None, help="training-set folder (mskdex-dataset/1); overrides data.dir")
    p.add_argument("--out", default=None, help="output model folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--steps", type=int, default=None, help="override the config's total steps")
    p.add_argument("--calibrate-only", action="store_true",
                   help="no training: (re)calibrate the interval of the model in --out on --data's validation "
                        "split (split conformal, 90 %%, 1 + 4 TTA passes as predict runs by default) and "
                        "update its config.json (--force to replace an existing calibration)")
    add_device(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..learning.training import (default_config, load_config, merge_config,  # lazy: torch; keeps
                                     recalibrate, train)  # `mskdex --help` instant

    if args.write_default_config:
        write_json(args.write_default_config, cpu_config() if args.cpu else default_config(), args.force)
        print(f"wrote {args.write_default_config} ({'cpu' if args.cpu else 'gpu'}-sized)")
        return 0
    if not args.out:
        raise UserError("--out is required (the model folder to write)")
    if args.calibrate_only:
        if not args.data:
            raise UserError("--calibrate-only needs --data (a data set with a 'val' split)")
        cal = recalibrate(args.out, args.data, device=str(resolve_device(args.device)), force=args.force)
        q = cal["tta"]["quantiles"]
        print(f"calibrated {args.out} on {cal['n']} '{cal['split']}' records: {cal['level']:.0%} interval, "
              f"quantiles {min(q):.3g}..{max(q):.3g}" + (" (pooled over channels)" if cal["tta"]["pooled"] else ""))
        return 0
    cfg = load_config(args.config) if args.config else (None if args.resume else merge_config({}))
    if args.steps is not None:
        if cfg is None:
            from ..learning.checkpoint import load_checkpoint  # lazy: torch; keeps `mskdex --help` instant

            cfg = load_checkpoint(args.out)[1]["config"]
        cfg["steps"] = int(args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        print_estimate(cfg, args)
    # an interrupted or diverged run leaves a resumable checkpoint, or nothing
    with resumable_folder(args.out, lambda p: (p / "checkpoint.json").exists()):
        res = train(cfg, args.data, args.out, resume=args.resume, device=args.device, progress=args.progress,
                    force=args.force)
    last = res.history[-1] if res.history else {}
    if int(os.environ.get("RANK", "0")) == 0:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
        print(f"trained {res.step} steps -> {res.out_dir}" + (f" ({summary})" if summary else ""))
    return 0


def cpu_config() -> dict:
    """The CPU-sized training config: the demo's (:func:`MSKdeXLib.demo.training_config`), with
    the documentation of the default config."""
    from ..demo import DemoSettings, training_config
    from ..learning.training import default_config

    return {"_doc": default_config()["_doc"], **{k: v for k, v in training_config(DemoSettings()).items()
                                                  if k != "_doc"}}


def print_estimate(cfg, args) -> None:
    """Print the run's estimated duration (a few timed warm-up steps of this config on this
    device) and, for a long CPU run, how to make it practical."""
    from ..learning.checkpoint import load_checkpoint
    from ..learning.dataset.records import load_dataset_info
    from ..learning.step_time import CPU_ADVICE_SECONDS, cpu_advice, duration_text, measure_step_seconds
    from ..learning.training import merge_config
    from .common import resolve_device

    if cfg is None:  # --resume with the checkpoint's own config
        cfg = load_checkpoint(args.out)[1]["config"]
    cfg = merge_config({k: v for k, v in cfg.items() if k != "_doc"})
    data = args.data or cfg["data"]["dir"]
    if not data:
        return  # train() says what is missing
    info = load_dataset_info(data)
    device = resolve_device(args.device)
    step_s = measure_step_seconds(cfg, info.channels, tuple(info.image_size), device)
    steps = int(cfg["steps"])
    h, w = info.image_size
    print(f"estimated training time: {steps} steps x {step_s:.3g} s = about {duration_text(steps * step_s)} on "
          f"{device} ({len(info.channels)} channels at {h} x {w}, batch {cfg['data']['batch_size']}; measured "
          "over warm-up steps, before data loading, validation and checkpoints)", flush=True)
    if device.type == "cpu" and steps * step_s > CPU_ADVICE_SECONDS:
        print(f"note: {cpu_advice(step_s, steps)}", flush=True)
