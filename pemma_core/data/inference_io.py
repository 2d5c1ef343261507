"""One case in, one mask out: preprocessing a case for a model and writing its prediction back.

:func:`load_for_inference` runs the site checks and the deterministic pipeline of
:mod:`pemma_core.data.pipeline` on given CT/PET files; :func:`write_prediction` resamples
a mask from the model's reference grid back onto the original CT grid (both affines).
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

__all__ = ["InferenceMeta", "load_for_inference", "write_prediction"]


@dataclass(frozen=True)
class InferenceMeta:
    """Enough to put a prediction made on the reference grid back onto the original image grid."""

    reference_path: Path  # the original CT (PET without CT)
    reference_affine: np.ndarray  # [4, 4] as nibabel reads it
    reference_shape: tuple[int, int, int]
    grid_affine: np.ndarray  # [4, 4] of the resampled grid the model saw
    grid_shape: tuple[int, int, int]

    @property
    def ct_path(self) -> Path:
        return self.reference_path

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], index: int = 0) -> InferenceMeta:
        """From an :func:`~pemma_core.data.pipeline.eval_loader`-style batch (item ``index``)."""
        path = Path(batch["reference_path"][index])
        grid_affine = np.asarray(batch["grid_affine"][index], dtype=np.float64)
        grid_shape = tuple(int(s) for s in batch["image"].shape[-3:])
        return cls._with_reference(path, grid_affine, grid_shape)

    @classmethod
    def _with_reference(cls, path: Path, grid_affine: np.ndarray, grid_shape: tuple[int, ...]) -> InferenceMeta:
        header = nib.load(str(path))  # header only: the data is not read
        return cls(
            reference_path=path,
            reference_affine=np.asarray(header.affine, dtype=np.float64),
            reference_shape=tuple(int(s) for s in header.shape[:3]),  # type: ignore[arg-type]
            grid_affine=grid_affine,
            grid_shape=grid_shape,  # type: ignore[arg-type]
        )


def load_for_inference(
    ct: Path | str | None,
    pet: Path | str | None,
    settings: SiteConfig | Preprocessing | Sequence[float],
) -> tuple[torch.Tensor, InferenceMeta]:
    """One case ready for a model, and what is needed to write its prediction back.

    ``settings``: a site config, a :class:`Preprocessing`, or just a spacing (default
    window and SUV ceiling). Returns ``image`` float32 [1, 2, X, Y, Z] (PET channel zeros
    when ``pet`` is None) and an :class:`InferenceMeta`. Raises :class:`BadCaseError`
    (naming the file and problem) when an input fails the checks.
    """
    if isinstance(settings, SiteConfig):
        prep = Preprocessing.from_site(settings)
    elif isinstance(settings, Preprocessing):
        prep = settings
    else:
        prep = Preprocessing(spacing=tuple(float(s) for s in settings))  # type: ignore[arg-type]
    paths = {"ct": None if ct is None else Path(ct), "pet": None if pet is None else Path(pet)}
    if paths["ct"] is None and paths["pet"] is None:
        raise ValueError("load_for_inference needs a CT or a PET image")
    # The case checks, for a "site" holding exactly what was given.
    case = Case("inference", paths["ct"], paths["pet"], None, "test")
    held = tuple(k for k in IMAGE_KEYS if paths[k] is not None)
    errors = [p for p in inspect_case_files(case, frozenset(held)) if p.severity == "error"]
    if errors:
        raise BadCaseError("; ".join(str(p) for p in errors))
    item = {k: str(v) for k, v in paths.items() if v is not None}
    out = deterministic_transform(prep, "ct" in held, "pet" in held, has_label=False)(item)
    reference = paths["ct"] if paths["ct"] is not None else paths["pet"]
    meta = InferenceMeta._with_reference(
        reference, out["grid_affine"].numpy(), tuple(int(s) for s in out["image"].shape[-3:])  # type: ignore[arg-type]
    )
    return out["image"].unsqueeze(0), meta


def write_prediction(mask: torch.Tensor | np.ndarray, meta: InferenceMeta, out_path: Path | str) -> Path:
    """Write a mask predicted on the reference grid as NIfTI on the original CT grid.

    ``mask``: [X, Y, Z], [1, X, Y, Z] or [1, 1, X, Y, Z] on the grid of ``meta`` (binary, or
    probabilities in [0, 1]). Binary masks are resampled nearest-neighbour; probabilities
    are resampled bilinearly and thresholded at 0.5. The file holds uint8 0/1 with the
    original CT's exact affine, shape and header geometry. Written atomically (temporary
    file, then rename); never written over the input image itself.
    """
    out_path = Path(out_path)
    if out_path.resolve() == meta.reference_path.resolve():
        raise ValueError(f"refusing to overwrite the input image {meta.reference_path}")
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

    reference = nib.load(str(meta.reference_path))
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(array, reference.affine, header=header)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp-", suffix=".nii.gz")
    os.close(handle)
    try:
        nib.save(image, temp)
        os.replace(temp, out_path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return out_path
