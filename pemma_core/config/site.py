"""A site's configuration: one YAML file describing what a hospital holds and how to read it.

A site is a folder plus a YAML file (schema in ``sites/README.md``, and for editors in
``sites/site.schema.json``, generated from :class:`SiteFile`)::

    name: site-b
    data_root: ${PEMMA_IBSI_ROOT:-../../../shared/data/ibsi-sts}
    modalities: [ct, pet]            # subset of ct, pet, ehr
    manifest: site-b.csv             # case_id, ct, pet, label, split (paths under data_root)
    spacing: [2.0, 2.0, 3.27]        # mm, the grid every case is resampled onto
    limits: {max_rank: 16}           # optional: what the site accepts, whatever the server asks
    label_roi: GTV*                  # optional: the RTSTRUCT ROI of labels given as DICOM

:func:`load_site_config` checks the whole file and raises one :class:`SiteConfigError`
listing every problem (unknown or mistyped keys, a key given twice, missing keys), each
naming the file, the key and what was expected. It expands environment variables in path
values (``$VAR``, ``${VAR}``, ``${VAR:-default}``) and resolves relative paths against
the YAML file's folder. Nothing is read beyond the YAML itself: the manifest and images
are checked by :mod:`pemma_core.data.checks`.

Intensity normalisation (applied by :mod:`pemma_core.data.pipeline`, documented here because the
config fixes it)::

    ct  -> (clip(HU,  ct_window[0], ct_window[1]) - ct_window[0]) / (ct_window[1] - ct_window[0])   in [0, 1]
    pet ->  clip(SUV, 0,            pet_suv_max)                 /  pet_suv_max                      in [0, 1]
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pemma_core.model.spec import PET_EMBED_KINDS
from pemma_core.modes import MODALITIES, MODES, servable_modes

__all__ = [
    "ON_BAD_CASE",
    "COVARIATE_KINDS",
    "DEFAULT_SPACING",
    "DEFAULT_CT_WINDOW",
    "DEFAULT_PET_SUV_MAX",
    "PET_EMBED_KINDS",
    "ClinicalSpec",
    "SiteConfig",
    "SiteLimits",
    "SiteConfigError",
    "SiteFile",
    "LimitsFile",
    "load_site_config",
    "expand_env",
    "site_json_schema",
]

ON_BAD_CASE: tuple[str, ...] = ("skip", "fail")
COVARIATE_KINDS: tuple[str, ...] = ("numeric", "categorical")
DEFAULT_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)
# Soft-tissue window: fat (-100 HU) to just above contrast-free soft tissue; bone saturates.
DEFAULT_CT_WINDOW: tuple[float, float] = (-200.0, 300.0)
# FDG tumour uptake rarely exceeds SUV 20; higher values saturate.
DEFAULT_PET_SUV_MAX: float = 20.0
# The PET-embedding kinds of ModelSpec.pet_embed (pemma_core.model.spec checks the same literal tuple).


class SiteConfigError(ValueError):
    """A site YAML that cannot be used; ``problems`` holds one line per problem, each naming
    the file, the key and what was expected."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems:\n" + "\n".join(self.problems))


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
class SiteLimits:
    """What a site accepts whatever the server asks (``limits:`` in the site YAML; sites/README.md).

    The checks are pure: they return one message per broken limit, each naming the limit's key
    and the YAML to edit, and the caller refuses the request.
    """

    max_rank: int = 16  # largest LoRA/DoRA rank: the upload grows with it
    pet_embed: tuple[str, ...] = ("lowrank",)  # "full" uploads a whole PET patch convolution
    max_upload_mb: float = 64.0  # MiB of tensor data per round
    min_examples_per_round: int = 8  # batch size x local steps; fewer makes an update close to one case
    min_eval_cases: int = 3  # Dice only over at least this many test cases per mode
    min_ehr_rows: int = 10  # EHR statistics only from at least this many training rows

    def refusals(
        self, *, rank: int, pet_embed: str, phase: str, local_steps: int, batch_size: int | None,
        source: Path | None = None,
    ) -> list[str]:
        """One message per limit a training request breaks (empty: accepted). ``phase``
        ``prognosis`` trains on whole cohorts and is exempt from the examples minimum."""
        where = _where(source)
        problems = []
        if rank > self.max_rank:
            problems.append(f"the server asks for rank {rank}, this site accepts at most {self.max_rank} "
                            f"(limits.max_rank in {where})")
        if pet_embed not in self.pet_embed:
            problems.append(f"the server asks for pet_embed {pet_embed!r}, this site accepts only "
                            f"{list(self.pet_embed)} (limits.pet_embed in {where})")
        if phase != "prognosis":
            if batch_size is None:  # the protocol always sends one outside prognosis: refuse rather than guess
                problems.append(f"the server sends no batch size for phase {phase!r}, so this site cannot check its "
                                f"minimum of {self.min_examples_per_round} examples per round "
                                f"(limits.min_examples_per_round in {where})")
            elif local_steps * batch_size < self.min_examples_per_round:
                problems.append(f"the server asks for {local_steps} local step(s) x batch {batch_size} = "
                                f"{local_steps * batch_size} example(s) per round, this site needs at least "
                                f"{self.min_examples_per_round} (limits.min_examples_per_round in {where})")
        return problems

    def upload_refusal(self, nbytes: int, *, source: Path | None = None) -> str | None:
        """The message refusing an upload of ``nbytes`` bytes of tensor data, or None when it fits."""
        mib = nbytes / 2**20
        if mib <= self.max_upload_mb:
            return None
        return (f"the upload would be {mib:.1f} MiB, this site sends at most {self.max_upload_mb:g} MiB per round "
                f"(limits.max_upload_mb in {_where(source)})")


def _where(source: Path | None) -> str:
    return str(source) if source is not None else "the site YAML"


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
    limits: SiteLimits = SiteLimits()  # frozen, so one shared default is safe
    label_roi: str | None = None  # RTSTRUCT ROI / SEG segment of the labels (name, glob or regex); None: the only one
    dicom_series: tuple[str, ...] = ()  # SeriesInstanceUIDs to pick in folders holding several series
    loader_workers: int = 0  # DataLoader worker processes for this site's loaders; 0: load in the training process

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


# --------------------------------------------------------------------------- the schema

# key -> (what it means, what it accepts): the schema's descriptions and the error messages.
_KEYS: dict[str, tuple[str, str]] = {
    "name": ("site name, used in reports and cache paths", "a non-empty string"),
    "data_root": ("folder the manifest's image paths are relative to", "a folder path"),
    "modalities": ("what the site holds: at least one of ct, pet; ehr needs clinical covariates",
                   f"a non-empty list drawn from {list(MODALITIES)}"),
    "modes": ("modes this site may train (default: every mode its modalities serve)",
              f"a list drawn from {list(MODES)} that the modalities can serve"),
    "manifest": ("the case list: a CSV with columns case_id, ct, pet, label, split", "a CSV file path"),
    "clinical": ("the clinical table and its columns (a bare path: the default columns, no covariates)",
                 "a mapping with path, id_column, time, event, covariates (or a path, or null)"),
    "spacing": ("mm, the grid every case is resampled onto (one number: isotropic)", "a list of 3 positive numbers (mm)"),
    "patch_size": ("training crop in voxels (null: the model preset's crop)", "a list of 3 positive integers (voxels), or null"),
    "cache_dir": ("preprocessed cases and check results (default: cache/<name> beside the YAML)", "a folder path"),
    "device": ("where the site trains (auto: CUDA when a GPU is visible, else CPU)",
               "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"),
    "loader_workers": ("DataLoader worker processes that read and augment cases beside training (0: in the training "
                       "process; on a GPU node a few workers keep the GPU fed)", "a whole number >= 0"),
    "on_bad_case": ("skip: leave bad cases out with a warning; fail: stop the site", f"one of {list(ON_BAD_CASE)}"),
    "ct_window": ("CT normalisation window (HU)", "a list [low, high] of HU values with low < high"),
    "pet_suv_max": ("PET normalisation ceiling (SUV)", "a positive number (SUV)"),
    "clinical.path": ("the clinical CSV", "a CSV file path"),
    "clinical.id_column": ("column of the case ids", "a column name"),
    "clinical.time": ("survival time column (null: no survival labels)", "a column name or null"),
    "clinical.event": ("event column, 0/1 (null together with time)", "a column name or null"),
    "clinical.covariates": ("EHR columns and their kinds (order kept)", f"a mapping column -> one of {list(COVARIATE_KINDS)}"),
    "label_roi": ("the tumour ROI of RTSTRUCT labels (the segment of DICOM-SEG labels): an exact name, a glob "
                  "such as GTV* or a regular expression, case-insensitive (null: the file's only ROI)",
                  "a ROI name or pattern, or null"),
    "dicom_series": ("SeriesInstanceUIDs to use where a DICOM folder of the manifest holds several series "
                     "(null: such a folder is an error listing them)", "a list of SeriesInstanceUID strings, or null"),
    "limits": ("what this site accepts, whatever the server asks (null: the defaults)",
               "a mapping with max_rank, pet_embed, max_upload_mb, min_examples_per_round, min_eval_cases, "
               "min_ehr_rows"),
    "limits.max_rank": ("largest LoRA/DoRA rank the site trains and uploads", "a whole number >= 1"),
    "limits.pet_embed": ("PET-embedding kinds the site accepts (full uploads a whole PET patch convolution)",
                         f"a non-empty list drawn from {list(PET_EMBED_KINDS)}"),
    "limits.max_upload_mb": ("largest upload per round, MiB of tensor data", "a positive number (MiB)"),
    "limits.min_examples_per_round": ("smallest batch size x local steps of a training round (prognosis is exempt)",
                                      "a whole number >= 1"),
    "limits.min_eval_cases": ("Dice is reported only over at least this many test cases per mode",
                              "a whole number >= 1"),
    "limits.min_ehr_rows": ("EHR statistics are sent only from at least this many training rows",
                            "a whole number >= 1"),
}
_PATH_NOTE = "; relative to the YAML's folder; $VAR, ${VAR} and ${VAR:-default} are expanded"


def _about(key: str, default: Any = ..., **constraints: Any) -> Any:
    """The Field of ``key``: its description (meaning and accepted values) from :data:`_KEYS`."""
    meaning, expected = _KEYS[key]
    if expected.endswith("path"):
        meaning += _PATH_NOTE
    return Field(default, description=f"{meaning}. Expected: {expected}", **constraints)


def _expanded(text: str) -> str:
    try:
        return expand_env(text)
    except KeyError as exc:
        name = exc.args[0]
        raise ValueError(f"environment variable ${name} is not set (set it, or give a default as ${{{name}:-/some/path}})") \
            from None


def _no_repeats(values: list[str], key: str) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError(f"expected {_KEYS[key][1]} without repeats, got {values!r}")
    return values


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value  # one name means a list of one


def _path_shorthand(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


_Text = Annotated[str, Field(min_length=1)]
_PathText = Annotated[str, Field(min_length=1), AfterValidator(_expanded)]
_Positive = Annotated[float, Field(gt=0)]
_PositiveInt = Annotated[int, Field(gt=0)]
_Modality = Literal[MODALITIES]  # type: ignore[valid-type]
_Mode = Literal[MODES]  # type: ignore[valid-type]
_PetEmbed = Literal[PET_EMBED_KINDS]  # type: ignore[valid-type]
_Strict = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True)


class ClinicalFile(BaseModel):
    """The clinical mapping of a site YAML: the clinical table and which columns mean what."""

    model_config = _Strict

    path: _PathText = _about("clinical.path")
    id_column: _Text = _about("clinical.id_column", "case_id")
    time: _Text | None = _about("clinical.time", "time", validate_default=True)
    event: _Text | None = _about("clinical.event", "event", validate_default=True)
    covariates: dict[str, Literal[COVARIATE_KINDS]] | None = _about("clinical.covariates", None)  # type: ignore[valid-type]

    @field_validator("event")
    @classmethod
    def _event_with_time(cls, event: str | None, info: ValidationInfo) -> str | None:
        if "time" in info.data and (info.data["time"] is None) != (event is None):
            raise ValueError("keys 'clinical.time' and 'clinical.event' must both be set or both null")
        return event

    @field_validator("covariates")
    @classmethod
    def _no_clash(cls, covariates: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        reserved = {info.data.get(key) for key in ("id_column", "time", "event")}
        clash = [c for c in covariates or {} if c in reserved]
        if clash:
            raise ValueError(f"{clash} clash with the id/time/event columns")
        return covariates


_DEFAULT_LIMITS = SiteLimits()


class LimitsFile(BaseModel):
    """The limits mapping of a site YAML: what the site accepts whatever the server asks."""

    model_config = _Strict

    max_rank: _PositiveInt = _about("limits.max_rank", _DEFAULT_LIMITS.max_rank)
    pet_embed: Annotated[list[_PetEmbed], Field(min_length=1)] | _PetEmbed = _about(
        "limits.pet_embed", list(_DEFAULT_LIMITS.pet_embed)
    )
    max_upload_mb: _Positive = _about("limits.max_upload_mb", _DEFAULT_LIMITS.max_upload_mb)
    min_examples_per_round: _PositiveInt = _about(
        "limits.min_examples_per_round", _DEFAULT_LIMITS.min_examples_per_round
    )
    min_eval_cases: _PositiveInt = _about("limits.min_eval_cases", _DEFAULT_LIMITS.min_eval_cases)
    min_ehr_rows: _PositiveInt = _about("limits.min_ehr_rows", _DEFAULT_LIMITS.min_ehr_rows)

    @field_validator("pet_embed")
    @classmethod
    def _kinds(cls, value: list[str] | str) -> list[str]:
        names = _no_repeats(_as_list(value), "limits.pet_embed")
        return [kind for kind in PET_EMBED_KINDS if kind in names]

    def resolve(self) -> SiteLimits:
        return SiteLimits(max_rank=self.max_rank, pet_embed=tuple(self.pet_embed), max_upload_mb=float(self.max_upload_mb),
                          min_examples_per_round=self.min_examples_per_round, min_eval_cases=self.min_eval_cases,
                          min_ehr_rows=self.min_ehr_rows)


class SiteFile(BaseModel):
    """A site YAML as written (before paths are resolved); the source of ``sites/site.schema.json``."""

    model_config = ConfigDict(**_Strict, title="pemma site")

    name: _Text = _about("name")
    data_root: _PathText = _about("data_root")
    modalities: Annotated[list[_Modality], Field(min_length=1)] | _Modality = _about("modalities")
    modes: Annotated[list[_Mode], Field(min_length=1)] | _Mode | None = _about("modes", None)
    manifest: _PathText = _about("manifest")
    clinical: Annotated[ClinicalFile | None, BeforeValidator(_path_shorthand)] = _about(
        "clinical", None, validate_default=True, json_schema_extra=lambda schema: schema["anyOf"].insert(0, {"type": "string"})
    )
    spacing: Annotated[list[_Positive], Field(min_length=3, max_length=3)] | _Positive = _about("spacing", DEFAULT_SPACING)
    patch_size: Annotated[list[_PositiveInt], Field(min_length=3, max_length=3)] | _PositiveInt | None = _about(
        "patch_size", None
    )
    cache_dir: _PathText | None = _about("cache_dir", None)
    device: Annotated[str, Field(pattern=r"^(cpu|auto|mps|cuda(:\d+)?)$")] = _about("device", "auto")
    loader_workers: Annotated[int, Field(ge=0)] = _about("loader_workers", 0)
    on_bad_case: Literal[ON_BAD_CASE] = _about("on_bad_case", "skip")  # type: ignore[valid-type]
    ct_window: Annotated[list[float], Field(min_length=2, max_length=2)] = _about("ct_window", DEFAULT_CT_WINDOW)
    pet_suv_max: _Positive = _about("pet_suv_max", DEFAULT_PET_SUV_MAX)
    limits: LimitsFile | None = _about("limits", None)
    label_roi: _Text | None = _about("label_roi", None)
    dicom_series: Annotated[list[_Text], Field(min_length=1)] | _Text | None = _about("dicom_series", None)

    @field_validator("modalities")
    @classmethod
    def _image_modality(cls, value: list[str] | str) -> tuple[str, ...]:
        names = _no_repeats(_as_list(value), "modalities")
        if not {"ct", "pet"} & set(names):
            raise ValueError(f"expected at least one image modality (ct or pet), got {names!r}")
        return tuple(m for m in MODALITIES if m in names)

    @field_validator("modes")
    @classmethod
    def _servable(cls, value: list[str] | str | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = _no_repeats(_as_list(value), "modes")
        if "modalities" in info.data:
            servable = servable_modes(info.data["modalities"])
            not_servable = [m for m in names if m not in servable]
            if not_servable:
                raise ValueError(f"{not_servable} need modalities this site does not hold "
                                 f"(modalities {list(info.data['modalities'])} serve {servable})")
        return tuple(m for m in MODES if m in names)

    @field_validator("clinical")
    @classmethod
    def _ehr_has_covariates(cls, value: ClinicalFile | None, info: ValidationInfo) -> ClinicalFile | None:
        if "ehr" in info.data.get("modalities", ()) and (value is None or not value.covariates):
            raise ValueError("modality 'ehr' needs a clinical table with covariates")
        return value

    @field_validator("ct_window")
    @classmethod
    def _low_below_high(cls, value: list[float]) -> list[float]:
        if not value[0] < value[1]:
            raise ValueError(f"expected {_KEYS['ct_window'][1]}, got {value!r}")
        return value

    def resolve(self, source: Path) -> SiteConfig:
        """The :class:`SiteConfig` of this file at ``source``: paths absolute, defaults filled."""

        def path(text: str) -> Path:
            found = Path(text).expanduser()
            return found if found.is_absolute() else (source.parent / found).resolve()

        def triple(value: Any) -> tuple[Any, Any, Any]:
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3  # type: ignore[return-value]

        clinical = None
        if self.clinical is not None:
            c = self.clinical
            clinical = ClinicalSpec(path=path(c.path), id_column=c.id_column, time=c.time, event=c.event,
                                    covariates=dict(c.covariates or {}))
        modalities = tuple(self.modalities)
        return SiteConfig(
            name=self.name,
            path=source,
            data_root=path(self.data_root),
            modalities=modalities,
            modes=tuple(self.modes) if self.modes is not None else tuple(servable_modes(modalities)),
            manifest=path(self.manifest),
            clinical=clinical,
            spacing=tuple(float(v) for v in triple(self.spacing)),  # type: ignore[arg-type]
            patch_size=None if self.patch_size is None else triple(self.patch_size),
            cache_dir=path(self.cache_dir) if self.cache_dir is not None else source.parent / "cache" / self.name,
            device=self.device,
            on_bad_case=self.on_bad_case,
            ct_window=(float(self.ct_window[0]), float(self.ct_window[1])),
            pet_suv_max=float(self.pet_suv_max),
            limits=SiteLimits() if self.limits is None else self.limits.resolve(),
            label_roi=self.label_roi,
            dicom_series=tuple(_as_list(self.dicom_series or [])),
            loader_workers=self.loader_workers,
        )


def site_json_schema() -> dict[str, Any]:
    """The JSON Schema of a site YAML, for editors (committed as ``sites/site.schema.json``)."""
    schema = SiteFile.model_json_schema()
    schema["description"] = "A pemma site: what a hospital holds and how to read it (sites/README.md)."
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --------------------------------------------------------------------------- reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that records every mapping key given twice (PyYAML keeps the last silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may legitimately repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    self.duplicates.append(f"duplicate key {key!r} (line {line}; first given on line {first_line[key]})")
                else:
                    first_line[key] = line
            except TypeError:  # an unhashable key: the constructor below reports it
                pass
        return super().construct_mapping(node, deep=deep)


def _read_yaml(source: Path) -> tuple[Any, list[str]]:
    loader = _UniqueKeyLoader(source.read_text(encoding="utf-8"))
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def _value_at(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(raw, Mapping) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            break
    return raw


def _problems(exc: ValidationError, raw: Mapping[str, Any]) -> list[str]:
    """One line per key: its own rule's message, or what the key expects and what it got."""
    problems: dict[str, str] = {}
    missing: list[str] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if loc[0] in ("clinical", "limits") and len(loc) > 1:  # clinical.<key>, clinical.covariates.<column>, limits.<key>
            parts = loc[:3] if loc[:2] == ("clinical", "covariates") and len(loc) > 2 else loc[:2]
            allowed = [k.removeprefix(f"{loc[0]}.") for k in _KEYS if k.startswith(f"{loc[0]}.")]
        else:
            parts = loc[:1]
            allowed = [k for k in _KEYS if "." not in k]
        key = ".".join(str(p) for p in parts)
        if key in problems:  # one line per key (a union reports each of its branches)
            continue
        if error["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(parts[-1]), allowed, n=1)
            problems[key] = (f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; expected keys: {', '.join(allowed)}")
        elif error["type"] == "missing" and len(parts) == 1:
            missing.append(key)
        elif error["type"] == "missing":
            problems[key] = f"key {key!r} is required ({_KEYS[key][1]})"
        elif error["type"] == "value_error":
            problems[key] = f"key {key!r}: {error['msg'].removeprefix('Value error, ')}"
        else:
            expected = f"one of {list(COVARIATE_KINDS)}" if len(parts) == 3 else _KEYS[key][1]
            problems[key] = f"key {key!r}: expected {expected}, got {_value_at(raw, parts)!r}"
    if missing:
        problems[""] = (f"missing required key(s) {missing}: "
                        + "; ".join(f"{key}: {_KEYS[key][1]}" for key in missing))
    return list(problems.values())


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML.

    Raises :class:`SiteConfigError` listing every problem at once (each naming the file
    and the key): a missing file, invalid YAML, a key given twice, unknown keys, missing
    required keys, mistyped values, modes the modalities cannot serve, ``ehr`` without
    clinical covariates, or an unset environment variable without a default.
    """
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise SiteConfigError(f"site config not found: {source}")
    try:
        raw, duplicates = _read_yaml(source)
    except yaml.YAMLError as exc:
        raise SiteConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise SiteConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    problems = list(duplicates)
    site = None
    try:
        site = SiteFile.model_validate(raw)
    except ValidationError as exc:
        problems += _problems(exc, raw)
    if problems or site is None:
        raise SiteConfigError([f"{source}: {problem}" for problem in problems])
    return site.resolve(source)


if __name__ == "__main__":  # python -m pemma_core.config.site > sites/site.schema.json
    print(json.dumps(site_json_schema(), indent=2))
