"""Pose parameters and optimisers for rigid 2D-3D registration.

A pose is searched as 6 parameters ``x = (rx, ry, rz, tx, ty, tz)`` applied in the **camera
frame** on top of a base pose: rotations (deg, R = Rz Ry Rx about the camera x, y, z axes) about
the body's centre, then a translation (mm) along the camera axes (x = image columns, y = image
rows, z = depth towards the detector). So ``ct_to_camera(x) = D(x) @ base`` with
``D = [R, c - R c + t]``, c = body centre in camera mm. rz is the in-plane rotation, tz the
(poorly observable) depth.

Stages: a global CMA-ES search (package ``cma``) on batches of poses at coarse resolution, then
a local gradient-based refinement (Adam through the differentiable renderer).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import cma
import numpy as np
import torch

from ..projection.geometry import angles_xyz, rigid, rotation_xyz

#: objective: (B, 4, 4) torch poses -> (B,) similarity (higher is better)
Objective = Callable[[torch.Tensor], torch.Tensor]


def _rot_torch(angles_deg: torch.Tensor) -> torch.Tensor:
    """(B, 3) degrees -> (B, 3, 3) R = Rz @ Ry @ Rx (as geometry.rotation_xyz)."""
    a = torch.deg2rad(angles_deg)
    cx, cy, cz = torch.cos(a).unbind(-1)
    sx, sy, sz = torch.sin(a).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


@dataclass
class PoseSpace:
    """Maps 6 parameters (deg, deg, deg, mm, mm, mm) to ct_to_camera poses around ``base``."""

    base: np.ndarray
    centre_lps: np.ndarray

    def __post_init__(self) -> None:
        self.base = np.asarray(self.base, dtype=np.float64)
        self.centre_lps = np.asarray(self.centre_lps, dtype=np.float64).reshape(3)

    @property
    def centre_camera(self) -> np.ndarray:
        return self.base[:3, :3] @ self.centre_lps + self.base[:3, 3]

    def matrix(self, x) -> np.ndarray:
        """4x4 numpy pose of one parameter vector."""
        x = np.asarray(x, dtype=np.float64)
        r = rotation_xyz(*x[:3])
        c = self.centre_camera
        return rigid(r, c - r @ c + x[3:6]) @ self.base

    def matrices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4, 4) torch poses of (B, 6) parameters; differentiable, dtype/device of ``x``."""
        x = x.reshape(-1, 6)
        r = _rot_torch(x[:, :3])
        c = torch.as_tensor(self.centre_camera, dtype=x.dtype, device=x.device)
        t = c - r @ c + x[:, 3:6]
        d = torch.zeros(x.shape[0], 4, 4, dtype=x.dtype, device=x.device)
        d[:, :3, :3] = r
        d[:, :3, 3] = t
        d[:, 3, 3] = 1.0
        return d @ torch.as_tensor(self.base, dtype=x.dtype, device=x.device)

    def params_of(self, pose: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`: the parameters giving ``pose``."""
        d = np.asarray(pose, dtype=np.float64) @ np.linalg.inv(self.base)
        r = d[:3, :3]
        c = self.centre_camera
        t = d[:3, 3] - (c - r @ c)
        return np.r_[angles_xyz(r), t]


@dataclass
class StageResult:
    x: np.ndarray
    similarity: float
    evaluations: int
    seconds: float
    history: list = field(default_factory=list)


#: optional penalty on the parameters: (B, 6) float64 tensor -> (B,), subtracted from the objective
Penalty = Callable[[torch.Tensor], torch.Tensor]


def _six(a, b) -> np.ndarray:
    """(6,) from a rotation value/array (3) and a translation value/array (3)."""
    return np.r_[np.broadcast_to(np.asarray(a, dtype=np.float64), 3), np.broadcast_to(np.asarray(b, dtype=np.float64), 3)]


def cma_search(objective: Objective, space: PoseSpace, x0, sigma_deg, sigma_mm,
               bounds_deg, bounds_mm, popsize: int = 16, max_evals: int = 400,
               seed: int = 0, dtype=torch.float32, device="cpu",
               callback: Callable[[int, float], None] | None = None,
               penalty: Penalty | None = None) -> StageResult:
    """Global CMA-ES over the 6 pose parameters (rotations scaled by ``sigma_deg``, translations
    by ``sigma_mm``; scalars or one value per axis), bounded to +-``bounds_deg`` / +-``bounds_mm``
    around ``x0``. Each generation is rendered as one batch. Maximises ``objective`` minus
    ``penalty`` (if given)."""
    t0 = time.time()
    x0 = np.asarray(x0, dtype=np.float64)
    scale = _six(sigma_deg, sigma_mm)
    half = _six(bounds_deg, bounds_mm) / scale
    opts = {"popsize": popsize, "maxfevals": max_evals, "seed": int(seed) + 1, "verbose": -9,
            "bounds": [list(-half), list(half)], "tolfun": 1e-5, "tolx": 1e-3}
    es = cma.CMAEvolutionStrategy(np.zeros(6), 1.0, opts)
    best_x, best_f, n, hist = x0.copy(), -math.inf, 0, []
    with torch.no_grad():
        while not es.stop():
            z = np.asarray(es.ask())
            xs = x0 + z * scale
            xt = torch.as_tensor(xs, dtype=torch.float64)
            poses = space.matrices(xt).to(dtype=dtype, device=device)
            f = objective(poses).double().cpu()
            if penalty is not None:
                f = f - penalty(xt)
            f = f.numpy()
            f = np.where(np.isfinite(f), f, -1.0)
            es.tell(list(z), list(-f))
            n += len(xs)
            i = int(np.argmax(f))
            if f[i] > best_f:
                best_f, best_x = float(f[i]), xs[i].copy()
            hist.append(float(best_f))
            if callback:
                callback(len(xs), best_f)
    return StageResult(best_x, best_f, n, time.time() - t0, hist)


class CosineAdam:
    """Adam (Kingma & Ba; the update of ``torch.optim.Adam``, no weight decay) on one tensor, its step
    size annealed from ``lr`` to ``lr_min`` over ``steps`` steps on a half cosine (as
    ``torch.optim.lr_scheduler.CosineAnnealingLR``). Written out because any ``torch.optim`` optimizer
    imports ``torch._dynamo`` when it is first built: seconds of a ``mskdex register`` run spent on an
    import that six parameters do not need (the refinement's results are unchanged: test_optimize)."""

    def __init__(self, param: torch.Tensor, steps: int, lr: float = 1.0, lr_min: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.steps, self.lr, self.lr_min, self.betas, self.eps = param, steps, lr, lr_min, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def step_size(self) -> float:
        """The learning rate of the next step (cosine annealing, closed form)."""
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * self.t / self.steps)) / 2

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step with ``param.grad``."""
        lr = self.step_size()
        self.t += 1
        b1, b2 = self.betas
        g = self.param.grad
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        denom = (self.v.sqrt() / math.sqrt(bias2)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / bias1)


def gradient_refine(objective: Objective, space: PoseSpace, x0, steps: int = 60, lr_deg: float = 0.3,
                    lr_mm: float = 1.0, dtype=torch.float32, device="cpu", patience: int = 15,
                    callback: Callable[[int, float], None] | None = None,
                    bounds: tuple[np.ndarray, np.ndarray] | None = None,
                    penalty: Penalty | None = None) -> StageResult:
    """Local refinement: Adam on the 6 parameters through the differentiable renderer, with
    step sizes ``lr_deg`` / ``lr_mm`` (decayed); returns the best pose seen. Maximises.
    ``bounds`` = (lower (6,), upper (6,)) keeps the parameters inside a box; ``penalty`` is
    subtracted from the objective."""
    t0 = time.time()
    scale = torch.tensor([lr_deg] * 3 + [lr_mm] * 3, dtype=torch.float64)
    x0_t = torch.as_tensor(np.asarray(x0, dtype=np.float64))
    z = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = CosineAdam(z, steps=max(1, steps), lr=1.0, lr_min=0.05, betas=(0.8, 0.95))
    best_x, best_f, hist, since = np.asarray(x0, dtype=np.float64), -math.inf, [], 0
    for step in range(steps):
        z.grad = None
        x = x0_t + z * scale
        pose = space.matrices(x[None]).to(dtype=dtype, device=device)
        f = objective(pose)[0]
        if penalty is not None:
            f = f - penalty(x[None])[0].to(f.dtype)
        fv = float(f.detach())
        if fv > best_f + 1e-6:
            best_f, best_x, since = fv, x.detach().numpy().copy(), 0
        else:
            since += 1
        hist.append(fv)
        if callback:
            callback(1, best_f)
        if since >= patience or step == steps - 1:  # (after the last step's evaluation nothing is stepped)
            break
        (-f).backward()
        opt.step()
        if bounds is not None:
            with torch.no_grad():
                lo = (torch.as_tensor(bounds[0], dtype=torch.float64) - x0_t) / scale
                hi = (torch.as_tensor(bounds[1], dtype=torch.float64) - x0_t) / scale
                z.copy_(torch.maximum(torch.minimum(z, hi), lo))
    return StageResult(best_x, best_f, len(hist), time.time() - t0, hist)
