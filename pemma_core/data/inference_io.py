"""One case in, one mask out: preprocessing a case for a model and writing its prediction back.

:func:`load_for_inference` runs the site checks and the deterministic pipeline of
:mod:`pemma_core.data.pipeline` on given CT/PET inputs (NIfTI files or DICOM series
folders); :func:`write_prediction` resamples a mask from the model's reference grid back
onto the original CT grid (both affines); :func:`write_dicom_seg` writes that mask as a
DICOM Segmentation referencing the CT series it was predicted on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from pemma_core.config.site import SiteConfig
from pemma_core.data.checks import inspect_case_files
from pemma_core.data.manifest import IMAGE_KEYS, BadCaseError, Case
from pemma_core.data.pipeline import Preprocessing, deterministic_transform

__all__ = ["MASK_SUFFIXES", "InferenceMeta", "load_for_inference", "mask_suffix", "write_dicom_seg", "write_prediction"]

MASK_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")  # nibabel compresses by suffix: .nii.gz gzip, .nii plain


def mask_suffix(path: Path | str) -> str:
    """``".nii.gz"`` or ``".nii"``; ValueError naming ``path`` for any other name."""
    name = Path(path).name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ValueError(f"{path}: a mask is written as NIfTI: name it .nii.gz (compressed) or .nii (uncompressed)")


@dataclass(frozen=True)
class InferenceMeta:
    """Enough to put a prediction made on the reference grid back onto the original image grid."""

    reference_path: Path  # the original CT (PET without CT): a NIfTI file or a DICOM series folder
    reference_affine: np.ndarray  # [4, 4] voxel index -> RAS mm (nibabel's convention)
    reference_shape: tuple[int, int, int]
    grid_affine: np.ndarray  # [4, 4] of the resampled grid the model saw
    grid_shape: tuple[int, int, int]
    reference_header: nib.Nifti1Header | None = None  # a NIfTI reference's header (kept in the mask); None: DICOM

    @property
    def ct_path(self) -> Path:
        return self.reference_path

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], index: int = 0) -> InferenceMeta:
        """From an :func:`~pemma_core.data.pipeline.eval_loader`-style batch (item ``index``)."""
        path = Path(batch["reference_path"][index])
        grid_affine = np.asarray(batch["grid_affine"][index], dtype=np.float64)
        grid_shape = tuple(int(s) for s in batch["image"].shape[-3:])
        return cls._with_reference(path, path, grid_affine, grid_shape)

    @classmethod
    def _with_reference(cls, path: Path, nifti: Path, grid_affine: np.ndarray, grid_shape: tuple[int, ...]) -> InferenceMeta:
        """``path``: what the user gave; ``nifti``: the NIfTI read for it (itself, or a DICOM series' conversion)."""
        image = nib.load(str(nifti))  # header only: the data is not read
        return cls(
            reference_path=path,
            reference_affine=np.asarray(image.affine, dtype=np.float64),
            reference_shape=tuple(int(s) for s in image.shape[:3]),  # type: ignore[arg-type]
            grid_affine=grid_affine,
            grid_shape=grid_shape,  # type: ignore[arg-type]
            reference_header=image.header.copy() if nifti == path else None,
        )


def _as_preprocessing(settings: SiteConfig | Preprocessing | Sequence[float]) -> Preprocessing:
    if isinstance(settings, SiteConfig):
        return Preprocessing.from_site(settings)
    if isinstance(settings, Preprocessing):
        return settings
    return Preprocessing(spacing=tuple(float(s) for s in settings))  # type: ignore[arg-type]


def _as_nifti(path: Path, kind: str, folder: Path) -> Path:
    """The NIfTI the pipeline reads for an input: a NIfTI itself (its gzip stream checked whole),
    a DICOM series folder converted into ``folder`` (:func:`pemma_core.data.volumes.read_volume`)."""
    from pemma_core.data.volumes import is_nifti, read_volume, verify_gzip, write_nifti

    if not path.exists():
        return path  # the case checks report it as a missing file
    if is_nifti(path):
        if path.name.lower().endswith(".gz"):
            verify_gzip(path)  # the pipeline reads the NIfTI itself: read_volume would read it twice
        return path
    return write_nifti(read_volume(path, kind=kind), folder / f"{kind}.nii.gz")


def load_for_inference(
    ct: Path | str | None,
    pet: Path | str | None,
    settings: SiteConfig | Preprocessing | Sequence[float],
) -> tuple[torch.Tensor, InferenceMeta]:
    """One case ready for a model, and what is needed to write its prediction back.

    ``ct`` / ``pet``: NIfTI files or DICOM series folders. ``settings``: a site config, a
    :class:`Preprocessing`, or just a spacing (default window and SUV ceiling). Returns
    ``image`` float32 [1, 2, X, Y, Z] (PET channel zeros when ``pet`` is None) and an
    :class:`InferenceMeta`. Raises :class:`BadCaseError` (naming the file and problem) when
    an input fails the checks, what :func:`~pemma_core.data.volumes.read_volume` raises for
    an unreadable one.
    """
    prep = _as_preprocessing(settings)
    given = {"ct": None if ct is None else Path(ct), "pet": None if pet is None else Path(pet)}
    if given["ct"] is None and given["pet"] is None:
        raise ValueError("load_for_inference needs a CT or a PET image")
    held = tuple(k for k in IMAGE_KEYS if given[k] is not None)
    with tempfile.TemporaryDirectory(prefix="pemma-dicom-") as converted:
        paths = {k: _as_nifti(given[k], k, Path(converted)) for k in held}  # type: ignore[arg-type]
        # The case checks, for a "site" holding exactly what was given.
        case = Case("inference", paths.get("ct"), paths.get("pet"), None, "test")
        errors = [p for p in inspect_case_files(case, frozenset(held)) if p.severity == "error"]
        if errors:
            text = "; ".join(str(p) for p in errors)
            for kind in held:  # name what the user gave, not a temporary conversion
                text = text.replace(str(paths[kind]), str(given[kind]))
            raise BadCaseError(text)
        transform = deterministic_transform(prep, "ct" in held, "pet" in held, has_label=False)
        out = transform({k: str(v) for k, v in paths.items()})
        reference = "ct" if "ct" in held else "pet"
        meta = InferenceMeta._with_reference(
            given[reference], paths[reference], out["grid_affine"].numpy(),  # type: ignore[arg-type]
            tuple(int(s) for s in out["image"].shape[-3:]),
        )
    return out["image"].unsqueeze(0), meta


def _atomic_write(out_path: Path, suffix: str, write: Any) -> Path:
    """``write(temporary path with suffix)`` then rename onto ``out_path``: never half a file under its name."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, out_path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return out_path


def write_prediction(mask: torch.Tensor | np.ndarray, meta: InferenceMeta, out_path: Path | str) -> Path:
    """Write a mask predicted on the reference grid as NIfTI on the original CT grid.

    ``mask``: [X, Y, Z], [1, X, Y, Z] or [1, 1, X, Y, Z] on the grid of ``meta`` (binary, or
    probabilities in [0, 1]). Binary masks are resampled nearest-neighbour; probabilities
    are resampled bilinearly and thresholded at 0.5. The file holds uint8 0/1 with the
    original CT's exact affine, shape and (for a NIfTI CT) header geometry; ``.nii.gz``
    compressed, ``.nii`` not (any other name is refused). Written atomically (temporary
    file, then rename); never written over the input image itself, nor onto a folder.
    """
    out_path = Path(out_path)
    if out_path.resolve() == meta.reference_path.resolve():
        raise ValueError(f"refusing to overwrite the input image {meta.reference_path}")
    if out_path.is_dir():
        raise IsADirectoryError(21, "is a folder, not a file name for the mask", str(out_path))
    suffix = mask_suffix(out_path)
    values = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask.detach().cpu())
    values = values.reshape(values.shape[-3:]) if values.ndim > 3 and np.prod(values.shape[:-3]) == 1 else values
    if values.ndim != 3 or tuple(values.shape) != tuple(meta.grid_shape):
        raise ValueError(
            f"mask shape {tuple(values.shape)} does not match the grid {meta.grid_shape} of {meta.reference_path}"
        )
    values = values.to(torch.float32)
    binary = bool(torch.all((values == 0) | (values == 1)))
    resample = SpatialResample(mode="nearest" if binary else "bilinear", padding_mode="zeros", dtype=torch.float64)
    on_grid = MetaTensor(values[None], affine=torch.as_tensor(meta.grid_affine, dtype=torch.float64))
    back = resample(on_grid, dst_affine=torch.as_tensor(meta.reference_affine), spatial_size=meta.reference_shape)
    array = (np.asarray(back.detach().cpu())[0] >= 0.5).astype(np.uint8)

    if meta.reference_header is not None:
        header = meta.reference_header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(array, meta.reference_affine, header=header)
    else:  # a DICOM CT: its geometry is all there is to keep
        image = nib.Nifti1Image(array, meta.reference_affine)
        image.set_sform(meta.reference_affine, code=1)
        image.set_qform(meta.reference_affine, code=1)
    return _atomic_write(out_path, suffix, lambda temp: nib.save(image, temp))


def _series_datasets(folder: Path, series_uid: str | None) -> list:
    """The pydicom datasets of the CT series in ``folder``, sorted along the slice normal."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "ImagePositionPatient" in ds and (series_uid is None or ds.SeriesInstanceUID == series_uid):
            datasets.append(ds)
    series = {ds.SeriesInstanceUID for ds in datasets}
    if len(series) != 1:
        raise ValueError(f"{folder}: expected the images of one DICOM series, found {len(series)} series")
    normal = np.cross(*np.asarray(datasets[0].ImageOrientationPatient, float).reshape(2, 3))
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _mask_on_slices(mask: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """[slices, rows, columns] bool: the mask at each DICOM pixel's centre, mapped through world
    coordinates (DICOM LPS -> RAS -> mask voxel), so no axis order or flip is assumed."""
    to_voxel = np.linalg.inv(affine)
    frames = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=bool)
    rows, cols = np.meshgrid(np.arange(frames.shape[1]), np.arange(frames.shape[2]), indexing="ij")
    for i, ds in enumerate(datasets):
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        lps = (np.asarray(ds.ImagePositionPatient, float)[None, None]
               + cols[..., None] * col_spacing * orientation[:3] + rows[..., None] * row_spacing * orientation[3:])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(np.int64)
        inside = np.all((voxel >= 0) & (voxel < np.array(mask.shape[:3])), axis=-1)
        frames[i][inside] = mask[tuple(voxel[inside].T)] > 0
    return frames


def write_dicom_seg(mask: Path | str, ct_series: Path | str, out_path: Path | str, *, overwrite: bool = False,
                    series_uid: str | None = None) -> Path:
    """Write the NIfTI ``mask`` as a binary DICOM Segmentation (highdicom) of the CT series folder
    ``ct_series`` (``series_uid`` to choose among several): one segment, "tumour", automatic
    (pemma), its frames the CT's slices. The mask may be on any grid covering the CT (it is
    sampled at each CT pixel's centre). Refuses an existing ``out_path`` unless ``overwrite``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pemma_core import __version__

    mask, ct_series, out_path = Path(mask), Path(ct_series), Path(out_path)
    if out_path.is_dir():
        raise IsADirectoryError(21, "is a folder, not a file name for the DICOM-SEG", str(out_path))
    if out_path.exists() and not overwrite:
        raise FileExistsError(17, "exists (pass overwrite to replace it)", str(out_path))
    if not ct_series.is_dir():
        raise ValueError(f"{ct_series}: a DICOM-SEG references a DICOM CT series: give the series folder")
    image = nib.load(str(mask))
    datasets = _series_datasets(ct_series, series_uid)
    frames = _mask_on_slices(np.asanyarray(image.dataobj), np.asarray(image.affine, float), datasets)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="pemma", version=__version__, family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="pemma", manufacturer_model_name="pemma PEMMA",
        software_versions=__version__, device_serial_number="none", series_description="pemma tumour segmentation",
        omit_empty_frames=bool(frames.any()),  # an empty mask keeps every frame (a SEG needs one)
    )
    return _atomic_write(out_path, ".dcm", seg.save_as)
