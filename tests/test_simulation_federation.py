"""The pemma ServerApp + ClientApp on a phantom federation, in one process (InProcessGrid).

Covers what crosses the wire (every message inspected), faulty sites (raising, NaN,
extra tensor, min-sites), resume equivalence, and the run folder's checkpoints.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message

from client.client_app import make_client_app
from pemma_core import wire
from pemma_core.adapters import read_adapter_file, save_backbone
from pemma_core.model import build_backbone
from pemma_core.phantoms import make_federation
from server.server_app import run_federation
from server.settings import RunSettings
from simulation.inprocess import InProcessGrid
from simulation.run_dir import RunDir

logging.getLogger("flwr").setLevel(logging.WARNING)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("federation")
    return list(make_federation(root / "fed", n_sites=3, cases_per_site=3, seed=0, test_cases=0).site_yamls)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = RunSettings()
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("backbone") / "backbone.safetensors"
    save_backbone(path, build_backbone(settings.model_spec()), settings.model_spec())
    return path


def settings_for(run_dir: Path, federation: list[Path], **changes) -> RunSettings:
    values = dict(
        run_dir=str(run_dir), site_configs=",".join(map(str, federation)), rounds=1, local_steps=1, batch_size=1, pretrain_rounds=0,
        evaluate=False, min_sites=2,
    )
    values.update(changes)
    return RunSettings(**values)


def run(
    settings: RunSettings, mods: list | None = None, node_configs: list[dict] | None = None, disconnected: set[int] = frozenset()
) -> tuple[RunDir, InProcessGrid]:
    n = len(settings.site_config_list())
    configs = node_configs or [{"partition-id": i, "num-partitions": n} for i in range(n)]
    grid = InProcessGrid(make_client_app(mods=mods), configs, settings.to_run_config())
    grid.disconnected = set(disconnected)
    return run_federation(grid, settings, progress=None), grid


def faulty(kind: str, partition: int) -> Callable:
    """A Flower mod making the site of ``partition`` misbehave in its train replies."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        if context.node_config.get("partition-id") != partition or msg.metadata.message_type != "train":
            return call_next(msg, context)
        if kind == "raise":
            raise RuntimeError("the site's GPU caught fire")
        reply = call_next(msg, context)
        arrays = reply.content["arrays"]
        if kind == "nan":
            key = sorted(arrays.keys())[0]
            arrays[key] = Array(np.full_like(arrays[key].numpy(), np.nan))
        elif kind == "extra":
            arrays["net.vit.patch_embedding.frozen_copy"] = Array(np.zeros((4, 4), dtype=np.float32))
        return reply

    return mod


def site_entries(run: RunDir, round_: int = 1) -> dict[str, dict]:
    record = next(r for r in run.metrics()["rounds"] if r["round"] == round_)
    return {s["name"]: s for s in record["sites"]}


# ------------------------------------------------------------------------- wire


def test_only_adapters_counts_and_metrics_cross_the_wire(tmp_path: Path, federation: list[Path]) -> None:
    settings = settings_for(tmp_path / "run", federation, pretrain_rounds=1, pretrain_steps=1, rounds=1, local_steps=3, evaluate=True,
                            wire_dtype="float16")
    run_dir, grid = run(settings)
    case_ids = []
    for site in federation:
        with (site.parent / "manifest.csv").open() as stream:
            case_ids += [row["case_id"] for row in csv.DictReader(stream)]
    assert case_ids
    roi = settings.model_spec().roi_size
    adapter_keys = set(read_adapter_file(run_dir.checkpoint("adapt", 1))[0])
    groups = json.loads(read_adapter_file(run_dir.checkpoint("adapt", 1))[1]["groups"])
    replies = [x for x in grid.transcript if x.reply is not None]
    assert {x.instruction.metadata.message_type for x in replies} == {
        "train.pretrain_ct", "query.install_backbone", "train", "evaluate"
    }
    for exchange in replies:
        reply = exchange.reply
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        sent_keys = set(exchange.instruction.content["arrays"].keys())
        arrays = reply.content["arrays"]
        metrics = dict(reply.content["metrics"])
        meta = dict(reply.content["meta"])
        assert set(reply.content.keys()) == {"arrays", "metrics", "meta"}
        assert set(arrays.keys()) <= sent_keys
        assert wire.payload_problems(arrays, sent_keys, roi, metrics, meta, case_ids) == []
        for key, array in arrays.items():
            assert not wire.looks_like_image(array.shape, roi)
            assert array.dtype == "float16"  # wire-dtype float16, both phases
        if exchange.instruction.metadata.message_type == "train":
            assert set(arrays.keys()) <= adapter_keys
            sent_groups = {groups[k] for k in arrays.keys()}
            assert sent_groups == {k.removeprefix("examples-") for k in metrics if k.startswith("examples-")}
            if meta["site"] == "site-1":  # CT only: never PET or fusion tensors
                assert sent_groups == {"shared", "ct"}
            else:
                assert sent_groups <= {"shared", "ct", "pet", "fusion"}
    bytes_up = {s["name"]: s["bytes_up"] for s in site_entries(run_dir).values()}
    assert 0 < bytes_up["site-1"] < bytes_up["site-2"]


# ------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [("raise", "failed", "caught fire"), ("nan", "rejected", "non-finite"), ("extra", "rejected", "frozen_copy")],
)
def test_a_faulty_site_is_left_out_and_the_round_completes(
    tmp_path: Path, federation: list[Path], backbone_file: Path, kind: str, status: str, reason: str
) -> None:
    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file))
    run_dir, _ = run(settings, mods=[faulty(kind, partition=2)])
    record = run_dir.metrics()["rounds"][0]
    assert record["aggregated"] is True
    sites = {s["node_id"]: s for s in record["sites"]}
    assert sites[3]["status"] == status and reason in sites[3]["reason"]
    assert [sites[n]["status"] for n in (1, 2)] == ["ok", "ok"]
    provenance = json.loads(read_adapter_file(run_dir.checkpoint("adapt", 1))[1]["provenance"])
    assert provenance["sites"] == ["site-1", "site-2"]
    assert reason in run_dir.report.read_text()


def test_a_silent_site_is_left_out(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file))
    run_dir, _ = run(settings, disconnected={2})
    record = run_dir.metrics()["rounds"][0]
    sites = {s["node_id"]: s for s in record["sites"]}
    assert record["aggregated"] is True
    assert sites[2]["status"] == "failed" and "no reply" in sites[2]["reason"]


def test_min_sites_not_met_keeps_the_global_adapters(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), min_sites=3)
    run_dir, _ = run(settings, mods=[faulty("raise", partition=0)])
    record = run_dir.metrics()["rounds"][0]
    assert record["aggregated"] is False and "min-sites is 3" in record["note"]
    before, _ = read_adapter_file(run_dir.checkpoint("adapt", 0))
    after, _ = read_adapter_file(run_dir.checkpoint("adapt", 1))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_site_with_another_backbone_refuses_to_join(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file))
    other = tmp_path / "other.safetensors"
    torch.manual_seed(99)
    save_backbone(other, build_backbone(settings.model_spec()), settings.model_spec())
    configs = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    configs[0]["backbone-file"] = str(other)
    run_dir, grid = run(settings, node_configs=configs)
    install = [x for x in grid.transcript if x.instruction.metadata.message_type == "query.install_backbone"]
    refused = [x.reply for x in install if x.reply.has_error()]
    assert len(refused) == 1 and "fingerprint" in refused[0].error.reason and "refusing" in refused[0].error.reason
    sites = {s["node_id"]: s for s in run_dir.metrics()["rounds"][0]["sites"]}
    assert sites[1]["status"] == "failed" and "refusing to train" in sites[1]["reason"]
    assert run_dir.metrics()["rounds"][0]["aggregated"] is True


# ------------------------------------------------------------------------- resume


def test_resume_ends_with_the_same_adapters(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    common = dict(backbone_file=str(backbone_file), rounds=2, seed=3)
    straight, _ = run(settings_for(tmp_path / "straight", federation, **common))
    settings = settings_for(tmp_path / "resumed", federation, **{**common, "rounds": 1})
    run(settings)
    with pytest.raises(FileExistsError, match="resume"):  # a run folder is never overwritten
        run(settings)
    resumed, _ = run(settings_for(tmp_path / "resumed", federation, **common, resume=True))
    assert [r["round"] for r in resumed.metrics()["rounds"]] == [1, 2]
    a, meta_a = read_adapter_file(straight.checkpoint("adapt", 2))
    b, meta_b = read_adapter_file(resumed.checkpoint("adapt", 2))
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    one, _ = read_adapter_file(straight.checkpoint("adapt", 1))
    assert any(not torch.equal(one[k], a[k]) for k in a)  # round 2 did change something
