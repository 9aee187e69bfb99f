"""Is an image file's pixel payload complete? (A truncated download must be refused, not read.)

ITK reads a truncated NIfTI (plain or gzip) without complaint and fills the missing voxels with
zeros; a truncated MetaImage fails with a misleading "No such file or directory". These checks
read only the header and count the payload bytes (streaming through gzip/zlib without keeping
the data), then compare with what the header promises:

* NIfTI-1/2 (.nii, .nii.gz): ``vox_offset + prod(dim) * bitpix / 8`` bytes;
* MetaImage (.mha, .mhd + raw/zraw): ``prod(DimSize) * channels * sizeof(ElementType)``;
* NRRD (.nrrd, .nhdr; raw and gzip encodings): ``prod(sizes) * sizeof(type)``.

Other formats (and encodings these checks do not know) pass unchecked: their readers are left to
judge. :func:`check_payload` raises a one-line :class:`~MSKdeXLib.errors.UserError` naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from ..errors import UserError

_CHUNK = 1 << 20

_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}

_NRRD_SIZES = {}
for _names, _size in ((("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
                      (("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                        "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
                      (("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                        "float"), 4),
                      (("longlong", "long long", "long long int", "signed long long", "signed long long int",
                        "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
                        "uint64", "uint64_t", "double"), 8)):
    for _n in _names:
        _NRRD_SIZES[_n] = _size


def check_payload(path: str | Path, what: str = "image") -> None:
    """UserError when ``path``'s payload is shorter (or, compressed, longer) than its header says,
    or its compressed stream is corrupt. Formats not checked here return silently."""
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        return
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(p, what)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(p, what)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(p, what)


def _short(p: Path, what: str, have: int, want: int) -> UserError:
    pct = 100.0 * have / want if want else 0.0
    return UserError(f"{what} is truncated: its pixel data holds {have} of the {want} bytes its header "
                     f"promises ({pct:.1f} %); the file is incomplete (interrupted copy or download?)", p)


def _zlib_size(p: Path, what: str, offset: int = 0) -> int:
    """Decompressed size of the zlib or gzip stream (all gzip members) from ``offset`` of ``p``,
    streaming; UserError when it is truncated or corrupt."""
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # auto-detect zlib or gzip header
    n = 0
    try:
        with open(p, "rb") as f:
            f.seek(offset)
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                while block:
                    n += len(d.decompress(block))
                    block = d.unused_data if d.eof else b""
                    if d.eof and block.startswith(b"\x1f\x8b"):  # next gzip member
                        d = zlib.decompressobj(zlib.MAX_WBITS | 32)
                    elif d.eof:
                        block = b""
            n += len(d.flush())
    except zlib.error as exc:
        raise UserError(f"{what} is corrupt: compressed pixel data unreadable ({exc})", p) from None
    if not d.eof:
        raise UserError(f"{what} is truncated: the compressed pixel data ends early (after {n} bytes); "
                        "the file is incomplete (interrupted copy or download?)", p)
    return n


def _check_nifti(p: Path, what: str) -> None:
    gz = p.name.lower().endswith(".gz")
    try:
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            head = f.read(540)
    except EOFError:
        head = b""
    except (OSError, zlib.error) as exc:
        raise UserError(f"cannot read {what} (not a NIfTI file: {exc})", p) from None
    if len(head) < 348:
        raise UserError(f"{what} is truncated: {len(head)} bytes, shorter than a NIfTI header", p)
    expected = _nifti_expected(head)
    if expected is None:
        return  # not a header we understand: let the reader judge
    have = _zlib_size(p, what) if gz else p.stat().st_size
    if have < expected:
        raise _short(p, what, have, expected)


def _nifti_expected(head: bytes) -> int | None:
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if size == 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dim = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dim[1:ndim + 1]):
        return None
    count = 1
    for d in dim[1:ndim + 1]:
        count *= max(int(d), 1)
    return max(offset, 352 if size == 348 else 544) + count * bitpix // 8


def _text_header(p: Path, limit: int = 1 << 16) -> tuple[list[str], int]:
    """The header lines of a text-header format and the byte offset just after them: up to the
    first blank line (NRRD) or the ElementDataFile line (MetaImage)."""
    with open(p, "rb") as f:
        raw = f.read(limit)
    lines, pos = [], 0
    meta = p.name.lower().endswith((".mha", ".mhd"))
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0:
            end = len(raw)
        line = raw[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        if not meta and not line.strip():
            break
        lines.append(line)
        if meta and line.split("=", 1)[0].strip() == "ElementDataFile":
            break
    return lines, pos


def _check_metaimage(p: Path, what: str) -> None:
    lines, offset = _text_header(p)
    h = {k.strip(): v.strip() for k, v in (ln.split("=", 1) for ln in lines if "=" in ln)}
    try:
        dims = [int(x) for x in h["DimSize"].split()]
        size = _MET_SIZES[h["ElementType"]] * int(h.get("ElementNumberOfChannels", "1"))
        datafile = h["ElementDataFile"]
    except (KeyError, ValueError):
        return
    expected = size
    for d in dims:
        expected *= d
    if datafile != "LOCAL":
        if datafile.startswith("LIST") or "%" in datafile or " " in datafile:
            return
        data = p.parent / datafile
        if not data.is_file():
            raise UserError(f"{what}: its pixel data file {datafile} is missing", p)
        p, offset = data, 0
    compressed = h.get("CompressedData", "False").lower() == "true"
    have = _zlib_size(p, what, offset) if compressed else p.stat().st_size - offset
    if have < expected:
        raise _short(p, what, have, expected)


def _check_nrrd(p: Path, what: str) -> None:
    lines, offset = _text_header(p)
    h = {}
    for ln in lines[1:]:
        if ln.startswith("#") or ":" not in ln:
            continue
        k, v = ln.split(":", 1)
        h[k.strip().lower()] = v.lstrip("=").strip()
    try:
        sizes = [int(x) for x in h["sizes"].split()]
        size = _NRRD_SIZES[h["type"].lower()]
        encoding = h.get("encoding", "raw").lower()
    except (KeyError, ValueError):
        return
    if "byte skip" in h or "line skip" in h or encoding not in ("raw", "gzip", "gz"):
        return
    expected = size
    for d in sizes:
        expected *= d
    datafile = h.get("data file", h.get("datafile"))
    if datafile:
        if datafile.startswith("LIST") or " " in datafile:
            return
        data = p.parent / datafile
        if not data.is_file():
            raise UserError(f"{what}: its pixel data file {datafile} is missing", p)
        p, offset = data, 0
    have = _zlib_size(p, what, offset) if encoding in ("gzip", "gz") else p.stat().st_size - offset
    if have < expected:
        raise _short(p, what, have, expected)


def check_dicom_files(files: list[str], what: str = "image") -> None:
    """UserError when an uncompressed DICOM file's PixelData is shorter than Rows x Columns x
    SamplesPerPixel x NumberOfFrames x BitsAllocated/8 (ITK reads such a file without a word).
    Encapsulated (compressed) transfer syntaxes are left to the decoder."""
    import pydicom

    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:  # pydicom raises many types on a damaged file  # noqa: BLE001
            raise UserError(f"{what}: DICOM file unreadable ({type(exc).__name__}: {exc})", f) from None
        meta = getattr(ds, "file_meta", None)
        syntax = getattr(meta, "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            continue
        if "PixelData" not in ds:
            raise UserError(f"{what}: DICOM file has no pixel data", f)
        try:
            want = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        except (AttributeError, TypeError, ValueError):
            continue
        have = len(ds.PixelData)
        if have < want:
            raise _short(Path(f), what, have, want)


def check_dicom_folder(folder: str | Path, used: list[str], what: str = "image") -> None:
    """UserError when ``folder`` holds a DICOM file (DICM preamble) that no readable series took:
    GDCM leaves out a damaged (e.g. truncated) slice silently and the volume loses a slice."""
    used_set = {str(Path(u).resolve()) for u in used}
    for f in sorted(Path(folder).iterdir()):
        if not f.is_file() or f.name.startswith(".") or str(f.resolve()) in used_set:
            continue
        with open(f, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            raise UserError(f"{what} is truncated or damaged: this DICOM file is not readable as part of any series", f)
