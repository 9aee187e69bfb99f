"""Writing outputs safely: never overwrite unless asked, write to a temporary name then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import UserError
from ..validation import finite_or_none


def check_new(path: str | Path, force: bool = False) -> Path:
    """``path`` as a Path; UserError when it exists and ``force`` is false."""
    p = Path(path)
    if p.exists() and not force:
        raise UserError("output exists; pass --force to overwrite it", p)
    return p


def prepare_out_dir(path: str | Path, force: bool = False, expected: tuple[str, ...] = ()) -> Path:
    """Create an output folder. An existing non-empty folder is refused unless ``force``;
    with ``expected`` names, only those files count as clashes."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError("output path exists and is not a folder", p)
    if p.exists() and not force:
        clashes = [n for n in expected if (p / n).exists()] if expected else list(p.iterdir())
        if clashes:
            raise UserError(f"output folder is not empty ({Path(str(clashes[0])).name} exists); "
                            "pass --force to overwrite", p)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextmanager
def output_folder(path: str | Path, force: bool = False, expected: tuple[str, ...] = (),
                  last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build an output folder atomically: yield an empty staging folder beside ``path``
    (``.NAME.partial-XXXX``), then move the result into place when the block ends without error.

    * ``path`` absent or empty: the staging folder is renamed to ``path`` (one rename).
    * ``path`` holds other things (``expected`` names the files this command writes, e.g. a case
      folder that gets registration.json): each staged entry replaces its namesake, the names in
      ``last`` (the report that marks the set complete) moved last; without ``expected`` the old
      folder is replaced as a whole. Existing outputs need ``force`` (checked before any work), and
      are replaced only after the new ones are complete.
    * On any error or interrupt (KeyboardInterrupt) the staging folder is deleted: nothing is left
      behind, and a rerun needs no ``--force``.

    An unwritable destination raises a one-line UserError naming the folder."""
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise UserError("output path exists and is not a folder", final)
    existing = final.is_dir() and any(final.iterdir())
    if existing and not force:
        clashes = [n for n in expected if (final / n).exists()] if expected else sorted(p.name for p in final.iterdir())
        if clashes:
            raise UserError(f"output folder is not empty ({clashes[0]} exists); pass --force to overwrite", final)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
    except OSError as exc:
        raise UserError(f"cannot create the output folder here ({exc.strerror or exc})", final) from None
    try:
        yield stage
        _give_usual_permissions(stage)
        if not existing:
            if final.is_dir():
                final.rmdir()  # an empty folder (e.g. made by the user beforehand)
            os.rename(stage, final)
        elif expected:
            names = sorted(p.name for p in stage.iterdir())
            for name in [n for n in names if n not in last] + [n for n in names if n in last]:
                _replace(stage / name, final / name)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.rename(final, old / final.name)
            os.rename(stage, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def resumable_folder(path: str | Path, worth_keeping: Callable[[Path], bool]) -> Iterator[Path]:
    """For a folder built step by step that a rerun resumes (cohort subjects, data-set records,
    training checkpoints): on an error or interrupt, a folder this run created is removed unless
    ``worth_keeping(folder)`` (e.g. it holds a checkpoint), so what is left is resumable or nothing."""
    p = Path(path)
    existed = p.exists()
    try:
        yield p
    except BaseException:
        if not existed and p.is_dir() and not worth_keeping(p):
            shutil.rmtree(p, ignore_errors=True)
        raise


def _replace(new: Path, old: Path) -> None:
    """Move ``new`` onto ``old`` (a file: one atomic rename; a folder: the old one set aside first)."""
    if old.is_dir() and not old.is_symlink():
        trash = old.with_name(f".{old.name}.old-{os.getpid()}")
        os.rename(old, trash)
        os.rename(new, old)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, old)


def _give_usual_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the staged folder the umask's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def remove_stale(folder: str | Path, written: Iterable[str | Path],
                 suffixes: tuple[str, ...] = (".nrrd", ".nii.gz", ".nii")) -> list[Path]:
    """After a ``--force`` rewrite of a folder of images this run owns (e.g. ``OUT/channels``):
    delete the images with ``suffixes`` that this run did not write (an earlier run's, e.g. of a
    structure no longer requested), so the folder holds exactly what the run's report lists.
    Returns the deleted paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    keep = {Path(w).resolve() for w in written}
    gone = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name.endswith(suffixes) and f.resolve() not in keep:
            f.unlink()
            gone.append(f)
    return gone


@contextmanager
def atomic_path(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps the full suffix (e.g. '.nii.gz') so writers choose the format.
    """
    final = check_new(path, force)
    suffix = "".join(final.suffixes) or ".tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=suffix, dir=final.parent)
    except OSError as exc:
        raise UserError(f"cannot write the output here ({exc.strerror or exc})", final) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give them the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_text(data: Any) -> str:
    """Strict JSON text of ``data``: every NaN/inf becomes ``null`` (never the bare ``NaN`` that
    strict parsers reject); numpy scalars/arrays and Paths are converted."""
    return json.dumps(finite_or_none(data), indent=2, default=_json_default, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Any, force: bool = False) -> Path:
    """Write ``data`` as strict JSON (non-finite numbers as ``null``), atomically."""
    return write_text(path, json_text(data), force)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.generic, np.ndarray)):
        return finite_or_none(obj.tolist() if isinstance(obj, np.ndarray) else obj.item())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_volume(path: str | Path, volume, force: bool = False) -> Path:
    """Write a :class:`~MSKdeXLib.io.images.Volume` (NIfTI / NRRD / MHA by suffix), atomically."""
    import SimpleITK as sitk

    with atomic_path(path, force) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
    return Path(path)
