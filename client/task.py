"""What a site does with its model for the Flower handlers in :mod:`client.client_app`, kept flwr-free.

PyTorch, MONAI and peft are imported here, at the top: :mod:`client.client_app` imports this
module on the first message that needs the model, so that the messages that do not (the
queries and the secure-aggregation stages, :mod:`client.site_work`) start in a fraction of
the time on a deployed SuperNode, which starts a fresh ClientApp process per message.

* :func:`install_backbone` / :func:`site_backbone`: the frozen CT backbone, checked by
  fingerprint against the one the server names. A site that holds its own backbone file
  (node config ``backbone-file``) refuses a server whose fingerprint differs.
* :func:`build_site_model`: the PEMMA model with the global adapters loaded.
* :func:`train_site` / :func:`evaluate_site` / :func:`pretrain_site`: call
  :mod:`pemma_core.training.local` and return only what may cross the wire (see
  :mod:`pemma_core.protocol`): the tensors of the groups the site trained, per-group
  counts, aggregate metrics. Every reply is checked (:func:`client.site_work.check_reply`)
  before it leaves, its metric names and config values searched for the site's case ids.
* :func:`prognosis_site`: a round of the ``prognosis`` phase: the Cox head (+ EHR encoder)
  on the frozen adapters, replying with the head groups, the event count and the C-index
  of the held-out split (never a per-patient risk or a case id).
* :func:`masked_reply`: a train reply of a secure-aggregation round, masked.

The site's work without the model (which site, its limits, ``query.join``,
``query.ehr_stats``, the reply check, the secure-aggregation stages) is in
:mod:`client.site_work`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.site_work import (
    check_reply,
    declared_cases,
    has_ehr,
    has_survival_labels,
    privacy_ledger,
    refuse_large_upload,
    refuse_outside_limits,
    site_modes,
    site_seed,
)
from pemma_core import protocol
from pemma_core.config.site import SiteConfig
from pemma_core.model.factory import build_model
from pemma_core.model.files import (
    AdapterMismatchError,
    backbone_fingerprint,
    load_backbone,
    load_trainable_state,
    save_backbone,
    trainable_state,
)
from pemma_core.model.pemma import MODE_GROUPS, SegmentationModel
from pemma_core.model.spec import FULL_GROUP, ModelSpec, build_backbone
from pemma_core.protocol import Instruction, Reply

log = logging.getLogger("pemma.site")


class BackboneMismatchError(RuntimeError):
    """The site's backbone is not the one the server's adapters belong to."""


# ----------------------------------------------------------------------------- device and groups


def resolve_device(site: SiteConfig) -> str:
    """Where ``site`` trains: its ``device``, with ``auto`` meaning CUDA when PyTorch sees a GPU, else
    CPU (said once per site and device, so hospital IT can see which it got)."""
    device = site.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if (site.name, device) not in _ANNOUNCED:
        _ANNOUNCED.add((site.name, device))
        log.info("site %s trains on %s (device: %s in %s)", site.name, device, site.device, site.path)
    return device


_ANNOUNCED: set[tuple[str, str]] = set()


def allowed_groups(site: SiteConfig) -> frozenset[str]:
    """Parameter groups this site may send: those its modes train (docs/ARCHITECTURE.md, parameter groups)."""
    groups: set[str] = set()
    for mode in site_modes(site):
        groups |= MODE_GROUPS[mode]
    return frozenset(groups)


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


def install_backbone_site(
    site: SiteConfig, node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> Reply:
    """``query.install_backbone``: keep the run's frozen CT backbone (checked by fingerprint), and
    build the adapt model on it, which the first round would otherwise wait for."""
    spec, fingerprint = protocol.read_install_config(config)
    fingerprint = install_backbone(site, node_config, arrays, spec, fingerprint)
    site_model(site, node_config, spec, fingerprint)  # built now: the first adapt round starts with it
    return check_reply(protocol.INSTALL_BACKBONE, Reply(meta=protocol.reply_meta(site.name, fingerprint)), {}, (1, 1, 1), site)


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


_MODELS: collections.OrderedDict[tuple[str, ...], SegmentationModel] = collections.OrderedDict()
_MODELS_KEPT = 4  # models kept per process, least recently used dropped (a simulation of many sites keeps few)


def site_model(site: SiteConfig, node_config: Mapping[str, Any], spec: ModelSpec, fingerprint: str) -> SegmentationModel:
    """The site's model of ``spec`` on the backbone ``fingerprint``: one of the last few built
    (:func:`build_site_model`), or built now and kept, its trainable tensors as they were left."""
    key = (site.name, str(site.path), fingerprint, spec.to_json(), str(node_config.get("backbone-file", "")))
    model = _MODELS.pop(key, None)
    if model is None:
        model = build_model(spec, site_backbone(site, node_config, fingerprint))
        if model.fingerprint != fingerprint:
            raise BackboneMismatchError(
                f"site {site.name}: model fingerprint {model.fingerprint[:12]}... != {fingerprint[:12]}...")
    _MODELS[key] = model
    while len(_MODELS) > _MODELS_KEPT:
        _MODELS.popitem(last=False)
    return model


def build_site_model(
    site: SiteConfig, node_config: Mapping[str, Any], instruction: Instruction, arrays: Mapping[str, np.ndarray]
) -> SegmentationModel:
    """The PEMMA model on the server's backbone with the global adapters ``arrays`` loaded.

    A process serving several messages (a simulation, or a SuperNode's long-lived ClientApp) keeps
    the last few models built and only loads the new adapters into them: building a model and
    hashing its backbone cost more than a local round of the tiny preset. Every trainable tensor
    is replaced by ``arrays`` and nothing else trains, so a kept model equals a fresh one."""
    model = site_model(site, node_config, instruction.spec, str(instruction.fingerprint))
    try:
        load_trainable_state(model, protocol.to_tensors(arrays))
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"site {site.name}: the server's adapters do not fit: {exc}") from exc
    return model


# ----------------------------------------------------------------------------- work


def _loaders():
    from pemma_core.data import pipeline  # imported late: the data stack (nibabel/MONAI transforms) is heavy

    return pipeline


def _seed(instruction: Instruction, site: SiteConfig) -> int:
    return site_seed(instruction.seed, int(instruction.round), site.name)


# A site keeps the adapt optimiser of its last few runs: the run id comes from the server, and one
# that sent a new id every round must not fill the site's disk. A few, not one, so that a site in two
# federations at once does not restart the other's optimiser every round.
OPTIMIZER_RUNS_KEPT = 4


def _optimizer_file(site: SiteConfig, run: str) -> Path:
    """Where ``site`` keeps its adapt optimiser of ``run``: a folder per site (sites may share a
    cache), a file per run, both names hashed (the run id comes from the server)."""
    folder = hashlib.sha256(site.name.encode()).hexdigest()[:16]
    return Path(site.cache_dir) / "optimizer" / folder / f"{hashlib.sha256(run.encode()).hexdigest()[:32]}.safetensors"


def _forget_old_runs(kept: Path) -> None:
    """Delete the site's moments files but the ``OPTIMIZER_RUNS_KEPT`` latest written, ``kept`` among them."""
    others = sorted((p for p in kept.parent.glob("*.safetensors") if p != kept),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[OPTIMIZER_RUNS_KEPT - 1:]:
        old.unlink(missing_ok=True)


def _site_optimizer(site: SiteConfig, instruction: Instruction, model: SegmentationModel, device: str):
    """The site's AdamW for this adapt round and how to keep it for the next (a function of the
    trained optimiser): its moments from the site's last round of this run are carried on
    (:mod:`pemma_core.training.optimizer` says why)."""
    from pemma_core.training import optimizer as optimizers
    from pemma_core.training.local import on_device

    on_device(model, device)  # before the optimiser: carried moments are put where their tensors are
    owner = f"{model.fingerprint}:{model.spec.to_json()}"
    path = _optimizer_file(site, instruction.run) if instruction.run else None
    carried = optimizers.load_moments(path, owner, int(instruction.round)) if path else None
    optimizer = optimizers.make_optimizer(model, float(instruction.lr), carried)

    def keep() -> None:
        if path is not None:
            optimizers.save_moments(path, optimizers.carried_moments(optimizer, model), owner, int(instruction.round))
            _forget_old_runs(path)

    return optimizer, keep


def train_site(
    site: SiteConfig, node_config: Mapping[str, Any], instruction: Instruction, arrays: Mapping[str, np.ndarray],
) -> Reply:
    """One round of ``adapt`` at a site: train the modes it serves (its optimiser carried on from its
    last round of the run), reply with what changed."""
    from pemma_core.training.local import train_local

    refuse_outside_limits(site, instruction)
    start = time.perf_counter()
    model = build_site_model(site, node_config, instruction, arrays)
    modes = site_modes(site)
    seed = _seed(instruction, site)
    loader = _loaders().train_loader(site, model.roi_size, batch_size=int(instruction.batch_size), split="train", seed=seed)
    setup = time.perf_counter() - start
    private = _private_steps(site, instruction, loader)
    steps = private.steps if private is not None else instruction.local_steps
    device = resolve_device(site)
    optimizer, keep_optimizer = _site_optimizer(site, instruction, model, device)
    result = train_local(
        model, loader, modes, steps=steps, lr=instruction.lr, seed=seed, device=device,
        optimizer=optimizer, dp=private.plan if private is not None else None,
    ) if steps > 0 else None
    keep_optimizer()
    groups = model.param_groups
    may_send = allowed_groups(site)
    examples = dict(result.examples) if result is not None else {}
    if private is not None and result is not None:
        # The expected count, not the Poisson draw's: what a DP site sends must not depend on which patients it drew.
        per_mode = {m: n * int(instruction.batch_size) for m, n in result.mode_steps.items()}
        examples = {}
        for mode, n in per_mode.items():
            for g in model.groups_for_mode(mode):
                examples[g] = examples.get(g, 0) + n
    trained = {g for g, n in examples.items() if n > 0 and g in may_send}
    state = trainable_state(model)  # CPU copies: the model stays on its device for the next round
    sent = {k: v for k, v in state.items() if groups[k] in trained}
    out = protocol.to_wire(sent, str(instruction.wire_dtype))
    refuse_large_upload(site, out)
    metrics: dict[str, float | int] = {
        "num-examples": int(max((examples[g] for g in trained), default=0)),
        "steps": int(steps),
        "train-seconds": float(result.seconds if result is not None else 0.0),
        "setup-seconds": float(setup),
        "bytes-up": protocol.payload_bytes(out),
        **protocol.examples_metrics({g: examples[g] for g in trained}),
    }
    meta = protocol.reply_meta(site.name, model.fingerprint)
    if private is None:
        metrics["loss"] = float(result.loss)
    else:  # the training loss is not privatised: under DP it stays at the site
        private.record(result.dp_steps if result is not None else 0)
        metrics.update({"dp-epsilon": private.epsilon(), "dp-steps": int(steps)})
        if private.stopped:
            meta[protocol.DP_STOPPED] = private.stopped
    reply = Reply(out, metrics, meta)
    return check_reply(protocol.TRAIN["adapt"], reply, arrays, model.roi_size, site)


class PrivateSteps:
    """A round's DP-SGD at a site: the plan, the steps its remaining budget allows, its ledger."""

    def __init__(self, site: SiteConfig, instruction: Instruction, n_patients: int) -> None:
        from pemma_core.privacy import plan_dp, steps_within_budget

        dp = dict(instruction.dp or {})
        self.ledger = privacy_ledger(site)
        # One budget per site and run: sites may share a cache folder, a run folder may be reused.
        self.key = f"{instruction.run or ''}:{site.name}:{instruction.fingerprint}"
        self.plan = plan_dp(float(dp["target_epsilon"]), float(dp["delta"]), float(dp["clip"]),
                            int(instruction.batch_size), n_patients, int(dp["planned_steps"]),
                            recorded=self.ledger.plan(self.key))
        taken = self.ledger.steps_taken(self.key)
        self.steps = steps_within_budget(self.plan, taken, int(instruction.local_steps))
        self.stopped = ""
        if self.steps < int(instruction.local_steps):
            self.stopped = (f"privacy budget: epsilon {self.plan.target_epsilon:g} (delta {self.plan.delta:g}) allows "
                            f"{self.steps} of the {instruction.local_steps} steps asked after {taken} taken")
            log.warning("site %s: %s", site.name, self.stopped)

    def record(self, steps: int) -> None:
        self.ledger.record(self.key, self.plan, steps)

    def epsilon(self) -> float:
        return float(self.ledger.epsilon(self.key))


def _private_steps(site: SiteConfig, instruction: Instruction, loader: Any) -> PrivateSteps | None:
    if not instruction.dp:
        return None
    return PrivateSteps(site, instruction, len(loader.dataset))


def evaluate_site(
    site: SiteConfig, node_config: Mapping[str, Any], instruction: Instruction, arrays: Mapping[str, np.ndarray]
) -> Reply:
    """Dice per mode of the global adapters on the site's test split (aggregate only), for the
    modes with at least ``limits.min_eval_cases`` test cases; the reply says what it withheld.
    Beside each mode's Dice: mean HD95 (and over how many cases it is defined), mean surface
    Dice, and the sums ``overlap`` (2 |P and G|) and ``volume`` (|P| + |G|) of the aggregated Dice.
    A site evaluates its test split only, whatever the server asks."""
    from pemma_core.training.local import evaluate

    start = time.perf_counter()
    model = build_site_model(site, node_config, instruction, arrays)
    modes = site_modes(site)
    loader = _loaders().eval_loader(site, split="test")
    result = evaluate(model, loader, modes, device=resolve_device(site))
    cases = {mode: len(per_case) for mode, per_case in result.per_case.items()}
    floor = site.limits.min_eval_cases
    reported = {mode: dice for mode, dice in result.dice.items() if cases[mode] >= floor}
    metrics: dict[str, float | int] = {"num-examples": max((cases[m] for m in reported), default=0),
                                       "eval-seconds": time.perf_counter() - start}
    for mode, dice in reported.items():
        metrics[f"dice-{mode}"] = float(dice)
        metrics[f"cases-{mode}"] = int(cases[mode])
        # Aggregates only: HD95's mean with its count of defined cases (none: no hd95-<mode>), the mean
        # surface Dice, and the voxel sums the server pools into the aggregated Dice. Distances in mm
        # (eval_loader batches carry their grid); in voxels they would not compare across sites, so not sent.
        if result.distance_unit == "mm" and result.nsd.get(mode) is not None:
            metrics[f"hd95-cases-{mode}"] = int(result.hd95_cases[mode])
            if result.hd95[mode] is not None:
                metrics[f"hd95-{mode}"] = float(result.hd95[mode])
            metrics[f"nsd-{mode}"] = float(result.nsd[mode])
        if mode in result.overlap:
            metrics[f"overlap-{mode}"] = int(result.overlap[mode])
            metrics[f"volume-{mode}"] = int(result.volume[mode])
    short = sorted(set(result.dice) - set(reported))
    withheld = (f"Dice of {', '.join(short)} withheld: {min(cases[m] for m in short)} test case(s), "
                f"fewer than limits.min_eval_cases {floor}") if short else None
    reply = Reply({}, metrics, protocol.reply_meta(site.name, model.fingerprint, withheld=withheld))
    return check_reply(protocol.EVALUATE, reply, arrays, model.roi_size, site)


def pretrain_site(site: SiteConfig, instruction: Instruction, arrays: Mapping[str, np.ndarray]) -> Reply:
    """One round of ``pretrain-ct``: train the whole CT backbone on CT; a site without CT sends nothing."""
    from pemma_core.training.local import train_backbone

    kind, spec = protocol.TRAIN["pretrain-ct"], instruction.spec
    refuse_outside_limits(site, instruction)
    if not site.has_ct:
        nothing = Reply({}, {"num-examples": 0, "train-seconds": 0.0, "bytes-up": 0}, protocol.reply_meta(site.name))
        return check_reply(kind, nothing, arrays, spec.roi_size, site)
    start = time.perf_counter()
    backbone = build_backbone(spec)
    floating = {k for k, v in backbone.state_dict().items() if v.is_floating_point()}
    backbone.load_state_dict(protocol.to_tensors(arrays), strict=False)
    seed = _seed(instruction, site)
    loader = _loaders().train_loader(site, spec.roi_size, batch_size=int(instruction.batch_size), split="train", seed=seed)
    setup = time.perf_counter() - start
    result = train_backbone(backbone, loader, steps=instruction.local_steps, lr=instruction.lr, seed=seed,
                            device=resolve_device(site))
    sent = {k: v for k, v in backbone.cpu().state_dict().items() if k in floating and k in arrays}
    out = protocol.to_wire(sent, str(instruction.wire_dtype))
    refuse_large_upload(site, out)
    count = int(max(result.examples.values(), default=0))
    metrics: dict[str, float | int] = {
        "num-examples": count,
        **protocol.examples_metrics({FULL_GROUP: count}),
        "loss": float(result.loss),
        "steps": int(result.steps),
        "train-seconds": float(result.seconds),
        "setup-seconds": float(setup),
        "bytes-up": protocol.payload_bytes(out),
    }
    return check_reply(kind, Reply(out, metrics, protocol.reply_meta(site.name)), arrays, spec.roi_size, site)


def prognosis_site(
    site: SiteConfig, node_config: Mapping[str, Any], instruction: Instruction, arrays: Mapping[str, np.ndarray]
) -> Reply:
    """One round of ``prognosis``: the Cox head (and, with EHR, the EHR encoder) trained on
    the site's train cohort over the frozen adapters; the C-index of its test split.

    Rule for a site without EHR on a model with an EHR branch: the head is additive and
    the site leaves the EHR term out (:func:`pemma_core.training.prognosis.ehr_term`), so it
    trains and sends ``prognosis`` only. Counts per group are the cohort's events (the
    Cox likelihood's information). A site without survival labels, or whose train cohort
    has no event, sends nothing.
    """
    from pemma_core.data.clinical import EhrPreprocessor
    from pemma_core.training.prognosis import check_site_covariates, load_cohort, predict_risk, train_survival
    from pemma_core.training.survival import bootstrap_pair_counts, concordance_pairs

    kind = protocol.TRAIN["prognosis"]
    refuse_outside_limits(site, instruction)
    start = time.perf_counter()
    meta = protocol.reply_meta(site.name, str(instruction.fingerprint))
    if not has_survival_labels(site):
        nothing = Reply({}, {"num-examples": 0, "train-seconds": 0.0, "bytes-up": 0}, meta)
        return check_reply(kind, nothing, arrays, instruction.spec.roi_size, site)
    model = build_site_model(site, node_config, instruction, arrays)
    preprocessor = None
    if model.spec.ehr_features and has_ehr(site):
        if instruction.ehr_preprocessor is None:
            raise ValueError(f"site {site.name}: the model has an EHR branch but the message carries no ehr-preprocessor")
        preprocessor = EhrPreprocessor.from_metadata(dict(instruction.ehr_preprocessor))
        check_site_covariates(site, preprocessor)
        if preprocessor.n_features != model.spec.ehr_features:
            raise ValueError(f"site {site.name}: EHR preprocessor gives {preprocessor.n_features} features, "
                             f"the model expects {model.spec.ehr_features}")
    modes = site_modes(site)
    cohort, _ = load_cohort(site, model.roi_size, "train", preprocessor)
    events = int(cohort.event.sum())
    setup = time.perf_counter() - start
    if len(cohort) < 2 or events < 1:  # the Cox likelihood has nothing to learn from
        nothing = Reply({}, {"num-examples": 0, "cases-survival": len(cohort), "train-seconds": 0.0, "bytes-up": 0}, meta)
        return check_reply(kind, nothing, arrays, model.roi_size, site)
    torch.manual_seed(_seed(instruction, site))
    result = train_survival(model, cohort, modes, steps=instruction.local_steps, lr=instruction.lr, omit_ehr=True)
    groups = model.param_groups
    sent = {k: v for k, v in trainable_state(model).items() if groups[k] in result.examples}
    out = protocol.to_wire(sent, str(instruction.wire_dtype))
    refuse_large_upload(site, out)
    metrics: dict[str, float | int] = {
        "num-examples": len(cohort),
        "events-survival": events,
        "loss": float(result.loss),
        "steps": int(result.steps),
        "train-seconds": float(result.seconds),
        "setup-seconds": float(setup),
        "bytes-up": protocol.payload_bytes(out),
        **protocol.examples_metrics({g: events for g in result.examples}),
    }
    try:  # the C-index of the held-out split, when it has comparable pairs and enough cases
        test, _ = load_cohort(site, model.roi_size, "test", preprocessor)
        if len(test) < site.limits.min_eval_cases:
            meta[protocol.WITHHELD] = (f"C-index withheld: {len(test)} test case(s), fewer than "
                                       f"limits.min_eval_cases {site.limits.min_eval_cases}")
        else:
            eval_mode = "ctpet" if "ctpet" in modes else modes[0]
            risk = predict_risk(model, test, eval_mode, omit_ehr=True)
            score, pairs = concordance_pairs(risk, test.time, test.event)
            if pairs == 0:
                raise ValueError("no admissible pair in the held-out split")
            metrics["c-index"], metrics["c-score"], metrics["c-pairs"] = score / (2 * pairs), score, pairs
            metrics["c-boot-scores"], metrics["c-boot-pairs"] = bootstrap_pair_counts(
                risk, test.time, test.event, protocol.BOOTSTRAP_REPLICATES, seed=_seed(instruction, site))
            metrics["cases-survival"] = len(test)
    except ValueError:  # no test split, no clinical row, or no admissible pair: no C-index
        pass
    return check_reply(kind, Reply(out, metrics, meta), arrays, model.roi_size, site)


# ----------------------------------------------------------------------------- secure aggregation


def _groups_of(spec: ModelSpec, phase: str, names: frozenset[str]) -> dict[str, str]:
    """Tensor -> parameter group of the tensors ``names`` the server sent in ``phase``."""
    if phase == "pretrain-ct":
        return {k: FULL_GROUP for k in names}
    return {k: g for k, g in _param_groups(spec.to_json()).items() if k in names}


@functools.lru_cache(maxsize=4)
def _param_groups(spec_json: str) -> dict[str, str]:
    return dict(build_model(ModelSpec.from_json(spec_json)).param_groups)


def masked_reply(site: SiteConfig, instruction: Instruction, arrays: Mapping[str, np.ndarray], reply: Reply,
                 state: Any) -> Reply:
    """``reply`` (already checked) with its tensors replaced by this site's masked update: the
    checks the server cannot make on masked values are made here first (the wire check of the
    plain reply, the update clipped to the round's bounds, the weight capped by the declared cases)."""
    from client import secure_aggregation
    from server.roster import weight_caps

    phase = str(instruction.phase)
    secure = dict(instruction.secure or {})
    received = protocol.from_wire(arrays)
    groups = _groups_of(instruction.spec, phase, frozenset(received))
    counts = protocol.examples_of(reply.metrics)
    caps = weight_caps(declared_cases(site), phase)
    masked, clipped = secure_aggregation.mask_update(secure, state, site.name, received, protocol.from_wire(reply.arrays),
                                                     groups, counts, caps)
    metrics = {**reply.metrics, "bytes-up": protocol.payload_bytes(masked), "secure-clipped": int(clipped)}
    return Reply(masked, metrics, dict(reply.meta))
