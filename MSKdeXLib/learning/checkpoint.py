"""Checkpoints and model folders: safetensors (tensors) + JSON (everything else), never pickle.

* Training checkpoint ``OUT/checkpoint.safetensors`` + ``OUT/checkpoint.json``: generator,
  discriminator and both optimisers' states (flattened to tensors ``opt_g.<param>.<name>``;
  their param groups and scalar state go to the JSON), the torch RNG state, plus step, epoch,
  seeds, config, history. Both files carry the step; a mismatched pair is refused.
* Model folder ``MODEL/model.safetensors`` (generator weights, ``generator.`` prefix dropped)
  + ``MODEL/config.json`` (format ``mskdex-model/1``: architecture, channels, structures,
  channel scales, normalisation, image size and pixel spacing, data summary, code version).

Everything is written atomically (temporary name, then rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..io.outputs import atomic_path, write_json
from ..io.documents import read_json

MODEL_FORMAT = "mskdex-model/1"
CHECKPOINT_FORMAT = "mskdex-checkpoint/1"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")


# ---------------------------------------------------------------------------------------------
# Optimiser state <-> flat tensors + JSON
# ---------------------------------------------------------------------------------------------
def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) of an optimiser's state dict."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    """The optimiser state dict rebuilt from :func:`flatten_optimizer`'s output."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise UserError(f"not a valid safetensors file ({msg}); pickle files are never loaded", path) from None


def require_finite_weights(tensors: dict[str, torch.Tensor], path: str | Path, what: str = "weight") -> None:
    """UserError naming ``path`` and the first tensor holding NaN/inf (with how many tensors do):
    a model or checkpoint from a diverged run is never written nor loaded."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        n = int((~torch.isfinite(tensors[bad[0]])).sum())
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(f"{what} '{bad[0]}' holds {n} NaN/inf values{more}: the model is unusable "
                        "(from a diverged training run?)", path)


# ---------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(folder: str | Path, *, generator: torch.nn.Module, discriminator: torch.nn.Module | None,
                    opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None,
                    meta: dict[str, Any]) -> Path:
    """Write ``checkpoint.safetensors`` + ``checkpoint.json`` in ``folder`` (atomically,
    replacing the previous checkpoint). ``meta`` must hold ``step``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = _prefixed(generator.state_dict(), "generator")
    og_t, og_meta = flatten_optimizer(opt_g, "opt_g")
    tensors.update(og_t)
    od_meta = None
    if discriminator is not None:
        tensors.update(_prefixed(discriminator.state_dict(), "discriminator"))
    if opt_d is not None:
        od_t, od_meta = flatten_optimizer(opt_d, "opt_d")
        tensors.update(od_t)
    require_finite_weights(tensors, folder / "checkpoint.safetensors", "checkpoint tensor")
    tensors["rng.torch"] = torch.get_rng_state()
    step = str(int(meta["step"]))
    with atomic_path(folder / "checkpoint.safetensors", force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "step": step})
    doc = {"format": CHECKPOINT_FORMAT, **meta, "optimizer_g": og_meta, "optimizer_d": od_meta}
    write_json(folder / "checkpoint.json", doc, force=True)
    return folder / "checkpoint.json"


def load_checkpoint(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensors by part, json) of ``folder``'s checkpoint. Parts: generator, discriminator,
    opt_g, opt_d (rebuilt state dicts), rng."""
    folder = Path(folder)
    meta = read_json(folder / "checkpoint.json", "checkpoint description")
    st_path = folder / "checkpoint.safetensors"
    if not st_path.exists():
        raise UserError("checkpoint weights missing", st_path)
    tensors, st_meta = _load_safetensors(st_path)
    if meta.get("format") != CHECKPOINT_FORMAT or st_meta.get("step") != str(meta.get("step")):
        raise UserError("checkpoint.json and checkpoint.safetensors do not belong together", folder)
    require_finite_weights(tensors, st_path, "checkpoint tensor")
    parts = {"generator": _strip(tensors, "generator"), "discriminator": _strip(tensors, "discriminator"),
             "opt_g": unflatten_optimizer(tensors, meta["optimizer_g"], "opt_g"),
             "opt_d": None if meta.get("optimizer_d") is None else
             unflatten_optimizer(tensors, meta["optimizer_d"], "opt_d"),
             "rng": {"torch": tensors.get("rng.torch")}}
    return parts, meta


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------
def save_model(folder: str | Path, generator: torch.nn.Module, config: dict[str, Any], force: bool = False) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``config`` must be a model config)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    require_finite_weights(weights, folder / "model.safetensors")
    with atomic_path(folder / "model.safetensors", force=force) as tmp:
        save_file(weights, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(folder / "config.json", {"format": MODEL_FORMAT, **config}, force=force)
    return folder


def check_model_config(config: dict[str, Any], path: Path) -> None:
    """UserError unless channels, structures and scales are consistent."""
    for key in ("architecture", "channels", "structures", "channel_scales", "image_size", "pixel_spacing_mm",
                "normalisation"):
        if key not in config:
            raise UserError(f"model config lacks '{key}'", path)
    names = [s.get("name") for s in config["structures"]]
    for c in config["channels"]:
        if c.get("structure") not in names:
            raise UserError(f"channel {c.get('structure')}:{c.get('quantity')} names a structure that is "
                            "not in the config's structures", path)
    if len(config["channel_scales"]) != len(config["channels"]):
        raise UserError(f"{len(config['channel_scales'])} channel scales for {len(config['channels'])} channels",
                        path)


def load_model_files(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, config) of a model folder, checked; refuses anything but safetensors + JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("model folder not found", folder)
    weights_path = folder / "model.safetensors"
    if not weights_path.exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        hint = f" (found {pickles[0]}: pickle files are never loaded)" if pickles else ""
        raise UserError(f"model folder has no model.safetensors{hint}", folder)
    config = read_json(folder / "config.json", "model config")
    if config.get("format") != MODEL_FORMAT:
        raise UserError(f"unsupported model format {config.get('format')!r} (expected {MODEL_FORMAT})",
                        folder / "config.json")
    check_model_config(config, folder / "config.json")
    weights, _ = _load_safetensors(weights_path)
    require_finite_weights(weights, weights_path)
    return weights, config
