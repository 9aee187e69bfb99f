"""MSKdeX core: per-muscle lean mass and volume from a plain radiograph.

Pure Python (numpy, SimpleITK, pydicom, torch ...), importable without 3D Slicer.
Conventions (see docs/conventions.md): millimetres, grams, cm^3, g/cm^3, Hounsfield units;
3D points in the CT's physical LPS frame; a pose is a 4x4 rigid matrix CT-LPS -> camera.
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402,F401
