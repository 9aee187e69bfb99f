"""Python packages the core needs beyond the Python standard library: the ONE list that the 3D
Slicer module installs (after asking) and that the Slicer-Python environment check installs.

3D Slicer ships numpy, scipy, SimpleITK, VTK, pydicom, pillow, requests and packaging (see
Slicer's ``SuperBuild/External_python-*.cmake``): the module never installs those (a newer build
could break Slicer). torch is installed through the *PyTorch* extension (SlicerPyTorch), which
picks the build matching the GPU; everything else below with pip, pinning what Slicer ships so
pip cannot upgrade it. GUI-free and import-light (standard library only).
"""

from __future__ import annotations

import importlib.metadata
import re

#: packages Slicer itself ships that the core imports (never installed by the module)
SLICER_SHIPS = ("numpy", "scipy", "SimpleITK", "vtk", "pydicom", "pillow")
#: installed through the PyTorch extension (PyTorchUtils), not with pip
TORCH = "torch>=2.2"
#: what the module pip-installs into Slicer's Python, the reason for each
SLICER_INSTALLS = (
    "safetensors>=0.4",    # model weights and data-set records (never pickle)
    "monai>=1.3",          # the decomposition networks (learning.networks)
    "cma>=3.3",            # registration's global search (CMA-ES)
    "matplotlib>=3.6",     # pictures written by register / train / predict (QA, loss curve, overlay)
    "scikit-image>=0.21",  # registration QA edges (registration.qa)
)
#: used by the ``mskdex`` command line only in ways the module never starts it (text progress
#: bars; the module runs ``--progress json``): not installed into Slicer
COMMAND_LINE_ONLY = ("tqdm",)
#: import name -> distribution name, where they differ
IMPORT_NAMES = {"PIL": "pillow", "skimage": "scikit-image", "vtkmodules": "vtk", "yaml": "pyyaml"}


def distribution(requirement: str) -> str:
    """'monai>=1.3' -> 'monai'."""
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]


def installed_version(name: str) -> str | None:
    """Version of an installed distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfied(requirement: str) -> bool:
    version = installed_version(distribution(requirement))
    if version is None:
        return False
    m = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    if not m:
        return True
    have = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    need = tuple(int(p) for p in m.group(1).split(".") if p)
    return have >= need


def missing(requirements=(TORCH, *SLICER_INSTALLS)) -> list[str]:
    """The requirements not satisfied in this Python (torch first when it is missing)."""
    return [r for r in requirements if not _satisfied(r)]


def pip_constraints(names=SLICER_SHIPS) -> str:
    """Constraint lines pinning the installed version of each of ``names`` (what Slicer ships),
    for ``pip install -c FILE``: installing the module's packages never changes Slicer's."""
    lines = []
    for n in names:
        v = installed_version(n)
        if v is not None:
            lines.append(f"{n}=={v}")
    return "\n".join(lines) + "\n"
