"""A site's configuration: one YAML file describing what a hospital holds and how to read it.

A site is a folder plus a YAML file (schema in ``sites/README.md``)::

    name: site-b
    data_root: ${PEMMA_IBSI_ROOT:-../../../shared/data/ibsi-sts}
    modalities: [ct, pet]            # subset of ct, pet, ehr
    manifest: site-b.csv             # case_id, ct, pet, label, split (paths under data_root)
    spacing: [2.0, 2.0, 3.27]        # mm, the grid every case is resampled onto

:func:`load_site_config` validates every key (unknown or mistyped keys raise
:class:`SiteConfigError` naming the key and what was expected), expands environment
variables in path values (``$VAR``, ``${VAR}``, ``${VAR:-default}``) and resolves relative
paths against the YAML file's folder. Nothing is read beyond the YAML itself: the manifest
and images are checked by :mod:`pemma_core.data`.

Intensity normalisation (applied by :mod:`pemma_core.data`, documented here because the
config fixes it)::

    ct  -> (clip(HU,  ct_window[0], ct_window[1]) - ct_window[0]) / (ct_window[1] - ct_window[0])   in [0, 1]
    pet ->  clip(SUV, 0,            pet_suv_max)                 /  pet_suv_max                      in [0, 1]
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pemma_core.modes import MODALITIES, MODES, servable_modes

__all__ = [
    "ON_BAD_CASE",
    "COVARIATE_KINDS",
    "DEFAULT_SPACING",
    "DEFAULT_CT_WINDOW",
    "DEFAULT_PET_SUV_MAX",
    "ClinicalSpec",
    "SiteConfig",
    "SiteConfigError",
    "load_site_config",
    "expand_env",
]

ON_BAD_CASE: tuple[str, ...] = ("skip", "fail")
COVARIATE_KINDS: tuple[str, ...] = ("numeric", "categorical")
DEFAULT_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)
# Soft-tissue window: fat (-100 HU) to just above contrast-free soft tissue; bone saturates.
DEFAULT_CT_WINDOW: tuple[float, float] = (-200.0, 300.0)
# FDG tumour uptake rarely exceeds SUV 20; higher values saturate.
DEFAULT_PET_SUV_MAX: float = 20.0
_DEVICE_PATTERN = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


class SiteConfigError(ValueError):
    """A site YAML that cannot be used; the message names the file, the key and what was expected."""


@dataclass(frozen=True)
class ClinicalSpec:
    """Where a site's clinical table is and which columns mean what.

    ``time``/``event`` name the survival columns (None: the site has no survival labels);
    ``covariates`` maps EHR column name -> ``"numeric"`` | ``"categorical"`` (order kept).
    """

    path: Path
    id_column: str = "case_id"
    time: str | None = "time"
    event: str | None = "event"
    covariates: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteConfig:
    """One site, validated. Paths are absolute. See ``sites/README.md`` for each field."""

    name: str
    path: Path  # the YAML file this came from
    data_root: Path
    modalities: tuple[str, ...]  # subset of MODALITIES, in MODALITIES order
    modes: tuple[str, ...]  # modes this site may train; default servable_modes(modalities)
    manifest: Path
    clinical: ClinicalSpec | None
    spacing: tuple[float, float, float]  # mm, target grid
    patch_size: tuple[int, int, int] | None  # None: the model preset's crop decides
    cache_dir: Path
    device: str
    on_bad_case: str  # "skip" | "fail"
    ct_window: tuple[float, float]  # HU
    pet_suv_max: float

    @property
    def has_ct(self) -> bool:
        return "ct" in self.modalities

    @property
    def has_pet(self) -> bool:
        return "pet" in self.modalities

    @property
    def has_ehr(self) -> bool:
        return "ehr" in self.modalities


# --------------------------------------------------------------------------- env vars

_ENV_PATTERN = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"  # ${VAR} or ${VAR:-default}
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"  # $VAR
)


def expand_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` like a POSIX shell.

    ``${VAR:-default}`` takes ``default`` when VAR is unset or empty. An unset variable
    without a default raises ``KeyError`` naming it (a silently empty path would point
    somewhere unintended).
    """
    env = os.environ if environ is None else environ

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        value = env.get(name, "")
        if value:
            return value
        if match.group("default") is not None:
            return match.group("default")
        if name in env:
            return value
        raise KeyError(name)

    return _ENV_PATTERN.sub(replace, text)


# --------------------------------------------------------------------------- schema

_TOP_KEYS: dict[str, str] = {
    "name": "a non-empty string",
    "data_root": "a folder path",
    "modalities": f"a non-empty list drawn from {list(MODALITIES)}",
    "modes": f"a list drawn from {list(MODES)} that the modalities can serve",
    "manifest": "a CSV file path",
    "clinical": "a mapping with path, id_column, time, event, covariates (or null)",
    "spacing": "a list of 3 positive numbers (mm)",
    "patch_size": "a list of 3 positive integers (voxels), or null",
    "cache_dir": "a folder path",
    "device": "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'",
    "on_bad_case": f"one of {list(ON_BAD_CASE)}",
    "ct_window": "a list [low, high] of HU values with low < high",
    "pet_suv_max": "a positive number (SUV)",
}
_REQUIRED_KEYS = ("name", "data_root", "modalities", "manifest")
_CLINICAL_KEYS: dict[str, str] = {
    "path": "a CSV file path",
    "id_column": "a column name",
    "time": "a column name or null",
    "event": "a column name or null",
    "covariates": f"a mapping column -> one of {list(COVARIATE_KINDS)}",
}


class _Reader:
    """Typed access to the YAML mapping; every error names the file, the key and the expectation."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.folder = source.parent

    def fail(self, key: str, expected: str, got: Any) -> SiteConfigError:
        return SiteConfigError(f"{self.source}: key {key!r}: expected {expected}, got {got!r}")

    def check_keys(self, mapping: Mapping[str, Any], allowed: Mapping[str, str], where: str = "") -> None:
        for key in mapping:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), list(allowed), n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise SiteConfigError(
                    f"{self.source}: unknown key {where + str(key)!r}{did_you_mean}; "
                    f"expected keys: {', '.join(allowed)}"
                )

    def string(self, key: str, value: Any, expected: str = "a non-empty string") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, expected, value)
        return value.strip()

    def path(self, key: str, value: Any) -> Path:
        text = self.string(key, value, "a path (string)")
        try:
            text = expand_env(text)
        except KeyError as exc:
            raise SiteConfigError(
                f"{self.source}: key {key!r}: environment variable ${exc.args[0]} is not set "
                f"(set it, or give a default as ${{{exc.args[0]}:-/some/path}})"
            ) from None
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.folder / path).resolve()

    def number(self, key: str, value: Any, expected: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, expected, value)
        return float(value)

    def triple(self, key: str, value: Any, integer: bool) -> tuple[Any, Any, Any]:
        expected = _TOP_KEYS[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3  # one number means isotropic
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise self.fail(key, expected, value)
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or item <= 0:
                raise self.fail(key, expected, value)
            if integer and int(item) != item:
                raise self.fail(key, expected, value)
            out.append(int(item) if integer else float(item))
        return tuple(out)  # type: ignore[return-value]

    def names(self, key: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
        expected = _TOP_KEYS[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise self.fail(key, expected, value)
        for item in value:
            if item not in allowed:
                raise self.fail(key, expected, item)
        if len(set(value)) != len(value):
            raise self.fail(key, expected + " without repeats", value)
        return tuple(name for name in allowed if name in value)


def _read_clinical_spec(reader: _Reader, value: Any) -> ClinicalSpec | None:
    if value is None:
        return None
    if isinstance(value, str):  # shorthand: just the path, default columns
        value = {"path": value}
    if not isinstance(value, Mapping):
        raise reader.fail("clinical", _TOP_KEYS["clinical"], value)
    reader.check_keys(value, _CLINICAL_KEYS, where="clinical.")
    if "path" not in value:
        raise SiteConfigError(f"{reader.source}: key 'clinical.path' is required (a CSV file path)")
    optional_column = {}
    for key in ("time", "event"):
        raw = value.get(key, key)
        optional_column[key] = None if raw is None else reader.string(f"clinical.{key}", raw, _CLINICAL_KEYS[key])
    if (optional_column["time"] is None) != (optional_column["event"] is None):
        raise SiteConfigError(
            f"{reader.source}: keys 'clinical.time' and 'clinical.event' must both be set or both null"
        )
    covariates_raw = value.get("covariates") or {}
    if not isinstance(covariates_raw, Mapping):
        raise reader.fail("clinical.covariates", _CLINICAL_KEYS["covariates"], covariates_raw)
    covariates: dict[str, str] = {}
    for column, kind in covariates_raw.items():
        if not isinstance(column, str) or kind not in COVARIATE_KINDS:
            raise reader.fail(f"clinical.covariates.{column}", f"one of {list(COVARIATE_KINDS)}", kind)
        covariates[column] = kind
    id_column = reader.string("clinical.id_column", value.get("id_column", "case_id"), _CLINICAL_KEYS["id_column"])
    reserved = {id_column, optional_column["time"], optional_column["event"]}
    clash = [c for c in covariates if c in reserved]
    if clash:
        raise SiteConfigError(
            f"{reader.source}: key 'clinical.covariates': {clash} clash with the id/time/event columns"
        )
    return ClinicalSpec(
        path=reader.path("clinical.path", value["path"]),
        id_column=id_column,
        time=optional_column["time"],
        event=optional_column["event"],
        covariates=covariates,
    )


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML.

    Raises :class:`SiteConfigError` (naming the key and what was expected) for a missing
    file, invalid YAML, unknown keys, missing required keys, mistyped values, modes the
    modalities cannot serve, ``ehr`` without clinical covariates, or an unset environment
    variable without a default.
    """
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise SiteConfigError(f"site config not found: {source}")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SiteConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise SiteConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")

    reader = _Reader(source)
    reader.check_keys(raw, _TOP_KEYS)
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise SiteConfigError(
            f"{source}: missing required key(s) {missing}: "
            + "; ".join(f"{key}: {_TOP_KEYS[key]}" for key in missing)
        )

    name = reader.string("name", raw["name"])
    modalities = reader.names("modalities", raw["modalities"], MODALITIES)
    if not {"ct", "pet"} & set(modalities):
        raise reader.fail("modalities", "at least one image modality (ct or pet)", list(modalities))
    servable = servable_modes(modalities)
    modes = servable if raw.get("modes") is None else reader.names("modes", raw["modes"], MODES)
    not_servable = [m for m in modes if m not in servable]
    if not_servable:
        raise SiteConfigError(
            f"{source}: key 'modes': {not_servable} need modalities this site does not hold "
            f"(modalities {list(modalities)} serve {servable})"
        )
    clinical = _read_clinical_spec(reader, raw.get("clinical"))
    if "ehr" in modalities and (clinical is None or not clinical.covariates):
        raise SiteConfigError(f"{source}: key 'clinical': modality 'ehr' needs a clinical table with covariates")

    spacing = reader.triple("spacing", raw.get("spacing", DEFAULT_SPACING), integer=False)
    patch_raw = raw.get("patch_size")
    patch_size = None if patch_raw is None else reader.triple("patch_size", patch_raw, integer=True)

    window_raw = raw.get("ct_window", DEFAULT_CT_WINDOW)
    if not isinstance(window_raw, (list, tuple)) or len(window_raw) != 2:
        raise reader.fail("ct_window", _TOP_KEYS["ct_window"], window_raw)
    ct_window = tuple(reader.number("ct_window", v, _TOP_KEYS["ct_window"]) for v in window_raw)
    if not ct_window[0] < ct_window[1]:
        raise reader.fail("ct_window", _TOP_KEYS["ct_window"], window_raw)
    pet_suv_max = reader.number("pet_suv_max", raw.get("pet_suv_max", DEFAULT_PET_SUV_MAX), _TOP_KEYS["pet_suv_max"])
    if pet_suv_max <= 0:
        raise reader.fail("pet_suv_max", _TOP_KEYS["pet_suv_max"], pet_suv_max)

    device = reader.string("device", raw.get("device", "cpu"), _TOP_KEYS["device"])
    if not _DEVICE_PATTERN.match(device):
        raise reader.fail("device", _TOP_KEYS["device"], device)
    on_bad_case = raw.get("on_bad_case", "skip")
    if on_bad_case not in ON_BAD_CASE:
        raise reader.fail("on_bad_case", _TOP_KEYS["on_bad_case"], on_bad_case)

    cache_dir = reader.path("cache_dir", raw["cache_dir"]) if raw.get("cache_dir") is not None else (
        source.parent / "cache" / name
    )
    return SiteConfig(
        name=name,
        path=source,
        data_root=reader.path("data_root", raw["data_root"]),
        modalities=modalities,
        modes=tuple(modes),
        manifest=reader.path("manifest", raw["manifest"]),
        clinical=clinical,
        spacing=spacing,
        patch_size=patch_size,
        cache_dir=cache_dir,
        device=device,
        on_bad_case=on_bad_case,
        ct_window=(ct_window[0], ct_window[1]),
        pet_suv_max=pet_suv_max,
    )
