"""Loading CTs and labels: formats, DICOM series, Slicer segmentations, and every bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from MSKdeXLib.errors import UserError
from MSKdeXLib.io.volumes import load_ct, load_labels


def _crop(ct, labels, k0=40, k1=56):
    """A small real sub-volume (slices k0:k1) of the pelvis CT and its labels, as sitk images."""
    img = ct.to_sitk()[:, :, k0:k1]
    lab = sitk.Cast(labels.grid.with_array(labels.layers[0]).to_sitk()[:, :, k0:k1], sitk.sitkUInt8)
    return img, lab


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_formats_keep_geometry(pelvis, tmp_path, suffix):
    ct, labels = pelvis
    img, lab = _crop(ct, labels)
    sitk.WriteImage(img, str(tmp_path / f"ct{suffix}"))
    sitk.WriteImage(lab, str(tmp_path / f"lab{suffix}"))
    v = load_ct(tmp_path / f"ct{suffix}")
    assert v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(v.origin, img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(v.direction.ravel(), img.GetDirection(), atol=1e-6)
    lm = load_labels(tmp_path / f"lab{suffix}", v, table="totalseg_v1")
    assert {s.name for s in lm.structures} >= {"hip_left", "gluteus_medius_right"}


def test_dicom_series_folder(pelvis, tmp_path):
    ct, labels = pelvis
    img = sitk.Cast(ct.to_sitk()[:, :, 30:42], sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    direction = img.GetDirection()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in [("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|0013", str(k + 1)),
                           ("0020|0037", "\\".join(f"{d:.6f}" for d in (direction[0], direction[3], direction[6],
                                                                     direction[1], direction[4], direction[7]))),
                           ("0020|0032", "\\".join(f"{p:.4f}" for p in img.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0028|1052", "0"), ("0028|1053", "1"), ("0018|0050", f"{img.GetSpacing()[2]}")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    v = load_ct(tmp_path)
    assert v.size == img.GetSize()
    np.testing.assert_allclose(v.spacing, img.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(v.origin, img.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(v.direction.ravel(), direction, atol=1e-5)
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(img).astype(np.float32))


def _write_seg_nrrd(path, layers: np.ndarray, grid, segments):
    """A Slicer-style multi-layer .seg.nrrd (4D, first axis 'list'), written by hand."""
    n, k, j, i = layers.shape
    d = grid.direction @ np.diag(grid.spacing)
    lines = ["NRRD0004", "type: unsigned char", "dimension: 4", "space: left-posterior-superior",
             f"sizes: {n} {i} {j} {k}",
             "space directions: none " + " ".join(f"({d[0, a]},{d[1, a]},{d[2, a]})" for a in range(3)),
             "kinds: list domain domain domain", "encoding: gzip",
             f"space origin: ({grid.origin[0]},{grid.origin[1]},{grid.origin[2]})"]
    for idx, (name, layer, value) in enumerate(segments):
        lines += [f"Segment{idx}_ID:=seg{idx}", f"Segment{idx}_Name:={name}", f"Segment{idx}_Layer:={layer}",
                  f"Segment{idx}_LabelValue:={value}", f"Segment{idx}_Color:=0.5 0.25 1"]
    data = np.moveaxis(layers.astype(np.uint8), 0, -1)  # fastest axis = layer ('list')
    path.write_bytes(("\n".join(lines) + "\n\n").encode() + gzip.compress(data.tobytes(order="C")))


def test_seg_nrrd_with_overlapping_layers(pelvis, tmp_path):
    ct, labels = pelvis
    gm = labels.mask("gluteus_medius_left")
    hip = labels.mask("hip_left")
    grown = gm.copy()
    grown[:, 1:, :] |= gm[:, :-1, :]  # overlaps with the first layer's segment
    layers = np.stack([np.where(gm, 1, 0) + np.where(hip, 2, 0), np.where(grown, 1, 0)])
    path = tmp_path / "case.seg.nrrd"
    _write_seg_nrrd(path, layers, ct, [("Gluteus Medius Left", 0, 1), ("Left hip", 0, 2),
                                       ("my grown region", 1, 1)])
    lm = load_labels(path, ct)
    names = [s.name for s in lm.structures]
    assert names[:2] == ["hip_left", "gluteus_medius_left"] and "my_grown_region" in names
    np.testing.assert_array_equal(lm.mask("gluteus medius left"), gm)
    np.testing.assert_array_equal(lm.mask("my grown region"), grown)
    assert (lm.mask("my grown region") & lm.mask("gluteus_medius_left")).sum() == gm.sum()  # overlap kept
    assert lm.resolve("gluteus medius left").kind == "muscle"
    assert lm.resolve("my grown region").color == (128, 64, 255)  # the segment's own colour


def test_float_labels_rounded_and_non_integral_refused(pelvis, tmp_path):
    ct, labels = pelvis
    arr = labels.layers[0].astype(np.float64)
    sitk.WriteImage(ct.with_array(arr).to_sitk(), str(tmp_path / "ok.nii.gz"))
    assert load_labels(tmp_path / "ok.nii.gz", ct).table.name == "totalseg_v1"
    arr[10, 10, 10] = 3.4
    sitk.WriteImage(ct.with_array(arr).to_sitk(), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(UserError, match=r"bad\.nii\.gz: label map has non-integral values"):
        load_labels(tmp_path / "bad.nii.gz", ct)


def test_grid_mismatch_is_error_unless_resampling(pelvis, tmp_path):
    ct, labels = pelvis
    lab = sitk.Cast(labels.grid.with_array(labels.layers[0]).to_sitk(), sitk.sitkUInt8)
    shifted = sitk.Resample(lab, lab.GetSize(), sitk.Transform(), sitk.sitkNearestNeighbor,
                            tuple(o + 1.5 for o in lab.GetOrigin()), lab.GetSpacing(), lab.GetDirection(), 0)
    path = tmp_path / "shifted.nii.gz"
    sitk.WriteImage(shifted, str(path))
    with pytest.raises(UserError, match=r"shifted\.nii\.gz: label map grid .* differs from the CT's"):
        load_labels(path, ct)
    lm = load_labels(path, ct, resample=True)
    assert lm.notes["resampled_to_ct_grid"] == "nearest neighbour"
    assert lm.grid.same_grid(ct)
    overlap = (lm.mask("hip_left") & labels.mask("hip_left")).sum() / labels.mask("hip_left").sum()
    assert overlap > 0.5  # half a voxel of shift: mostly the same voxels


def test_bad_inputs_are_one_line_errors(pelvis, tmp_path):
    ct, _ = pelvis
    with pytest.raises(UserError, match="missing.nii.gz: CT not found"):
        load_ct(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="junk.nii.gz: cannot read CT") as exc:
        load_ct(junk)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="folder holds no DICOM series"):
        load_ct(tmp_path)
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(ct.with_array(np.zeros(ct.array.shape, np.uint8)).to_sitk(), str(empty))
    with pytest.raises(UserError, match="empty.nii.gz: label map is empty"):
        load_labels(empty, ct)
    flat = tmp_path / "flat.png"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(flat))
    with pytest.raises(UserError, match="flat.png: CT must be 3D"):
        load_ct(flat)
