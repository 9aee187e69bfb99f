"""Range and finiteness checks of a training config's numeric fields (issue 15).

A config with ``optimizer.lr: -1`` or ``steps: -1`` must stop before training with one line
naming the field and the file, not train nothing (exit 0) or crash inside torch (traceback).
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..validation import check_number

_POS = {"low": 0.0, "low_open": True}
_NONNEG = {"low": 0.0}
_INT1 = {"low": 1, "integer": True}
_INT0 = {"low": 0, "integer": True}

#: dotted field -> bounds (see :func:`MSKdeXLib.validation.check_number`)
FIELD_RULES: dict[str, dict[str, Any]] = {
    "seed": _INT0, "steps": _INT1, "checkpoint_every": _INT1, "log_every": _INT1, "val_every": _INT1,
    "optimizer.lr": _POS, "optimizer.weight_decay": _NONNEG, "optimizer.warmup_steps": _INT0,
    "optimizer.min_lr_fraction": {"low": 0.0, "high": 1.0},
    "data.batch_size": _INT1, "data.num_workers": _INT0, "data.resimulate.probability": {"low": 0.0, "high": 1.0},
    "discriminator.width": _INT1, "discriminator.n_layers": _INT1, "discriminator.n_scales": _INT1,
    "adversarial.start_step": _NONNEG, "adversarial.ramp_steps": _NONNEG, "adversarial.d_lr_ratio": _POS,
    "adversarial.instance_noise": _NONNEG, "adversarial.real_label": {"low": 0.0, "high": 1.0, "low_open": True},
}


def check_training_config(cfg: dict[str, Any], source: str = "config") -> None:
    """UserError (naming ``source`` and the field, e.g. ``optimizer.lr must be > 0, got -1``) for the
    first numeric field out of range or not finite; loss weights must be finite and >= 0."""
    try:
        for dotted, bounds in FIELD_RULES.items():
            node: Any = cfg
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                check_number(dotted, node, **bounds)
        for name, weight in (cfg.get("losses") or {}).items():
            check_number(f"losses.{name}", weight, **_NONNEG)
        betas = (cfg.get("optimizer") or {}).get("betas")
        if betas is not None:
            if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                raise UserError(f"optimizer.betas must be two numbers, got {betas!r}")
            for i, b in enumerate(betas):
                check_number(f"optimizer.betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        scales = cfg.get("channel_scales", "auto")
        if scales != "auto":
            if not isinstance(scales, (list, tuple)):
                raise UserError(f"channel_scales must be 'auto' or a list of numbers, got {scales!r}")
            for i, s in enumerate(scales):
                check_number(f"channel_scales[{i}]", s, **_POS)
    except UserError as exc:
        raise UserError(f"training config: {exc}", source) from None
