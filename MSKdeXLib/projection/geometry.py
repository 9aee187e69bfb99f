"""Cone-beam camera and rigid pose. Frames (see docs/frames.md for the picture):

* **CT frame**: the CT's physical LPS frame, mm (x -> patient Left, y -> Posterior, z -> Superior).
* **Camera frame**, mm: origin at the X-ray *source* (focal spot); +z along the principal ray
  towards the detector; +x along detector columns (image right); +y along detector rows
  (image down). The detector plane is z = SID.
* **Detector pixels**: pixel (row r, column c) has its centre at
  x = (c - cx) * spacing_col, y = (r - cy) * spacing_row, z = SID, where (cx, cy) is the
  principal point in pixels (default: the detector centre, (cols-1)/2, (rows-1)/2).
* **Pose**: a rigid 4x4 matrix ``ct_to_camera`` mapping homogeneous CT LPS points to the camera.

Default AP pelvis view: source anterior, detector posterior, so +z_cam = +P; radiological
display (patient's right on the image's left, head up), so +x_cam = +L and +y_cam = -S. The
isocentre (by default the centre of the labelled bones) sits on the principal ray at the
source-to-isocentre distance (default SID - 150 mm: the pelvis mid-plane 15 cm above the
detector, magnification ~1.18).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from ..validation import check_finite_fields
from ..settings import DRR_DETECTOR, SID_MM

#: Rotation taking LPS directions to camera axes for the default AP view (rows = camera axes).
AP_ROTATION = np.array([[1.0, 0.0, 0.0],    # x_cam = +L  (image right = patient left)
                        [0.0, 0.0, -1.0],   # y_cam = -S  (image down = inferior)
                        [0.0, 1.0, 0.0]])   # z_cam = +P  (source anterior, detector posterior)


@dataclass(frozen=True)
class Camera:
    """A cone-beam (pinhole) X-ray camera. Distances in mm, principal point in pixels."""

    rows: int = DRR_DETECTOR.rows
    cols: int = DRR_DETECTOR.cols
    spacing_row_mm: float = DRR_DETECTOR.pixel_spacing_mm
    spacing_col_mm: float = DRR_DETECTOR.pixel_spacing_mm
    sid_mm: float = SID_MM
    cx: float | None = None
    cy: float | None = None

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if self.rows < 1 or self.cols < 1:
            raise UserError(f"detector size must be positive, got {self.rows}x{self.cols}")
        if self.spacing_row_mm <= 0 or self.spacing_col_mm <= 0:
            raise UserError("detector pixel spacing must be positive")
        if self.sid_mm <= 0:
            raise UserError("source-to-image distance must be positive")

    @property
    def principal_point(self) -> tuple[float, float]:
        """(cx, cy) in pixels (column, row)."""
        return (
            (self.cols - 1) / 2.0 if self.cx is None else float(self.cx),
            (self.rows - 1) / 2.0 if self.cy is None else float(self.cy),
        )

    @property
    def pixel_area_mm2(self) -> float:
        return self.spacing_row_mm * self.spacing_col_mm

    def intrinsics(self) -> np.ndarray:
        """3x3 matrix K: camera (x, y, z) -> homogeneous pixel (c, r, 1) * z."""
        cx, cy = self.principal_point
        return np.array([[self.sid_mm / self.spacing_col_mm, 0.0, cx],
                         [0.0, self.sid_mm / self.spacing_row_mm, cy],
                         [0.0, 0.0, 1.0]])

    def pixel_centres_camera(self) -> np.ndarray:
        """Camera-frame positions (rows, cols, 3) of the detector pixel centres (z = SID)."""
        cx, cy = self.principal_point
        c = (np.arange(self.cols) - cx) * self.spacing_col_mm
        r = (np.arange(self.rows) - cy) * self.spacing_row_mm
        x, y = np.meshgrid(c, r)
        return np.stack([x, y, np.full_like(x, self.sid_mm)], axis=-1)

    def scaled(self, factor: float) -> "Camera":
        """The same field of view with ``factor`` times fewer pixels along each side."""
        rows, cols = max(1, round(self.rows / factor)), max(1, round(self.cols / factor))
        cx, cy = self.principal_point
        sr, sc = self.spacing_row_mm * self.rows / rows, self.spacing_col_mm * self.cols / cols
        # keep the physical position of the principal point
        return Camera(rows, cols, sr, sc, self.sid_mm,
                      (cx + 0.5) * self.spacing_col_mm / sc - 0.5,
                      (cy + 0.5) * self.spacing_row_mm / sr - 0.5)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cx"], d["cy"] = self.principal_point
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        keys = ("rows", "cols", "spacing_row_mm", "spacing_col_mm", "sid_mm", "cx", "cy")
        return cls(**{k: d[k] for k in keys if k in d})


def project(camera: Camera, ct_to_camera: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """Project LPS points (N, 3) to continuous pixel coordinates (N, 2) as (row, col)."""
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    cam = pts @ ct_to_camera[:3, :3].T + ct_to_camera[:3, 3]
    uvw = cam @ camera.intrinsics().T
    col = uvw[:, 0] / uvw[:, 2]
    row = uvw[:, 1] / uvw[:, 2]
    return np.stack([row, col], axis=1)


# --------------------------------------------------------------------------------------------
# Rotations and poses
# --------------------------------------------------------------------------------------------
def rotation_xyz(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """R = Rz @ Ry @ Rx (rotate about x first, then y, then z), angles in degrees."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def angles_xyz(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_xyz`: (rx, ry, rz) in degrees."""
    r = np.asarray(rotation)
    ry = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    if abs(np.cos(ry)) > 1e-8:
        rx = np.arctan2(r[2, 1], r[2, 2])
        rz = np.arctan2(r[1, 0], r[0, 0])
    else:  # gimbal lock: put everything in rx
        rx = np.arctan2(-r[1, 2], r[1, 1])
        rz = 0.0
    return tuple(float(v) for v in np.rad2deg([rx, ry, rz]))  # type: ignore[return-value]


def rigid(rotation: np.ndarray, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = np.asarray(translation, dtype=np.float64)
    return m


def invert_rigid(m: np.ndarray) -> np.ndarray:
    r, t = m[:3, :3], m[:3, 3]
    return rigid(r.T, -r.T @ t)


def check_rigid(m: np.ndarray, what: str = "pose", tol: float = 1e-4) -> np.ndarray:
    """Return ``m`` as a 4x4 float array, or raise UserError when it is not rigid."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4):
        raise UserError(f"{what} must be a 4x4 matrix, got shape {m.shape}")
    r = m[:3, :3]
    if not (np.allclose(r @ r.T, np.eye(3), atol=tol) and np.isclose(np.linalg.det(r), 1.0, atol=tol)
            and np.allclose(m[3], [0, 0, 0, 1], atol=tol)):
        raise UserError(f"{what} is not a rigid transform (rotation + translation)")
    return m


#: the default view's isocentre (pelvis mid-plane) lies this far in front of the detector, mm
ISOCENTRE_TO_DETECTOR_MM = 150.0


def default_source_to_isocentre(camera: Camera) -> float:
    """Default source-to-isocentre distance: the isocentre 150 mm in front of the detector."""
    return camera.sid_mm - ISOCENTRE_TO_DETECTOR_MM


def ap_pose(isocentre_lps, camera: Camera, source_to_isocentre_mm: float | None = None) -> np.ndarray:
    """The default AP view: ``isocentre_lps`` on the principal ray, source anterior."""
    d = default_source_to_isocentre(camera) if source_to_isocentre_mm is None else source_to_isocentre_mm
    iso = np.asarray(isocentre_lps, dtype=np.float64)
    return rigid(AP_ROTATION, np.array([0.0, 0.0, d]) - AP_ROTATION @ iso)


def perturbed_pose(base: np.ndarray, rotation_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0),
                   centre_lps=None) -> np.ndarray:
    """``base`` with an extra rotation (deg, about the CT-frame axes through ``centre_lps``)
    and translation (mm, along the CT LPS axes), applied in the CT frame before ``base``.

    This is how ``--rotation`` / ``--translation`` are interpreted relative to the default view:
    rotations are about the patient's L (x), P (y) and S (z) axes through the isocentre.
    """
    c = np.zeros(3) if centre_lps is None else np.asarray(centre_lps, dtype=np.float64)
    r = rotation_xyz(*rotation_deg)
    delta = rigid(r, c - r @ c + np.asarray(translation_mm, dtype=np.float64))
    return base @ delta


# --------------------------------------------------------------------------------------------
# Slicer (RAS) <-> core (LPS)
# --------------------------------------------------------------------------------------------
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def pose_to_slicer_ras(ct_to_camera: np.ndarray) -> np.ndarray:
    """The pose as a 4x4 acting on RAS points: camera = M_ras @ p_ras (camera frame unchanged)."""
    return ct_to_camera @ LPS_TO_RAS


def pose_from_slicer_ras(ras_to_camera: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pose_to_slicer_ras`."""
    return ras_to_camera @ LPS_TO_RAS


def source_position_lps(ct_to_camera: np.ndarray) -> np.ndarray:
    """Where the X-ray source is, in CT LPS mm."""
    return invert_rigid(ct_to_camera)[:3, 3]
