"""A Python environment like 3D Slicer's: exactly the packages a Slicer release ships plus what
the MSKdeX module installs into it (MSKdeXLib.dependencies), built once and cached.

Slicer's packages and versions are read from the release's own build files
(``SuperBuild/External_python-*.cmake`` in ../shared/reference/slicer/vX), installed with
``--no-deps`` as Slicer does; SimpleITK, which Slicer builds from source (External_SimpleITK,
not among the reference files), is added unpinned. The module's packages are then installed the
way the module installs them inside Slicer: torch first (as the PyTorch extension would; here
the CPU build the project's constraints name), then ``pip install -c <pins of what Slicer ships>
<MSKdeXLib.dependencies.SLICER_INSTALLS>``. Known difference: Slicer 5.8 runs Python 3.9,
this environment the interpreter of the test run.

The environment lives in ``<repo>/.cache/slicer-python/<version>-<hash>`` (git-ignored); the hash
covers the package lists, so a changed list builds a new one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from slicer_box import REFERENCE, ROOT

CACHE = ROOT / ".cache" / "slicer-python"
#: Python packages Slicer builds from source (no External_python-*.cmake): added unpinned
BUILT_BY_SLICER = ("SimpleITK",)


def shipped_packages(version: str) -> dict[str, str]:
    """{name: version} of every ``name==version`` requirement in the release's
    SuperBuild/External_python-*.cmake files."""
    found: dict[str, str] = {}
    files = sorted((REFERENCE / version / "SuperBuild").glob("External_python-*.cmake"))
    if not files:
        raise FileNotFoundError(f"no External_python-*.cmake for Slicer {version} in {REFERENCE}")
    for f in files:
        for name, ver in re.findall(r"^\s*([A-Za-z0-9_.\-]+)==([^\s\\]+)", f.read_text(encoding="utf-8"), flags=re.M):
            found[name] = ver
    return found


def _module_requirements() -> tuple[str, tuple[str, ...]]:
    sys.path.insert(0, str(ROOT))
    try:
        from MSKdeXLib import dependencies
    finally:
        sys.path.remove(str(ROOT))
    return dependencies.TORCH, tuple(dependencies.SLICER_INSTALLS)


def env_dir(version: str) -> Path:
    torch, installs = _module_requirements()
    key = repr((sorted(shipped_packages(version).items()), BUILT_BY_SLICER, torch, installs,
                (ROOT / ".ci" / "constraints.txt").read_text(encoding="utf-8"), sys.version_info[:2]))
    return CACHE / f"{version}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def python_of(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd, log, **kw):
    log.write("$ " + " ".join(map(str, cmd)) + "\n")
    log.flush()
    r = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(map(str, cmd))}; see {log.name}")


def build(version: str) -> Path:
    """The environment of ``version`` (built when absent; ~2 minutes, then cached)."""
    env = env_dir(version)
    if (env / "READY").is_file():
        return env
    tmp = env  # built in place (a venv is not relocatable); READY is written last
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    torch, installs = _module_requirements()
    with open(tmp.parent / f"{env.name}.log", "w") as log:
        _run([sys.executable, "-m", "venv", tmp], log)
        py = python_of(tmp)
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        shipped = shipped_packages(version)
        _run(pip + ["--no-deps"] + [f"{n}=={v}" for n, v in shipped.items()] + list(BUILT_BY_SLICER), log)
        # the module's installer, as in Slicer: torch (PyTorch extension), then the rest with Slicer's pins
        _run(pip + ["-c", ROOT / ".ci" / "constraints.txt", torch], log)
        pins = subprocess.run([py, "-c", "from MSKdeXLib import dependencies; print(dependencies.pip_constraints())"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, check=True).stdout
        (tmp / "slicer-pins.txt").write_text(pins)
        _run(pip + ["-c", tmp / "slicer-pins.txt", "-c", ROOT / ".ci" / "constraints.txt", *installs], log)
        _run([py, "-m", "pip", "freeze"], log)
    (env / "READY").write_text(version + "\n")
    return env


def freeze(env: Path) -> dict[str, str]:
    out = subprocess.run([python_of(env), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    pkgs = {}
    for line in out.splitlines():
        if "==" in line:
            n, v = line.split("==", 1)
            pkgs[n.lower().replace("_", "-")] = v
    return pkgs
