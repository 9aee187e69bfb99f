"""Truncated or non-finite images are refused (issue 15): payload size vs header, NaN/inf voxels."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from MSKdeXLib.errors import UserError
from MSKdeXLib.io.payload import check_dicom_files, check_payload
from MSKdeXLib.io.volumes import NONFINITE_FILL_HU, load_ct


@pytest.fixture(scope="module")
def small_ct(pelvis_case):
    """The real pelvis CT, every 4th voxel (31x26x28), as an sitk image."""
    return sitk.ReadImage(str(pelvis_case.ct))[::4, ::4, ::4]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("compress", [False, True])
def test_complete_files_pass_and_truncated_ones_are_refused(tmp_path, small_ct, suffix, compress):
    f = tmp_path / f"ct{suffix}"
    sitk.WriteImage(small_ct, str(f), useCompression=compress)
    check_payload(f, "CT")
    data = f.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(UserError, match=r"cut.*CT is truncated"):
        check_payload(cut, "CT")
    with pytest.raises(UserError, match=r"truncated"):
        load_ct(cut)


def test_itk_alone_accepts_a_truncated_nifti(tmp_path, small_ct):
    """Why the check exists: ITK fills a cut NIfTI's missing voxels with zeros without a word."""
    f = tmp_path / "ct.nii"
    sitk.WriteImage(small_ct, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
    assert (arr.reshape(-1)[arr.size // 2 + 200:] == 0).all()


def test_recompressed_short_payload_and_detached_raw(tmp_path, small_ct):
    f = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct, str(f))
    raw = gzip.decompress(f.read_bytes())
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[:5000]))  # a complete gzip stream, too little data
    with pytest.raises(UserError, match=r"holds 5000 of the \d+ bytes"):
        check_payload(short, "CT")
    two = tmp_path / "two.nii.gz"  # multi-member gzip is fine
    two.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    check_payload(two, "CT")
    for header in ("ct.nhdr", "ct.mhd"):
        sub = tmp_path / header.replace(".", "_")
        sub.mkdir()
        sitk.WriteImage(small_ct, str(sub / header))
        check_payload(sub / header, "CT")
        data_file = next(p for p in sub.iterdir() if p.name != header)
        data_file.write_bytes(data_file.read_bytes()[:1000])
        with pytest.raises(UserError, match=rf"{data_file.name}: CT is truncated"):
            check_payload(sub / header, "CT")


def test_truncated_dicom_slice_is_refused(tmp_path, small_ct):
    img = sitk.Cast(small_ct, sitk.sitkInt16)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    files = []
    for k in range(4):
        s = img[:, :, k]
        s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        files.append(str(tmp_path / f"{k:03d}.dcm"))
        w.SetFileName(files[-1])
        w.Execute(s)
    check_dicom_files(files, "CT")
    load_ct(tmp_path)
    data = open(files[2], "rb").read()
    open(files[2], "wb").write(data[:-500])
    with pytest.raises(UserError, match=r"002.dcm: CT is truncated"):
        load_ct(tmp_path)


def test_nonfinite_voxels_refused_or_masked(tmp_path, small_ct):
    arr = sitk.GetArrayFromImage(small_ct).astype(np.float32)
    arr[3:5, 6:8, 10:12] = np.nan
    arr[0, 0, 0] = np.inf
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(small_ct)
    f = tmp_path / "nan.nrrd"
    sitk.WriteImage(img, str(f))
    with pytest.raises(UserError, match=r"nan.nrrd: CT has 9 non-finite voxels \(NaN 8, inf 1\) .*\[0:5, 0:8, 0:12\].*--nonfinite mask"):
        load_ct(f)
    ct = load_ct(f, nonfinite="mask")
    assert np.isfinite(ct.array).all() and ct.array[3, 6, 10] == NONFINITE_FILL_HU
    assert ct.metadata["nonfinite"]["voxels"] == 9 and ct.grid_description()["nonfinite"]["policy"] == "mask"
