"""The federated phases of a run, all through one runner (:func:`run_phase`).

A phase (``pretrain-ct``, ``adapt``, ``prognosis``) is rounds of :class:`PemmaStrategy`
over some global tensors; after every round its checkpoint is written, then its entry in
``metrics.json`` (a round is finished once both exist, see :mod:`server.run_dir`), then the
progress line. What differs between phases is only what :class:`Phase` holds: the
tensors and their groups, the instruction sent to sites, where the rounds are numbered
from and how one round's tensors are saved. :func:`pretrain_ct`, :func:`adapt` and
:func:`prognosis` build that and call :func:`run_phase`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from pemma_core import protocol
from pemma_core.aggregation import one_group
from pemma_core.config.run import RunSettings
from pemma_core.data.clinical import EhrPreprocessor
from pemma_core.model.factory import build_model
from pemma_core.model.files import (
    AdapterMismatchError,
    load_backbone,
    read_adapter_file,
    save_adapters,
    save_backbone,
    trainable_state,
)
from pemma_core.model.pemma import SegmentationModel
from pemma_core.model.spec import build_backbone
from pemma_core.protocol import Instruction
from pemma_core.server_optimizer import OptimizerState, load_state, save_state
from server import records
from server.roster import Roster, one_line_cause
from server.run_dir import RunDir
from server.strategy import PemmaStrategy, RoundRecord, state_to_record

log = logging.getLogger("flwr.pemma")

Progress = Callable[[RoundRecord], None]
SaveRound = Callable[[Path, RoundRecord, dict[str, np.ndarray]], None]  # (checkpoint path, record, global tensors)


class Installer(Protocol):
    """The backbone installer of the run (``server.server_app.BackboneInstaller``)."""

    roster: Roster  # the sites that joined
    installed: set[int]  # nodes holding the backbone

    def __call__(self, grid: Grid) -> object:
        """Let nodes that connected since join, and install the backbone there (before each round)."""


@dataclass
class Phase:
    """One phase, ready to run."""

    name: str  # one of protocol.PHASES
    state: dict[str, np.ndarray]  # the global tensors at the start
    groups: Mapping[str, str]  # tensor -> parameter group
    roi_size: tuple[int, int, int]
    instruction: Instruction
    round_offset: int  # global number of the round before the first one to run
    num_rounds: int  # rounds to run now
    save: SaveRound
    roster: Roster
    on_round_start: Callable[[Grid], object]  # late sites join (and get the backbone) before each round
    evaluate: bool = False
    max_update_norm: float | None = None  # the user's bound: adapt only (the automatic one runs in every phase)
    server_optimizer_state: OptimizerState | None = None  # adapt: FedAdam / FedYogi moments to resume from
    lr_scales: Mapping[str, float] = field(default_factory=dict)  # group -> its rate / the instruction's (1 where absent)


def run_phase(grid: Grid, settings: RunSettings, run: RunDir, phase: Phase, progress: Progress | None) -> PemmaStrategy:
    """Run ``phase``'s rounds; after each, its checkpoint, its ``metrics.json`` entry, ``progress``."""

    def on_round_end(record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        phase.save(run.checkpoint(phase.name, record.round), record, global_state)
        run.record_round(record.to_json())
        if progress:
            progress(record)

    strategy = PemmaStrategy(
        phase=phase.name,
        global_state=phase.state,
        groups=phase.groups,
        roi_size=phase.roi_size,
        instruction=phase.instruction,
        roster=phase.roster,
        min_sites=settings.min_sites,
        max_update_norm=phase.max_update_norm,
        outlier_factor=settings.outlier_factor or None,
        rule=settings.aggregation,
        wire_dtype=settings.wire_dtype,
        round_offset=phase.round_offset,
        evaluate=phase.evaluate,
        on_round_end=on_round_end,
        on_round_start=phase.on_round_start,
        secure={"max_dropouts": settings.secure_max_dropouts, "min_cohort": settings.secure_min_cohort}
        if settings.secure_aggregation else None,
        round_timeout=settings.round_timeout,
        lr_scales=phase.lr_scales,
        **({"lora_aggregation": settings.lora_aggregation_rule, "server_optimizer": settings.server_optimizer,
            "server_lr": settings.server_lr} if phase.name == "adapt" else {}),  # pretrain-ct, prognosis: plain FedAvg
    )
    if phase.server_optimizer_state is not None:
        strategy.optimizer_state = phase.server_optimizer_state
    if phase.num_rounds > 0:
        strategy.start(grid, state_to_record(phase.state), num_rounds=phase.num_rounds, timeout=settings.round_timeout,
                       train_config=ConfigRecord(phase.instruction.to_config()))
    return strategy


def _sites_of(record: RoundRecord) -> list[str]:
    return sorted(s.name for s in record.sites.values() if s.status == "ok")


def floating_state(backbone: nn.Module) -> dict[str, np.ndarray]:
    """The backbone's floating tensors (what pretrain-ct averages) as numpy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in backbone.state_dict().items() if v.is_floating_point()}


def load_floating(backbone: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """``backbone`` with the floating tensors ``state`` loaded (the rest kept)."""
    backbone.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    return backbone


def _adapter_saver(model: SegmentationModel, phase: str, extra_metadata: Mapping[str, str] | None = None) -> SaveRound:
    def save(path: Path, record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in global_state.items()}
        save_adapters(path, model, tensors, extra_metadata=extra_metadata,
                      provenance={"phase": phase, "round": record.round, "sites": _sites_of(record),
                                  "aggregated": record.aggregated})

    return save


def _state(model: SegmentationModel) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in trainable_state(model).items()}


# ----------------------------------------------------------------------------- phases


def pretrain_ct(grid: Grid, settings: RunSettings, run: RunDir, roster: Roster, progress: Progress | None) -> nn.Module:
    """Phase ``pretrain-ct``: FedAvg of the whole CT backbone over the sites holding CT."""
    spec = settings.model_spec()
    torch.manual_seed(settings.seed)
    backbone = build_backbone(spec)
    state = floating_state(backbone)
    offset = run.last_finished_round("pretrain-ct") if settings.resume else 0
    if offset:
        backbone, _ = load_backbone(run.checkpoint("pretrain-ct", offset))
        state = floating_state(backbone)
        run.forget_after("pretrain-ct", offset)
        log.info("resuming pretrain-ct after round %d", offset)

    def save(path: Path, record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        save_backbone(path, load_floating(build_backbone(spec), global_state), spec,
                      provenance={"phase": "pretrain-ct", "round": record.round, "sites": _sites_of(record)})
        for n, older in run.checkpoints("pretrain-ct").items():  # keep only the newest full backbone
            if n < record.round:
                older.unlink()

    instruction = Instruction(local_steps=settings.pretrain_steps, lr=settings.pretrain_lr, batch_size=settings.batch_size,
                              seed=settings.seed, spec=spec)
    strategy = run_phase(grid, settings, run, Phase(
        name="pretrain-ct", state=state, groups=one_group(state), roi_size=spec.roi_size, instruction=instruction,
        round_offset=offset, num_rounds=settings.pretrain_rounds - offset, save=save, roster=roster, on_round_start=roster,
    ), progress)
    if settings.pretrain_rounds > offset and not any(r.aggregated for r in strategy.rounds):
        raise RuntimeError("pretrain-ct: no round could aggregate (see the site errors above); no backbone to adapt")
    return load_floating(backbone, strategy.global_state)


def adapt(
    grid: Grid, settings: RunSettings, run: RunDir, backbone: nn.Module, installer: Installer, progress: Progress | None
) -> PemmaStrategy:
    """Phase ``adapt``: federated PEMMA adapters, checkpointed after every round."""
    spec = settings.model_spec()
    torch.manual_seed(settings.seed)
    model = build_model(spec, backbone)
    state = _state(model)
    run.forget_phase("prognosis")  # prognosis always runs (again) on the final adapters
    offset = run.last_finished_round("adapt") if settings.resume else 0
    if offset:
        tensors, metadata = read_adapter_file(run.checkpoint("adapt", offset))
        if metadata.get("fingerprint") != model.fingerprint:
            raise AdapterMismatchError(f"{run.checkpoint('adapt', offset)} belongs to another backbone")
        state = {k: v.numpy() for k, v in tensors.items()}
        log.info("resuming adapt after round %d", offset)
    else:
        save_adapters(run.checkpoint("adapt", 0), model, provenance={"phase": "adapt", "round": 0, "sites": []})
    run.forget_after("adapt", offset)
    run_uid = str(run.metrics()["run"]["run_uid"])  # kept across a resume
    dp = None
    if settings.dp_target_epsilon > 0:  # each site's budget covers the whole adapt phase, resumed rounds included
        dp = {"target_epsilon": settings.dp_target_epsilon, "delta": settings.dp_delta, "clip": settings.dp_clip,
              "planned_steps": settings.rounds * settings.local_steps}
    instruction = Instruction(local_steps=settings.local_steps, lr=settings.lr, batch_size=settings.batch_size,
                              seed=settings.seed, spec=spec, fingerprint=model.fingerprint, dp=dp, run=run_uid)
    moments = _server_moments(run, offset) if settings.server_optimizer != "none" else None
    save_adapters_of_round = _adapter_saver(model, "adapt")

    def save(path: Path, record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        if moments is not None:  # before the checkpoint: a finished round always has its moments
            save_state(run.server_optimizer_file(record.round), moments, record.round)
            run.server_optimizer_file(record.round - 2).unlink(missing_ok=True)
        save_adapters_of_round(path, record, global_state)

    return run_phase(grid, settings, run, Phase(
        name="adapt", state=state, groups=model.param_groups, roi_size=spec.roi_size, instruction=instruction,
        round_offset=offset, num_rounds=settings.rounds - offset, save=save,
        evaluate=settings.evaluate, max_update_norm=settings.max_update_norm or None, roster=installer.roster,
        on_round_start=installer, server_optimizer_state=moments, lr_scales=model.lr_scales,
    ), progress)


def _server_moments(run: RunDir, offset: int) -> OptimizerState:
    """The server optimiser's moments to go on from after adapt round ``offset`` (empty at the start).
    A run resumed without them (started with server-optimizer = none, or before they were kept)
    starts them from 0, and says so; an unreadable file stops the run (delete it to start from 0)."""
    path = run.server_optimizer_file(offset)
    if offset and path.is_file():
        return load_state(path, offset)
    if offset:
        log.warning("resuming adapt after round %d without the server optimiser's moments (%s): they start from 0",
                    offset, path)
    return OptimizerState()


def agree_ehr_width(
    grid: Grid, settings: RunSettings, run: RunDir, roster: Roster, nodes: set[int]
) -> EhrPreprocessor | None:
    """The federation's EHR preprocessor, fitted from the sites' :func:`partial_stats`
    (aggregates of their training rows: counts, sums, centred sums of squares, category
    sets); ``None`` when no site holds EHR (the model then has no EHR branch).

    Every reply is checked (:func:`pemma_core.data.clinical.partial_stats_problems`: types,
    ranges, consistency, a bounded number of categories) and must come from a site that
    declared EHR; where sites disagree on the covariates, the spec most sites send is kept.
    What each site's statistics became (ok, withheld by its privacy floor, rejected with
    the reason, failed, none) goes into the run info (``ehr_stats``); nothing here stops the run.
    """
    from pemma_core.data.clinical import ClinicalDataError, partial_stats_problems

    targets = sorted(n for n in nodes if n in roster.members)
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type=protocol.EHR_STATS.name) for n in targets]
    outcomes: dict[str, dict[str, str]] = {}
    stats: list[tuple[str, dict[str, Any]]] = []

    def note(name: str, status: str, reason: str = "") -> None:
        outcomes[name] = {"site": name, "status": status, **({"reason": reason} if reason else {})}
        if status in ("rejected", "failed"):
            log.warning("EHR statistics of site %s %s: %s", name, status, reason)

    for msg in grid.send_and_receive(messages, timeout=settings.round_timeout):
        node = msg.metadata.src_node_id
        name = roster.label(node)
        if msg.has_error():
            note(name, "failed", one_line_cause(msg.error.reason))
            continue
        reply, malformed = records.read_reply(msg)
        problems = malformed + protocol.reply_problems(protocol.EHR_STATS, reply, (), (1, 1, 1))
        if reply.meta.get(protocol.SITE) != roster.members[node].name:
            problems.append(f"the reply speaks for {str(reply.meta.get(protocol.SITE))[:80]!r}")
        if problems:
            note(name, "rejected", "; ".join(problems))
            continue
        if protocol.EHR_STATS_KEY not in reply.meta:
            note(name, "withheld" if protocol.WITHHELD in reply.meta else "none", str(reply.meta.get(protocol.WITHHELD, "")))
            continue
        if roster.members[node].declared.get("ehr", 0) < 1:
            note(name, "rejected", "EHR statistics from a site that declared no EHR training cases when it joined")
            continue
        try:
            decoded = json.loads(str(reply.meta[protocol.EHR_STATS_KEY]))
        except ValueError as exc:
            note(name, "rejected", f"ehr-stats is not JSON ({exc})")
            continue
        problems = partial_stats_problems(decoded)
        if problems:
            note(name, "rejected", "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
            continue
        stats.append((name, decoded))
    stats.sort(key=lambda item: item[0])
    if stats:  # the covariates most sites send (ties: the first site by name) are the federation's
        specs = [json.dumps(s["spec"]) for _, s in stats]
        common = max(dict.fromkeys(specs), key=specs.count)
        for (name, s), spec in zip(list(stats), specs):
            if spec != common:
                note(name, "rejected", f"EHR covariates {s['spec']} differ from the federation's {json.loads(common)}")
        stats = [(name, s) for (name, s), spec in zip(stats, specs) if spec == common]
    preprocessor = None
    if stats:
        try:
            preprocessor = EhrPreprocessor.from_partial_stats([s for _, s in stats])
        except ClinicalDataError as exc:  # checked above; kept so that no statistics can stop the run
            for name, _ in stats:
                note(name, "rejected", str(exc))
            stats = []
    for name, _ in stats:
        note(name, "ok")
    run.update_run_info(ehr_stats=[outcomes[name] for name in sorted(outcomes)])
    if preprocessor is None:
        log.info("no usable EHR statistics: the survival head has no EHR branch")
        return None
    log.info("EHR from %s: %d features", ", ".join(n for n, _ in stats), preprocessor.n_features)
    return preprocessor


def prognosis(
    grid: Grid,
    settings: RunSettings,
    run: RunDir,
    backbone: nn.Module,
    installer: Installer,
    adapters: Mapping[str, np.ndarray],
    progress: Progress | None,
) -> PemmaStrategy | None:
    """Phase ``prognosis``: the survival head (+ EHR encoder) over the final adapters, frozen.

    The global tensors are the whole trainable state (adapters + head) so that
    ``adapters/round-<n>.safetensors`` stays one self-contained file per round (the EHR
    preprocessor in its metadata); sites send back only groups ``prognosis`` / ``ehr``.
    Rounds are numbered after the adapt rounds. On resume the phase starts again from the
    final adapters (it is short).
    """
    if settings.prognosis_rounds < 1:
        return None
    preprocessor = agree_ehr_width(grid, settings, run, installer.roster, installer.installed)
    spec = replace(settings.model_spec(), survival=True, ehr_features=preprocessor.n_features if preprocessor else 0)
    torch.manual_seed(settings.seed)
    model = build_model(spec, backbone)
    state = _state(model)
    missing = sorted(set(k for k, g in model.param_groups.items() if g not in ("prognosis", "ehr")) - set(adapters))
    if missing:
        raise AdapterMismatchError(f"prognosis: the final adapters lack {missing[:3]}...")
    state.update({k: np.asarray(v, dtype=np.float32) for k, v in adapters.items()})
    first = max(run.checkpoints("adapt"), default=0) + 1
    run.forget_phase("prognosis")
    extra = preprocessor.to_metadata() if preprocessor else {}
    instruction = Instruction(local_steps=settings.prognosis_steps, lr=settings.prognosis_lr, seed=settings.seed, spec=spec,
                              fingerprint=model.fingerprint, ehr_preprocessor=extra or None)
    return run_phase(grid, settings, run, Phase(
        name="prognosis", state=state, groups=model.param_groups, roi_size=spec.roi_size, instruction=instruction,
        round_offset=first - 1, num_rounds=settings.prognosis_rounds, save=_adapter_saver(model, "prognosis", extra),
        roster=installer.roster, on_round_start=installer, lr_scales=model.lr_scales,
    ), progress)


__all__ = [
    "Installer",
    "Phase",
    "adapt",
    "agree_ehr_width",
    "floating_state",
    "load_floating",
    "pretrain_ct",
    "prognosis",
    "run_phase",
]
