"""Pictures: side letters from the DICOM patient orientation, distinct structure colours, the
decomposition figure on the real pelvis CT's projections."""

from __future__ import annotations

import numpy as np
import pytest

from MSKdeXLib.visualize import (body_box, decomposition_figure, orientation_letters, resample_channels,
                                 structure_colours)


def test_side_letters_follow_the_patient_orientation():
    # DICOM (0020,0020): first value = the patient direction towards the last pixel of a row
    assert orientation_letters(["L", "F"]) == ("R", "L", False)  # radiological AP display
    assert orientation_letters(["R", "F"]) == ("L", "R", False)  # flipped
    assert orientation_letters([]) == ("R", "L", True) and orientation_letters(None)[2]


def test_structure_colours_are_all_different_and_pair_the_sides():
    names = ["gluteus_maximus_right", "gluteus_maximus_left", "gluteus_medius_right", "gluteus_medius_left",
             "iliopsoas_right", "iliopsoas_left", "hip_right", "hip_left", "sacrum", "femur_right", "femur_left"]
    kinds = ["muscle"] * 6 + ["bone"] * 5
    cols = structure_colours(names, kinds)
    assert len(set(cols)) == len(cols)
    # a muscle's two sides share a hue: dark = right, light = left
    import colorsys

    h = [colorsys.rgb_to_hsv(*(np.asarray(c) / 255))[0] for c in cols[:2]]
    assert abs(h[0] - h[1]) < 0.05 and sum(cols[1]) > sum(cols[0])


def test_resampling_keeps_the_sums_and_the_place(pelvis):
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view
    from MSKdeXLib.projection.geometry import Camera

    ct, labels = pelvis
    cam = Camera(rows=48, cols=48, spacing_row_mm=8.0, spacing_col_mm=8.0)
    r = DRRRenderer(ct, cam, labels=labels, structures=["femur_left", "gluteus_maximus_right"])
    ch = r.channels(default_view(ct, labels, cam), "mass")[0].numpy().astype(np.float64)
    up = resample_channels(ch, (8.0, 8.0), (192, 192), (2.0, 2.0))
    assert up.sum(axis=(1, 2)) == pytest.approx(ch.sum(axis=(1, 2)), rel=0.05)  # a picture, not a measure
    # centres of mass stay put (model pixel p -> radiograph pixel 4 p + 1.5)
    for a, b in zip(ch, up):
        ca = np.array(np.unravel_index(np.argmax(a), a.shape)) * 4 + 1.5
        com_a = np.array([np.sum(a * g) / a.sum() for g in np.indices(a.shape)]) * 4 + 1.5
        com_b = np.array([np.sum(b * g) / b.sum() for g in np.indices(b.shape)])
        assert np.abs(com_a - com_b).max() < 1.0, (ca, com_a, com_b)
    # the left femur (patient's left) is drawn on the image's right half in the default AP view
    assert np.indices(up[0].shape)[1][up[0] > 0.5 * up[0].max()].mean() > 96


def test_decomposition_figure_is_written_atomically(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rad = np.zeros((60, 80))
    rad[10:50, 15:65] = 1.0 + 0.1 * rng.random((40, 50))
    assert body_box(rad) == (slice(8, 52), slice(12, 68))
    ch = np.zeros((2, 60, 80))
    ch[0, 20:30, 20:30], ch[1, 25:45, 40:60] = 1.0, 2.0
    p = decomposition_figure(tmp_path / "d.png", rad, [("estimate", ch)], ["hip_right", "gluteus_medius_left"],
                             ["bone", "muscle"], caption="what to look for", patient_orientation=["L", "F"])
    w, h = Image.open(p).size
    assert w > h
    with pytest.raises(Exception, match="force"):
        decomposition_figure(p, rad, [], ["x"], ["bone"])


def test_written_radiographs_say_patient_right_is_on_the_image_left(tmp_path):
    # the renderer's default AP view puts the patient's left femur on the image's right half
    # (test_resampling_keeps_the_sums_and_the_place); the DICOM it writes must say the same
    from MSKdeXLib.io.images import Radiograph
    from MSKdeXLib.io.radiographs import load_radiograph, write_dx_dicom

    p = write_dx_dicom(tmp_path / "x.dcm", Radiograph(np.ones((8, 8), np.float32), (1.0, 1.0)))
    meta = load_radiograph(p).metadata
    assert meta["patient_orientation"] == ["L", "F"] and orientation_letters(meta["patient_orientation"])[:2] == ("R", "L")


def test_qa_zooms_sit_where_the_bodies_meet_and_the_picture_flags_doubtful_bodies(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from MSKdeXLib.registration.qa import qa_figure, zoom_boxes

    pelvis = np.zeros((200, 200))
    pelvis[40:120, 20:180] = 1.0
    femur_r, femur_l = np.zeros_like(pelvis), np.zeros_like(pelvis)
    femur_r[110:200, 40:70] = 1.0   # image left = patient's right
    femur_l[110:200, 130:160] = 1.0
    drrs = {"pelvis": pelvis, "femur_left": femur_l, "femur_right": femur_r}
    boxes = zoom_boxes(drrs)
    assert [b[0] for b in boxes] == ["femur_right meets pelvis", "femur_left meets pelvis"]  # left to right
    for (label, (rs, cs)), col in zip(boxes, (55, 145)):
        assert rs.start <= 115 < rs.stop and cs.start <= col < cs.stop  # the joint is in the zoom
        assert rs.stop - rs.start == cs.stop - cs.start >= 44  # square, at least 22 % of the image
    results = [SimpleNamespace(name="pelvis", final_similarity=0.8, doubtful=False, doubtful_below=0.3),
               SimpleNamespace(name="femur_left", final_similarity=0.4, doubtful=True, doubtful_below=0.62),
               SimpleNamespace(name="femur_right", final_similarity=0.9, doubtful=False, doubtful_below=0.62)]
    rad = 0.2 + pelvis + femur_l + femur_r
    p = qa_figure(tmp_path / "qa.png", rad, drrs, results=results, patient_orientation=["L", "F"])
    w, h = Image.open(p).size
    assert w > h > 300
