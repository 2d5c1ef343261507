"""Input modes and the modalities each one needs.

A batch image always has two channels, CT first and PET second; a mode says which of
them the model reads (a site without PET fills channel 1 with zeros and never trains a
mode that needs it).
"""

from __future__ import annotations

from collections.abc import Iterable

MODES: tuple[str, ...] = ("ct", "pet", "ctpet")
MODALITIES: tuple[str, ...] = ("ct", "pet", "ehr")
IMAGE_CHANNEL = {"ct": 0, "pet": 1}
REQUIRED_MODALITIES: dict[str, frozenset[str]] = {
    "ct": frozenset({"ct"}),
    "pet": frozenset({"pet"}),
    "ctpet": frozenset({"ct", "pet"}),
}
# Default per-batch draw when a site can serve every mode (docs/ARCHITECTURE.md, the model).
DEFAULT_MODE_WEIGHTS: dict[str, float] = {"ctpet": 0.6, "ct": 0.2, "pet": 0.2}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def servable_modes(modalities: Iterable[str]) -> list[str]:
    """Modes a site holding ``modalities`` can train or evaluate, in MODES order."""
    held = frozenset(modalities)
    return [m for m in MODES if REQUIRED_MODALITIES[m] <= held]
