"""The pemma ServerApp + ClientApp on a phantom federation, in one process (InProcessGrid).

Covers what crosses the wire (every message inspected, prognosis phase included), faulty
sites (raising, NaN, extra tensor, min-sites), resume equivalence, the run folder's
checkpoints, and the prognosis phase (per-group head aggregation, EHR agreement, predict).
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
from safetensors.torch import load_file

from client.client_app import make_client_app
from pemma_core import protocol
from pemma_core.config.run import RunSettings
from pemma_core.model.files import read_adapter_file, save_backbone
from pemma_core.model.spec import build_backbone
from pemma_core.phantoms.writer import make_federation
from server.run_dir import RunDir
from server.server_app import prepare_run_dir, run_federation
from simulation.inprocess import InProcessGrid

pytestmark = pytest.mark.slow  # whole federations in-process

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
        evaluate=False, min_sites=2, prognosis_rounds=0,
    )
    values.update(changes)
    return RunSettings(**values)


def run(
    settings: RunSettings, mods: list | None = None, node_configs: list[dict] | None = None, disconnected: set[int] = frozenset(),
    workers: int = 1,
) -> tuple[RunDir, InProcessGrid]:
    n = len(settings.site_config_list())
    configs = node_configs or [{"partition-id": i, "num-partitions": n} for i in range(n)]
    grid = InProcessGrid(make_client_app(mods=mods), configs, settings.to_run_config(), workers=workers)
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
                            wire_dtype="float16", prognosis_rounds=1, prognosis_steps=2)
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
        "query.join", "train.pretrain_ct", "query.install_backbone", "train", "evaluate", "query.ehr_stats", "train.prognosis"
    }
    head_groups = json.loads(read_adapter_file(run_dir.checkpoint("prognosis", 2))[1]["groups"])
    for exchange in replies:
        reply = exchange.reply
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        sent_keys = set(exchange.instruction.content.array_records.get("arrays", {}).keys())
        arrays = reply.content["arrays"]
        metrics = dict(reply.content["metrics"])
        meta = dict(reply.content["meta"])
        assert set(reply.content.keys()) == {"arrays", "metrics", "meta"}
        assert set(arrays.keys()) <= sent_keys
        kind = next(k for k in protocol.REPLIES if k.name == exchange.instruction.metadata.message_type)
        reply_dict = protocol.Reply({k: a.numpy() for k, a in arrays.items()}, metrics, meta)
        assert protocol.reply_problems(kind, reply_dict, sent_keys, roi, case_ids) == []
        for key, array in arrays.items():
            assert not protocol.looks_like_image(array.shape, roi)
            assert array.dtype == "float16"  # wire-dtype float16, both phases
        if exchange.instruction.metadata.message_type == "train":
            assert set(arrays.keys()) <= adapter_keys
            sent_groups = {groups[k] for k in arrays.keys()}
            assert sent_groups == {k.removeprefix("examples-") for k in metrics if k.startswith("examples-")}
            if meta["site"] == "site-1":  # CT only: never PET or fusion tensors
                assert sent_groups == {"shared", "ct"}
            else:
                assert sent_groups <= {"shared", "ct", "pet", "fusion"}
        if exchange.instruction.metadata.message_type == "query.ehr_stats":  # aggregates, only where EHR is held
            assert ("ehr-stats" in meta) == (meta["site"] == "site-3") and not arrays
        if exchange.instruction.metadata.message_type == "train.prognosis":
            sent_groups = {head_groups[k] for k in arrays.keys()}
            assert sent_groups == {k.removeprefix("examples-") for k in metrics if k.startswith("examples-")}
            # the CT-only / no-EHR sites leave the EHR term out: never an ehr tensor
            assert sent_groups == ({"prognosis", "ehr"} if meta["site"] == "site-3" else {"prognosis"})
            assert all(isinstance(v, (int, float)) for v in metrics.values())  # no per-patient list
    bytes_up = {s["name"]: s["bytes_up"] for s in site_entries(run_dir).values()}
    assert 0 < bytes_up["site-1"] < bytes_up["site-2"]


def test_prognosis_round_aggregates_the_head_and_predict_gives_a_risk(
    tmp_path: Path, federation: list[Path], backbone_file: Path, capsys: pytest.CaptureFixture
) -> None:
    from pemma_core.aggregation import SiteUpdate, aggregate_adapters
    from pemma_core.cli import main
    from pemma_core.data.clinical import METADATA_KEY

    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), prognosis_rounds=1,
                            prognosis_steps=3)
    run_dir, grid = run(settings)
    record = run_dir.metrics()["rounds"][-1]
    assert (record["phase"], record["round"], record["aggregated"]) == ("prognosis", 2, True)
    tensors, metadata = read_adapter_file(run_dir.checkpoint("prognosis", 2))
    spec = json.loads(metadata["spec"])
    assert spec["survival"] and spec["ehr_features"] > 0 and METADATA_KEY in metadata
    groups = json.loads(metadata["groups"])
    exchanges = [x for x in grid.transcript if x.instruction.metadata.message_type == "train.prognosis"]
    sent = {k: a.numpy() for k, a in exchanges[0].instruction.content["arrays"].items()}
    updates = sorted(
        (SiteUpdate(site=x.reply.content["meta"]["site"],
                    tensors={k: a.numpy() for k, a in x.reply.content["arrays"].items()},
                    examples={k.removeprefix("examples-"): int(v) for k, v in x.reply.content["metrics"].items()
                              if k.startswith("examples-")})
         for x in exchanges),
        key=lambda u: u.site,
    )
    expected = aggregate_adapters(sent, [u for u in updates if u.tensors], groups)
    for key, value in expected.items():
        np.testing.assert_allclose(tensors[key].numpy(), value, rtol=1e-6, atol=1e-7)
    adapt_final, _ = read_adapter_file(run_dir.checkpoint("adapt", 1))
    assert all(torch.equal(adapt_final[k], tensors[k]) for k in adapt_final)  # adapters frozen
    assert any(groups[k] == "ehr" for k in updates[2].tensors) and not any(groups[k] == "ehr" for k in updates[0].tensors)
    assert "## prognosis" in run_dir.report.read_text() and "C-index" in run_dir.report.read_text()

    case = next((federation[2].parent / "cases").iterdir())
    mask = tmp_path / "mask.nii.gz"
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir.path), "--ct", str(case / "ct.nii.gz"), "--pet", str(case / "pet.nii.gz"),
                 "--out", str(mask), "--clinical", str(federation[2].parent / "clinical.csv"), "--case-id", case.name]) == 0
    out = capsys.readouterr().out
    assert "risk " in out and "EHR yes" in out
    risk = json.loads((tmp_path / "mask.risk.json").read_text())
    assert np.isfinite(risk["risk"]) and risk["ehr"] == "yes"
    assert main(["predict", "--run", str(run_dir.path), "--ct", str(case / "ct.nii.gz"), "--out", str(mask),
                 "--overwrite"]) == 0
    assert "EHR omitted" in capsys.readouterr().out


def test_a_site_builds_its_adapt_model_when_the_backbone_arrives(
    tmp_path: Path, federation: list[Path], backbone_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the first adapt round: that round's time is the sites' training, not model building."""
    import inspect

    from client import task

    built: list[str] = []

    def build_model(*args, **kwargs):
        built.append(next((f.function for f in inspect.stack() if f.function in ("install_backbone_site", "train_site")), "?"))
        return original(*args, **kwargs)

    original = task.build_model
    monkeypatch.setattr(task, "build_model", build_model)
    monkeypatch.setattr(task, "_MODELS", type(task._MODELS)())
    run(settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), rounds=2))
    assert built == ["install_backbone_site"] * 3


def test_the_pooled_c_index_comes_with_its_bootstrap_interval(tmp_path: Path, backbone_file: Path) -> None:
    """Sites with held-out pairs send the counts and their bootstrap replicates; the server pools
    both: the point estimate from the summed counts, the interval from the summed replicates."""
    from pemma_core.training.survival import pooled_bootstrap_interval

    fed = list(make_federation(tmp_path / "fed", n_sites=3, cases_per_site=12, seed=0, test_cases=0).site_yamls)
    run_dir, grid = run(settings_for(tmp_path / "run", fed, backbone_file=str(backbone_file), prognosis_rounds=1,
                                     prognosis_steps=2))
    record = run_dir.metrics()["rounds"][-1]
    replies = [x.reply.content["metrics"] for x in grid.transcript
               if x.instruction.metadata.message_type == "train.prognosis" and "c-score" in x.reply.content["metrics"]]
    assert len(replies) >= 2
    score, pairs = (sum(int(r[k]) for r in replies) for k in ("c-score", "c-pairs"))
    train = record["train_metrics"]
    assert train["c-index-pairs"] == pairs and train["c-index-pooled"] == pytest.approx(score / (2 * pairs))
    boot = [(list(r["c-boot-scores"]), list(r["c-boot-pairs"])) for r in replies]
    assert (train["c-index-pooled-low"], train["c-index-pooled-high"]) == pytest.approx(pooled_bootstrap_interval(boot))
    assert 0 <= train["c-index-pooled-low"] < train["c-index-pooled-high"] <= 1
    assert "95% bootstrap interval" in run_dir.report.read_text()
    assert all("c-boot-scores" not in json.dumps(s) for s in record["sites"])  # 400 counts per site stay out of metrics.json


def test_without_an_ehr_site_the_head_has_no_ehr_branch(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    settings = settings_for(tmp_path / "run", federation[:2], backbone_file=str(backbone_file), prognosis_rounds=1,
                            prognosis_steps=1)
    run_dir, _ = run(settings)
    _, metadata = read_adapter_file(run_dir.checkpoint("prognosis", 2))
    assert json.loads(metadata["spec"])["ehr_features"] == 0 and "ehr" not in json.loads(metadata["groups"]).values()


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
    assert record["aggregated"] is True and sorted(s["node_id"] for s in record["sites"]) == [1, 3]
    silent = run_dir.metrics()["run"]["join_failures"]
    assert [(f["node_id"], f["cause"]) for f in silent] == [(2, "no reply to the join request")]


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


def test_a_deployed_federation_gets_no_phantom_data_from_the_server(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    """Deployment: ``site-configs`` empty, every SuperNode names its own site (node config ``site-config``)."""
    phantom_dir = tmp_path / "phantom-federation"
    settings = settings_for(tmp_path / "run", [], backbone_file=str(backbone_file), federation_dir=str(phantom_dir))
    run_dir, _ = run(settings, node_configs=[{"site-config": str(p)} for p in federation])
    assert run_dir.metrics()["rounds"][0]["aggregated"] is True
    assert not phantom_dir.exists() and not (run_dir.path / "federation").exists()
    info = run_dir.metrics()["run"]
    assert "site_configs" not in info  # no site path the run did not use
    assert [s["name"] for s in info["sites"]] == ["site-1", "site-2", "site-3"]  # each joined under its own name
    from pemma_core.config.site import load_site_config

    site = load_site_config(federation[0])  # the run records how its sites prepare data (predict needs it)
    assert info["preprocessing"] == {"spacing": list(site.spacing), "ct_window": list(site.ct_window),
                                     "pet_suv_max": site.pet_suv_max, "differs": []}
    assert json.loads(run_dir.run_json.read_text())["preprocessing"] == info["preprocessing"]


# ------------------------------------------------------------------------- resume


def test_resume_ends_with_the_same_adapters(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    """A resumed run sends train messages for its unfinished rounds only, leaves the
    finished rounds' files as they were, and ends where an uninterrupted run ends."""
    common = dict(backbone_file=str(backbone_file), rounds=2, seed=3)
    straight, _ = run(settings_for(tmp_path / "straight", federation, **common))
    settings = settings_for(tmp_path / "resumed", federation, **{**common, "rounds": 1})
    first, _ = run(settings)
    with pytest.raises(FileExistsError, match="resume"):  # a run folder is never overwritten
        run(settings)
    finished = [first.checkpoint("adapt", 0), first.checkpoint("adapt", 1), first.backbone_file]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in finished}
    round_1 = first.metrics()["rounds"][0]
    resumed, grid = run(settings_for(tmp_path / "resumed", federation, **common, resume=True))
    train = [x.instruction for x in grid.transcript if x.instruction.metadata.message_type == "train"]
    assert sorted(m.metadata.dst_node_id for m in train) == [1, 2, 3]
    assert {m.content["config"]["round"] for m in train} == {2}  # round 1 is not trained again
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in finished} == before
    assert [r["round"] for r in resumed.metrics()["rounds"]] == [1, 2] and resumed.metrics()["rounds"][0] == round_1
    a, meta_a = read_adapter_file(straight.checkpoint("adapt", 2))
    b, meta_b = read_adapter_file(resumed.checkpoint("adapt", 2))
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    one, _ = read_adapter_file(straight.checkpoint("adapt", 1))
    assert any(not torch.equal(one[k], a[k]) for k in a)  # round 2 did change something


def test_a_resumed_run_carries_the_server_optimiser_on(tmp_path: Path, federation: list[Path],
                                                       backbone_file: Path) -> None:
    """FedAdam's moments are kept with the round: a run resumed after round 1 ends with the
    adapters of an uninterrupted one, not with those of a first FedAdam step taken again."""
    common = dict(backbone_file=str(backbone_file), rounds=2, seed=3, server_optimizer="fedadam")
    straight, _ = run(settings_for(tmp_path / "straight", federation, **common))
    run(settings_for(tmp_path / "resumed", federation, **{**common, "rounds": 1}))
    resumed, _ = run(settings_for(tmp_path / "resumed", federation, **common, resume=True))
    a, _ = read_adapter_file(straight.checkpoint("adapt", 2))
    b, _ = read_adapter_file(resumed.checkpoint("adapt", 2))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_each_site_carries_its_optimiser_from_round_to_round(tmp_path: Path, federation: list[Path],
                                                            backbone_file: Path) -> None:
    """A site's AdamW moments outlive the round (in its cache, per run): after two rounds the step
    count of its CT tensors is the number of CT steps of both rounds, not of the last only."""
    from client import task
    from pemma_core.config.site import load_site_config
    from pemma_core.training.optimizer import load_moments

    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), rounds=2, local_steps=3)
    run_dir, _ = run(settings)
    uid = run_dir.metrics()["run"]["run_uid"]
    for path in federation:
        site = load_site_config(path)
        kept = load_moments(task._optimizer_file(site, uid), _owner_of(run_dir), round_=3)
        assert kept is not None, site.name
        ct_steps = [site_entries(run_dir, r)[site.name]["examples"].get("ct", 0) for r in (1, 2)]  # batch size 1
        steps = {float(v) for k, v in kept.items() if k.startswith("step/") and ".ct_adapter." in k}
        assert steps == ({float(sum(ct_steps))} if sum(ct_steps) else set()), (site.name, ct_steps)
        if site.modalities == ("ct",):  # a CT-only site takes every step in CT: 3 per round
            assert ct_steps == [3, 3]


def _owner_of(run_dir: RunDir) -> str:
    """The owner a site's moments name: the run's backbone fingerprint and model spec."""
    from simulation.predict import load_run_model

    model = load_run_model(run_dir.path, 1)
    return f"{model.fingerprint}:{model.spec.to_json()}"


def test_sites_side_by_side_give_the_same_run_bit_for_bit(tmp_path: Path, federation: list[Path]) -> None:
    """Three site workers (threads) against one: every phase's tensors and every reported metric
    are identical, so parallel sites change the time, never the result. (Both at one intra-op
    thread per site, as three workers on this machine get: PyTorch's CPU kernels sum in
    another order with another thread count.)"""
    common = dict(pretrain_rounds=1, pretrain_steps=2, rounds=2, local_steps=2, evaluate=True, prognosis_rounds=1,
                  prognosis_steps=2, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, _ = run(settings_for(tmp_path / "one", federation, **common))
        three, grid = run(settings_for(tmp_path / "three", federation, **common), workers=3)
    finally:
        torch.set_num_threads(threads)
    assert {grid.worker_of(n) for n in grid.get_node_ids()} == {0, 1, 2}
    files = [lambda r: r.checkpoint("adapt", 2), lambda r: r.checkpoint("prognosis", 3)]
    for where in files:
        a, b = read_adapter_file(where(one))[0], read_adapter_file(where(three))[0]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(one.backbone_file), load_file(three.backbone_file)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    def reported(r: RunDir) -> list:
        return [(x["phase"], x["round"], x.get("eval_metrics"), x.get("train_metrics"),
                 sorted((s["name"], s.get("loss"), s.get("dice"), s.get("c_index")) for s in x["sites"]))
                for x in r.metrics()["pretrain_rounds"] + r.metrics()["rounds"]]

    assert reported(one) == reported(three)
    assert any(x[2] for x in reported(one))  # evaluation ran, so the Dice compared are real


def test_a_raising_site_among_parallel_workers_becomes_its_error_reply(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    run_dir, grid = run(settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file)),
                        mods=[faulty("raise", partition=2)], workers=2)
    assert grid.worker_of(1) == grid.worker_of(3) != grid.worker_of(2)  # the raising node shares its worker
    record = run_dir.metrics()["rounds"][0]
    sites = {s["node_id"]: s for s in record["sites"]}
    assert sites[3]["status"] != "ok" and "GPU caught fire" in sites[3]["reason"]
    assert [sites[n]["status"] for n in (1, 2)] == ["ok", "ok"] and record["aggregated"] is True


def test_resume_with_another_model_spec_is_refused(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file))
    run_dir = prepare_run_dir(settings)
    saved = run_dir.run_json.read_bytes()
    changed = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), rank=4, alpha=8, resume=True)
    with pytest.raises(ValueError, match=r"cannot resume .*model spec differs.*\(rank 8 -> 4, alpha 16 -> 8\)"):
        run(changed)
    assert run_dir.run_json.read_bytes() == saved  # the run folder is left as it was
    assert prepare_run_dir(settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), resume=True))


# ------------------------------------------------------------------------- joining


def test_a_site_whose_yaml_fails_is_named_with_its_cause_and_sent_nothing_more(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    broken = federation[1].with_name("typo.yaml")  # beside site-2's own YAML: its relative paths still hold
    broken.write_text(federation[1].read_text().replace("spacing:", "spacnig:"))
    sites = [federation[0], broken, federation[2]]
    settings = settings_for(tmp_path / "run", sites, backbone_file=str(backbone_file), rounds=2)
    run_dir, grid = run(settings)
    failure = run_dir.metrics()["run"]["join_failures"]
    assert len(failure) == 1 and failure[0]["site"].startswith("site-2")
    assert "unknown key 'spacnig'" in failure[0]["cause"] and "\x1b[" not in failure[0]["cause"]
    assert "\n" not in failure[0]["cause"]
    to_node_2 = [x.instruction.metadata.message_type for x in grid.transcript if x.instruction.metadata.dst_node_id == 2]
    assert to_node_2 == ["query.join"]  # asked to join once, then nothing
    assert all(r["aggregated"] for r in run_dir.metrics()["rounds"])


def test_two_nodes_claiming_one_name_are_both_reported(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    settings = settings_for(tmp_path / "run", [], backbone_file=str(backbone_file))
    configs = [{"site-config": str(federation[0])}, {"site-config": str(federation[0])}, {"site-config": str(federation[1])}]
    run_dir, _ = run(settings, node_configs=configs)
    info = run_dir.metrics()["run"]
    assert info["duplicate_names"] == {"site-1": [1, 2]}
    assert sorted(s["label"] for s in info["sites"]) == ["site-1 (node 1)", "site-1 (node 2)", "site-2"]
    assert sorted(s["name"] for s in run_dir.metrics()["rounds"][0]["sites"]) == ["site-1 (node 1)", "site-1 (node 2)", "site-2"]
    assert json.loads(run_dir.run_json.read_text())["duplicate_names"] == {"site-1": [1, 2]}


def test_every_reply_a_site_sends_is_in_its_audit_log(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    from pemma_core import audit
    from pemma_core.config.site import load_site_config

    for site in federation:  # a fresh log per test: the module's federation is shared
        audit.audit_path(load_site_config(site).cache_dir).unlink(missing_ok=True)
    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), rounds=2, evaluate=True)
    _, grid = run(settings)
    site = load_site_config(federation[1])
    entries, problems = audit.read_audit(audit.audit_path(site.cache_dir))
    sent = [x for x in grid.transcript if x.instruction.metadata.dst_node_id == 2 and x.reply is not None]
    assert problems == [] and len(entries) == len(sent)
    assert [e["message_type"] for e in entries] == [x.instruction.metadata.message_type for x in sent]
    for entry, exchange in zip(entries, sent):
        arrays = exchange.reply.content["arrays"]
        assert {t["name"]: (t["bytes"], t["dtype"]) for t in entry["tensors"]} == {
            k: (a.numpy().nbytes, str(a.numpy().dtype)) for k, a in arrays.items()}
        assert entry["metrics"] == dict(exchange.reply.content["metrics"])
    train = [e for e in entries if e["message_type"] == "train"]
    assert [(e["phase"], e["round"]) for e in train] == [("adapt", 1), ("adapt", 2)]


def test_poisoned_ehr_statistics_are_rejected_and_the_run_goes_on(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    def poison(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == "query.ehr_stats" and "ehr-stats" in reply.content["meta"]:
            stats = json.loads(reply.content["meta"]["ehr-stats"])
            stats["columns"]["age"]["centred_sum_sq"] = -5.0
            stats["columns"]["sex"]["categories"] = [f"cat-{i:04d}" for i in range(1000)]
            reply.content["meta"]["ehr-stats"] = json.dumps(stats)
        return reply

    settings = settings_for(tmp_path / "run", federation, backbone_file=str(backbone_file), prognosis_rounds=1,
                            prognosis_steps=1)
    run_dir, _ = run(settings, mods=[poison])
    outcome = {e["site"]: e for e in run_dir.metrics()["run"]["ehr_stats"]}
    assert outcome["site-3"]["status"] == "rejected"
    assert "centred_sum_sq is negative" in outcome["site-3"]["reason"] and "categories" in outcome["site-3"]["reason"]
    spec = json.loads(read_adapter_file(run_dir.checkpoint("prognosis", 2))[1]["spec"])
    assert spec["survival"] and spec["ehr_features"] == 0  # no EHR branch: the only EHR site's statistics were refused


# ------------------------------------------------------------------------- adversaries


ADVERSARY_CASES = {  # kind -> (adversary site, phases whose train replies it corrupts)
    "scale": ("site-2", ("pretrain-ct", "adapt", "prognosis")),
    "count": ("site-2", ("pretrain-ct", "adapt", "prognosis")),
    "huge": ("site-2", ("pretrain-ct", "adapt", "prognosis")),
    "nan": ("site-2", ("pretrain-ct", "adapt", "prognosis")),
    "list-metric": ("site-2", ("pretrain-ct", "adapt", "prognosis")),
    "impersonate": ("site-2", ("pretrain-ct", "adapt", "prognosis")),
    "foreign": ("site-1", ("adapt",)),
    "ehr-poison": ("site-2", ()),
}


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory, federation: list[Path]) -> tuple[RunSettings, dict[str, float]]:
    from simulation.adversary import phase_distances

    settings = adversary_settings(tmp_path_factory.mktemp("honest") / "run", federation)
    run_dir, _ = run(settings)
    return settings, phase_distances(run_dir.path)


def adversary_settings(run_dir: Path, federation: list[Path]) -> RunSettings:
    return settings_for(run_dir, federation, pretrain_rounds=2, pretrain_steps=1, rounds=2, local_steps=2, evaluate=True,
                        prognosis_rounds=1, prognosis_steps=2, min_sites=1)


@pytest.mark.parametrize("kind", list(ADVERSARY_CASES))
def test_no_adversary_steers_the_federation(
    tmp_path: Path, federation: list[Path], honest_run: tuple[RunSettings, dict[str, float]], kind: str
) -> None:
    """The acceptance of every ``--adversary`` kind, end to end on real sites: the run completes, the
    adversary's corrupted replies are rejected or clipped in every phase they reach, and the final
    global tensors of each phase are no further from where they started than 1.5x an honest run's."""
    from simulation.adversary import adversary_mod, phase_distances

    site, phases = ADVERSARY_CASES[kind]
    settings = adversary_settings(tmp_path / "run", federation)
    run_dir, _ = run(settings, mods=[adversary_mod({site: kind})])
    metrics = run_dir.metrics()
    for record in metrics["pretrain_rounds"] + metrics["rounds"]:
        status = {s["name"]: s["status"] for s in record["sites"]}
        if record["phase"] in phases:
            assert status[site] in ("rejected", "clipped"), (record["phase"], record["round"], status)
        assert all(v == "ok" for name, v in status.items() if name != site), (record["phase"], status)
    if kind == "ehr-poison":
        outcome = {e["site"]: e["status"] for e in metrics["run"]["ehr_stats"]}
        assert outcome[site] == "rejected" and outcome["site-3"] == "ok"
    honest = honest_run[1]
    for phase, distance in phase_distances(run_dir.path).items():
        assert distance <= 1.5 * honest[phase] + 1e-6, (phase, distance, honest[phase])
    assert "Robustness" in run_dir.report.read_text()
