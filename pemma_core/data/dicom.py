"""DICOM in: CT and PET series, RTSTRUCT and DICOM-SEG labels, as arrays on pemma's grids.

Libraries do the DICOM work: pydicom reads headers and structure sets, SimpleITK reads a
series' pixels (rescale slope and intercept applied per slice), highdicom reads DICOM-SEG,
scikit-image fills the RTSTRUCT polygons. This module only checks what a hospital's
export can get wrong and says so, naming the file or folder and the DICOM tag.

Geometry: DICOM patient coordinates are LPS, pemma's (nibabel's) RAS, so x and y change
sign (:data:`LPS_TO_RAS`). Arrays are indexed ``[column, row, slice]`` (x, y, z, as nibabel
gives the NIfTI twins), slices sorted along the slice normal, and every affine maps a
voxel index to RAS millimetres.

PET is returned in SUV (body weight): ``Units`` GML is already SUV; BQML (Bq/mL) is
multiplied by ``weight [g] / decayed dose [Bq]`` (:func:`suv_factors`).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.valuerep import DT, TM

__all__ = [
    "LPS_TO_RAS",
    "SERIES_MODALITY",
    "DicomProblem",
    "DicomError",
    "SeriesImage",
    "LabelImage",
    "dicom_kind",
    "series_modality",
    "read_series",
    "suv_factors",
    "rtstruct_roi_names",
    "choose_roi",
    "read_rtstruct",
    "read_seg",
]

# Hospital exports routinely break value-length limits (an 18-character SH); pydicom would warn on
# every such header. They never matter to what pemma reads, so values are read as they are.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES_MODALITY = {"ct": "CT", "pet": "PT"}  # pemma kind -> DICOM Modality
POSITION_TOL_MM = 0.01  # two slices closer than this along the normal are the same slice
SPACING_REL_TOL = 0.01  # slice gaps may differ by 1% (rounded positions), not more
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def tag_text(keyword: str) -> str:
    """``"InstanceNumber (0020,0013)"``: a DICOM keyword with its tag, as errors name it."""
    number = tag_for_keyword(keyword)
    return f"{keyword} {Tag(number)}" if number is not None else keyword


@dataclass(frozen=True)
class DicomProblem:
    """Something wrong in a DICOM export: where (folder or file), which tag, what."""

    path: Path
    tag: str  # DICOM keyword, e.g. "InstanceNumber"
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {tag_text(self.tag)}: {self.problem}"


class DicomError(ValueError):
    """A DICOM source that cannot be read as asked; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[DicomProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class SeriesImage:
    """A CT (HU) or PET (SUV) series on its own grid."""

    array: np.ndarray  # float32 [x, y, z]
    affine: np.ndarray  # [4, 4] voxel index -> RAS mm
    notes: list[str]
    dicom: dict[str, str]  # Modality, SeriesInstanceUID, FrameOfReferenceUID


@dataclass(frozen=True)
class LabelImage:
    """A 0/1 mask rasterised onto a reference grid."""

    array: np.ndarray  # uint8 [x, y, z]
    notes: list[str]
    dicom: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- what a path is


def _header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None


def dicom_kind(path: Path) -> str | None:
    """``"series"`` (a folder of DICOM images), ``"rtstruct"``, ``"seg"``, ``"image"`` (one image
    file) or ``"other"`` for a DICOM file; None when ``path`` is not DICOM."""
    path = Path(path)
    if path.is_dir():
        return "series" if any(_header(f) is not None for f in _files(path)) else None
    if not path.is_file():
        return None
    header = _header(path)
    if header is None:
        return None
    sop_class = str(header.get("SOPClassUID", ""))
    modality = str(header.get("Modality", ""))
    if modality == "RTSTRUCT" or sop_class == _RTSTRUCT_SOP_CLASS:
        return "rtstruct"
    if modality == "SEG" or sop_class == _SEG_SOP_CLASS:
        return "seg"
    return "image" if "ImagePositionPatient" in header else "other"


def series_modality(folder: Path) -> str | None:
    """The Modality of the first DICOM image in ``folder`` (None: none found)."""
    for path in _files(folder):
        header = _header(path)
        if header is not None and "ImagePositionPatient" in header:
            return str(header.get("Modality", "")) or None
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


# --------------------------------------------------------------------------- series


@dataclass
class _Slice:
    path: Path
    header: Dataset
    position: float = 0.0  # along the slice normal, mm


def _float_list(value: Any) -> list[float] | None:
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _group_series(folder: Path) -> tuple[dict[str, list[_Slice]], list[str]]:
    """Image files of ``folder`` by SeriesInstanceUID, and notes about the files left out."""
    groups: dict[str, list[_Slice]] = {}
    ignored: list[str] = []
    for path in _files(folder):
        header = _header(path)
        if header is None:
            ignored.append(path.name)
        elif "ImagePositionPatient" not in header:  # an RTSTRUCT, SR, ... beside the images
            ignored.append(f"{path.name} ({header.get('Modality', 'no Modality')})")
        else:
            groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(_Slice(path, header))
    notes = [f"{folder}: {len(ignored)} file(s) that are not DICOM images ignored: {', '.join(ignored[:5])}"
             + (", ..." if len(ignored) > 5 else "")] if ignored else []
    return groups, notes


def _choose_series(
    folder: Path, groups: dict[str, list[_Slice]], wanted: Sequence[str]
) -> tuple[str | None, list[DicomProblem]]:
    if not groups:
        return None, [DicomProblem(folder, "SOPClassUID", "no DICOM image file in this folder")]
    if len(groups) == 1:
        return next(iter(groups)), []
    named = [uid for uid in groups if uid in set(wanted)]
    if len(named) == 1:
        return named[0], []
    listing = ", ".join(f"{uid} ({len(slices)} file(s))" for uid, slices in groups.items())
    why = "several of them are named" if named else "name the one to use"
    return None, [DicomProblem(folder, "SeriesInstanceUID",
                               f"{len(groups)} series in one folder: {listing}; {why} (dicom_series in the site YAML, "
                               "--series with pemma convert)")]


def _geometry_problems(folder: Path, slices: list[_Slice]) -> list[DicomProblem]:
    """Sort ``slices`` along the normal (in place) and check they form one regular volume."""
    problems: list[DicomProblem] = []

    def add(tag: str, text: str, where: Path = folder) -> None:
        problems.append(DicomProblem(where, tag, text))

    orientations = {tuple(np.round(_float_list(s.header.get("ImageOrientationPatient")) or [np.nan], 4))
                    for s in slices}
    if len(orientations) != 1 or np.isnan(next(iter(orientations))).any() or len(next(iter(orientations))) != 6:
        add("ImageOrientationPatient", f"missing, malformed or not the same on every slice "
                                       f"({len(orientations)} values)")
        return problems
    for keyword in ("Rows", "Columns", "PixelSpacing"):
        values = {str(s.header.get(keyword)) for s in slices}
        if len(values) != 1 or "None" in values:
            add(keyword, f"missing or not the same on every slice: {sorted(values)[:4]}")
    cosines = np.array(next(iter(orientations)), dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    positions = []
    for s in slices:
        xyz = _float_list(s.header.get("ImagePositionPatient"))
        if xyz is None or len(xyz) != 3:
            add("ImagePositionPatient", "missing or malformed", s.path)
            return problems
        positions.append(np.array(xyz))
        s.position = float(np.dot(normal, xyz))
    order = np.argsort([s.position for s in slices], kind="stable")
    slices[:] = [slices[i] for i in order]
    positions = [positions[i] for i in order]

    sop = Counter(str(s.header.get("SOPInstanceUID", "")) for s in slices)
    for uid, count in sop.items():
        if count > 1:
            files = [s.path.name for s in slices if str(s.header.get("SOPInstanceUID", "")) == uid]
            add("SOPInstanceUID", f"the same image {uid} in {count} files: {', '.join(files)} (duplicated slice)")
    numbers = [s.header.get("InstanceNumber") for s in slices]
    if None not in numbers:
        counted = Counter(int(n) for n in numbers)
        for number, count in sorted(counted.items()):
            if count > 1:
                files = [s.path.name for s in slices if int(s.header.InstanceNumber) == number]
                add("InstanceNumber", f"instance {number} appears {count} times: {', '.join(files)}")
        expected = set(range(min(counted), max(counted) + 1))
        absent = sorted(expected - set(counted))
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
            add("InstanceNumber",
                f"{len(absent)} instance(s) missing between {min(counted)} and {max(counted)}: {shown}")
    along = np.array([s.position for s in slices])
    for i in np.flatnonzero(np.diff(along) < POSITION_TOL_MM):
        add("ImagePositionPatient", f"{slices[i].path.name} and {slices[i + 1].path.name} are at the same position "
                                    f"{along[i]:.2f} mm along the slice normal (duplicated slice)")
    if len(slices) < 2:
        add("ImagePositionPatient", f"{len(slices)} slice: a 3-D volume needs at least 2")
        return problems
    # Slices must stack along the normal: an in-plane drift means a tilted gantry or a mixed series.
    drift = max(np.linalg.norm((p - positions[0]) - np.dot(p - positions[0], normal) * normal) for p in positions)
    if drift > 0.5:
        add("ImagePositionPatient", f"slice origins drift {drift:.2f} mm sideways (gantry tilt?): not a regular volume")
    gaps = np.diff(along)
    gaps = gaps[gaps >= POSITION_TOL_MM]
    if gaps.size and gaps.max() - gaps.min() > SPACING_REL_TOL * np.median(gaps):
        step = float(np.median(gaps))
        big = [(slices[i].path.name, slices[i + 1].path.name, g) for i, g in enumerate(np.diff(along))
               if g > step * (1 + SPACING_REL_TOL)]
        shown = "; ".join(f"{g:.2f} mm between {a} and {b}" for a, b, g in big[:3])
        add("ImagePositionPatient", f"uneven slice spacing: gaps {gaps.min():.2f}..{gaps.max():.2f} mm "
                                    f"(usually {step:.2f} mm){'; ' + shown if shown else ''} (missing slice?)")
    return problems


def read_series(folder: Path, *, kind: str, series_uids: Sequence[str] = ()) -> SeriesImage:
    """A CT (``kind`` ``"ct"``, Hounsfield units) or PET (``"pet"``, SUV) series folder.

    ``series_uids``: the SeriesInstanceUID to use when the folder holds several series.
    Raises :class:`DicomError` listing every problem: several series, missing or
    duplicated slices (SOPInstanceUID, InstanceNumber, ImagePositionPatient), uneven
    spacing, a Modality other than ``kind``'s, PET units that cannot become SUV.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if kind not in SERIES_MODALITY:
        raise ValueError(f"kind must be one of {list(SERIES_MODALITY)} for a series folder, got {kind!r}")
    if not folder.is_dir():
        raise DicomError([DicomProblem(folder, "SeriesInstanceUID", "not a folder of DICOM images")])
    groups, notes = _group_series(folder)
    uid, problems = _choose_series(folder, groups, series_uids)
    if uid is None:
        raise DicomError(problems)
    slices = groups[uid]
    if len(groups) > 1:
        notes.append(f"{folder} holds {len(groups)} series; read {uid} ({len(slices)} files), as dicom_series names it")
    modalities = sorted({str(s.header.get("Modality", "")) for s in slices})
    if modalities != [SERIES_MODALITY[kind]]:
        problems.append(DicomProblem(folder, "Modality", f"{'/'.join(modalities) or 'absent'}, expected "
                                                         f"{SERIES_MODALITY[kind]} for a {kind.upper()} series"))
    frames = sorted({str(s.header.get("FrameOfReferenceUID", "")) for s in slices})
    if len(frames) != 1 or not frames[0]:
        problems.append(DicomProblem(folder, "FrameOfReferenceUID",
                                     f"missing or not the same on every slice: {frames}"))
    problems += _geometry_problems(folder, slices)
    factors = np.ones(len(slices))
    if kind == "pet":
        factors, suv_notes, suv_problems = suv_factors([s.header for s in slices], folder)
        problems += suv_problems
        notes += suv_notes
    if problems:
        raise DicomError(problems)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise DicomError([DicomProblem(folder, "PixelData", f"pixels unreadable: {reason}")]) from None
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)  # sitk [z, y, x] -> [x, y, z]
    if array.ndim != 3 or array.shape[2] != len(slices):
        raise DicomError([DicomProblem(folder, "PixelData",
                                       f"read as shape {array.shape}, expected {len(slices)} slices")])
    if kind == "pet" and not np.all(factors == 1.0):
        array *= factors.astype(np.float32)[None, None, :]
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    notes.insert(0, f"DICOM {kind.upper()} series {uid}: {len(slices)} slices from {folder}")
    first = slices[0].header
    return SeriesImage(array, LPS_TO_RAS @ lps, notes, {
        "Modality": str(first.get("Modality", "")),
        "SeriesInstanceUID": uid,
        "FrameOfReferenceUID": frames[0],
    })


# --------------------------------------------------------------------------- PET units


def _clock(value: Any) -> float | None:
    """Seconds since midnight of a DICOM TM, or of the time part of a DT (None: absent or unreadable)."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        moment = DT(text).time() if len(text.split(".")[0]) > 6 else TM(text)
    except ValueError:
        return None
    return moment.hour * 3600.0 + moment.minute * 60.0 + moment.second + moment.microsecond / 1e6


def suv_factors(headers: Sequence[Dataset], where: Path) -> tuple[np.ndarray, list[str], list[DicomProblem]]:
    """Per-slice factors turning PET voxel values into SUV (body weight), notes, problems.

    ``Units`` GML: already SUV, factors 1. BQML: ``SUV = value * weight[g] / dose[Bq]``
    where the dose is the RadionuclideTotalDose decayed (RadionuclideHalfLife) from the
    RadiopharmaceuticalStartTime to the time the image is decay-corrected to, as
    DecayCorrection says: ADMIN the injection (no decay), START the SeriesTime
    (AcquisitionTime when absent), NONE each slice's AcquisitionTime. Any other unit, or a
    tag missing, is a problem naming the tag.
    """
    ones = np.ones(len(headers))
    first = headers[0]
    units = str(first.get("Units", "")).upper()
    if units == "GML":
        return ones, ["PET Units GML: already SUV (body weight), values passed through"], []
    if units != "BQML":
        return ones, [], [DicomProblem(where, "Units", f"{units or 'absent'}: only GML (SUV) and BQML (Bq/mL, "
                                                      "converted to SUV) PET can be read")]
    problems: list[DicomProblem] = []

    def need(value: Any, keyword: str, what: str) -> Any:
        if value in (None, ""):
            problems.append(DicomProblem(where, keyword, f"missing: needed to convert BQML PET to SUV ({what})"))
        return value

    weight = need(first.get("PatientWeight"), "PatientWeight", "body weight, kg")
    if weight not in (None, "") and float(weight) <= 0:
        problems.append(DicomProblem(where, "PatientWeight", f"{weight}: not a body weight in kg"))
    info = first.get("RadiopharmaceuticalInformationSequence")
    item = info[0] if info else Dataset()
    if not info:
        need(None, "RadiopharmaceuticalInformationSequence", "dose, injection time, half life")
    dose = need(item.get("RadionuclideTotalDose"), "RadionuclideTotalDose", "injected activity, Bq")
    correction = str(first.get("DecayCorrection", "")).upper()
    if correction not in ("ADMIN", "START", "NONE"):
        problems.append(DicomProblem(where, "DecayCorrection", f"{correction or 'absent'}: expected START, ADMIN or "
                                                               "NONE to know when the dose is counted"))
    half_life = injected = None
    if correction in ("START", "NONE"):
        half_life = need(item.get("RadionuclideHalfLife"), "RadionuclideHalfLife", "seconds")
        start = item.get("RadiopharmaceuticalStartTime") or item.get("RadiopharmaceuticalStartDateTime")
        injected = _clock(need(start, "RadiopharmaceuticalStartTime", "injection time"))
    if correction in ("START", "NONE") and injected is None and not problems:
        problems.append(DicomProblem(where, "RadiopharmaceuticalStartTime", "unreadable: needed to decay the dose"))
    if problems:
        return ones, [], problems
    weight_g = float(weight) * 1000.0
    if correction == "ADMIN":
        return ones * weight_g / float(dose), [
            f"PET Units BQML converted to SUV body weight: x {weight_g / float(dose):.6g} = {float(weight):g} kg / "
            f"{float(dose) / 1e6:.4g} MBq (DecayCorrection ADMIN: no decay)"], []
    if correction == "START":
        times = [_clock(first.get("SeriesTime"))]
        if times[0] is None:
            acquired = [_clock(h.get("AcquisitionTime")) for h in headers]
            times = [min((t for t in acquired if t is not None), default=None)]
        keyword = "SeriesTime"
    else:
        times = [_clock(h.get("AcquisitionTime")) for h in headers]
        keyword = "AcquisitionTime"
    if any(t is None for t in times):
        return ones, [], [DicomProblem(where, keyword, f"missing or unreadable: needed to decay the dose "
                                                       f"(DecayCorrection {correction})")]
    # Times of day only: anonymisation shifts dates inconsistently (IBSI STS_002's injection is dated the day
    # after its scan), and a scan is always within a day of its injection, so a negative gap crossed midnight.
    elapsed = np.mod(np.array(times, dtype=float) - float(injected), 86400.0)  # type: ignore[arg-type]
    decayed = float(dose) * np.power(2.0, -elapsed / float(half_life))  # type: ignore[arg-type]
    factors = weight_g / decayed
    factors = factors if correction == "NONE" else np.full(len(headers), factors[0])
    return factors, [
        f"PET Units BQML converted to SUV body weight: {float(weight):g} kg, {float(dose) / 1e6:.4g} MBq decayed over "
        f"{elapsed.min():.0f} s (half life {float(half_life):g} s, DecayCorrection {correction}, {keyword}): "
        f"x {factors.min():.6g}" + ("" if correction == "START" else f"..{factors.max():.6g}")], []


# --------------------------------------------------------------------------- labels


def choose_roi(
    names: Sequence[str], roi: str | None, where: Path, what: str = "ROI"
) -> tuple[int | None, list[DicomProblem]]:
    """Index of the ROI named ``roi`` in ``names``: exact name, else a glob (``GTV*``), else a
    regular expression (full match), case-insensitive; None and a problem listing the ROIs
    present when none or several match (``roi`` None: the only ROI, if there is one)."""
    tag = "ROIName" if what == "ROI" else "SegmentLabel"
    present = ", ".join(repr(n) for n in names) or "none"
    if roi is None:
        if len(names) == 1:
            return 0, []
        return None, [DicomProblem(where, tag, f"{len(names)} {what}s ({present}): name one (label_roi in the site "
                                               "YAML, --roi with pemma convert)")]
    matches = [i for i, n in enumerate(names) if n == roi]
    if not matches:
        matches = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n.lower(), roi.lower())]
    if not matches:
        try:
            pattern = re.compile(roi, re.IGNORECASE)
            matches = [i for i, n in enumerate(names) if pattern.fullmatch(n)]
        except re.error:
            pass
    if len(matches) == 1:
        return matches[0], []
    if not matches:
        return None, [DicomProblem(where, tag, f"no {what} matches {roi!r}; {what}s present: {present}")]
    return None, [DicomProblem(where, tag, f"{len(matches)} {what}s match {roi!r}: "
                                           f"{', '.join(repr(names[i]) for i in matches)}; give an exact name")]


def rtstruct_roi_names(path: Path) -> list[str]:
    """The ROI names of an RTSTRUCT file, in file order."""
    return [str(item.get("ROIName", "")) for item in pydicom.dcmread(path).get("StructureSetROISequence", [])]


def _referenced_series(ds: Dataset) -> set[str]:
    found = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                found.add(str(series.get("SeriesInstanceUID", "")))
    return found - {""}


def read_rtstruct(path: Path, shape: tuple[int, int, int], affine: np.ndarray, *, roi: str | None,
                  reference: dict[str, str] | None = None) -> LabelImage:
    """One ROI of an RTSTRUCT filled onto a grid (``shape``, ``affine`` voxel -> RAS mm).

    A voxel is inside when its centre is inside the slice's contour (scikit-image's
    polygon fill); contours nested on one slice are holes (even-odd rule). ``reference``:
    the DICOM identifiers of the reference series (SeriesInstanceUID,
    FrameOfReferenceUID), checked against what the RTSTRUCT references. Raises
    :class:`DicomError`: not an RTSTRUCT, ROI not found (the ROIs present listed),
    another series or frame of reference, contours not on the grid's slice planes.
    """
    from skimage.draw import polygon

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise DicomError([DicomProblem(path, "SOPClassUID", f"not a readable DICOM file ({exc})")]) from None
    if str(ds.get("Modality", "")) != "RTSTRUCT":
        raise DicomError([DicomProblem(path, "Modality", f"{ds.get('Modality', 'absent')}, expected RTSTRUCT")])
    rois = list(ds.get("StructureSetROISequence", []))
    index, problems = choose_roi([str(r.get("ROIName", "")) for r in rois], roi, path)
    if index is None:
        raise DicomError(problems)
    chosen = rois[index]
    name, number = str(chosen.get("ROIName", "")), chosen.get("ROINumber")
    reference = reference or {}
    notes = [f"RTSTRUCT {path}: ROI {name!r}"]
    series = _referenced_series(ds)
    if reference.get("SeriesInstanceUID") and series and reference["SeriesInstanceUID"] not in series:
        problems.append(DicomProblem(path, "SeriesInstanceUID",
                                     f"the RTSTRUCT references series {', '.join(sorted(series))}, not the reference "
                                     f"series {reference['SeriesInstanceUID']}: contours drawn on another image"))
    frame = str(chosen.get("ReferencedFrameOfReferenceUID", ""))
    if reference.get("FrameOfReferenceUID") and frame and frame != reference["FrameOfReferenceUID"]:
        problems.append(DicomProblem(path, "FrameOfReferenceUID",
                                     f"ROI {name!r} is in frame of reference {frame}, the reference image in "
                                     f"{reference['FrameOfReferenceUID']}: positions cannot be compared"))
    contours = next((c.get("ContourSequence", []) for c in ds.get("ROIContourSequence", [])
                     if c.get("ReferencedROINumber") == number), None)
    if contours is None:
        problems.append(DicomProblem(path, "ROIContourSequence", f"no contours for ROI {name!r} (ROINumber {number})"))
    if problems:
        raise DicomError(problems)

    mask = np.zeros(shape, dtype=bool)
    to_index = np.linalg.inv(np.asarray(affine, dtype=float))
    outside = skipped = 0
    for contour in contours:
        if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
            skipped += 1  # points and open lines enclose no volume
            continue
        points = np.asarray([float(v) for v in contour.ContourData], dtype=float).reshape(-1, 3)
        ras = (LPS_TO_RAS[:3, :3] @ points.T).T
        ijk = (to_index[:3, :3] @ ras.T + to_index[:3, 3:4]).T
        if np.ptp(ijk[:, 2]) > 0.1:
            raise DicomError([DicomProblem(path, "ContourData",
                                           f"ROI {name!r} has a contour across {np.ptp(ijk[:, 2]):.2f} slices of the "
                                           "reference grid: contours must lie in its slice planes")])
        k = int(round(float(ijk[:, 2].mean())))
        if not 0 <= k < shape[2]:
            outside += 1
            continue
        rows, cols = polygon(ijk[:, 0], ijk[:, 1], shape=shape[:2])
        filled = np.zeros(shape[:2], dtype=bool)
        filled[rows, cols] = True
        mask[:, :, k] ^= filled
    if outside:
        notes.append(f"{outside} contour(s) of {name!r} lie outside the reference grid's slices; left out")
    if skipped:
        notes.append(f"{skipped} contour(s) of {name!r} are not CLOSED_PLANAR; left out")
    return LabelImage(mask.astype(np.uint8), notes, {"ROIName": name})


def read_seg(path: Path, shape: tuple[int, int, int], affine: np.ndarray, *, roi: str | None,
             reference: dict[str, str] | None = None) -> LabelImage:
    """One segment of a DICOM-SEG (highdicom) on a grid (``shape``, ``affine`` voxel -> RAS mm).

    The segment is matched to the grid by permuting, flipping, padding and cropping
    (highdicom's ``match_geometry``) when their voxels coincide, else resampled nearest
    neighbour. Raises :class:`DicomError`: not a SEG, segment not found (those present
    listed), another frame of reference.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises several types for a file that is no SEG
        reason = f"not a readable DICOM-SEG ({type(exc).__name__}: {exc})"
        raise DicomError([DicomProblem(path, "SOPClassUID", reason)]) from None
    segments = list(seg.SegmentSequence)
    index, problems = choose_roi([str(s.get("SegmentLabel", "")) for s in segments], roi, path, what="segment")
    reference = reference or {}
    frame = str(seg.get("FrameOfReferenceUID", ""))
    if reference.get("FrameOfReferenceUID") and frame and frame != reference["FrameOfReferenceUID"]:
        problems.append(DicomProblem(path, "FrameOfReferenceUID",
                                     f"the SEG is in frame of reference {frame}, the reference image in "
                                     f"{reference['FrameOfReferenceUID']}: positions cannot be compared"))
    if problems or index is None:
        raise DicomError(problems)
    number = int(segments[index].SegmentNumber)
    name = str(segments[index].get("SegmentLabel", ""))
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=True)
    except (RuntimeError, ValueError) as exc:
        raise DicomError([DicomProblem(path, "PerFrameFunctionalGroupsSequence",
                                       f"segment {name!r} is not a regular 3-D volume ({exc})")]) from None
    target = hd.VolumeGeometry(LPS_TO_RAS @ np.asarray(affine, dtype=float), list(shape), coordinate_system="PATIENT",
                               frame_of_reference_uid=frame or None)
    notes = [f"DICOM-SEG {path}: segment {name!r}"]
    try:
        array = volume.match_geometry(target).array
    except RuntimeError:
        array = _nearest_resample(np.asarray(volume.array), LPS_TO_RAS @ volume.affine, shape, affine)
        notes.append("SEG voxels do not coincide with the reference grid: resampled nearest neighbour")
    return LabelImage((np.asarray(array) > 0).astype(np.uint8), notes, {"SegmentLabel": name})


def _nearest_resample(array: np.ndarray, source_affine: np.ndarray, shape: tuple[int, int, int],
                      target_affine: np.ndarray) -> np.ndarray:
    from scipy.ndimage import affine_transform

    mapping = np.linalg.inv(source_affine) @ np.asarray(target_affine, dtype=float)  # target index -> source index
    return affine_transform(array.astype(np.float32), mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape,
                            order=0, mode="constant", cval=0.0)
