"""The refinement's optimiser: torch's Adam + cosine annealing, written out (no torch.optim import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from MSKdeXLib.registration.optimize import CosineAdam

ROOT = Path(__file__).resolve().parents[3]


def _objective(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return z @ a @ z + torch.sin(3 * z).sum()   # not convex: paths that differ would part


def test_cosine_adam_takes_torch_optims_steps():
    """Step for step the same parameters as torch.optim.Adam with CosineAnnealingLR (the pair the
    registration refinement used before), to float64 rounding, for several lengths and betas."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    a = a @ a.T
    for steps, betas in ((10, (0.8, 0.95)), (40, (0.8, 0.95)), (25, (0.9, 0.999))):
        theirs = torch.full((6,), 0.3, dtype=torch.float64, requires_grad=True)
        mine = theirs.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([theirs], lr=1.0, betas=betas)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.05)
        ours = CosineAdam(mine, steps, lr=1.0, lr_min=0.05, betas=betas)
        for _ in range(steps):
            opt.zero_grad()
            _objective(theirs, a).backward()
            opt.step()
            sched.step()
            mine.grad = None
            _objective(mine, a).backward()
            ours.step()
            assert torch.allclose(theirs, mine, rtol=0, atol=1e-12)
        assert abs(ours.step_size() - sched.get_last_lr()[0]) < 1e-12
        assert (theirs - 0.3).abs().max() > 0.05   # it moved


def test_refinement_does_not_import_the_compiler():
    """A gradient refinement in a fresh process leaves torch._dynamo unimported (seconds per CLI run)."""
    code = ("import sys, numpy as np, torch\n"
            "from MSKdeXLib.registration.optimize import PoseSpace, gradient_refine\n"
            "space = PoseSpace(np.eye(4), np.zeros(3))\n"
            "target = torch.tensor([[1.0, 0, 0, 2.0], [0, 1.0, 0, -1.0], [0, 0, 1.0, 0.5], [0, 0, 0, 1.0]])\n"
            "f = lambda p: -((p - target) ** 2).sum(dim=(1, 2))\n"
            "r = gradient_refine(f, space, np.zeros(6), steps=30, lr_deg=0.2, lr_mm=0.5)\n"
            "assert r.similarity > f(space.matrices(torch.zeros(1, 6, dtype=torch.float64)).float())[0], r.similarity\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().splitlines()[-1] == "clean", out.stdout + out.stderr


def test_refinement_does_not_step_after_its_last_evaluation():
    """Every evaluation but the last is followed by one backward pass (the last one's step would
    never be evaluated), whether the step budget or the patience ends the refinement; the poses
    seen and the best kept are those of a loop that stepped after every evaluation."""
    import numpy as np

    from MSKdeXLib.registration.optimize import PoseSpace, gradient_refine

    space = PoseSpace(np.eye(4), np.zeros(3))
    target = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0], dtype=torch.float64)
    seen, backward = [], []

    def objective(poses: torch.Tensor) -> torch.Tensor:
        seen.append(poses.detach().clone())
        if poses.requires_grad:
            poses.register_hook(lambda g: backward.append(1))
        return -((poses[:, :3, 3].double() - target[3:]) ** 2).sum(-1) - 0.01 * (poses[:, :3, :3] ** 2).sum((-2, -1))

    for steps, patience, flat in ((12, 15, False), (30, 4, True)):
        seen.clear()
        backward.clear()
        f = (lambda p: objective(p) * 0.0) if flat else objective  # flat: no improvement, patience ends it
        r = gradient_refine(f, space, np.zeros(6), steps=steps, lr_deg=0.2, lr_mm=0.5, patience=patience)
        assert r.evaluations == len(seen) == len(backward) + 1
        assert r.evaluations == (patience + 1 if flat else steps)
        if not flat:  # the best pose is one that was evaluated, and the last evaluation is the best one here
            assert np.allclose(space.matrix(r.x), seen[-1][0].double().numpy(), atol=1e-6)
