"""Phantom physics: one synthetic limb case's anatomy, scanners, CT/PET/label images and survival.

One case (world coordinates in mm, the limb along z):

- CT over a 110 x 110 x 111 mm field of view (~2.3-2.7 mm in plane by site, 3 mm slices;
  :func:`ct_shape`), the limb 72-100 mm across: air -1000 HU, a
  subcutaneous fat layer (~-100 HU), muscle (35-55 HU), a long bone (cortex ~1200 HU,
  marrow ~-50 HU) and a tumour 80-140 HU above muscle (contrast-enhanced CT; PET still
  outlines it better: the CT edge is blurred and noisy); scanner
  blur and Gaussian noise (10-25 HU by site).
- PET on its own coarser grid (4.0-5.5 mm in plane) with another origin, axis direction
  and a slightly shorter axial field of view: background SUV ~1 (fat 0.35, marrow 1.3),
  tumour SUV heterogeneous (smooth blobs, necrotic core in large tumours) with mean
  3-10 and maxima up to ~20; partial volume (2x supersampling), PSF blur (FWHM 6-9 mm
  by site) and noise ~ sqrt(SUV).
- Label: the tumour (union of three spheres) on the CT grid.

Each site has its own scanner (:func:`site_scanner`): CT voxel size, orientation, noise,
PET voxel size, resolution (PSF) and noise.

Survival (months) follows a proportional-hazards model whose three sources carry
independent signal, so a C-index can rise from CT to CT+PET to CT+PET+EHR::

    lp     = 0.8 * zV  +  0.8 * zS  +  0.5 * (age - 60) / 12  +  g[grade]  +  0.35 * (ecog - 0.7)
    hazard = (ln 2 / 30) * exp(lp)                     (median 30 months at lp = 0)
    T ~ Exponential(hazard),  C ~ Uniform(12, 84),  time = min(T, C),  event = [T <= C]

    zV = standardised ln(tumour volume, ml)   (from the CT/label: volumes ~1.4-34 ml)
    zS = standardised ln(mean tumour SUV)     (from the PET)
    g  = {G1: -0.5, G2: 0.0, G3: +0.6};  age ~ N(60, 12);  ecog in {0, 1, 2}

Volume, SUV, age, grade and ECOG are drawn independently. ``sex`` is a covariate without
effect, and ``ecog`` is missing for ~12% of cases (missing at random) in the CSV while
the hazard uses its true value.

Everything is deterministic for a random generator: :func:`draw_case` then
:func:`make_case_images` draw from it in that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "CT_FOV_MM",
    "ct_shape",
    "Scanner",
    "PhantomCase",
    "CaseImages",
    "site_scanner",
    "draw_case",
    "make_case_images",
    "survival_linear_predictor",
    "case_survival",
]

# The CT field of view: resampled to the phantoms' 3.5 mm grid it is one 32-voxel model
# window, so evaluating a case is one forward pass instead of eight overlapping ones.
CT_FOV_MM: tuple[float, float, float] = (110.0, 110.0, 111.0)
CT_SLICE_MM = 3.0

# Hazard model (module docstring). Standardisation uses the sampling distributions.
RADIUS_RANGE_MM = (7.0, 20.0)  # main sphere; ln(volume) is uniform over this range
SUV_MEAN_RANGE = (3.0, 10.0)  # ln(mean SUV) uniform
TUMOUR_CONTRAST_HU = (80.0, 140.0)  # above muscle, uniform: a contrast-enhanced CT
BETA_VOLUME = 0.8
BETA_SUV = 0.8
BETA_AGE_PER_SD = 0.5
GRADE_EFFECT = {"G1": -0.5, "G2": 0.0, "G3": 0.6}
GRADE_PROBS = {"G1": 0.25, "G2": 0.35, "G3": 0.40}
BETA_ECOG = 0.35
ECOG_PROBS = (0.45, 0.40, 0.15)
ECOG_MISSING = 0.12
BASE_HAZARD_PER_MONTH = math.log(2) / 30.0
CENSOR_RANGE_MONTHS = (12.0, 84.0)

_VOLUME_SCALE = 1.3  # union of three spheres ~1.3x the main sphere (measured)


def _uniform_log_stats(lo: float, hi: float) -> tuple[float, float]:
    """Mean and SD of ln X for ln X uniform on [ln lo, ln hi]."""
    a, b = math.log(lo), math.log(hi)
    return (a + b) / 2, (b - a) / math.sqrt(12)


_LOG_VOLUME_STATS = _uniform_log_stats(
    *(_VOLUME_SCALE * 4 / 3 * math.pi * r**3 / 1000 for r in RADIUS_RANGE_MM)
)
_LOG_SUV_STATS = _uniform_log_stats(*SUV_MEAN_RANGE)


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Scanner:
    """One site's acquisition: CT and PET voxel sizes, orientation, blur and noise."""

    ct_inplane_mm: float
    ct_noise_hu: float
    ct_flip_xy: bool  # store x and y descending (LPS-like) instead of ascending
    pet_spacing_mm: tuple[float, float, float]
    pet_fwhm_mm: float
    pet_noise: float  # noise SD = pet_noise * sqrt(SUV)


_SCANNERS: tuple[Scanner, ...] = (
    Scanner(2.5, 12.0, True, (4.0, 4.0, 3.0), 6.0, 0.15),
    Scanner(2.3, 18.0, False, (4.69, 4.69, 3.27), 7.5, 0.25),
    Scanner(2.7, 25.0, True, (5.47, 5.47, 3.27), 9.0, 0.20),
)


def site_scanner(site_index: int) -> Scanner:
    """Scanner of site ``site_index`` (0-based); sites past the third cycle with a variation."""
    base = _SCANNERS[site_index % len(_SCANNERS)]
    if site_index < len(_SCANNERS):
        return base
    rng = np.random.default_rng([site_index, 7])
    return Scanner(
        ct_inplane_mm=float(rng.uniform(2.3, 2.7)),
        ct_noise_hu=float(rng.uniform(10, 25)),
        ct_flip_xy=bool(site_index % 2),
        pet_spacing_mm=base.pet_spacing_mm,
        pet_fwhm_mm=float(rng.uniform(6, 9)),
        pet_noise=float(rng.uniform(0.15, 0.25)),
    )


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class PhantomCase:
    """Everything drawn for one case (world mm). Images follow from it and a scanner."""

    centre: tuple[float, float, float]  # world position of the CT volume centre
    body_axes: tuple[float, float]  # ellipse semi-axes (x, y)
    fat_mm: float
    bone_centre: tuple[float, float]  # in-plane offset from the body centre
    bone_radius: float
    tumour_spheres: tuple[tuple[float, float, float, float], ...]  # (x, y, z, radius) world
    hu_fat: float
    hu_muscle: float
    tumour_contrast_hu: float
    suv_muscle: float
    suv_mean: float
    uptake_blobs: tuple[tuple[float, float, float, float, float], ...]  # (x, y, z, width, weight)
    necrosis: float  # 0..0.6: depth of the cold core
    pet_offset: tuple[float, float, float]  # PET grid origin shift (mm)
    pet_axial_loss_mm: float  # PET axial FOV this much shorter than the CT's
    age: float
    sex: str
    grade: str
    ecog: int
    ecog_missing: bool
    censor_months: float
    event_draw: float  # U(0, 1) turned into the event time by the hazard


def draw_case(rng: np.random.Generator) -> PhantomCase:
    """Draw one case's anatomy, tumour, uptake and clinical values (independent of scanner)."""
    centre = (float(rng.uniform(-30, 30)), float(rng.uniform(-30, 30)), float(rng.uniform(-300, 300)))
    axes = (float(rng.uniform(40, 50)), float(rng.uniform(36, 46)))  # inside CT_FOV_MM's 55 mm half-width
    fat = float(rng.uniform(4, 9))
    bone_radius = float(rng.uniform(9, 12))
    bone = (float(rng.uniform(-10, 10)), float(rng.uniform(-8, 8)))

    log_r = rng.uniform(math.log(RADIUS_RANGE_MM[0]), math.log(RADIUS_RANGE_MM[1]))
    radius = math.exp(log_r)
    spheres = _place_tumour(rng, centre, axes, fat, bone, bone_radius, radius)

    blobs = []
    main = spheres[0]
    for _ in range(4):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        at = np.array(main[:3]) + direction * main[3] * rng.uniform(0, 0.9)
        blobs.append((*(float(v) for v in at), float(main[3] * rng.uniform(0.3, 0.6)), float(rng.uniform(-0.6, 1.0))))
    return PhantomCase(
        centre=centre,
        body_axes=axes,
        fat_mm=fat,
        bone_centre=bone,
        bone_radius=bone_radius,
        tumour_spheres=spheres,
        hu_fat=float(rng.uniform(-110, -90)),
        hu_muscle=float(rng.uniform(35, 55)),
        tumour_contrast_hu=float(rng.uniform(*TUMOUR_CONTRAST_HU)),
        suv_muscle=float(rng.uniform(0.8, 1.1)),
        suv_mean=float(math.exp(rng.uniform(*np.log(SUV_MEAN_RANGE)))),
        uptake_blobs=tuple(blobs),
        necrosis=float(np.clip((radius - 12) / 8, 0, 1) * rng.uniform(0.3, 0.6)),
        pet_offset=tuple(float(v) for v in rng.uniform(-2.5, 2.5, size=3)),  # type: ignore[arg-type]
        pet_axial_loss_mm=float(rng.uniform(0, 8)),
        age=float(np.clip(rng.normal(60, 12), 18, 90)),
        sex=str(rng.choice(["F", "M"])),
        grade=str(rng.choice(list(GRADE_PROBS), p=list(GRADE_PROBS.values()))),
        ecog=int(rng.choice(3, p=ECOG_PROBS)),
        ecog_missing=bool(rng.uniform() < ECOG_MISSING),
        censor_months=float(rng.uniform(*CENSOR_RANGE_MONTHS)),
        event_draw=float(rng.uniform()),
    )


def _place_tumour(
    rng: np.random.Generator,
    centre: tuple[float, float, float],
    axes: tuple[float, float],
    fat: float,
    bone: tuple[float, float],
    bone_radius: float,
    radius: float,
) -> tuple[tuple[float, float, float, float], ...]:
    """Main sphere inside the muscle (clear of bone, within the CT's axial range) + 2 satellites."""
    for attempt in range(400):
        r = radius * (0.97 ** (attempt // 40))  # shrink slowly if the limb is too small
        room = (axes[0] - fat - 0.5 * r, axes[1] - fat - 0.5 * r)
        x, y = rng.uniform(-room[0], room[0]), rng.uniform(-room[1], room[1])
        inside = (x / room[0]) ** 2 + (y / room[1]) ** 2 <= 1
        clear = math.hypot(x - bone[0], y - bone[1]) >= bone_radius + r + 2
        if inside and clear:
            break
    z = rng.uniform(-CT_FOV_MM[2] / 2 + r + 12, CT_FOV_MM[2] / 2 - r - 12)
    main = np.array([centre[0] + x, centre[1] + y, centre[2] + z])
    spheres = [(*(float(v) for v in main), float(r))]
    for _ in range(2):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        at = main + direction * r * 0.6
        spheres.append((*(float(v) for v in at), float(r * rng.uniform(0.45, 0.7))))
    return tuple(spheres)


def _tissues(case: PhantomCase, points: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean tissue maps at world ``points`` [..., 3] (tumour excludes bone and air)."""
    dx = points[..., 0] - case.centre[0]
    dy = points[..., 1] - case.centre[1]
    a, b = case.body_axes
    body = (dx / a) ** 2 + (dy / b) ** 2 <= 1
    inner = (dx / (a - case.fat_mm)) ** 2 + (dy / (b - case.fat_mm)) ** 2 <= 1
    bone_distance = np.hypot(dx - case.bone_centre[0], dy - case.bone_centre[1])
    bone = bone_distance <= case.bone_radius
    cortex = bone & (bone_distance > case.bone_radius - 3.0)
    tumour = np.zeros(points.shape[:-1], dtype=bool)
    for x, y, z, r in case.tumour_spheres:
        tumour |= (points[..., 0] - x) ** 2 + (points[..., 1] - y) ** 2 + (points[..., 2] - z) ** 2 <= r * r
    tumour &= body & ~bone
    return {
        "body": body,
        "fat": body & ~inner,
        "muscle": inner & ~bone,
        "cortex": cortex,
        "marrow": bone & ~cortex,
        "tumour": tumour,
    }


def _grid_points(shape: Sequence[int], affine: np.ndarray, supersample: int = 1) -> np.ndarray:
    """World coordinates [X*s, Y*s, Z*s, 3] of (sub-)voxel centres of a grid."""
    axes = [(np.arange(n * supersample) + 0.5) / supersample - 0.5 for n in shape]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def ct_shape(scanner: Scanner) -> tuple[int, int, int]:
    """Voxels of ``scanner``'s CT grid: :data:`CT_FOV_MM` at its voxel size."""
    spacing = (scanner.ct_inplane_mm, scanner.ct_inplane_mm, CT_SLICE_MM)
    return tuple(int(round(fov / mm)) for fov, mm in zip(CT_FOV_MM, spacing))  # type: ignore[return-value]


def _ct_affine(case: PhantomCase, scanner: Scanner) -> np.ndarray:
    sign = -1.0 if scanner.ct_flip_xy else 1.0
    spacing = np.array([sign * scanner.ct_inplane_mm, sign * scanner.ct_inplane_mm, CT_SLICE_MM])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.array(case.centre) - spacing * (np.array(ct_shape(scanner)) - 1) / 2
    return affine


def _pet_grid(case: PhantomCase, scanner: Scanner) -> tuple[tuple[int, int, int], np.ndarray]:
    """PET shape and affine: covers the CT in plane, slightly shorter axially, axes opposite to the CT's."""
    extent = np.array([scanner.ct_inplane_mm, scanner.ct_inplane_mm, CT_SLICE_MM]) * np.array(ct_shape(scanner))
    extent[2] -= case.pet_axial_loss_mm
    pet_mm = np.array(scanner.pet_spacing_mm)
    shape = np.maximum(np.ceil(extent / pet_mm).astype(int), 1)
    shape[:2] += 1  # in plane the PET covers the CT fully
    sign = 1.0 if scanner.ct_flip_xy else -1.0  # opposite storage order to the CT: shape tricks fail
    spacing = np.array([sign * pet_mm[0], sign * pet_mm[1], pet_mm[2]])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.array(case.centre) + np.array(case.pet_offset) - spacing * (shape - 1) / 2
    return tuple(int(s) for s in shape), affine  # type: ignore[return-value]


def _uptake(case: PhantomCase, points: np.ndarray, tissues: dict[str, np.ndarray]) -> np.ndarray:
    """Noise-free SUV at ``points``; the tumour's mean over ``points`` equals ``case.suv_mean``."""
    suv = np.zeros(points.shape[:-1], dtype=np.float64)
    suv[tissues["fat"]] = 0.35
    suv[tissues["muscle"]] = case.suv_muscle
    suv[tissues["cortex"]] = 0.4
    suv[tissues["marrow"]] = 1.3
    tumour = tissues["tumour"]
    if tumour.any():
        p = points[tumour]
        field = np.ones(len(p))
        for x, y, z, width, weight in case.uptake_blobs:
            field += weight * np.exp(-((p - (x, y, z)) ** 2).sum(-1) / (2 * width**2))
        x0, y0, z0, r0 = case.tumour_spheres[0]
        field *= 1 - case.necrosis * np.exp(-((p - (x0, y0, z0)) ** 2).sum(-1) / (2 * (0.4 * r0) ** 2))
        field = np.clip(field, 0.25, None)
        suv[tumour] = case.suv_mean * field / field.mean()
    return suv


@dataclass(frozen=True)
class CaseImages:
    """Arrays and affines of one case, plus measured truth."""

    ct: np.ndarray  # int16 HU, ct_shape(scanner)
    ct_affine: np.ndarray
    label: np.ndarray  # uint8, ct_shape(scanner)
    pet: np.ndarray  # float32 SUV on its own grid
    pet_affine: np.ndarray
    volume_ml: float
    suv_max: float


def make_case_images(case: PhantomCase, scanner: Scanner, rng: np.random.Generator) -> CaseImages:
    """Render CT, label (CT grid) and PET (own grid) of ``case`` as seen by ``scanner``."""
    ct_affine = _ct_affine(case, scanner)
    shape = ct_shape(scanner)
    points = _grid_points(shape, ct_affine)
    tissue = _tissues(case, points)
    hu = np.full(shape, -1000.0)
    hu[tissue["fat"]] = case.hu_fat
    hu[tissue["muscle"]] = case.hu_muscle
    hu[tissue["cortex"]] = 1200.0
    hu[tissue["marrow"]] = -50.0
    hu[tissue["tumour"]] = case.hu_muscle + case.tumour_contrast_hu
    hu = gaussian_filter(hu, sigma=0.6) + rng.normal(0, scanner.ct_noise_hu, shape)
    ct = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    label = tissue["tumour"].astype(np.uint8)
    voxel_ml = abs(np.linalg.det(ct_affine[:3, :3])) / 1000

    pet_shape, pet_affine = _pet_grid(case, scanner)
    factor = 2  # partial volume: average 2x2x2 sub-voxels
    fine_points = _grid_points(pet_shape, pet_affine, supersample=factor)
    fine = _uptake(case, fine_points, _tissues(case, fine_points))
    suv = fine.reshape(pet_shape[0], factor, pet_shape[1], factor, pet_shape[2], factor).mean(axis=(1, 3, 5))
    sigma_voxels = [scanner.pet_fwhm_mm / 2.355 / s for s in scanner.pet_spacing_mm]
    suv = gaussian_filter(suv, sigma=sigma_voxels)
    suv = suv + rng.normal(0, 1, pet_shape) * scanner.pet_noise * np.sqrt(np.clip(suv, 0, None))
    pet = np.clip(suv, 0, None).astype(np.float32)
    return CaseImages(
        ct=ct,
        ct_affine=ct_affine,
        label=label,
        pet=pet,
        pet_affine=pet_affine,
        volume_ml=float(label.sum() * voxel_ml),
        suv_max=float(fine.max()),
    )


def survival_linear_predictor(volume_ml: float, suv_mean: float, age: float, grade: str, ecog: int) -> dict[str, float]:
    """The hazard's linear predictor split by source (module docstring): ct, pet, ehr, total."""
    z_volume = (math.log(max(volume_ml, 1e-3)) - _LOG_VOLUME_STATS[0]) / _LOG_VOLUME_STATS[1]
    z_suv = (math.log(suv_mean) - _LOG_SUV_STATS[0]) / _LOG_SUV_STATS[1]
    parts = {
        "ct": BETA_VOLUME * z_volume,
        "pet": BETA_SUV * z_suv,
        "ehr": BETA_AGE_PER_SD * (age - 60) / 12 + GRADE_EFFECT[grade] + BETA_ECOG * (ecog - 0.7),
    }
    parts["total"] = parts["ct"] + parts["pet"] + parts["ehr"]
    return parts


def case_survival(case: PhantomCase, volume_ml: float) -> tuple[float, float, int, dict[str, float]]:
    """(event time, observed time rounded to 0.01, event 0/1, linear predictor parts) of ``case``."""
    parts = survival_linear_predictor(volume_ml, case.suv_mean, case.age, case.grade, case.ecog)
    event_time = -math.log(1 - case.event_draw) / (BASE_HAZARD_PER_MONTH * math.exp(parts["total"]))
    observed = min(event_time, case.censor_months)
    return event_time, round(observed, 2), int(event_time <= case.censor_months), parts
