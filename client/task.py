"""What a site does for the Flower handlers in :mod:`client.client_app`, kept flwr-free.

* :func:`site_config_path`: which site YAML this node serves (deployment: the node config
  ``site-config``; simulation: the run config ``site-configs`` or the phantom federation,
  written on first use, by ``partition-id``).
* :func:`install_backbone` / :func:`site_backbone`: the frozen CT backbone, checked by
  fingerprint against the one the server names. A site that holds its own backbone file
  (node config ``backbone-file``) refuses a server whose fingerprint differs.
* :func:`build_site_model`: the PEMMA model with the global adapters loaded.
* :func:`train_site` / :func:`evaluate_site` / :func:`pretrain_site`: call
  :mod:`pemma_core.train` and return only what may cross the wire (see
  :mod:`pemma_core.wire`): the tensors of the groups the site trained, per-group counts,
  aggregate metrics.
* :func:`ehr_stats_site` / :func:`prognosis_site`: the ``prognosis`` phase: the aggregates
  of the site's EHR training rows (to agree on the EHR width), then rounds of the Cox
  head (+ EHR encoder) on the frozen adapters, replying with the head groups, the event
  count and the C-index of the held-out split (never a per-patient risk or a case id).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pemma_core import wire
from pemma_core.adapters import (
    AdapterMismatchError,
    backbone_fingerprint,
    load_backbone,
    load_trainable_state,
    save_backbone,
    trainable_state,
)
from pemma_core.model import MODE_GROUPS, ModelSpec, SegmentationModel, build_backbone, build_model
from pemma_core.modes import servable_modes
from pemma_core.phantoms import ensure_phantom_federation
from pemma_core.site import SiteConfig, load_site_config


class BackboneMismatchError(RuntimeError):
    """The site's backbone is not the one the server's adapters belong to."""


# ----------------------------------------------------------------------------- site


def site_config_path(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path:
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
    listed = [p.strip() for p in str(run_config.get("site-configs", "")).split(",") if p.strip()]
    if listed:
        files = [Path(p).expanduser() for p in listed]
    else:
        folder = str(run_config.get("federation-dir") or "") or str(Path(str(run_config.get("run-dir", "runs/flwr-run"))) / "federation")
        files = ensure_phantom_federation(folder, int(run_config.get("phantom-sites", 3)),
                                          int(run_config.get("phantom-cases", 6)), int(run_config.get("seed", 0)))
    if index >= len(files):
        raise ValueError(f"simulation node {index} has no site: only {len(files)} site config(s) ({', '.join(map(str, files))})")
    return files[index]


_SITES: dict[str, SiteConfig] = {}


def load_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
    path = site_config_path(node_config, run_config)
    key = str(path.resolve())
    if key not in _SITES:
        _SITES[key] = load_site_config(path)
    return _SITES[key]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def site_seed(seed: int, round_: int, site: str) -> int:
    """A site's seed for one round: distinct per site and round, the same on every rerun."""
    return zlib.crc32(f"{seed}:{round_}:{site}".encode()) & 0x7FFFFFFF


def allowed_groups(site: SiteConfig) -> frozenset[str]:
    """Parameter groups this site may send: those its modes train (DESIGN.md section 4)."""
    groups: set[str] = set()
    for mode in site_modes(site):
        groups |= MODE_GROUPS[mode]
    return frozenset(groups)


def site_modes(site: SiteConfig) -> list[str]:
    return [m for m in site.modes if m in servable_modes(site.modalities)]


# ----------------------------------------------------------------------------- backbone

_BACKBONES: dict[str, nn.Module] = {}


def _cache_file(site: SiteConfig, fingerprint: str) -> Path:
    return Path(site.cache_dir) / "backbones" / f"{fingerprint}.safetensors"


def _own_backbone(node_config: Mapping[str, Any]) -> tuple[nn.Module, str] | None:
    path = node_config.get("backbone-file")
    if not path:
        return None
    backbone, _ = load_backbone(Path(str(path)).expanduser())
    return backbone, backbone_fingerprint(backbone)


def backbone_from_arrays(arrays: Mapping[str, np.ndarray], spec: ModelSpec) -> nn.Module:
    backbone = build_backbone(spec)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    backbone.load_state_dict(state, strict=True)
    return backbone


def install_backbone(
    site: SiteConfig, node_config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], spec: ModelSpec, fingerprint: str
) -> str:
    """Keep the server's backbone at the site (cache folder), after checking its fingerprint."""
    own = _own_backbone(node_config)
    if own is not None:
        if own[1] != fingerprint:
            raise BackboneMismatchError(
                f"site {site.name}: its backbone file {node_config.get('backbone-file')} has fingerprint "
                f"{own[1][:12]}..., the server's is {fingerprint[:12]}...: refusing to join this run"
            )
        _BACKBONES[fingerprint] = own[0]
        return fingerprint
    backbone = backbone_from_arrays(arrays, spec)
    received = backbone_fingerprint(backbone)
    if received != fingerprint:
        raise BackboneMismatchError(
            f"site {site.name}: the backbone received has fingerprint {received[:12]}..., the server "
            f"announced {fingerprint[:12]}... (corrupted in transit?)"
        )
    target = _cache_file(site, fingerprint)
    if not target.exists():
        save_backbone(target, backbone, spec, provenance={"source": "server"})
    _BACKBONES[fingerprint] = backbone
    return fingerprint


def site_backbone(site: SiteConfig, node_config: Mapping[str, Any], fingerprint: str) -> nn.Module:
    """The backbone with ``fingerprint`` (the site's own file, or the one the server installed)."""
    own = _own_backbone(node_config)
    if own is not None:
        if own[1] != fingerprint:
            raise BackboneMismatchError(
                f"site {site.name}: its backbone has fingerprint {own[1][:12]}..., the server's adapters "
                f"belong to {fingerprint[:12]}...: refusing to train or evaluate them"
            )
        return own[0]
    if fingerprint in _BACKBONES:
        return _BACKBONES[fingerprint]
    cached = _cache_file(site, fingerprint)
    if not cached.exists():
        raise BackboneMismatchError(
            f"site {site.name}: no backbone with fingerprint {fingerprint[:12]}... here ({cached} missing); "
            "the server installs it at the start of the adapt phase, or set node config backbone-file"
        )
    backbone, _ = load_backbone(cached)
    if backbone_fingerprint(backbone) != fingerprint:
        raise BackboneMismatchError(f"site {site.name}: cached backbone {cached} does not match its fingerprint")
    _BACKBONES[fingerprint] = backbone
    return backbone


def build_site_model(
    site: SiteConfig, node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> SegmentationModel:
    """The PEMMA model on the server's backbone with the global adapters ``arrays`` loaded."""
    fingerprint = str(config["fingerprint"])
    spec = ModelSpec.from_dict(json.loads(str(config["model-spec"])))
    backbone = site_backbone(site, node_config, fingerprint)
    model = build_model(spec, backbone)
    if model.fingerprint != fingerprint:
        raise BackboneMismatchError(f"site {site.name}: model fingerprint {model.fingerprint[:12]}... != {fingerprint[:12]}...")
    try:
        load_trainable_state(model, wire.to_tensors(arrays))
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"site {site.name}: the server's adapters do not fit: {exc}") from exc
    return model


# ----------------------------------------------------------------------------- work


@dataclass
class SiteReply:
    """Exactly what goes back to the server."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float | int]
    meta: dict[str, str]


def _loaders():
    from pemma_core import data  # imported late: the data stack (nibabel/MONAI transforms) is heavy

    return data


def train_site(
    site: SiteConfig, node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> SiteReply:
    """One round of ``adapt`` at a site: train the modes it serves, reply with what changed."""
    from pemma_core.train import train_local

    start = time.perf_counter()
    model = build_site_model(site, node_config, config, arrays)
    modes = site_modes(site)
    seed = site_seed(int(config.get("seed", 0)), int(config["round"]), site.name)
    loader = _loaders().train_loader(site, model.roi_size, batch_size=int(config.get("batch-size", 2)), split="train", seed=seed)
    setup = time.perf_counter() - start
    result = train_local(
        model, loader, modes, steps=int(config["local-steps"]), lr=float(config["lr"]), seed=seed,
        device=resolve_device(site.device),
    )
    groups = model.param_groups
    may_send = allowed_groups(site)
    trained = {g for g, n in result.examples.items() if n > 0 and g in may_send}
    state = trainable_state(model.cpu())
    sent = {k: v for k, v in state.items() if groups[k] in trained}
    out = wire.to_wire(sent, str(config.get("wire-dtype", "float32")))
    metrics: dict[str, float | int] = {
        "num-examples": int(max((result.examples[g] for g in trained), default=0)),
        "loss": float(result.loss),
        "steps": int(result.steps),
        "train-seconds": float(result.seconds),
        "setup-seconds": float(setup),
        "bytes-up": wire.payload_bytes(out),
    }
    metrics.update({f"examples-{g}": int(result.examples[g]) for g in sorted(trained)})
    reply = SiteReply(out, metrics, {"site": site.name, "fingerprint": model.fingerprint})
    check_reply(reply, arrays, model.roi_size, site)
    return reply


def evaluate_site(
    site: SiteConfig, node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> SiteReply:
    """Dice per mode of the global adapters on the site's test split (aggregate only)."""
    from pemma_core.train import evaluate

    start = time.perf_counter()
    model = build_site_model(site, node_config, config, arrays)
    modes = site_modes(site)
    loader = _loaders().eval_loader(site, split=str(config.get("eval-split", "test")))
    result = evaluate(model, loader, modes, device=resolve_device(site.device))
    cases = {mode: len(per_case) for mode, per_case in result.per_case.items()}
    metrics: dict[str, float | int] = {"num-examples": max(cases.values(), default=0), "eval-seconds": time.perf_counter() - start}
    for mode, dice in result.dice.items():
        metrics[f"dice-{mode}"] = float(dice)
        metrics[f"cases-{mode}"] = int(cases[mode])
    reply = SiteReply({}, metrics, {"site": site.name, "fingerprint": model.fingerprint})
    check_reply(reply, arrays, model.roi_size, site, case_ids=[c for pc in result.per_case.values() for c in pc])
    return reply


def pretrain_site(site: SiteConfig, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SiteReply:
    """One round of ``pretrain-ct``: train the whole CT backbone on CT; a site without CT sends nothing."""
    from pemma_core.train import train_backbone

    spec = ModelSpec.from_dict(json.loads(str(config["model-spec"])))
    if not site.has_ct:
        return SiteReply({}, {"num-examples": 0, "train-seconds": 0.0, "bytes-up": 0}, {"site": site.name})
    start = time.perf_counter()
    backbone = build_backbone(spec)
    floating = {k for k, v in backbone.state_dict().items() if v.is_floating_point()}
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in wire.from_wire(arrays).items()}
    backbone.load_state_dict(state, strict=False)
    seed = site_seed(int(config.get("seed", 0)), int(config["round"]), site.name)
    loader = _loaders().train_loader(site, spec.roi_size, batch_size=int(config.get("batch-size", 2)), split="train", seed=seed)
    setup = time.perf_counter() - start
    result = train_backbone(backbone, loader, steps=int(config["local-steps"]), lr=float(config["lr"]), seed=seed,
                            device=resolve_device(site.device))
    sent = {k: v for k, v in backbone.cpu().state_dict().items() if k in floating and k in arrays}
    out = wire.to_wire(sent, str(config.get("wire-dtype", "float32")))
    count = int(max(result.examples.values(), default=0))
    metrics: dict[str, float | int] = {
        "num-examples": count,
        "examples-backbone": count,
        "loss": float(result.loss),
        "steps": int(result.steps),
        "train-seconds": float(result.seconds),
        "setup-seconds": float(setup),
        "bytes-up": wire.payload_bytes(out),
    }
    reply = SiteReply(out, metrics, {"site": site.name})
    check_reply(reply, arrays, spec.roi_size, site)
    return reply


def has_survival_labels(site: SiteConfig) -> bool:
    return site.clinical is not None and site.clinical.time is not None and site.clinical.event is not None


def has_ehr(site: SiteConfig) -> bool:
    return "ehr" in site.modalities and site.clinical is not None and bool(site.clinical.covariates)


def ehr_stats_site(site: SiteConfig) -> SiteReply:
    """``query.ehr_stats``: the aggregates of the site's EHR training rows
    (:func:`pemma_core.clinical.partial_stats`); a site without EHR answers with its name only."""
    from pemma_core.data import site_cases
    from pemma_core.prognosis import site_ehr_stats

    if not has_ehr(site):
        return SiteReply({}, {}, {"site": site.name})
    reply = SiteReply({}, {}, {"site": site.name, wire.EHR_STATS_KEY: json.dumps(site_ehr_stats(site), sort_keys=True)})
    check_reply(reply, {}, (1, 1, 1), site, case_ids=[c.case_id for c in site_cases(site)[0]],
                config_keys=wire.EHR_STATS_REPLY_KEYS)
    return reply


def prognosis_site(
    site: SiteConfig, node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> SiteReply:
    """One round of ``prognosis``: the Cox head (and, with EHR, the EHR encoder) trained on
    the site's train cohort over the frozen adapters; the C-index of its test split.

    Rule for a site without EHR on a model with an EHR branch: the head is additive and
    the site leaves the EHR term out (:func:`pemma_core.prognosis.ehr_term`), so it
    trains and sends ``prognosis`` only. Counts per group are the cohort's events (the
    Cox likelihood's information). A site without survival labels, or whose train cohort
    has no event, sends nothing.
    """
    from pemma_core.clinical import EhrPreprocessor
    from pemma_core.prognosis import check_site_covariates, evaluate_survival, load_cohort, train_survival

    start = time.perf_counter()
    meta = {"site": site.name, "fingerprint": str(config["fingerprint"])}
    if not has_survival_labels(site):
        return SiteReply({}, {"num-examples": 0, "train-seconds": 0.0, "bytes-up": 0}, meta)
    model = build_site_model(site, node_config, config, arrays)
    preprocessor = None
    if model.spec.ehr_features and has_ehr(site):
        preprocessor = EhrPreprocessor.from_metadata(json.loads(str(config["ehr-preprocessor"])))
        check_site_covariates(site, preprocessor)
        if preprocessor.n_features != model.spec.ehr_features:
            raise ValueError(f"site {site.name}: EHR preprocessor gives {preprocessor.n_features} features, "
                             f"the model expects {model.spec.ehr_features}")
    modes = site_modes(site)
    cohort, ids = load_cohort(site, model.roi_size, "train", preprocessor)
    events = int(cohort.event.sum())
    setup = time.perf_counter() - start
    if len(cohort) < 2 or events < 1:  # the Cox likelihood has nothing to learn from
        return SiteReply({}, {"num-examples": 0, "cases-survival": len(cohort), "train-seconds": 0.0, "bytes-up": 0}, meta)
    torch.manual_seed(site_seed(int(config.get("seed", 0)), int(config["round"]), site.name))
    result = train_survival(model, cohort, modes, steps=int(config["local-steps"]), lr=float(config["lr"]), omit_ehr=True)
    groups = model.param_groups
    sent = {k: v for k, v in trainable_state(model).items() if groups[k] in result.examples}
    out = wire.to_wire(sent, str(config.get("wire-dtype", "float32")))
    metrics: dict[str, float | int] = {
        "num-examples": len(cohort),
        "events-survival": events,
        "loss": float(result.loss),
        "steps": int(result.steps),
        "train-seconds": float(result.seconds),
        "setup-seconds": float(setup),
        "bytes-up": wire.payload_bytes(out),
    }
    metrics.update({f"examples-{g}": events for g in sorted(result.examples)})
    case_ids = list(ids)
    try:  # the C-index of the held-out split, when it has comparable pairs
        test, test_ids = load_cohort(site, model.roi_size, "test", preprocessor)
        case_ids += test_ids
        eval_mode = "ctpet" if "ctpet" in modes else modes[0]
        metrics["c-index"] = float(evaluate_survival(model, test, eval_mode, omit_ehr=True))
        metrics["cases-survival"] = len(test)
    except ValueError:  # no test split, no clinical row, or no admissible pair: no C-index
        pass
    reply = SiteReply(out, metrics, meta)
    check_reply(reply, arrays, model.roi_size, site, case_ids=case_ids)
    return reply


def check_reply(
    reply: SiteReply,
    received: Mapping[str, Any],
    roi_size: tuple[int, int, int],
    site: SiteConfig,
    case_ids: list[str] | None = None,
    config_keys: frozenset[str] = wire.REPLY_CONFIG_KEYS,
) -> None:
    """The client-side wire check: raise before anything but adapters, counts and metrics leaves."""
    wire.assert_clean(
        reply.arrays, received.keys(), roi_size, reply.metrics, reply.meta, case_ids or (), where=f"reply of site {site.name}",
        config_keys=config_keys,
    )
