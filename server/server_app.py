"""pemma ServerApp: federated CT pretraining, then federated PEMMA adaptation.

The recipe (:func:`run_federation`)::

    settings   <- run config ([tool.flwr.app.config], or `pemma simulate` options)
    sites      -> recorded only when the run config lists them (a simulation); the server
                  never writes site data (a deployed SuperNode names its own site YAML)
    backbone   <- RUN/backbone.safetensors | backbone-file | pretrain-ct (FedAvg over CT sites)
    install    -> every site receives the backbone once and checks its fingerprint
    adapt      -> PEMMA adapters, rounds of: train (modality-aware aggregation) + evaluate
    ehr width  -> sites holding EHR send aggregates of their rows; the server fits the
                  federation's EHR preprocessor (no row ever leaves a site)
    prognosis  -> Cox head (+ EHR encoder) on the frozen adapters, rounds numbered after adapt's
    report     -> RUN/metrics.json, RUN/adapters/round-<n>.safetensors, RUN/report.md

Every phase runs through Flower (:class:`server.strategy.PemmaStrategy`, a FedAvg);
after every round the global tensors and the round's metrics are written, so
``resume = true`` continues from the last finished round with the same result as an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn

from pemma_core import wire
from pemma_core.adapters import (
    AdapterMismatchError,
    backbone_fingerprint,
    load_backbone,
    read_adapter_file,
    save_adapters,
    save_backbone,
    trainable_state,
)
from pemma_core.aggregate import one_group
from pemma_core.clinical import EhrPreprocessor
from pemma_core.model import build_backbone, build_model
from server.run_dir import RunDir, write_report
from server.settings import RunSettings
from server.strategy import ARRAYS_KEY, CONFIG_KEY, META_KEY, PemmaStrategy, RoundRecord, state_to_record

log = logging.getLogger("flwr.pemma")
INSTALL_MESSAGE_TYPE = "query.install_backbone"
EHR_STATS_MESSAGE_TYPE = "query.ehr_stats"

Progress = Callable[[RoundRecord], None]


# ----------------------------------------------------------------------------- steps


def prepare_run_dir(settings: RunSettings) -> RunDir:
    """Create the run folder (or check it matches the run being resumed)."""
    run = RunDir(settings.resolved_run_dir())
    previous = run.read_json(run.run_json, None)
    if settings.resume:
        if previous is None:
            raise FileNotFoundError(f"cannot resume: {run.run_json} does not exist")
        if previous.get("model_spec") != json.loads(json.dumps(settings.model_spec().to_dict())):
            raise ValueError(f"cannot resume {run.path}: its model spec {previous.get('model_spec')} differs from this run's")
    elif run.metrics_json.exists() or run.checkpoints("adapt"):
        raise FileExistsError(f"{run.path} already holds a run: resume it (--resume) or choose another folder")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json(run.run_json, settings.to_json())
    return run


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once at least ``count`` are connected (Flower's own sampling waits the same way)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} site(s) connected after {timeout:.0f} s, min-sites is {count}")
        time.sleep(0.5)
    return nodes


def _floating_state(backbone: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in backbone.state_dict().items() if v.is_floating_point()}


def _load_floating(backbone: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    backbone.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    return backbone


def _sites_of(record: RoundRecord) -> list[str]:
    return sorted(s.name for s in record.sites.values() if s.status == "ok")


def pretrain_ct(grid: Grid, settings: RunSettings, run: RunDir, progress: Progress | None) -> nn.Module:
    """Phase ``pretrain-ct``: FedAvg of the whole CT backbone over the sites holding CT."""
    spec = settings.model_spec()
    torch.manual_seed(settings.seed)
    backbone = build_backbone(spec)
    state = _floating_state(backbone)
    offset = run.last_finished_round("pretrain-ct") if settings.resume else 0
    if offset:
        backbone, _ = load_backbone(run.checkpoint("pretrain-ct", offset))
        state = _floating_state(backbone)
        run.forget_after("pretrain-ct", offset)
        log.info("resuming pretrain-ct after round %d", offset)

    def on_round_end(record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        path = run.checkpoint("pretrain-ct", record.round)
        save_backbone(path, _load_floating(build_backbone(spec), global_state), spec,
                      provenance={"phase": "pretrain-ct", "round": record.round, "sites": _sites_of(record)})
        for n, older in run.checkpoints("pretrain-ct").items():  # keep only the newest full backbone
            if n < record.round:
                older.unlink()
        run.record_round(record.to_json())
        if progress:
            progress(record)

    strategy = PemmaStrategy(
        phase="pretrain-ct",
        global_state=state,
        groups=one_group(state),
        roi_size=spec.roi_size,
        train_config={
            "local-steps": settings.pretrain_steps,
            "lr": settings.pretrain_lr,
            "batch-size": settings.batch_size,
            "seed": settings.seed,
            "model-spec": json.dumps(spec.to_dict()),
        },
        min_sites=settings.min_sites,
        max_update_norm=None,
        wire_dtype=settings.wire_dtype,
        round_offset=offset,
        evaluate=False,
        on_round_end=on_round_end,
    )
    if settings.pretrain_rounds > offset:
        strategy.start(grid, state_to_record(state), num_rounds=settings.pretrain_rounds - offset,
                       timeout=settings.round_timeout, train_config=ConfigRecord(strategy.train_config))
        if not any(r.aggregated for r in strategy.rounds):
            raise RuntimeError("pretrain-ct: no round could aggregate (see the site errors above); no backbone to adapt")
    return _load_floating(backbone, strategy.global_state)


def obtain_backbone(grid: Grid, settings: RunSettings, run: RunDir, progress: Progress | None) -> tuple[nn.Module, str]:
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
        backbone = pretrain_ct(grid, settings, run, progress) if settings.pretrain_rounds else None
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
    connects late still receives it; a node that refused (another fingerprint) is not
    asked again.
    """

    def __init__(self, settings: RunSettings, backbone: nn.Module, fingerprint: str) -> None:
        self.settings = settings
        self.content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in backbone.state_dict().items()}),
                CONFIG_KEY: ConfigRecord(
                    {"model-spec": json.dumps(settings.model_spec().to_dict()), "fingerprint": fingerprint}
                ),
            }
        )
        self.installed: dict[int, str] = {}  # node id -> site name
        self.refused: dict[int, str] = {}  # node id -> reason

    def __call__(self, grid: Grid) -> dict[int, str]:
        nodes = [n for n in grid.get_node_ids() if n not in self.installed and n not in self.refused]
        if not nodes:
            return self.installed
        messages = [Message(content=self.content, dst_node_id=n, message_type=INSTALL_MESSAGE_TYPE) for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=self.settings.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.refused[node] = reply.error.reason
                log.warning("node %d refused the backbone and will not take part: %s", node, reply.error.reason)
                continue
            meta = reply.content.config_records.get(META_KEY, ConfigRecord())
            self.installed[node] = str(meta.get("site", f"node-{node}"))
        log.info("backbone installed at %d site(s): %s", len(self.installed), ", ".join(sorted(self.installed.values())))
        return self.installed


def install_backbone(grid: Grid, settings: RunSettings, backbone: nn.Module, fingerprint: str) -> BackboneInstaller:
    """Install the backbone at every connected site; at least ``min-sites`` must take it."""
    wait_for_nodes(grid, settings.min_sites, settings.round_timeout)
    installer = BackboneInstaller(settings, backbone, fingerprint)
    if len(installer(grid)) < settings.min_sites:
        raise RuntimeError(f"only {len(installer.installed)} site(s) accepted the backbone, min-sites is {settings.min_sites}")
    return installer


def adapt(
    grid: Grid,
    settings: RunSettings,
    run: RunDir,
    backbone: nn.Module,
    installer: BackboneInstaller,
    progress: Progress | None,
) -> PemmaStrategy:
    """Phase ``adapt``: federated PEMMA adapters, checkpointed after every round."""
    spec = settings.model_spec()
    torch.manual_seed(settings.seed)
    model = build_model(spec, backbone)
    state = {k: v.numpy() for k, v in trainable_state(model).items()}
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

    def on_round_end(record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in global_state.items()}
        save_adapters(run.checkpoint("adapt", record.round), model, tensors,
                      provenance={"phase": "adapt", "round": record.round, "sites": _sites_of(record),
                                  "aggregated": record.aggregated})
        run.record_round(record.to_json())
        if progress:
            progress(record)

    strategy = PemmaStrategy(
        phase="adapt",
        global_state=state,
        groups=model.param_groups,
        roi_size=spec.roi_size,
        train_config={
            "local-steps": settings.local_steps,
            "lr": settings.lr,
            "batch-size": settings.batch_size,
            "seed": settings.seed,
            "model-spec": json.dumps(spec.to_dict()),
            "fingerprint": model.fingerprint,
        },
        min_sites=settings.min_sites,
        max_update_norm=settings.max_update_norm or None,
        wire_dtype=settings.wire_dtype,
        round_offset=offset,
        evaluate=settings.evaluate,
        on_round_end=on_round_end,
        on_round_start=installer,
    )
    strategy.node_names.update(installer.installed)
    if settings.rounds > offset:
        strategy.start(grid, state_to_record(state), num_rounds=settings.rounds - offset, timeout=settings.round_timeout,
                       train_config=ConfigRecord(strategy.train_config))
    return strategy


def agree_ehr_width(grid: Grid, settings: RunSettings, installer: BackboneInstaller) -> EhrPreprocessor | None:
    """The federation's EHR preprocessor, fitted from the sites' :func:`partial_stats`
    (aggregates of their training rows: counts, sums, centred sums of squares, category
    sets); ``None`` when no site holds EHR (the model then has no EHR branch)."""
    nodes = sorted(installer.installed)
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type=EHR_STATS_MESSAGE_TYPE) for n in nodes]
    stats: list[tuple[str, dict[str, Any]]] = []
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        name = installer.installed.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        if reply.has_error():
            log.warning("EHR statistics of site %s failed; its EHR is left out: %s", name, reply.error.reason)
            continue
        meta = reply.content.config_records.get(META_KEY, ConfigRecord())
        problems = wire.payload_problems(reply.content.array_records.get(ARRAYS_KEY, {}), (), (1, 1, 1), None, dict(meta),
                                         config_keys=wire.EHR_STATS_REPLY_KEYS)
        if problems:
            log.warning("EHR statistics of site %s ignored: %s", name, "; ".join(problems))
            continue
        if wire.EHR_STATS_KEY in meta:
            stats.append((name, json.loads(str(meta[wire.EHR_STATS_KEY]))))
    if not stats:
        log.info("no site holds EHR: the survival head has no EHR branch")
        return None
    stats.sort(key=lambda item: item[0])
    specs = {name: [tuple(item) for item in s["spec"]] for name, s in stats}
    first_name, first = next(iter(specs.items()))
    for name, spec in specs.items():
        if spec != first:
            raise ValueError(f"EHR covariates differ between sites: {first_name} has {first}, {name} has {spec}")
    preprocessor = EhrPreprocessor.from_partial_stats([s for _, s in stats])
    log.info("EHR from %s: %d features", ", ".join(n for n, _ in stats), preprocessor.n_features)
    return preprocessor


def prognosis(
    grid: Grid,
    settings: RunSettings,
    run: RunDir,
    backbone: nn.Module,
    installer: BackboneInstaller,
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
    preprocessor = agree_ehr_width(grid, settings, installer)
    spec = replace(settings.model_spec(), survival=True, ehr_features=preprocessor.n_features if preprocessor else 0)
    torch.manual_seed(settings.seed)
    model = build_model(spec, backbone)
    state = {k: v.numpy() for k, v in trainable_state(model).items()}
    missing = sorted(set(k for k, g in model.param_groups.items() if g not in ("prognosis", "ehr")) - set(adapters))
    if missing:
        raise AdapterMismatchError(f"prognosis: the final adapters lack {missing[:3]}...")
    state.update({k: np.asarray(v, dtype=np.float32) for k, v in adapters.items()})
    first = max(run.checkpoints("adapt"), default=0) + 1
    run.forget_phase("prognosis")
    extra = preprocessor.to_metadata() if preprocessor else {}

    def on_round_end(record: RoundRecord, global_state: dict[str, np.ndarray]) -> None:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in global_state.items()}
        save_adapters(run.checkpoint("prognosis", record.round), model, tensors, extra_metadata=extra,
                      provenance={"phase": "prognosis", "round": record.round, "sites": _sites_of(record),
                                  "aggregated": record.aggregated})
        run.record_round(record.to_json())
        if progress:
            progress(record)

    config: dict[str, Any] = {
        "local-steps": settings.prognosis_steps,
        "lr": settings.prognosis_lr,
        "seed": settings.seed,
        "model-spec": json.dumps(spec.to_dict()),
        "fingerprint": model.fingerprint,
    }
    if preprocessor:
        config["ehr-preprocessor"] = json.dumps(preprocessor.to_metadata())
    strategy = PemmaStrategy(
        phase="prognosis",
        global_state=state,
        groups=model.param_groups,
        roi_size=spec.roi_size,
        train_config=config,
        min_sites=settings.min_sites,
        max_update_norm=None,
        wire_dtype=settings.wire_dtype,
        round_offset=first - 1,
        evaluate=False,
        on_round_end=on_round_end,
        on_round_start=installer,
    )
    strategy.node_names.update(installer.installed)
    strategy.start(grid, state_to_record(state), num_rounds=settings.prognosis_rounds, timeout=settings.round_timeout,
                   train_config=ConfigRecord(strategy.train_config))
    return strategy


def log_progress(record: RoundRecord) -> None:
    """One line per round: phase, round, wall time, sites (status, loss, Dice)."""
    parts = []
    for site in sorted(record.sites.values(), key=lambda s: s.name):
        text = f"{site.name}: {site.status}"
        if site.loss is not None:
            text += f" loss {site.loss:.3f}"
        if site.dice:
            text += " Dice " + "/".join(f"{m} {v:.3f}" for m, v in site.dice.items())
        if site.c_index is not None:
            text += f" C-index {site.c_index:.3f}"
        parts.append(text)
    log.info("[%s round %d, %.1f s] %s%s", record.phase, record.round, record.wall_seconds, "; ".join(parts),
             f" ({record.note})" if record.note else "")


def run_federation(grid: Grid, settings: RunSettings, progress: Progress | None = log_progress) -> RunDir:
    """The whole run (see the module docstring); returns the run folder."""
    run = prepare_run_dir(settings)
    started = time.perf_counter()
    if sites := settings.site_config_list():  # a simulation names its sites; deployed nodes name their own
        run.update_run_info(sites=[str(p) for p in sites])
    backbone, fingerprint = obtain_backbone(grid, settings, run, progress)
    installer = install_backbone(grid, settings, backbone, fingerprint)
    adapted = adapt(grid, settings, run, backbone, installer, progress)
    prognosis(grid, settings, run, backbone, installer, adapted.global_state, progress)
    run.update_run_info(wall_seconds=time.perf_counter() - started)
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
        config["run-dir"] = str(config.get("run-dir", "runs/flwr-{run_id}")).replace("{run_id}", str(context.run_id))
        settings = RunSettings.from_run_config(config)
        run_federation(grid, settings, progress)

    return server_app


app = make_server_app()
