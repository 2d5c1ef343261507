"""A site's MONAI pipelines: usable cases, the deterministic and random transforms, cached loaders.

Geometry: CT and PET live on different grids and are always resampled with both
affines, never by array shape. The *reference grid* is the CT's (the PET's at a site
without CT) reoriented to RAS and resampled to the site's ``spacing`` (MONAI
``Orientationd`` + ``Spacingd``); PET (bilinear) and label (nearest neighbour) are then
resampled onto it with ``ResampleToMatchd``, which maps through the world coordinates
of both affines. Predictions are resampled back onto the original CT grid
(:func:`pemma_core.data.inference_io.write_prediction`).

Intensities (see :mod:`pemma_core.config.site`)::

    channel 0, CT : (clip(HU, lo, hi) - lo) / (hi - lo)  with (lo, hi) = ct_window   -> [0, 1]
    channel 1, PET: clip(SUV, 0, pet_suv_max) / pet_suv_max                          -> [0, 1]

A missing modality's channel is all zeros. Outside the PET field of view PET reads 0.

Batches are dicts::

    "image":  float32 [B, 2, X, Y, Z]   (channel 0 CT, channel 1 PET)
    "label":  float32 [B, 1, X, Y, Z]   values in {0, 1}
    "case_id": list[str]
    "grid_affine": float64 [B, 4, 4]    affine of the reference grid (world mm, RAS)
    "reference_path": list[str]         the original image whose grid predictions return to

Only checked cases are used (:func:`pemma_core.data.cases.site_cases`); a bad case is skipped with a warning or
stops the site, as the site's ``on_bad_case`` says. A case given as DICOM is converted to
NIfTI once, into the site cache, by :func:`~pemma_core.data.cases.site_cases`. The deterministic part (load,
resample, normalise) is cached on disk per site with MONAI's ``PersistentDataset`` under
``cfg.cache_dir/<preprocessing fingerprint>/``; a cache entry is keyed by the case's file
paths, sizes and modification times, so an edited file is re-read and a changed spacing
or window uses another folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    ResampleToMatchd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from pemma_core.config.site import DEFAULT_CT_WINDOW, DEFAULT_PET_SUV_MAX, SiteConfig
from pemma_core.data.cases import site_cases
from pemma_core.data.checks import file_stamp
from pemma_core.data.manifest import IMAGE_KEYS, Case, SiteDataError

__all__ = [
    "Preprocessing",
    "deterministic_transform",
    "train_transform",
    "cached_dataset",
    "train_loader",
    "eval_loader",
]


_PIPELINE_VERSION = 1  # bump when the deterministic transform changes, to invalidate the cache


@dataclass(frozen=True)
class Preprocessing:
    """The settings that fix the reference grid and intensities (a site's or a model's)."""

    spacing: tuple[float, float, float]
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    pet_suv_max: float = DEFAULT_PET_SUV_MAX

    @classmethod
    def from_site(cls, cfg: SiteConfig) -> Preprocessing:
        return cls(spacing=tuple(cfg.spacing), ct_window=tuple(cfg.ct_window), pet_suv_max=cfg.pet_suv_max)

    def fingerprint(self) -> str:
        """Short hash naming the cache folder of data preprocessed with these settings."""
        text = json.dumps({**asdict(self), "version": _PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# MONAI's LoadImage builds every reader it knows, the DICOM one included, which warns at each
# construction when the optional nvImageCodec GPU decoder is absent. pemma's loaders read NIfTI only
# (DICOM is converted first, with pydicom), so the warning says nothing here but came once per loader.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin", category=UserWarning)
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

# --------------------------------------------------------------------------- transforms


class _ZerosLiked(MapTransform):
    """Add ``key`` as an all-zero volume shaped like ``like`` (the channel of a modality not held)."""

    def __init__(self, key: str, like: str) -> None:
        super().__init__([key], allow_missing_keys=True)
        self.key, self.like = key, like

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        out[self.key] = torch.zeros_like(out[self.like])
        return out


class _RecordGridd(MapTransform):
    """Store the reference grid's affine as a plain float64 [4, 4] tensor under ``grid_affine``."""

    def __init__(self, reference: str) -> None:
        super().__init__([reference])
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        out["grid_affine"] = torch.as_tensor(np.asarray(out[self.reference].affine), dtype=torch.float64)
        return out


def deterministic_transform(prep: Preprocessing, has_ct: bool, has_pet: bool, has_label: bool) -> Compose:
    """Load, put every volume on the reference grid, normalise, stack channels.

    Input dict: ``"ct"`` / ``"pet"`` / ``"label"`` file paths (those present), anything
    else passes through. Output: ``"image"`` float32 [2, X, Y, Z], ``"label"`` float32
    [1, X, Y, Z] (when ``has_label``), ``"grid_affine"`` float64 [4, 4], plain tensors.
    The reference grid is the CT's (PET's without CT) in RAS at ``prep.spacing``; the
    other volumes follow it through both affines (``ResampleToMatchd``).
    """
    if not (has_ct or has_pet):
        raise ValueError("a case needs a CT or a PET image")
    reference = "ct" if has_ct else "pet"
    held = [k for k in IMAGE_KEYS if (k == "ct" and has_ct) or (k == "pet" and has_pet)]
    files = held + (["label"] if has_label else [])
    followers = [k for k in files if k != reference]
    steps: list[Any] = [
        LoadImaged(files, reader="NibabelReader", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(files, channel_dim="no_channel"),
        Orientationd(reference, axcodes="RAS", labels=None),
        Spacingd(reference, pixdim=prep.spacing, mode="bilinear", padding_mode="border"),
    ]
    if followers:
        steps.append(
            ResampleToMatchd(
                followers,
                key_dst=reference,
                mode=["nearest" if k == "label" else "bilinear" for k in followers],
                padding_mode="zeros",
            )
        )
    lo, hi = prep.ct_window
    if has_ct:
        steps.append(ScaleIntensityRanged("ct", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if has_pet:
        steps.append(ScaleIntensityRanged("pet", a_min=0.0, a_max=prep.pet_suv_max, b_min=0.0, b_max=1.0, clip=True))
    steps += [_ZerosLiked(k, like=reference) for k in IMAGE_KEYS if k not in held]
    steps += [
        _RecordGridd(reference),
        ConcatItemsd(list(IMAGE_KEYS), "image"),
        DeleteItemsd(list(IMAGE_KEYS)),
        EnsureTyped(["image", "label"] if has_label else ["image"], dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def train_transform(roi_size: tuple[int, int, int]) -> Compose:
    """Random part of training on a deterministic item: pad, tumour-biased crop, flips, small affine.

    Output: ``"image"`` [2, *roi_size], ``"label"`` [1, *roi_size] (a list of one dict, as
    MONAI croppers return; ``monai.data.DataLoader`` flattens it).
    """
    keys = ["image", "label"]
    return Compose(
        [
            # Volumes smaller than the crop are padded first so every crop has exactly roi_size.
            SpatialPadd(keys, spatial_size=roi_size, mode="constant"),
            # Two of three crops centred on tumour: tumours fill ~3% of a volume.
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi_size, pos=2.0, neg=1.0, num_samples=1),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=(0.15, 0.15, 0.15),  # about 9 degrees
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ]
    )


def _case_item(case: Case) -> dict[str, str]:
    item = {"case_id": case.case_id}
    for role in ("ct", "pet", "label"):
        path = getattr(case, role)
        if path is not None:
            item[role] = str(path)
    item["reference_path"] = str(case.ct if case.ct is not None else case.pet)
    return item


def _item_hash(item: Mapping[str, Any]) -> bytes:
    """Cache key of one case: its files' paths, sizes and modification times."""
    stamp = [item.get("case_id")] + [
        file_stamp(Path(item[role]) if role in item else None) for role in ("ct", "pet", "label")
    ]
    return hashlib.sha256(json.dumps(stamp, default=str).encode()).hexdigest().encode()


def cached_dataset(
    cfg: SiteConfig, cases: Sequence[Case], with_label: bool, cache_dir: Path | None = None
) -> PersistentDataset:
    """The deterministic part of ``cases``, cached on disk under ``(cache_dir or cfg.cache_dir)/<fingerprint>/``."""
    prep = Preprocessing.from_site(cfg)
    folder = (cache_dir or cfg.cache_dir) / prep.fingerprint()
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "label" if with_label else "nolabel"
    items = [_case_item(c) for c in cases]
    if not with_label:
        for item in items:
            item.pop("label", None)
    return PersistentDataset(
        items,
        transform=deterministic_transform(prep, cfg.has_ct, cfg.has_pet, with_label),
        cache_dir=folder / suffix,
        hash_func=_item_hash,
        track_meta=False,
    )


def _usable_or_raise(cfg: SiteConfig, split: str, need_label: bool) -> list[Case]:
    cases, _ = site_cases(cfg, split)
    if need_label:
        unlabelled = [c.case_id for c in cases if c.label is None]
        if unlabelled:
            _warn_once(cfg, f"{len(unlabelled)} case(s) without label left out of {split}: {unlabelled}")
        cases = [c for c in cases if c.label is not None]
    if not cases:
        raise SiteDataError(f"site {cfg.name}: no usable {split} case (run 'pemma check-site {cfg.path}')")
    return cases


def train_loader(
    cfg: SiteConfig,
    roi_size: tuple[int, int, int],
    batch_size: int = 2,
    split: str = "train",
    seed: int = 0,
    num_workers: int | None = None,
) -> DataLoader:
    """Shuffled random crops of the site's usable ``split`` cases.

    Each batch: ``"image"`` float32 [B, 2, *roi_size], ``"label"`` float32 [B, 1, *roi_size]
    in {0, 1}, ``"case_id"`` list[str] (plus ``"grid_affine"``, ``"reference_path"``).
    Same ``seed``, same crops and order (also with workers: MONAI's loader seeds each worker's
    transforms from the seeded generator). ``num_workers`` None: the site's ``loader_workers``.
    Raises :class:`SiteDataError` when no case is usable and :class:`BadCaseError` when one is
    bad and ``on_bad_case`` is ``fail``.
    """
    roi = tuple(int(s) for s in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be 3 positive integers, got {roi_size!r}")
    cases = _usable_or_raise(cfg, split, need_label=True)
    # monai.data.DataLoader seeds the transforms from ``generator`` (and each worker's from it)
    dataset = Dataset(cached_dataset(cfg, cases, with_label=True), transform=train_transform(roi))  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=_workers(cfg, num_workers),
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(cfg: SiteConfig, split: str = "test", num_workers: int | None = None) -> DataLoader:
    """Whole volumes of the site's usable, labelled ``split`` cases, batch 1, manifest order.

    Each batch: ``"image"`` [1, 2, X, Y, Z], ``"label"`` [1, 1, X, Y, Z], ``"case_id"``,
    ``"grid_affine"`` [1, 4, 4], ``"reference_path"``. Volumes are not padded
    (``monai.inferers.sliding_window_inference`` pads itself). ``num_workers`` None: the site's ``loader_workers``.
    :meth:`InferenceMeta.from_batch` turns a batch into what :func:`write_prediction` needs.
    """
    cases = _usable_or_raise(cfg, split, need_label=True)
    dataset = cached_dataset(cfg, cases, with_label=True)
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=_workers(cfg, num_workers))


def _workers(cfg: SiteConfig, num_workers: int | None) -> int:
    """The loader's worker count: the caller's, else the site's ``loader_workers`` (sites/README.md)."""
    return cfg.loader_workers if num_workers is None else num_workers
