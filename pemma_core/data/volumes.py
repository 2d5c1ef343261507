"""One reader for every image source pemma accepts, and the conversion of DICOM into NIfTI once per case.

:func:`read_volume` takes a NIfTI file (``.nii``, ``.nii.gz``: the whole gzip stream is
checked, so a damaged file is refused by name), a DICOM series folder (CT in Hounsfield
units, PET in SUV: :mod:`pemma_core.data.dicom`), or an RTSTRUCT / DICOM-SEG file
(rasterised onto a reference image's grid). Every affine maps a voxel index to RAS mm,
as nibabel gives it for a NIfTI.

The rest of pemma (checks, MONAI transforms) reads NIfTI: :func:`materialise_case`
converts a case's DICOM sources once into ``cache_dir/converted/<case_id>/{ct,pet,label}.nii.gz``,
keyed by the source files' names, sizes and modification times (a changed series is
converted again).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from pemma_core.data import dicom

if TYPE_CHECKING:
    from pemma_core.data.manifest import Case

__all__ = [
    "KINDS",
    "Volume",
    "CorruptFileError",
    "read_volume",
    "write_nifti",
    "verify_gzip",
    "is_nifti",
    "is_dicom_source",
    "source_stamp",
    "converted_nifti",
    "materialise_case",
]

KINDS: tuple[str, ...] = ("ct", "pet", "label")
_CONVERT_VERSION = 1  # bump when a conversion changes, to convert every cached case again


@dataclass(frozen=True)
class Volume:
    """A 3-D image: ``array`` [x, y, z], ``affine`` [4, 4] voxel index -> RAS mm (nibabel's convention).

    ``source`` says what was read; ``notes`` what was done to it (e.g. the SUV conversion);
    ``dicom`` the identifiers of a DICOM source (Modality, SeriesInstanceUID,
    FrameOfReferenceUID, ROIName...), empty for a NIfTI.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)
    dicom: dict[str, str] = field(default_factory=dict)


class CorruptFileError(ValueError):
    """A file whose compressed stream is damaged or truncated (``reason``: what the decompressor said)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def is_nifti(path: Path) -> bool:
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


def is_dicom_source(path: Path) -> bool:
    """A series folder, or a DICOM file (RTSTRUCT, SEG, ...): what :func:`materialise_case` converts."""
    path = Path(path)
    return (path.is_dir() or path.is_file()) and not is_nifti(path) and dicom.dicom_kind(path) is not None


def verify_gzip(path: Path) -> None:
    """Read a ``.gz`` file's whole stream; :class:`CorruptFileError` naming it on a CRC error or truncation.

    Why: a NIfTI reader stops after the voxels it needs and never reaches the CRC, so a
    few flipped bytes can load as silently wrong voxels.
    """
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptFileError(path, f"damaged or truncated gzip stream ({type(exc).__name__}: {exc})") from None


def _image_kind(path: Path) -> str:
    """The kind to read a label's reference image with: PET for a PT series, else CT (a NIfTI: grid only)."""
    return "pet" if Path(path).is_dir() and dicom.series_modality(path) == "PT" else "ct"


def read_nifti(path: Path, kind: str) -> Volume:
    """A NIfTI file, its gzip stream checked first; CT/PET as float32, a label as stored."""
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        verify_gzip(path)
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for a malformed header
        raise ValueError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if kind != "label":
        array = array.astype(np.float32, copy=False)
    return Volume(array, np.asarray(image.affine, dtype=np.float64), f"NIfTI {path}")


def _read_dicom(path: Path, *, kind: str, reference: Path | Volume | None, roi: str | None,
                series_uids: Sequence[str], cache_dir: Path | None, case_id: str | None) -> Volume:
    found = dicom.dicom_kind(path)
    if kind in ("ct", "pet"):
        if found != "series":
            what = {"image": "a single DICOM image: give the folder of its series"}.get(
                found or "", f"a {found} file, not a series folder" if found else "not DICOM")
            raise dicom.DicomError([dicom.DicomProblem(path, "Modality", f"a {kind.upper()} must be a series folder; "
                                                                         f"this is {what}")])
        series = dicom.read_series(path, kind=kind, series_uids=series_uids)
        return Volume(series.array, series.affine, f"DICOM series {path}", series.notes, series.dicom)
    if found not in ("rtstruct", "seg"):
        raise dicom.DicomError([dicom.DicomProblem(path, "Modality", "a DICOM label must be an RTSTRUCT or a DICOM-SEG "
                                                                     f"file; this is {found or 'not DICOM'}")])
    if reference is None:
        raise ValueError(f"{path}: an {found.upper()} label needs the image it is drawn on (reference) for its grid")
    if not isinstance(reference, Volume):
        reference = read_volume(reference, kind=_image_kind(reference), series_uids=series_uids, cache_dir=cache_dir,
                                case_id=case_id)
    shape = tuple(int(s) for s in reference.array.shape[:3])
    reader = dicom.read_rtstruct if found == "rtstruct" else dicom.read_seg
    label = reader(path, shape, reference.affine, roi=roi, reference=reference.dicom)  # type: ignore[arg-type]
    notes = label.notes + ([] if reference.dicom else [f"reference {reference.source} is not DICOM: the series the "
                                                       "label references was not checked"])
    return Volume(label.array, np.asarray(reference.affine, dtype=np.float64), f"{found.upper()} {path}", notes,
                  label.dicom)


def read_volume(path: Path, *, kind: str, reference: Path | Volume | None = None, roi: str | None = None,
                cache_dir: Path | None = None, series_uids: Sequence[str] = (), case_id: str | None = None) -> Volume:
    """Read an image or label from any source pemma accepts.

    ``kind``: ``"ct"`` (Hounsfield units), ``"pet"`` (SUV) or ``"label"`` (0/1).
    ``path``: a NIfTI file; a DICOM series folder (``ct``, ``pet``); an RTSTRUCT or
    DICOM-SEG file (``label``), filled onto ``reference``'s grid (a series folder, a
    NIfTI or a :class:`Volume`) with the ROI/segment ``roi`` (exact name, glob or regular
    expression; None: the only one). ``series_uids``: the SeriesInstanceUID to use in a
    folder holding several series. ``cache_dir``: keep the conversion of a DICOM source in
    ``cache_dir/converted/<case_id>/`` and reuse it while the source files are unchanged.

    Raises :class:`FileNotFoundError`; :class:`CorruptFileError` for a damaged ``.nii.gz``;
    :class:`~pemma_core.data.dicom.DicomError` (every problem, naming file and tag); ValueError otherwise.
    """
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if is_nifti(path):
        return read_nifti(path, kind)
    if not is_dicom_source(path):
        raise ValueError(f"{path}: cannot work out the file type: pemma reads NIfTI (.nii, .nii.gz), DICOM series "
                         "folders, RTSTRUCT and DICOM-SEG files")
    if cache_dir is not None and not isinstance(reference, Volume):
        target, meta = _convert_cached(path, kind=kind, cache_dir=cache_dir, case_id=case_id, reference=reference,
                                       roi=roi, series_uids=series_uids)
        volume = read_nifti(target, kind)
        return Volume(volume.array, volume.affine, meta["source"], list(meta["notes"]), dict(meta["dicom"]))
    return _read_dicom(path, kind=kind, reference=reference, roi=roi, series_uids=series_uids, cache_dir=cache_dir,
                       case_id=case_id)


def _atomic(path: Path, write: Any) -> None:
    """``write(temporary_path)`` then rename onto ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    try:
        write(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_nifti(volume: Volume, path: Path) -> Path:
    """Write ``volume`` as NIfTI (sform and qform set, code scanner); a label (integer array) as uint8,
    anything else float32. Written to a temporary file and renamed; returns ``path``."""
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: a NIfTI file name ends in .nii or .nii.gz")
    array = np.asarray(volume.array)
    array = array.astype(np.uint8) if array.dtype.kind in "biu" else array.astype(np.float32)
    image = nib.Nifti1Image(array, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    _atomic(path, lambda temp: nib.save(image, str(temp)))
    return path


# --------------------------------------------------------------------------- the conversion cache


def source_stamp(path: Path | None) -> list[Any]:
    """What identifies a version of a source in cache keys: path, size, modification time; a folder:
    the name, size and modification time of each file in it."""
    if path is None:
        return [None]
    # One stat per file: a site stamps every case file each round, and each stat lets go of the
    # interpreter lock, which its thread then waits for while other sites' threads train.
    path = Path(path)
    try:
        found = path.stat()
        if stat.S_ISDIR(found.st_mode):
            with os.scandir(path) as listing:
                files = sorted((e.name, e.stat()) for e in listing if not e.name.startswith(".") and e.is_file())
            return [str(path), "folder", [[name, st.st_size, st.st_mtime_ns] for name, st in files]]
    except OSError:
        return [str(path), "absent"]
    return [str(path), found.st_size, found.st_mtime_ns]


def _case_folder(cache_dir: Path, case_id: str | None, path: Path) -> Path:
    if not case_id:  # read_volume without a case: one folder per source path
        return Path(cache_dir) / "converted" / f"path-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    return Path(cache_dir) / "converted" / name


def _convert_cached(path: Path, *, kind: str, cache_dir: Path, case_id: str | None, reference: Path | None,
                    roi: str | None, series_uids: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    folder = _case_folder(cache_dir, case_id, path)
    target, sidecar = folder / f"{kind}.nii.gz", folder / f"{kind}.json"
    key = json.loads(json.dumps({
        "version": _CONVERT_VERSION, "kind": kind, "source": source_stamp(path),
        "reference": source_stamp(reference) if kind == "label" else None,
        "roi": roi if kind == "label" else None, "series": sorted(series_uids),
    }))
    try:
        meta = json.loads(sidecar.read_text())
        if meta["key"] == key and target.is_file():
            return target, meta
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: convert
    volume = _read_dicom(path, kind=kind, reference=reference, roi=roi, series_uids=series_uids, cache_dir=cache_dir,
                         case_id=case_id)
    meta = {"key": key, "source": volume.source, "notes": volume.notes, "dicom": volume.dicom}
    write_nifti(volume, target)
    _atomic(sidecar, lambda temp: temp.write_text(json.dumps(meta)))
    return target, meta


def converted_nifti(path: Path, *, kind: str, cache_dir: Path, case_id: str | None = None,
                    reference: Path | None = None, roi: str | None = None, series_uids: Sequence[str] = ()) -> Path:
    """The NIfTI to load for ``path``: itself for a NIfTI, else its conversion in
    ``cache_dir/converted/<case_id>/<kind>.nii.gz`` (made now unless the cached one has the same
    source files, reference, ROI and series choice). Raises what :func:`read_volume` raises."""
    path = Path(path)
    if is_nifti(path) or not is_dicom_source(path):
        return path
    return _convert_cached(path, kind=kind, cache_dir=cache_dir, case_id=case_id, reference=reference, roi=roi,
                           series_uids=series_uids)[0]


def materialise_case(case: Case, cache_dir: Path, *, label_roi: str | None = None,
                     series_uids: Sequence[str] = ()) -> Case:
    """``case`` with each DICOM source replaced by its cached NIfTI conversion (NIfTI paths kept).

    The label (RTSTRUCT / DICOM-SEG) is filled onto the CT's grid (the PET's without CT)
    with ROI ``label_roi``. Raises what :func:`read_volume` raises.
    """
    reference = case.ct if case.ct is not None else case.pet
    changes: dict[str, Path] = {}
    for role in KINDS:
        path = getattr(case, role)
        if path is None or is_nifti(path):
            continue
        changes[role] = converted_nifti(path, kind=role, cache_dir=cache_dir, case_id=case.case_id,
                                        reference=reference if role == "label" else None,
                                        roi=label_roi if role == "label" else None, series_uids=series_uids)
    return dataclasses.replace(case, **changes) if changes else case
