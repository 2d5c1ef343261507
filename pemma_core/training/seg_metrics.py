"""Segmentation metrics beside per-case Dice: HD95, surface Dice and the HECKTOR aggregated Dice.

Pure functions on class maps (no model, no Flower):

* :func:`case_metrics` scores one case: HD95 and surface Dice (normalised surface
  distance, NSD) as MONAI's ``compute_hausdorff_distance(percentile=95)`` and
  ``compute_surface_dice`` give them (from one pass of MONAI's surface distances), in
  millimetres when the voxel spacing is known (else in voxels), plus the overlap counts ``intersection`` = |P ∩ G| and ``volume_sum`` =
  |P| + |G| in voxels;
* :func:`aggregated_dice` is the HECKTOR aggregated Dice, ``sum 2·I / sum (|P| + |G|)``
  over cases. The sums add up across sites, so a federation computes it exactly from each
  site's two totals (:func:`pooled_dice`), without any case leaving its site;
* on the wire (``pemma_core.protocol``, evaluate replies) a site sends per mode
  ``hd95-<mode>``, ``hd95-cases-<mode>``, ``nsd-<mode>``, ``overlap-<mode>`` (sum of 2·I)
  and ``volume-<mode>`` (sum of |P| + |G|); :func:`reply_problems` says why such a reply
  is inconsistent, :func:`site_summary` reads one mode of it and :func:`combine_sites`
  pools the sites' replies into the round's ``agg-dice-<mode>``, ``hd95-<mode>`` and
  ``nsd-<mode>``.

Empty masks, decided here once (per foreground class; MONAI itself returns NaN or inf):

* prediction and label both empty: HD95 0, surface Dice 1 (perfect agreement, as Dice
  scores it with ``ignore_empty=False``);
* exactly one of them empty: surface Dice 0 (no surface point lies within tolerance of
  the other, absent, surface) and HD95 *undefined*, ``None``. A case's HD95 is undefined
  if any foreground class's is, so a missed class is not averaged away. Means of HD95 are
  taken over the cases where it is defined, reported with that count
  (:func:`mean_defined`); a non-finite number is never returned.

With several foreground classes a case's HD95 and surface Dice are the means over the
classes, and its overlap counts the sums over the classes (pemma's models have one
foreground class, where this is exactly the HECKTOR aggregated Dice).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# MONAI passes its own deprecated argument to get_mask_edges inside these metrics. A filter for that one
# message, set once: catch_warnings() around the call is not thread-safe, and sites evaluate in threads.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)

__all__ = [
    "NSD_TOLERANCE_MM",
    "CaseMetrics",
    "aggregated_dice",
    "case_metrics",
    "combine_sites",
    "mean_defined",
    "pooled_dice",
    "reply_problems",
    "site_summary",
    "spacing_of_affine",
]

# Surface Dice tolerance: a surface point within this distance of the other surface counts as
# agreeing. The default, pemma's choice for every report, is fixed here so that sites and the
# bench score alike; callers may pass another. In voxels when the spacing is unknown.
NSD_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class CaseMetrics:
    """One case's scores (means over its foreground classes) and overlap counts (sums over them)."""

    hd95: float | None  # None: undefined (one of prediction / label empty in some class)
    nsd: float | None  # surface Dice at the tolerance, in [0, 1]; None only when not computed (surface=False)
    intersection: int  # |P ∩ G| in voxels
    volume_sum: int  # |P| + |G| in voxels

    @property
    def dice(self) -> float:
        """This case's Dice from its counts (1 when both masks are empty)."""
        return 1.0 if self.volume_sum == 0 else 2.0 * self.intersection / self.volume_sum


def spacing_of_affine(affine: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """Voxel spacing (mm) along the three array axes of a ``[4, 4]`` voxel-to-world affine:
    the lengths of its first three columns (rotations and flips do not change them)."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"grid affine must be [4, 4], got shape {matrix.shape}")
    spacing = tuple(float(s) for s in np.linalg.norm(matrix[:3, :3], axis=0))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"grid affine gives voxel spacing {spacing}; every spacing must be finite and > 0")
    return spacing  # type: ignore[return-value]


def _as_map(mask: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).detach().cpu()
    while values.dim() > 3 and values.shape[0] == 1:  # [1, 1, X, Y, Z] or [1, X, Y, Z]
        values = values[0]
    if values.dim() != 3:
        raise ValueError(f"{what} must be a class map [X, Y, Z] (leading singleton axes allowed), got {tuple(values.shape)}")
    return values.long()


def _surface_scores(p: torch.Tensor, g: torch.Tensor, spacing: Sequence[float] | None, tolerance: float) -> tuple[float | None, float]:
    """HD95 and surface Dice of two non-empty boolean masks [X, Y, Z].

    What MONAI's ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice``
    return, from one call of the surface-distance pass both of them make (MONAI's
    ``get_edge_surface_distance``, symmetric, edge voxels as the boundary): the distance
    transforms are most of a site's evaluation time, and each function would compute them again.
    """
    from monai.metrics import utils as monai_metrics

    _, (pred_to_label, label_to_pred), _ = monai_metrics.get_edge_surface_distance(
        p, g, distance_metric="euclidean", spacing=None if spacing is None else [float(s) for s in spacing], symmetric=True,
    )
    hd = max(float(torch.quantile(d, 0.95)) for d in (pred_to_label, label_to_pred))
    within = int((pred_to_label <= float(tolerance)).sum()) + int((label_to_pred <= float(tolerance)).sum())
    nsd = within / (pred_to_label.numel() + label_to_pred.numel())
    return (hd if math.isfinite(hd) else None), (nsd if math.isfinite(nsd) else 0.0)


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    classes: int = 2,
    spacing: Sequence[float] | None = None,
    tolerance: float = NSD_TOLERANCE_MM,
    surface: bool = True,
) -> CaseMetrics:
    """Scores of one case from its predicted and true class maps ``[X, Y, Z]`` (values in
    ``0 .. classes-1``, 0 the background), over foreground classes ``1 .. classes-1``.

    ``spacing``: voxel size per axis (mm), else distances and ``tolerance`` are in voxels.
    ``surface`` False skips HD95 and surface Dice (both None; the counts are always computed).
    """
    p_map, g_map = _as_map(pred, "prediction"), _as_map(label, "label")
    if p_map.shape != g_map.shape:
        raise ValueError(f"prediction {tuple(p_map.shape)} and label {tuple(g_map.shape)} differ in shape")
    if classes < 2:
        raise ValueError(f"classes must be >= 2 (background and at least one foreground class), got {classes}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"surface Dice tolerance must be finite and >= 0, got {tolerance}")
    if spacing is not None and (len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing)):
        raise ValueError(f"spacing must be three finite values > 0, got {tuple(spacing)}")
    intersection = volume = 0
    hds: list[float | None] = []
    nsds: list[float] = []
    for c in range(1, classes):
        p, g = p_map == c, g_map == c
        n_p, n_g = int(p.sum()), int(g.sum())
        intersection += int((p & g).sum())
        volume += n_p + n_g
        if not surface:
            continue
        if n_p == 0 and n_g == 0:
            hds.append(0.0)
            nsds.append(1.0)
        elif n_p == 0 or n_g == 0:
            hds.append(None)
            nsds.append(0.0)
        else:
            hd, nsd = _surface_scores(p, g, spacing, tolerance)
            hds.append(hd)
            nsds.append(nsd)
    if not surface:
        return CaseMetrics(hd95=None, nsd=None, intersection=intersection, volume_sum=volume)
    hd95 = None if any(h is None for h in hds) else float(np.mean(hds))  # type: ignore[arg-type]
    return CaseMetrics(hd95=hd95, nsd=float(np.mean(nsds)), intersection=intersection, volume_sum=volume)


def mean_defined(values: Iterable[float | None]) -> tuple[float | None, int]:
    """(mean over the finite values, how many there were); (None, 0) when there is none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return (float(np.mean(finite)) if finite else None), len(finite)


def aggregated_dice(pairs: Iterable[tuple[int, int]]) -> float | None:
    """HECKTOR aggregated Dice over ``(intersection, volume_sum)`` pairs, one per case:
    ``sum 2·I / sum (|P| + |G|)``; None when every mask is empty (nothing to score)."""
    overlap = volume = 0
    for intersection, volume_sum in pairs:
        if intersection < 0 or volume_sum < 0 or 2 * intersection > volume_sum:
            raise ValueError(
                f"overlap pair (intersection {intersection}, volume_sum {volume_sum}) is impossible: "
                "need 0 <= 2 * intersection <= volume_sum"
            )
        overlap += 2 * int(intersection)
        volume += int(volume_sum)
    return pooled_dice(overlap, volume)


def pooled_dice(overlap: int, volume: int) -> float | None:
    """Aggregated Dice from totals already summed (over cases, or over sites' sums):
    ``overlap`` = sum of 2·I, ``volume`` = sum of |P| + |G|; None when ``volume`` is 0."""
    if overlap < 0 or volume < 0 or overlap > volume:
        raise ValueError(f"overlap {overlap} and volume {volume} are impossible: need 0 <= overlap <= volume")
    return None if volume == 0 else overlap / volume


# ----------------------------------------------------------------------------- evaluate replies

_SEG_PREFIXES = ("hd95-cases-", "hd95-", "nsd-", "overlap-", "volume-")  # longest first: hd95-cases- before hd95-


def _mode_of(name: str) -> tuple[str, str] | None:
    for prefix in _SEG_PREFIXES:
        if name.startswith(prefix):
            return prefix[:-1], name.removeprefix(prefix)
    return None


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def reply_problems(metrics: Mapping[str, Any]) -> list[str]:
    """Why the HD95 / surface Dice / overlap metrics of an evaluate reply make no sense
    (names and ranges are :mod:`pemma_core.protocol`'s checks; these are the relations):
    each belongs to a mode the reply gives a Dice for; ``overlap-`` and ``volume-`` come
    together, whole, with ``overlap <= volume`` and ``overlap`` even (twice a voxel count);
    ``hd95-cases-`` is at most the mode's ``cases-`` and ``hd95-`` is present exactly when
    ``hd95-cases-`` is positive."""
    problems: list[str] = []
    modes: dict[str, set[str]] = {}
    for name in metrics:
        found = _mode_of(str(name))
        if found is not None:
            modes.setdefault(found[1], set()).add(found[0])
    for mode, kinds in sorted(modes.items()):
        if f"dice-{mode}" not in metrics:
            problems.append(f"{', '.join(sorted(kinds))} for mode {mode!r} without a Dice for it")
            continue
        if ("overlap" in kinds) != ("volume" in kinds):
            problems.append(f"overlap-{mode} and volume-{mode} must come together")
        elif "overlap" in kinds:
            overlap, volume = _whole(metrics[f"overlap-{mode}"]), _whole(metrics[f"volume-{mode}"])
            if overlap is not None and volume is not None:
                if overlap > volume:
                    problems.append(f"overlap-{mode} = {overlap} exceeds volume-{mode} = {volume} (2 |P and G| <= |P| + |G|)")
                if overlap % 2:
                    problems.append(f"overlap-{mode} = {overlap} is odd, but it is twice a voxel count")
        cases = _whole(metrics.get(f"cases-{mode}"))
        defined = _whole(metrics.get(f"hd95-cases-{mode}")) if "hd95-cases" in kinds else None
        if "hd95" in kinds and "hd95-cases" not in kinds:
            problems.append(f"hd95-{mode} without hd95-cases-{mode} (over how many cases it is defined)")
        if defined is not None:
            if cases is not None and defined > cases:
                problems.append(f"hd95-cases-{mode} = {defined} exceeds cases-{mode} = {cases}")
            if defined == 0 and "hd95" in kinds:
                problems.append(f"hd95-{mode} over hd95-cases-{mode} = 0 cases")
            if defined > 0 and "hd95" not in kinds:
                problems.append(f"hd95-cases-{mode} = {defined} but no hd95-{mode}")
    return problems


def site_summary(metrics: Mapping[str, Any], mode: str) -> dict[str, float]:
    """One mode of a checked evaluate reply: ``cases``, and those it holds of ``hd95``,
    ``hd95-cases``, ``nsd``, ``overlap``, ``volume`` and the site's own ``agg-dice``."""
    out: dict[str, float] = {"cases": int(metrics.get(f"cases-{mode}", 1))}
    for kind in ("hd95", "nsd"):
        if f"{kind}-{mode}" in metrics:
            out[kind] = float(metrics[f"{kind}-{mode}"])
    for kind in ("hd95-cases", "overlap", "volume"):
        if f"{kind}-{mode}" in metrics:
            out[kind] = int(metrics[f"{kind}-{mode}"])
    if "overlap" in out and "volume" in out:
        agg = pooled_dice(int(out["overlap"]), int(out["volume"]))
        if agg is not None:
            out["agg-dice"] = agg
    return out


def combine_sites(sites: Iterable[Mapping[str, float]], mode: str) -> dict[str, float]:
    """The round's metrics of ``mode`` from the sites' :func:`site_summary` dicts:
    ``agg-dice-<mode>`` = sum of overlaps / sum of volumes (exactly the aggregated Dice of
    all their cases pooled; over the sites that sent the sums), ``hd95-<mode>`` weighted by
    each site's ``hd95-cases`` and ``nsd-<mode>`` by its ``cases``. A metric no site could
    give (no sums, every volume 0, no defined HD95) is left out."""
    overlap = volume = 0
    summed = False
    hd = [0.0, 0]
    nsd = [0.0, 0]
    for site in sites:
        if "overlap" in site and "volume" in site:
            overlap, volume, summed = overlap + int(site["overlap"]), volume + int(site["volume"]), True
        if "hd95" in site and int(site.get("hd95-cases", 0)) > 0:
            hd[0] += float(site["hd95"]) * int(site["hd95-cases"])
            hd[1] += int(site["hd95-cases"])
        if "nsd" in site:
            nsd[0] += float(site["nsd"]) * int(site.get("cases", 1))
            nsd[1] += int(site.get("cases", 1))
    out: dict[str, float] = {}
    if summed and (agg := pooled_dice(overlap, volume)) is not None:
        out[f"agg-dice-{mode}"] = agg
    if hd[1]:
        out[f"hd95-{mode}"] = hd[0] / hd[1]
    if nsd[1]:
        out[f"nsd-{mode}"] = nsd[0] / nsd[1]
    return out
