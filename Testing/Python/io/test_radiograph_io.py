"""Radiograph loading / writing on a real projection of the pelvis CT (MSKdeXLib.io.radiographs)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1,
                         RLELossless, SecondaryCaptureImageStorage, generate_uid)

from MSKdeXLib.errors import UserError
from MSKdeXLib.io.images import Radiograph
from MSKdeXLib.io.radiographs import (UncalibratedWarning, load_radiograph, to_unsigned, write_dx_dicom,
                                      write_radiograph_image)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# --------------------------------------------------------------------------------------------
# A real image: parallel projection of the pelvis CT's density along the AP axis
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def projection(pelvis):
    """(line integral of density (rows, cols), femur mask, air mask) displayed head up."""
    ct, labels = pelvis
    rho = np.clip(1.0 + ct.array / 1000.0, 0.0, None)          # [k, j, i]
    proj = rho.sum(axis=1)[::-1]                                 # (k, i), superior at the top
    femur = (labels.mask("femur_left") | labels.mask("femur_right")).any(axis=1)[::-1]
    air = proj < 0.05 * proj.max()
    assert femur.sum() > 50 and air.sum() > 50
    return proj, femur, air


def codes_of(proj: np.ndarray, bits: int) -> np.ndarray:
    return np.round(proj / proj.max() * (2 ** bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)


def make_ds(codes: np.ndarray, bits: int, photometric: str = "MONOCHROME2", sop=CR_STORAGE,
            imager=None, spacing=None, mag=None, lut_shape=None, slope=None, intercept=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR" if sop == CR_STORAGE else "OT"
    ds.PatientName, ds.PatientID = "Test^Pelvis", "T1"
    ds.ViewPosition, ds.PatientOrientation = "AP", ["R", "F"]
    ds.Rows, ds.Columns = codes.shape[:2]
    ds.SamplesPerPixel = 3 if codes.ndim == 3 else 1
    if codes.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if imager is not None:
        ds.ImagerPixelSpacing = list(imager)
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if mag is not None:
        ds.EstimatedRadiographicMagnificationFactor = mag
    if lut_shape is not None:
        ds.PresentationLUTShape = lut_shape
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    ds.PixelData = codes.astype(f"<u{ds.BitsAllocated // 8}").tobytes()
    return ds


def save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless_sv1(img: np.ndarray, precision: int) -> bytes:
    """Minimal JPEG lossless (process 14, predictor 1) encoder, to test decoding of that syntax."""
    rows, cols = img.shape
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()
    bits: list[str] = []
    for d in diff.tolist():
        ssss = 16 if d == -32768 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))                       # 17 symbols, all 5-bit codes
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    s = "".join(bits)
    s += "1" * (-len(s) % 8)
    data = bytearray()
    for byte in int(s, 2).to_bytes(len(s) // 8, "big"):
        data.append(byte)
        if byte == 0xFF:
            data.append(0)
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision]) + rows.to_bytes(2, "big") \
        + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17
    out += b"\xff\xc4" + (19 + 17).to_bytes(2, "big") + bytes([0]) + bytes(counts) + bytes(range(17))
    out += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0, 1, 0, 0])
    return bytes(out + data + b"\xff\xd9")


# --------------------------------------------------------------------------------------------
# DICOM: photometric interpretations, bit depths, spacing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_bone_bright_any_photometric(tmp_path, projection, bits, photometric):
    proj, femur, air = projection
    codes = codes_of(proj, bits)
    stored = codes if photometric == "MONOCHROME2" else (2 ** bits - 1) - codes.astype(np.int64)
    path = save(make_ds(stored, bits, photometric, imager=(0.7, 0.75)), tmp_path / "x.dcm")
    r = load_radiograph(path)
    assert r.pixels.dtype == np.float32 and r.shape == proj.shape
    assert r.pixels[femur].mean() > r.pixels[air].mean() + 0.2 * (2 ** bits - 1)
    np.testing.assert_array_equal(r.pixels, codes)               # inversion is exact
    assert r.pixel_spacing == (0.7, 0.75) and r.spacing_source == "ImagerPixelSpacing"
    assert r.metadata["photometric"] == photometric and r.metadata["bits_stored"] == bits
    assert r.metadata["inverted"] == (photometric == "MONOCHROME1")
    assert r.metadata["view_position"] == "AP" and r.metadata["patient_orientation"] == ["R", "F"]


def test_presentation_lut_inverse_and_rescale(tmp_path, projection):
    proj, femur, air = projection
    codes = codes_of(proj, 12)
    inv = 4095 - codes.astype(np.int64)
    # MONOCHROME2 with INVERSE presentation LUT: inverted; slope/intercept applied
    ds = make_ds(inv, 12, "MONOCHROME2", spacing=(0.5, 0.5), lut_shape="INVERSE", slope=2.0, intercept=-100.0)
    r = load_radiograph(save(ds, tmp_path / "inv.dcm"))
    expected = (-100.0 + (2 * 4095 - 100.0)) - (inv * 2.0 - 100.0)
    np.testing.assert_allclose(r.pixels, expected)
    assert r.pixels[femur].mean() > r.pixels[air].mean()
    assert r.spacing_source == "PixelSpacing" and r.pixel_spacing == (0.5, 0.5)
    # MONOCHROME1 + INVERSE (the DX convention) is inverted once, not twice
    ds = make_ds(inv, 12, "MONOCHROME1", imager=(0.2, 0.2), lut_shape="INVERSE")
    r = load_radiograph(save(ds, tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(r.pixels, codes)


def test_spacing_priority_magnification_and_user(tmp_path, projection):
    codes = codes_of(projection[0], 16)
    ds = make_ds(codes, 16, imager=(0.2, 0.2), spacing=(0.17, 0.17), mag=1.18)
    path = save(ds, tmp_path / "m.dcm")
    r = load_radiograph(path)
    assert r.pixel_spacing == (0.2, 0.2) and r.spacing_source == "ImagerPixelSpacing"
    assert r.metadata["magnification_factor"] == pytest.approx(1.18)
    assert r.metadata["pixel_spacing_tag"] == [0.17, 0.17]
    r = load_radiograph(path, pixel_spacing=0.3)
    assert r.pixel_spacing == (0.3, 0.3) and r.spacing_source == "user"


def test_uncalibrated_warns(tmp_path, projection):
    path = save(make_ds(codes_of(projection[0], 8), 8), tmp_path / "u.dcm")
    with pytest.warns(UncalibratedWarning, match="uncalibrated"):
        r = load_radiograph(path)
    assert r.pixel_spacing is None and not r.calibrated and r.spacing_source == "none"


# --------------------------------------------------------------------------------------------
# DICOM: compressed transfer syntaxes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("syntax,bits", [(RLELossless, 16), (RLELossless, 8), (JPEG2000Lossless, 16),
                                         (JPEG2000Lossless, 12)])
def test_lossless_compressed(tmp_path, projection, syntax, bits):
    proj, femur, air = projection
    codes = codes_of(proj, bits)
    ds = make_ds(codes, bits, imager=(0.4, 0.4))
    ds.compress(syntax, codes if bits > 8 else codes.astype(np.uint8))
    r = load_radiograph(save(ds, tmp_path / "c.dcm"))
    assert r.metadata["transfer_syntax_uid"] == syntax
    np.testing.assert_array_equal(r.pixels, codes)
    assert r.pixels[femur].mean() > r.pixels[air].mean()


def test_jpeg_lossless_process14(tmp_path, projection):
    proj, femur, air = projection
    codes = codes_of(proj, 16)
    ds = make_ds(codes, 16, "MONOCHROME1", imager=(0.4, 0.4))
    ds.PixelData = encapsulate([jpeg_lossless_sv1(65535 - codes.astype(np.int64), 16)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    r = load_radiograph(save(ds, tmp_path / "jl.dcm"))
    np.testing.assert_array_equal(r.pixels, codes)
    assert r.metadata["transfer_syntax_uid"] == JPEGLosslessSV1


def test_jpeg_baseline_lossy(tmp_path, projection):
    from PIL import Image

    proj, femur, air = projection
    codes = codes_of(proj, 8)
    buf = io.BytesIO()
    Image.fromarray(codes).save(buf, format="JPEG", quality=95)
    ds = make_ds(codes, 8, imager=(0.4, 0.4))
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    r = load_radiograph(save(ds, tmp_path / "jb.dcm"))
    assert np.abs(r.pixels - codes).mean() < 2.0                # lossy but close
    assert r.pixels[femur].mean() > r.pixels[air].mean() + 50


def test_secondary_capture_rgb_to_grey(tmp_path, projection):
    proj, femur, air = projection
    grey = codes_of(proj, 8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    ds = make_ds(rgb, 8, "RGB", sop=SecondaryCaptureImageStorage)
    ds.NominalScannedPixelSpacing = [0.3, 0.3]
    r = load_radiograph(save(ds, tmp_path / "sc.dcm"))
    np.testing.assert_array_equal(r.pixels, grey)
    assert r.spacing_source == "NominalScannedPixelSpacing" and r.metadata["converted_from"] == "RGB"


# --------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF
# --------------------------------------------------------------------------------------------
def test_png_tiff_round_trip(tmp_path, projection):
    proj, femur, air = projection
    rad = Radiograph(proj.astype(np.float32), (0.6, 0.8))
    write_radiograph_image(tmp_path / "r.tif", rad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # calibrated: no warning
        t = load_radiograph(tmp_path / "r.tif")
    np.testing.assert_array_equal(t.pixels, rad.pixels)
    assert t.pixel_spacing == pytest.approx((0.6, 0.8)) and t.spacing_source == "TIFF resolution"

    write_radiograph_image(tmp_path / "r.png", rad)
    with pytest.warns(UncalibratedWarning):
        p = load_radiograph(tmp_path / "r.png")
    codes, window = to_unsigned(rad.pixels, 16)
    np.testing.assert_array_equal(p.pixels, codes)
    assert window == (pytest.approx(float(proj.min())), pytest.approx(float(proj.max())))
    assert load_radiograph(tmp_path / "r.png", (0.5, 0.5)).pixel_spacing == (0.5, 0.5)
    with pytest.raises(UserError, match="exists"):
        write_radiograph_image(tmp_path / "r.png", rad)


def test_rgb_png_and_jpeg_to_grey(tmp_path, projection):
    from PIL import Image

    proj, femur, air = projection
    grey = codes_of(proj, 8)
    rgb = np.stack([grey, (grey * 0.5).astype(np.uint8), grey], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    with pytest.warns(UncalibratedWarning):
        p = load_radiograph(tmp_path / "c.png")
        j = load_radiograph(tmp_path / "c.jpg")
    assert p.pixels.ndim == 2
    np.testing.assert_allclose(p.pixels, luma, atol=1e-3)
    assert np.abs(j.pixels - luma).mean() < 3.0
    assert j.pixels[femur].mean() > j.pixels[air].mean()


# --------------------------------------------------------------------------------------------
# Writing DX
# --------------------------------------------------------------------------------------------
def test_write_dx_dicom_round_trip(tmp_path, projection):
    proj, femur, air = projection
    rad = Radiograph(codes_of(proj, 14).astype(np.float32), (0.25, 0.3))
    out = write_dx_dicom(tmp_path / "dx.dcm", rad, bits=14, sid_mm=1000.0, sod_mm=850.0, kvp=75)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16 and ds.BitsStored == 14
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.25, 0.3]
    assert float(ds.EstimatedRadiographicMagnificationFactor) == pytest.approx(1000 / 850)
    r = load_radiograph(out)
    np.testing.assert_array_equal(r.pixels, rad.pixels)         # integer codes kept exactly
    assert r.pixel_spacing == (0.25, 0.3) and r.metadata["modality"] == "DX"
    # new UIDs every time, never overwrite without force
    out2 = write_dx_dicom(tmp_path / "dx2.dcm", proj, (0.5, 0.5))
    ds2 = pydicom.dcmread(out2)
    assert ds2.SOPInstanceUID != ds.SOPInstanceUID and ds2.StudyInstanceUID != ds.StudyInstanceUID
    f = load_radiograph(out2).pixels
    assert f.max() == 65535 and f.min() == 0 and f[femur].mean() > f[air].mean()
    with pytest.raises(UserError, match="--force"):
        write_dx_dicom(out, rad)
    write_dx_dicom(out, rad, force=True)
    assert pydicom.dcmread(out).SOPInstanceUID != ds.SOPInstanceUID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dx.dcm", "dx2.dcm"]  # no temp left


# --------------------------------------------------------------------------------------------
# Bad input: one-line UserError naming the file
# --------------------------------------------------------------------------------------------
def _one_line_error(fn, *args, match=None, **kw):
    with pytest.raises(UserError) as exc:
        fn(*args, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    if match:
        assert match in msg, msg
    return msg


def test_bad_inputs(tmp_path, projection):
    from PIL import Image

    codes = codes_of(projection[0], 16)
    msg = _one_line_error(load_radiograph, tmp_path / "nope.dcm", match="not found")
    assert "nope.dcm" in msg
    (tmp_path / "empty.dcm").write_bytes(b"")
    _one_line_error(load_radiograph, tmp_path / "empty.dcm", match="empty")
    (tmp_path / "text.png").write_text("hello, not an image\n" * 20)
    _one_line_error(load_radiograph, tmp_path / "text.png", match="not an image")
    (tmp_path / "text.dcm").write_text("hello, not an image\n" * 20)
    _one_line_error(load_radiograph, tmp_path / "text.dcm")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _one_line_error(load_radiograph, tmp_path / "fake.png", match="fake.png")
    _one_line_error(load_radiograph, tmp_path, match="folder")
    # DICOM without pixel data
    ds = make_ds(codes, 16)
    del ds.PixelData
    _one_line_error(load_radiograph, save(ds, tmp_path / "nopix.dcm"), match="no pixel data")
    # multi-frame
    ds = make_ds(np.concatenate([codes, codes]), 16)
    ds.Rows, ds.NumberOfFrames = codes.shape[0], 2
    _one_line_error(load_radiograph, save(ds, tmp_path / "mf.dcm"), match="multi-frame")
    # truncated pixel data
    ds = make_ds(codes, 16)
    ds.PixelData = ds.PixelData[:100]
    _one_line_error(load_radiograph, save(ds, tmp_path / "trunc.dcm"), match="trunc.dcm")
    # multi-page TIFF
    frames = [Image.fromarray(codes_of(projection[0], 8)) for _ in range(2)]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    _one_line_error(load_radiograph, tmp_path / "pages.tif", match="multi-page")
    # bad spacing from the user
    save(make_ds(codes, 16, imager=(0.2, 0.2)), tmp_path / "ok.dcm")
    _one_line_error(load_radiograph, tmp_path / "ok.dcm", pixel_spacing=-1, match="positive")
    _one_line_error(load_radiograph, tmp_path / "ok.dcm", pixel_spacing=(1, 2, 3))
    # writer
    _one_line_error(write_dx_dicom, tmp_path / "w.dcm", codes, None, match="spacing")
    _one_line_error(write_dx_dicom, tmp_path / "w.dcm", codes, 0.2, bits=20, match="bits")
    _one_line_error(write_dx_dicom, tmp_path / "w.dcm", np.zeros((2, 2, 2)), 0.2, match="2D")
    _one_line_error(write_radiograph_image, tmp_path / "w.bmp", Radiograph(codes.astype(np.float32), None))
    assert not (tmp_path / "w.dcm").exists()
