"""pemma ServerApp: federated CT pretraining, then federated PEMMA adaptation.

The recipe (:func:`run_federation`)::

    settings   <- run config ([tool.flwr.app.config], or `pemma simulate` options)
    join       -> every site gives its name and declares its training cases per modality
                  (server.roster; recorded in run.json); sites connecting later join before
                  their first round. The server never writes site data.
    backbone   <- RUN/backbone.safetensors | backbone-file | pretrain-ct (FedAvg over CT sites)
    install    -> every site receives the backbone once and checks its fingerprint
    adapt      -> PEMMA adapters, rounds of: train (modality-aware aggregation) + evaluate
    ehr width  -> sites holding EHR send aggregates of their rows; the server fits the
                  federation's EHR preprocessor (no row ever leaves a site)
    prognosis  -> Cox head (+ EHR encoder) on the frozen adapters, rounds numbered after adapt's
    report     -> RUN/metrics.json, RUN/adapters/round-<n>.safetensors, RUN/report.md

Every phase runs through Flower (:class:`server.strategy.PemmaStrategy`, a FedAvg) by
the one phase runner of :mod:`server.phases`; after every round the global tensors and
the round's metrics are written, so ``resume = true`` continues from the last finished
round with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from torch import nn

from pemma_core import protocol
from pemma_core.config.run import RunSettings
from pemma_core.model.files import AdapterMismatchError, backbone_fingerprint, load_backbone, save_backbone
from pemma_core.model.spec import ModelSpec, build_backbone
from server import records
from server.phases import Progress, adapt, pretrain_ct, prognosis
from server.report import write_report
from server.roster import Roster, one_line_cause
from server.run_dir import RunDir, total_wall_seconds
from server.strategy import RoundRecord

log = logging.getLogger("flwr.pemma")


# ----------------------------------------------------------------------------- steps


def prepare_run_dir(settings: RunSettings) -> RunDir:
    """Create the run folder (or check it matches the run being resumed)."""
    run = RunDir(settings.resolved_run_dir())
    previous = run.read_json(run.run_json, None)
    if settings.resume:
        if previous is None:
            raise FileNotFoundError(f"cannot resume: {run.run_json} does not exist")
        check_same_spec(run, previous.get("model_spec"), settings.model_spec())
    elif run.metrics_json.exists() or run.checkpoints("adapt"):
        raise FileExistsError(f"{run.path} already holds a run: resume it (--resume) or choose another folder")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json(run.run_json, settings.to_json())
    run.start_segment(run.finished_rounds() if settings.resume else None)  # before a resume forgets anything
    if not run.metrics()["run"].get("run_uid"):  # names this run to the sites (their privacy ledgers), kept on resume
        run.update_run_info(run_uid=uuid.uuid4().hex)
    return run


# Spec fields a resumed run may change: how the model computes, not what it computes.
RESUMABLE_SPEC_FIELDS = frozenset({"checkpointing"})


def check_same_spec(run: RunDir, saved: Any, spec: ModelSpec) -> None:
    """Refuse to resume ``run`` with a model spec other than the one it was started with."""
    try:
        previous = ModelSpec.from_json(json.dumps(saved))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot resume {run.path}: {run.run_json} holds no usable model spec ({exc})") from None
    changed = [f"{f.name} {getattr(previous, f.name)!r} -> {getattr(spec, f.name)!r}"
               for f in dataclasses.fields(ModelSpec)
               if f.name not in RESUMABLE_SPEC_FIELDS and getattr(previous, f.name) != getattr(spec, f.name)]
    if changed:
        raise ValueError(f"cannot resume {run.path}: its model spec differs from this run's ({', '.join(changed)}); "
                         "resume with the run's own model settings or start a new run folder")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once at least ``count`` are connected (Flower's own sampling waits the same way)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} site(s) connected after {timeout:.0f} s, min-sites is {count}")
        time.sleep(0.5)
    return nodes


def obtain_backbone(
    grid: Grid, settings: RunSettings, run: RunDir, roster: Roster, progress: Progress | None
) -> tuple[nn.Module, str]:
    """The run's frozen CT backbone and its fingerprint, written to ``RUN/backbone.safetensors``."""
    spec = settings.model_spec()
    if run.backbone_file.exists():
        backbone, file_spec = load_backbone(run.backbone_file)
        source = run.metrics()["run"].get("backbone_source", "run folder")
    elif settings.backbone_file:
        backbone, file_spec = load_backbone(Path(settings.backbone_file).expanduser())
        shutil.copyfile(Path(settings.backbone_file).expanduser(), run.backbone_file)
        source = f"file {settings.backbone_file}"
    else:
        backbone = pretrain_ct(grid, settings, run, roster, progress) if settings.pretrain_rounds else None
        if backbone is None:
            torch.manual_seed(settings.seed)
            backbone = build_backbone(spec)
        file_spec = spec
        save_backbone(run.backbone_file, backbone, spec,
                      provenance={"phase": "pretrain-ct", "rounds": settings.pretrain_rounds})
        source = f"pretrain-ct, {settings.pretrain_rounds} round(s)" if settings.pretrain_rounds else "random init"
    if (file_spec.backbone, file_spec.preset) != (spec.backbone, spec.preset):
        raise AdapterMismatchError(
            f"backbone file is {file_spec.backbone}/{file_spec.preset}, the run asks for {spec.backbone}/{spec.preset}"
        )
    fingerprint = backbone_fingerprint(backbone)
    run.update_run_info(fingerprint=fingerprint, backbone_source=source)
    log.info("backbone %s... (%s)", fingerprint[:12], source)
    return backbone, fingerprint


class BackboneInstaller:
    """Sends the run's backbone to each site once (``query.install_backbone``).

    Called before the adapt phase and again before every round, so a SuperNode that
    connects late still joins and receives it; a node that refused (another fingerprint)
    is not asked again.
    """

    def __init__(self, settings: RunSettings, backbone: nn.Module, fingerprint: str, roster: Roster, run: RunDir) -> None:
        self.settings = settings
        self.roster = roster
        self.run = run
        self.fingerprint = fingerprint
        self.content = records.instruction(
            {k: v.detach().cpu().numpy() for k, v in backbone.state_dict().items()},
            protocol.install_config(settings.model_spec(), fingerprint),
        )
        self.installed: set[int] = set()
        self.refused: dict[int, str] = {}  # node id -> one-line cause

    def __call__(self, grid: Grid) -> set[int]:
        join(grid, self.roster, self.run)
        nodes = [n for n in self.roster.members if n not in self.installed and n not in self.refused]
        if not nodes:
            return self.installed
        messages = [Message(content=self.content, dst_node_id=n, message_type=protocol.INSTALL_BACKBONE.name) for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=self.settings.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.refused[node] = one_line_cause(reply.error.reason)
            else:
                answer, malformed = records.read_reply(reply)
                problems = malformed + protocol.reply_problems(protocol.INSTALL_BACKBONE, answer, (), (1, 1, 1))
                if answer.site != self.roster.members[node].name:
                    problems.append(f"the reply speaks for {str(answer.site)[:80]!r}")
                if answer.meta.get(protocol.FINGERPRINT) != self.fingerprint:
                    problems.append("the reply names another backbone")
                if not problems:
                    self.installed.add(node)
                    continue
                self.refused[node] = "install reply refused: " + "; ".join(problems)
            log.warning("site %s did not take the backbone and will not take part: %s", self.roster.label(node),
                        self.refused[node])
        log.info("backbone installed at %d site(s): %s", len(self.installed),
                 ", ".join(sorted(self.roster.label(n) for n in self.installed)))
        return self.installed


def join(grid: Grid, roster: Roster, run: RunDir) -> Roster:
    """Let every connected node that has not joined yet join, and record the sites in the run info."""
    before = roster.to_json()
    roster(grid)
    if roster.to_json() != before or not run.metrics()["run"].get("sites"):
        joined = roster.to_json()
        run.update_run_info(**joined)  # for the report
        run.write_json(run.run_json, {**run.read_json(run.run_json, {}), **joined})  # what the run was set up with
    return roster


def install_backbone(
    grid: Grid, settings: RunSettings, run: RunDir, roster: Roster, backbone: nn.Module, fingerprint: str
) -> BackboneInstaller:
    """Install the backbone at every site that joined; at least ``min-sites`` must take it."""
    installer = BackboneInstaller(settings, backbone, fingerprint, roster, run)
    if len(installer(grid)) < settings.min_sites:
        raise RuntimeError(f"only {len(installer.installed)} site(s) accepted the backbone, min-sites is {settings.min_sites}")
    return installer


def log_progress(record: RoundRecord) -> None:
    """One line per round: phase, round, wall time, sites (status, loss, Dice)."""
    parts = [site.summary() for site in sorted(record.sites.values(), key=lambda s: s.name)]
    log.info("[%s round %d, %.1f s] %s%s", record.phase, record.round, record.wall_seconds, "; ".join(parts),
             f" ({record.note})" if record.note else "")


def run_federation(grid: Grid, settings: RunSettings, progress: Progress | None = log_progress) -> RunDir:
    """The whole run (see the module docstring); returns the run folder."""
    run = prepare_run_dir(settings)
    if sites := settings.site_config_list():  # a simulation names its sites; deployed nodes name their own
        run.update_run_info(site_configs=[str(p) for p in sites])
    wait_for_nodes(grid, settings.min_sites, settings.round_timeout)
    roster = join(grid, Roster(timeout=settings.round_timeout), run)
    if len(roster.members) < settings.min_sites:
        raise RuntimeError(f"only {len(roster.members)} site(s) could join, min-sites is {settings.min_sites}: "
                           + "; ".join(f"{label}: {cause}" for label, cause in roster.failed.values()))
    backbone, fingerprint = obtain_backbone(grid, settings, run, roster, progress)
    installer = install_backbone(grid, settings, run, roster, backbone, fingerprint)
    adapted = adapt(grid, settings, run, backbone, installer, progress)
    prognosis(grid, settings, run, backbone, installer, adapted.global_state, progress)
    run.finish_segment()
    run.update_run_info(wall_seconds=total_wall_seconds(run.metrics()))  # every segment of the run, resumed ones too
    write_report(run)
    log.info("run folder: %s", run.path)
    return run


# ----------------------------------------------------------------------------- app


def make_server_app(overrides: Mapping[str, Any] | None = None, progress: Progress | None = log_progress) -> ServerApp:
    """A ServerApp running :func:`run_federation`; ``overrides`` take precedence over the run config
    (``pemma simulate`` passes its options this way)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**dict(context.run_config), **dict(overrides or {})}
        settings = RunSettings.from_run_config(config, run_id=context.run_id)
        run_federation(grid, settings, progress)

    return server_app


app = make_server_app()
