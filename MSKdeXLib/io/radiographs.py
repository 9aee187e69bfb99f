"""Loading and writing radiographs: DICOM (DX, CR, secondary capture), PNG, JPEG, TIFF.

Whatever the file, :func:`load_radiograph` returns a :class:`~MSKdeXLib.io.images.Radiograph` whose
float32 pixels show *more attenuation = brighter* (bone bright, air dark):

* the Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence) is applied;
* the image is inverted when Photometric Interpretation is MONOCHROME1 **or** Presentation LUT
  Shape is INVERSE (DX files store MONOCHROME1 together with INVERSE; this is inverted once);
  inversion maps value v to (lo + hi - v) over the range the stored bits allow, so values
  stay positive;
* the VOI LUT / window is *not* applied (it only changes display contrast).

Pixel spacing (mm, at the detector plane, (row, column)) comes from, in this order: the
caller's ``pixel_spacing``; Imager Pixel Spacing (0018,1164); Pixel Spacing (0028,0030);
Nominal Scanned Pixel Spacing (0018,2010); for TIFF, a resolution given per centimetre. The
chosen source is recorded in ``spacing_source``; Estimated Radiographic Magnification Factor
(0018,1114) is recorded in ``metadata['magnification_factor']`` (the spacing stays the
detector's: divide by it for the spacing at the patient's mid-plane). A radiograph with no
spacing loads with a :class:`UncalibratedWarning` and ``pixel_spacing=None``.

:func:`write_dx_dicom` writes a Digital X-Ray Image Storage - For Presentation file
(MONOCHROME2, unsigned, 12 to 16 bits, Imager Pixel Spacing, fresh UIDs) atomically, and
:func:`write_radiograph_image` a 16-bit PNG or a float32 TIFF (with its spacing as a
per-centimetre resolution).
"""

from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, require_file
from .images import Radiograph
from .outputs import atomic_path

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: ITU-R BT.601 luma weights used to turn colour images grey
LUMA = (0.299, 0.587, 0.114)


class UncalibratedWarning(UserWarning):
    """A radiograph loaded without any pixel spacing (sizes in mm are unknown)."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_radiograph(path: str | Path, pixel_spacing: float | tuple[float, float] | None = None) -> Radiograph:
    """Load a radiograph file as displayed pixels (float32, bone bright) with its spacing.

    ``pixel_spacing`` (mm, one value or (row, column)) overrides the file's spacing.
    Raises :class:`UserError` (one line, naming the file) for anything it cannot read.
    """
    p = require_file(path, "radiograph")
    if p.is_dir():
        raise UserError("radiograph path is a folder, expected one image file", p)
    user_spacing = _check_spacing(pixel_spacing, p) if pixel_spacing is not None else None
    with open(p, "rb") as fh:
        head = fh.read(132)
    if len(head) == 0:
        raise UserError("radiograph file is empty", p)
    if head[128:132] == b"DICM" or _suffix(p) in DICOM_SUFFIXES and not _looks_like_raster(head):
        pixels, spacing, source, meta = _load_dicom(p)
    elif _looks_like_raster(head):
        pixels, spacing, source, meta = _load_raster(p)
    else:
        raise UserError("not an image: neither DICOM nor PNG / JPEG / TIFF / BMP", p)

    if user_spacing is not None:
        spacing, source = user_spacing, "user"
    if spacing is None:
        warnings.warn(f"{p}: no pixel spacing in the file and none given; the radiograph is "
                      "uncalibrated (sizes in mm unknown)", UncalibratedWarning, stacklevel=2)
        source = "none"
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise UserError(f"radiograph must be a 2D image, got shape {pixels.shape}", p)
    if not np.all(np.isfinite(pixels)):
        raise UserError("radiograph has non-finite pixel values", p)
    return Radiograph(np.ascontiguousarray(pixels, dtype=np.float32), spacing, source, str(p), meta)


def _suffix(p: Path) -> str:
    return p.suffix.lower()


def _looks_like_raster(head: bytes) -> bool:
    return (head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head[:4] in
            (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") or head.startswith(b"BM"))


def _check_spacing(value, path: Path | None, what: str = "pixel spacing") -> tuple[float, float]:
    try:
        vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    except (TypeError, ValueError):
        raise UserError(f"{what} must be one or two numbers (mm), got {value!r}", path) from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(np.isfinite(v) and v > 0 for v in vals):
        raise UserError(f"{what} must be one or two positive numbers (mm), got {value!r}", path)
    return (vals[0], vals[1])


def _file_spacing(value) -> tuple[float, float] | None:
    """A spacing read from a file, or None when absent / malformed (never raises)."""
    if value is None:
        return None
    try:
        return _check_spacing(list(value) if not isinstance(value, (int, float)) else value, None)
    except UserError:
        return None


def _load_dicom(p: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(p, force=_suffix(p) in DICOM_SUFFIXES)
    except InvalidDicomError:
        raise UserError("not an image: not a DICOM file", p) from None
    except Exception as exc:  # truncated / corrupt files raise many kinds of errors
        raise UserError(f"cannot read DICOM file ({type(exc).__name__}: {_short(exc)})", p) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UserError("DICOM file has no pixel data (not an image)", p)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(f"multi-frame DICOM ({frames} frames) is not a single radiograph", p)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        raise UserError("palette-colour DICOM images are not supported as radiographs", p)
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(tsyntax, "name", str(tsyntax)) if tsyntax else "Implicit VR Little Endian (assumed)"
    try:
        raw = ds.pixel_array
    except Exception as exc:
        raise UserError(f"cannot decode DICOM pixel data ({ts_name}: {_short(exc)})", p) from None

    meta: dict[str, Any] = {
        "format": "DICOM",
        "modality": str(ds.get("Modality", "")),
        "sop_class": getattr(ds.get("SOPClassUID"), "name", str(ds.get("SOPClassUID", ""))),
        "photometric": photometric,
        "bits_allocated": int(ds.get("BitsAllocated", 0) or 0),
        "bits_stored": int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "transfer_syntax": ts_name,
        "transfer_syntax_uid": str(tsyntax) if tsyntax else None,
        "patient_orientation": [str(v) for v in ds.get("PatientOrientation", [])] if
        ds.get("PatientOrientation") else [],
        "view_position": str(ds.get("ViewPosition", "")),
        "presentation_lut_shape": str(ds.get("PresentationLUTShape", "")),
        "pixel_intensity_relationship": str(ds.get("PixelIntensityRelationship", "")),
        "pixel_intensity_relationship_sign": _num(ds.get("PixelIntensityRelationshipSign")),
        "rescale_slope": _num(ds.get("RescaleSlope")),
        "rescale_intercept": _num(ds.get("RescaleIntercept")),
        "kvp": _num(ds.get("KVP")),
        "sid_mm": _num(ds.get("DistanceSourceToDetector")),
        "sod_mm": _num(ds.get("DistanceSourceToPatient")),
        "body_part": str(ds.get("BodyPartExamined", "")),
    }

    if samples == 3 or photometric.startswith(("RGB", "YBR")):
        if raw.ndim != 3 or raw.shape[-1] != 3:
            raise UserError(f"colour DICOM with unexpected pixel shape {raw.shape}", p)
        # pydicom returns YBR data converted to RGB; reduce to luma
        pixels = _to_grey(raw.astype(np.float64))
        meta["converted_from"] = photometric
        inverted = False
    elif samples != 1:
        raise UserError(f"DICOM with {samples} samples per pixel is not supported", p)
    else:
        pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        inverted = photometric == "MONOCHROME1" or meta["presentation_lut_shape"].upper() == "INVERSE"
        if inverted:
            lo, hi = _value_range(ds, raw)
            if "ModalityLUTSequence" not in ds:
                slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
                icpt = float(ds.get("RescaleIntercept", 0.0) or 0.0)
                lo, hi = sorted((lo * slope + icpt, hi * slope + icpt))
            else:
                lo, hi = float(pixels.min()), float(pixels.max())
            pixels = (lo + hi) - pixels
    meta["inverted"] = bool(inverted)
    if pixels.ndim != 2:
        raise UserError(f"DICOM pixel data has shape {pixels.shape}, expected one 2D image", p)

    imager = _file_spacing(ds.get("ImagerPixelSpacing"))
    plain = _file_spacing(ds.get("PixelSpacing"))
    scanned = _file_spacing(ds.get("NominalScannedPixelSpacing"))
    meta["imager_pixel_spacing"] = list(imager) if imager else None
    meta["pixel_spacing_tag"] = list(plain) if plain else None
    mag = _num(ds.get("EstimatedRadiographicMagnificationFactor"))
    meta["magnification_factor"] = mag if mag and mag > 0 else None
    for spacing, source in ((imager, "ImagerPixelSpacing"), (plain, "PixelSpacing"),
                            (scanned, "NominalScannedPixelSpacing")):
        if spacing is not None:
            return pixels, spacing, source, meta
    return pixels, None, "none", meta


def _value_range(ds, raw: np.ndarray) -> tuple[float, float]:
    """The range of stored values the file's bits allow (falls back to the data range)."""
    bits = int(ds.get("BitsStored", 0) or 0)
    if bits <= 0 or bits > 32:
        return float(raw.min()), float(raw.max())
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2 ** bits - 1)


def _num(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    """Colour (rows, cols, 3) -> grey; exact when the three channels are equal."""
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].astype(np.float64)
    return rgb[..., :3].astype(np.float64) @ np.asarray(LUMA)


def _load_raster(p: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(p)
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > 1:
            raise UserError(f"multi-page image ({n_frames} pages) is not a single radiograph", p)
        mode = img.mode
        img.load()
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"not an image or unreadable ({_short(exc)})", p) from None
    meta: dict[str, Any] = {"format": img.format or "", "mode": mode}
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        mode = img.mode
    if mode == "1":
        arr = np.asarray(img, dtype=np.float64)
    elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode not in ("RGB", "RGBA", "RGBX"):
            img = img.convert("RGB")
        arr = _to_grey(np.asarray(img)[..., :3])
        meta["converted_from"] = mode
    elif mode in ("LA", "La"):
        arr = np.asarray(img)[..., 0].astype(np.float64)
    else:  # L, I;16*, I, F
        arr = np.asarray(img)
        if arr.dtype.kind not in "uif":
            raise UserError(f"unsupported image pixel mode {mode}", p)
        arr = arr.astype(np.float64)
    meta["bits"] = {"1": 1, "L": 8, "LA": 8, "P": 8, "RGB": 8, "RGBA": 8}.get(meta["mode"], None) or \
        (16 if meta["mode"].startswith("I;16") else 32)
    spacing = _tiff_spacing(img) if (meta["format"] or "").upper() == "TIFF" else None
    return arr, spacing, ("TIFF resolution" if spacing else "none"), meta


def _tiff_spacing(img) -> tuple[float, float] | None:
    """Spacing from a TIFF resolution given per centimetre (unit 3); inch units are ignored
    because most writers put a nominal 72 or 96 dpi there."""
    tags = getattr(img, "tag_v2", {})
    if int(tags.get(296, 2)) != 3 or 282 not in tags or 283 not in tags:
        return None
    try:
        xres, yres = float(tags[282]), float(tags[283])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if xres <= 0 or yres <= 0:
        return None
    return (10.0 / yres, 10.0 / xres)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def to_unsigned(pixels: np.ndarray, bits: int = 16, window: tuple[float, float] | None = None
                ) -> tuple[np.ndarray, tuple[float, float]]:
    """Integer pixels in [0, 2**bits - 1] (uint16) and the window (lo, hi) that was used.

    Integer-valued input already inside the range is kept as is (window None -> (0, max code));
    otherwise [lo, hi] (default: the data's min and max) is mapped linearly onto the codes.
    """
    a = np.asarray(pixels, dtype=np.float64)
    top = 2 ** bits - 1
    if window is None and a.size and np.all(a == np.round(a)) and a.min() >= 0 and a.max() <= top:
        return a.astype(np.uint16), (0.0, float(top))
    lo, hi = (float(a.min()), float(a.max())) if window is None else map(float, window)
    scale = top / (hi - lo) if hi > lo else 0.0
    return np.clip(np.round((a - lo) * scale), 0, top).astype(np.uint16), (lo, hi)


def write_dx_dicom(path: str | Path, radiograph_or_array: Radiograph | np.ndarray,
                   pixel_spacing: float | tuple[float, float] | None = None, *, bits: int = 16,
                   force: bool = False, patient_name: str = "MSKdeX^Simulated",
                   patient_id: str = "MSKDEX0001", study_description: str = "MSKdeX radiograph",
                   series_description: str = "", view_position: str = "AP",
                   patient_orientation: tuple[str, str] = ("L", "F"), kvp: float | None = None,
                   sid_mm: float | None = None, sod_mm: float | None = None,
                   image_comments: str = "", body_part: str = "PELVIS") -> Path:
    """Write a DICOM DX For Presentation image (MONOCHROME2, ``bits`` stored, unsigned).

    ``pixel_spacing`` (mm at the detector, (row, col) or one value) defaults to the
    radiograph's; one of them is required (written as Imager Pixel Spacing). Pixels are stored
    as :func:`to_unsigned` gives them (bone bright). ``sid_mm`` / ``sod_mm`` set Distance
    Source to Detector / Patient and the Estimated Radiographic Magnification Factor.
    ``patient_orientation`` is DICOM (0020,0020): the patient directions towards the last pixel of
    a row and of a column: ("L", "F") for a radiologically displayed AP view (patient's right on
    the image's left, head up). Never overwrites without ``force``; written atomically.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    if isinstance(radiograph_or_array, Radiograph):
        arr = radiograph_or_array.pixels
        spacing = pixel_spacing if pixel_spacing is not None else radiograph_or_array.pixel_spacing
    else:
        arr = np.asarray(radiograph_or_array)
        spacing = pixel_spacing
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise UserError(f"a DX image must be 2D, got shape {arr.shape}", path)
    if not np.all(np.isfinite(arr)):
        raise UserError("cannot write non-finite pixel values", path)
    if spacing is None:
        raise UserError("a DX image needs a pixel spacing (mm)", path)
    spacing = _check_spacing(spacing, Path(path))
    if not 8 <= int(bits) <= 16:
        raise UserError(f"bits must be in 8..16, got {bits}", path)
    codes, window = to_unsigned(arr, int(bits))

    now = _dt.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient / study / series / equipment
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
    ds.StudyDescription = study_description
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    if series_description:
        ds.SeriesDescription = series_description
    ds.Manufacturer = "MSKdeX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = list(patient_orientation)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    if image_comments:
        ds.ImageComments = image_comments[:10240]
    # Image pixel + DX image
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(codes.shape[0]), int(codes.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, int(bits), int(bits) - 1, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    lo, hi = float(codes.min()), float(codes.max())
    ds.WindowCenter, ds.WindowWidth = round((lo + hi) / 2, 2), round(max(hi - lo, 1.0), 2)
    ds.ImagerPixelSpacing = [f"{v:.6g}" for v in spacing]
    ds.DetectorType = "DIRECT"
    if kvp is not None:
        ds.KVP = f"{float(kvp):.6g}"
    if sid_mm is not None:
        ds.DistanceSourceToDetector = f"{float(sid_mm):.6g}"
    if sod_mm is not None:
        ds.DistanceSourceToPatient = f"{float(sod_mm):.6g}"
        if sid_mm is not None and sod_mm > 0:
            ds.EstimatedRadiographicMagnificationFactor = f"{float(sid_mm) / float(sod_mm):.6g}"
    ds.PixelData = codes.astype("<u2").tobytes()
    with atomic_path(path, force) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


def write_radiograph_image(path: str | Path, radiograph: Radiograph, force: bool = False) -> Path:
    """Write a radiograph as a 16-bit PNG (pixels via :func:`to_unsigned`) or a float32 TIFF
    (values exact; spacing stored as a per-centimetre resolution). Chosen by suffix."""
    from PIL import Image

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise UserError("radiograph images are written as .png, .tif or .tiff", p)
    with atomic_path(p, force) as tmp:
        if suffix == ".png":
            codes, _ = to_unsigned(radiograph.pixels, 16)
            Image.fromarray(codes).save(tmp, format="PNG")
        else:
            kwargs = {}
            if radiograph.pixel_spacing is not None:
                kwargs = {"resolution_unit": 3, "x_resolution": 10.0 / radiograph.pixel_spacing[1],
                          "y_resolution": 10.0 / radiograph.pixel_spacing[0]}
            Image.fromarray(np.asarray(radiograph.pixels, dtype=np.float32)).save(tmp, format="TIFF", **kwargs)
    return p
