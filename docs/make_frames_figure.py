"""Draw docs/frames.png: the CT (LPS) frame, the camera frame and the detector of the default
AP view, as implemented by MSKdeXLib.projection.geometry (computed from the code, not drawn by hand).

    python docs/make_frames_figure.py [--out docs/frames.png] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def draw(out: Path, force: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from MSKdeXLib.projection.geometry import Camera, ap_pose, invert_rigid
    from MSKdeXLib.visualize import save_figure

    cam = Camera()  # the default (DRR) detector of MSKdeXLib.settings
    iso = np.zeros(3)
    pose = ap_pose(iso, cam)
    cam_to_ct = invert_rigid(pose)

    def to_ct(p_cam):
        p = np.c_[np.atleast_2d(p_cam), np.ones(len(np.atleast_2d(p_cam)))]
        return (cam_to_ct @ p.T)[:3].T

    fig = plt.figure(figsize=(11, 5.2))
    ax = fig.add_subplot(1, 2, 1)
    # Side view of the patient (y = posterior to the right, z = superior up), looking from the patient's left.
    src = to_ct([0, 0, 0])[0]
    half = cam.rows * cam.spacing_row_mm / 2
    det = to_ct(np.array([[0, y, cam.sid_mm] for y in (-half, half)]))
    ax.plot([src[1]], [src[2]], "o", color="orange", ms=10)
    ax.annotate("X-ray source\n(camera origin)", (src[1], src[2]), (src[1] + 30, src[2] + 120), fontsize=8)
    ax.plot(det[:, 1], det[:, 2], color="k", lw=4)
    ax.annotate("detector (z_cam = SID)", (det[0, 1], det[1, 2]), (det[0, 1] - 260, det[1, 2] + 40), fontsize=8)
    for y in (-half, 0, half):
        p = to_ct([0, y, cam.sid_mm])[0]
        ax.plot([src[1], p[1]], [src[2], p[2]], color="gold", lw=0.8)
    body = plt.Circle((0, 0), 1, fill=False)
    ax.add_patch(plt.Rectangle((-120, -170), 240, 340, fill=True, color="lightsteelblue", alpha=0.6))
    ax.text(-110, 150, "patient\n(supine CT)", fontsize=8)
    ax.plot([0], [0], "r+", ms=12)
    ax.annotate("isocentre (centre of the\nlabelled bones)", (0, 0), (20, -120), fontsize=8, color="r")
    o = np.array([-600.0, -300.0])
    for vec, name, col in ((np.array([1, 0]), "+y LPS (posterior)", "tab:green"),
                           (np.array([0, 1]), "+z LPS (superior)", "tab:blue")):
        ax.arrow(*o, *(vec * 150), width=6, color=col)
        ax.text(*(o + vec * 165), name, fontsize=8, color=col)
    rz = pose[2, :3]  # camera z in LPS
    ry = pose[1, :3]
    o2 = np.array([src[1] + 60, src[2] - 250])
    for vec, name in ((rz, "+z_cam (to detector)"), (ry, "+y_cam (image rows, down)")):
        v = np.array([vec[1], vec[2]])
        ax.arrow(*o2, *(v * 150), width=5, color="purple")
        ax.text(*(o2 + v * 170), name, fontsize=8, color="purple")
    ax.set_xlim(-1000, 400)
    ax.set_ylim(-450, 450)
    ax.set_aspect("equal")
    ax.set_title("Default AP view, side view (from the patient's left)", fontsize=9)
    ax.set_xlabel("y_LPS (mm)")
    ax.set_ylabel("z_LPS (mm)")
    del body

    ax2 = fig.add_subplot(1, 2, 2)
    ax2.set_xlim(-0.5, cam.cols - 0.5)
    ax2.set_ylim(cam.rows - 0.5, -0.5)
    ax2.set_aspect("equal")
    ax2.add_patch(plt.Rectangle((-0.5, -0.5), cam.cols, cam.rows, fill=False, lw=2))
    cx, cy = cam.principal_point
    ax2.plot([cx], [cy], "r+", ms=12)
    ax2.text(cx + 4, cy - 6, "principal point (cx, cy)\n= isocentre's projection", fontsize=8, color="r")
    ax2.arrow(10, 10, 60, 0, width=1.5, color="purple")
    ax2.text(75, 14, "+x_cam = columns = patient LEFT", fontsize=8, color="purple")
    ax2.arrow(10, 10, 0, 60, width=1.5, color="purple")
    ax2.text(14, 85, "+y_cam = rows\n= patient inferior", fontsize=8, color="purple")
    ax2.text(5, cam.rows - 10, "R (patient right)", fontsize=9, color="tab:red")
    ax2.text(cam.cols - 75, cam.rows - 10, "L (patient left)", fontsize=9, color="tab:red")
    ax2.text(cam.cols / 2 - 20, 30, "head", fontsize=9)
    ax2.text(cam.cols / 2 - 20, cam.rows - 30, "feet", fontsize=9)
    ax2.set_title("Detector as displayed (radiological): pixel (row, col), row 0 on top", fontsize=9)
    ax2.set_xlabel("column c: x = (c - cx) * spacing_col")
    ax2.set_ylabel("row r: y = (r - cy) * spacing_row")
    fig.tight_layout()
    return save_figure(fig, out, force)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("frames.png")))
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    print(draw(Path(a.out), a.force))
