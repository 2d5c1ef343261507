"""What a site does without its model, for the Flower handlers in :mod:`client.client_app`:
no PyTorch, MONAI or peft at import (a deployed SuperNode imports the ClientApp afresh for
every message, and the secure-aggregation stages need none of them); :mod:`client.task` does
the model's work.

* :func:`site_config_path` / :func:`load_site`: which site YAML this node serves (deployment:
  the node config ``site-config``; simulation: the run config ``site-configs`` or the phantom
  federation, written on first use, by ``partition-id``).
* :func:`join_site` / :func:`ehr_stats_site`: ``query.join`` (the site's name, declared cases
  and preprocessing) and ``query.ehr_stats`` (the aggregates of its EHR training rows). Both
  read the site's cases with :mod:`pemma_core.data.cases`, which imports neither PyTorch nor
  MONAI.
* :func:`secure_stage_site`: the stages of secure aggregation (:mod:`client.secure_aggregation`).
* :func:`refuse_outside_limits` / :func:`refuse_large_upload`: the site's ``limits:``.
* :func:`check_reply`: every reply is checked before it leaves, its metric names and config
  values searched for the site's case ids.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pemma_core import protocol
from pemma_core.config.run import RunSettings
from pemma_core.config.site import SiteConfig, load_site_config
from pemma_core.modes import servable_modes
from pemma_core.phantoms.coordination import ensure_phantom_federation
from pemma_core.protocol import Instruction, MessageType, Reply

# ----------------------------------------------------------------------------- site


def run_settings(run_config: Mapping[str, Any], run_id: int | None = None) -> RunSettings:
    """The run's settings as this node reads them (the same parsing and defaults as the server)."""
    return RunSettings.from_run_config(run_config, run_id=run_id)


def site_config_path(node_config: Mapping[str, Any], run_config: Mapping[str, Any], run_id: int | None = None) -> Path:
    """The YAML this node serves.

    1. ``node_config["site-config"]`` (a deployed SuperNode: ``--node-config "site-config='...'"``);
    2. in simulation (``partition-id`` in the node config): entry ``partition-id`` of the
       comma-separated run config ``site-configs``, or, when that is empty, of the phantom
       federation in ``federation-dir`` (default ``RUN/federation``), which the first
       simulated node to get here writes (``phantom-sites``, ``phantom-cases``, ``seed``).
       The server never writes site data.
    """
    if node_config.get("site-config"):
        return Path(str(node_config["site-config"])).expanduser()
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode has no site: start it with --node-config \"site-config='/path/to/site.yaml'\""
        )
    index = int(node_config["partition-id"])
    settings = run_settings(run_config, run_id)
    files = settings.site_config_list() or ensure_phantom_federation(
        settings.resolved_federation_dir(), settings.phantom_sites, settings.phantom_cases, settings.seed
    )
    if index >= len(files):
        raise ValueError(f"simulation node {index} has no site: only {len(files)} site config(s) ({', '.join(map(str, files))})")
    return files[index]


_SITES: dict[str, SiteConfig] = {}


def site_label(node_config: Mapping[str, Any], run_config: Mapping[str, Any], run_id: int | None = None) -> str:
    """What to call this node's site in an error, even when its YAML does not load: the
    YAML's ``name`` if it can be read at all, else the file's name."""
    try:
        path = site_config_path(node_config, run_config, run_id)
    except Exception:  # noqa: BLE001 - naming the site must never fail
        return "site (no site config)"
    try:
        import yaml

        name = yaml.safe_load(path.read_text(encoding="utf-8")).get("name")
        if isinstance(name, str) and name.strip():
            return f"{name.strip()} ({path.name})"
    except Exception:  # noqa: BLE001 - an unreadable YAML: its file name says which site
        pass
    return f"site config {path.name}"


def load_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any], run_id: int | None = None) -> SiteConfig:
    path = site_config_path(node_config, run_config, run_id)
    key = str(path.resolve())
    if key not in _SITES:
        _SITES[key] = load_site_config(path)
    return _SITES[key]


def site_seed(seed: int, round_: int, site: str) -> int:
    """A site's seed for one round: distinct per site and round, the same on every rerun."""
    return zlib.crc32(f"{seed}:{round_}:{site}".encode()) & 0x7FFFFFFF


def site_modes(site: SiteConfig) -> list[str]:
    return [m for m in site.modes if m in servable_modes(site.modalities)]


def has_survival_labels(site: SiteConfig) -> bool:
    return site.clinical is not None and site.clinical.time is not None and site.clinical.event is not None


def has_ehr(site: SiteConfig) -> bool:
    return "ehr" in site.modalities and site.clinical is not None and bool(site.clinical.covariates)


# ----------------------------------------------------------------------------- limits


class RequestRefused(ValueError):
    """The server asked for something outside the site's ``limits:`` (its YAML)."""


def refuse_outside_limits(site: SiteConfig, instruction: Instruction) -> None:
    """Raise :class:`RequestRefused` listing every limit of the site's YAML the request breaks
    (rank, PET-embedding kind, batch size x local steps)."""
    refusals = site.limits.refusals(rank=instruction.spec.rank, pet_embed=instruction.spec.pet_embed,
                                    phase=str(instruction.phase), local_steps=instruction.local_steps,
                                    batch_size=instruction.batch_size, source=site.path)
    if refusals:
        raise RequestRefused(f"site {site.name} refuses this request: " + "; ".join(refusals))


def refuse_large_upload(site: SiteConfig, out: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`RequestRefused` if ``out`` is more than the site's ``limits.max_upload_mb``."""
    refusal = site.limits.upload_refusal(protocol.payload_bytes(out), source=site.path)
    if refusal:
        raise RequestRefused(f"site {site.name} refuses to send this update: {refusal}")


# ----------------------------------------------------------------------------- queries


def declared_cases(site: SiteConfig) -> dict[str, int]:
    """The site's training cases per modality (``survival``: with survival labels), as it
    declares them when it joins; the server weights and checks its replies against them."""
    from pemma_core.data.checks import read_site_clinical
    from pemma_core.data.cases import site_cases

    cases, _ = site_cases(site, "train")
    counts = {
        "ct": sum(1 for c in cases if c.ct is not None) if site.has_ct else 0,
        "pet": sum(1 for c in cases if c.pet is not None) if site.has_pet else 0,
        "ehr": 0,
        "survival": 0,
    }
    clinical = read_site_clinical(site)
    if clinical is not None:
        table = clinical[0]
        ids = [c.case_id for c in cases if c.case_id in table.index]
        counts["ehr"] = len(ids) if has_ehr(site) else 0
        counts["survival"] = len(ids) if has_survival_labels(site) else 0
    return counts


def join_site(site: SiteConfig) -> Reply:
    """``query.join``: the site's name, its declared training cases per modality and its
    preprocessing (resampling spacing, CT window, SUV ceiling), which the run records so that
    the model is applied to data prepared the same way."""
    preprocessing = protocol.preprocessing_json(site.spacing, site.ct_window, site.pet_suv_max)
    reply = Reply(metrics=protocol.declared_metrics(declared_cases(site)),
                  meta={protocol.SITE: site.name, protocol.PREPROCESSING: preprocessing})
    return check_reply(protocol.JOIN, reply, {}, (1, 1, 1), site)


def ehr_stats_site(site: SiteConfig) -> Reply:
    """``query.ehr_stats``: the aggregates of the site's EHR training rows
    (:func:`pemma_core.data.clinical.partial_stats`), only from at least
    ``limits.min_ehr_rows`` rows per covariate (below it the reply says what it withheld);
    a site without EHR answers with its name only."""
    from pemma_core.data.cases import site_ehr_stats

    stats, withheld = None, None
    if has_ehr(site):
        found, note = site_ehr_stats(site, min_rows=site.limits.min_ehr_rows)
        stats = json.dumps(found, sort_keys=True) if found is not None else None
        withheld = note if found is None else None
    reply = Reply(meta=protocol.reply_meta(site.name, ehr_stats=stats, withheld=withheld))
    return check_reply(protocol.EHR_STATS, reply, {}, (1, 1, 1), site)


# ----------------------------------------------------------------------------- replies


def site_case_ids(site: SiteConfig) -> list[str]:
    """Every case id in the site's manifest (usable or not): none may appear in a reply."""
    from pemma_core.data.manifest import read_manifest

    return [case.case_id for case in read_manifest(site)[0]]


def check_reply(
    kind: MessageType, reply: Reply, received: Mapping[str, Any], roi_size: tuple[int, int, int], site: SiteConfig
) -> Reply:
    """The client-side wire check: ``reply`` if it holds only what a reply of ``kind`` may
    (:func:`pemma_core.protocol.check_reply`, the site's case ids searched for in every
    metric name and config value); else :class:`~pemma_core.protocol.WireViolation`."""
    protocol.check_reply(kind, reply, received.keys(), roi_size, site_case_ids(site), where=f"reply of site {site.name}")
    return reply


# ----------------------------------------------------------------------------- secure aggregation


def secure_stage_site(site: SiteConfig, stage: MessageType, config: Mapping[str, Any], state: Any) -> Reply:
    """This site's answer to a stage of secure aggregation (:mod:`client.secure_aggregation`);
    ``state`` is the node's Flower ``context.state``, where the round's keys stay between stages."""
    from client import secure_aggregation

    seed = site_seed(0, int(json.loads(str(config.get(protocol.SECAGG, "{}"))).get("round", 0)), site.name)
    answer = secure_aggregation.answer_stage(stage.action, config, state, seed)
    return Reply({}, {}, {protocol.SITE: site.name, protocol.SECAGG: json.dumps(answer)})


# ----------------------------------------------------------------------------- differential privacy


def privacy_ledger(site: SiteConfig):
    """The site's own record of the DP steps it has taken, per run (``cache_dir/privacy-ledger.json``)."""
    from pemma_core.privacy import PrivacyLedger

    return PrivacyLedger(Path(site.cache_dir) / "privacy-ledger.json")
