"""Bit-reproducible runs (the demo): one pinned set of thread counts, CPU code paths and
deterministic algorithms, recorded with the results.

Why pinning is needed (measured, issue 16): with one torch thread a training run is bit-identical
from run to run on one machine, but the math libraries pick their kernels by CPU: the same 100
training steps gave other weights when oneDNN and MKL were held to AVX2 on this AVX-512 machine,
i.e. on a CPU without AVX-512. Training a GAN amplifies any last-bit difference, so the demo's
numbers moved. :data:`PINNED_ENV` therefore holds every library to one thread and to its AVX2
code path (MKL's "conditional numerical reproducibility" mode, oneDNN's ISA cap, ATen's dispatch,
OpenBLAS's Haswell kernels): an x86-64 CPU with AVX2 then runs the same instructions in the same
order. These variables are read when the libraries load, so a command applies them by starting
again with them set (:func:`reexec_pinned`); :func:`deterministic_torch` sets what torch
allows at run time.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

#: threads of every math library (and of torch inside the process)
THREADS = 1

#: environment of a reproducible run, read by the libraries at load time
PINNED_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
    "PYTHONHASHSEED": "0",
    # CUDA matmuls: the workspace size that makes cuBLAS deterministic (ignored on CPU)
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}

#: x86-64 only: one code path whatever the CPU's newest instruction set
PINNED_ENV_X86: dict[str, str] = {
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "OPENBLAS_CORETYPE": "Haswell",
}

#: set (to "1") in a process started again by :func:`reexec_pinned`, so it never loops
REEXEC_MARK = "MSKDEX_PINNED"


def pinned_env() -> dict[str, str]:
    """The variables a reproducible run needs on this machine's architecture."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return {**PINNED_ENV, **(PINNED_ENV_X86 if x86 else {})}


def missing_pins(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The pinned variables that ``environ`` (default ``os.environ``) lacks or sets otherwise."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in pinned_env().items() if env.get(k) != v}


def reexec_pinned(argv: Sequence[str]) -> None:
    """Start this command again (same process id, same standard streams) with the pinned
    environment when it is not set yet: ``python -m MSKdeXLib *argv``. Returns (doing nothing)
    when the environment is already pinned or this process was started by this function."""
    if not missing_pins() or os.environ.get(REEXEC_MARK) == "1":
        return
    env = {**os.environ, **pinned_env(), REEXEC_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "MSKdeXLib", *argv], env)


@contextmanager
def deterministic_torch(threads: int = THREADS) -> Iterator[None]:
    """Within the block: ``threads`` intra-op threads (one inter-op thread when torch still lets
    it be set), deterministic algorithms (warn-only: on CPU every op used has one), no cuDNN
    benchmarking. The previous settings come back afterwards."""
    import torch

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed before the first inter-op work of the process
        pass
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]


def record() -> dict[str, Any]:
    """What a reproducible run ran with (JSON-ready): thread counts, deterministic flags, CPU
    code paths, the pinned variables' values and whether all are set, library versions."""
    import numpy
    import scipy
    import torch

    env = {k: os.environ.get(k) for k in pinned_env()}
    return {"pinned": not missing_pins(), "missing": sorted(missing_pins()), "environment": env,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
                         **_optional_versions(("monai", "SimpleITK", "skimage", "pydicom"))}}


def _optional_versions(names: Sequence[str]) -> dict[str, str]:
    import importlib

    out = {}
    for n in names:
        try:
            out[n] = str(getattr(importlib.import_module(n), "__version__", "?"))
        except ImportError:
            continue
    return out


def _cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
