"""``pemma convert SOURCE OUT.nii.gz``: DICOM to NIfTI, as pemma reads it.

- a CT or PET series folder: CT in Hounsfield units, PET in SUV (body weight; BQML is
  converted, the factor printed); ``--kind`` or the series' Modality says which;
- an RTSTRUCT or DICOM-SEG file: the ROI ``--roi`` (name, glob or regular expression)
  filled onto the grid of ``--reference`` (the series folder it was drawn on, or a NIfTI).

The NIfTI has the series' affine in RAS (as nibabel reads the NIfTI twins). An existing
OUT is never replaced without ``--overwrite``. Exit status 0 written, 1 a problem with the
data (every DICOM problem named with its file and tag), 2 bad options.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

from pemma_core.console import UsageError

__all__ = ["add_arguments", "run"]

# nibabel, pydicom, SimpleITK are imported when the command runs, not for --help.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a DICOM series folder (CT or PET), or an RTSTRUCT / DICOM-SEG file")
    parser.add_argument("out", type=Path, help="the NIfTI file to write (.nii.gz or .nii)")
    parser.add_argument("--kind", choices=("ct", "pet", "label"), default=None,
                        help="what SOURCE is (default: a series' Modality, CT or PT; label for an RTSTRUCT / SEG)")
    parser.add_argument("--reference", type=Path, default=None, metavar="SERIES_DIR",
                        help="for a label: the series folder (or NIfTI) whose grid it is filled onto")
    parser.add_argument("--roi", default=None, metavar="NAME",
                        help="for a label: the RTSTRUCT ROI / SEG segment, an exact name, a glob (GTV*) or a regular "
                             "expression (default: the file's only ROI)")
    parser.add_argument("--series", action="append", default=[], metavar="UID",
                        help="the SeriesInstanceUID to use where a folder holds several series (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def _detect_kind(source: Path) -> str:
    from pemma_core.data import dicom

    found = dicom.dicom_kind(source)
    if found in ("rtstruct", "seg"):
        return "label"
    if found == "series":
        modality = dicom.series_modality(source)
        kinds = {v: k for k, v in dicom.SERIES_MODALITY.items()}
        if modality in kinds:
            return kinds[modality]
        raise ValueError(f"{source}: Modality (0008,0060) is {modality!r}: pemma converts CT and PT series "
                         "(give --kind to read it as one)")
    if found == "image":
        raise ValueError(f"{source}: a single DICOM image; give the folder of its series")
    raise ValueError(f"{source}: not a DICOM series folder, RTSTRUCT or DICOM-SEG file")


def run(args: argparse.Namespace) -> int:
    from pemma_core.console import say
    from pemma_core.data.volumes import is_nifti, read_volume, write_nifti

    source, out = Path(args.source), Path(args.out)
    if not is_nifti(out):
        raise UsageError(f"OUT must be a NIfTI file name (.nii.gz or .nii), got {out}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(errno.EEXIST, "already exists; refusing to overwrite it (give --overwrite)", str(out))
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))
    kind = args.kind or _detect_kind(source)
    if kind == "label" and args.reference is None:
        raise UsageError("a label (RTSTRUCT / DICOM-SEG) needs --reference SERIES_DIR: the grid it is filled onto")
    if kind != "label" and (args.reference is not None or args.roi is not None):
        raise UsageError(f"--reference and --roi apply to a label; {source} is read as {kind.upper()}")
    volume = read_volume(source, kind=kind, reference=args.reference, roi=args.roi, series_uids=args.series)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(volume, out)
    spacing = " x ".join(f"{v:.3g}" for v in (volume.affine[:3, :3] ** 2).sum(axis=0) ** 0.5)
    extra = f", {int(volume.array.sum())} voxels inside" if kind == "label" else (
        f", values {float(volume.array.min()):.4g}..{float(volume.array.max()):.4g} {'HU' if kind == 'ct' else 'SUV'}")
    print(f"wrote {out}: {kind.upper() if kind != 'label' else 'label'} "
          f"{' x '.join(map(str, volume.array.shape))} voxels of {spacing} mm{extra}")
    for note in volume.notes:
        say(f"  {note}")
    return 0
