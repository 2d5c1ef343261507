"""Secure aggregation and DP-SGD through the real ServerApp and ClientApp, in one process (InProcessGrid).

The server must end where the plain run ends (within quantisation error), see no site's
tensors, complete a round when a site vanishes after masking (with the survivors' sum), and
DP sites must report the epsilon they spent, never above the target.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message

from pemma_core.model.files import read_adapter_file
from server.run_dir import RunDir
from simulation.inprocess import InProcessGrid
from test_simulation_federation import backbone_file, federation, settings_for  # noqa: F401 - shared fixtures
from test_simulation_federation import run as run_in_process

pytestmark = pytest.mark.slow  # whole federations in-process

logging.getLogger("flwr").setLevel(logging.WARNING)


def run(tmp: Path, federation: list[Path], backbone: Path, mods: list | None = None, **changes) -> tuple[RunDir, InProcessGrid]:
    values = {"rounds": 2, "local_steps": 2, "backbone_file": str(backbone), **changes}
    return run_in_process(settings_for(tmp, federation, **values), mods=mods)


def adapters(run_dir: RunDir, round_: int) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in read_adapter_file(run_dir.checkpoint("adapt", round_))[0].items()}


def relative_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> float:
    gap = np.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))
    moved = np.sqrt(sum(float(np.sum((b[k] - start[k]) ** 2)) for k in b))
    assert moved > 0
    return gap / moved


def fail_at(message_type: str, partition: int) -> Callable:
    """A mod: the site of ``partition`` vanishes (raises) when it gets ``message_type``."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        if context.node_config.get("partition-id") == partition and msg.metadata.message_type == message_type:
            raise RuntimeError("the site's node lost power")
        return call_next(msg, context)

    return mod


def test_secure_run_ends_where_the_plain_run_ends_and_the_server_sees_no_site_tensor(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    # One round: the server's result is the plain weighted mean up to quantisation. (Over several
    # rounds Adam turns any 1e-8 difference in the global tensors, float rounding included, into
    # lr-sized steps of elements whose gradient is near zero: BENCHMARKS.md, secure aggregation.)
    # The plain reference averages the low-rank factors as the secure sum does (naive): exact
    # aggregation needs each site's factors, which secure aggregation hides from the server.
    plain, plain_grid = run(tmp_path / "plain", federation, backbone_file, rounds=1, lora_aggregation="naive")
    secure, grid = run(tmp_path / "secure", federation, backbone_file, secure_aggregation=True, rounds=1)
    start = adapters(plain, 0)
    gap = relative_gap(adapters(secure, 1), adapters(plain, 1), start)
    print(f"||secure - plain|| / ||plain - initial|| = {gap:.2e}")
    assert gap <= 1e-5
    for r in secure.metrics()["rounds"]:
        assert r["aggregated"] and r["secure_aggregation"]["final"] == ["site-1", "site-2", "site-3"]
        assert r["contributors"]["pet"] == ["site-2", "site-3"] and r["contributors"]["shared"] == [
            "site-1", "site-2", "site-3"]
    # Every tensor a site sent is masked (uint32), none is its plain update.
    plain_updates = {(x.reply.content["meta"]["site"], x.instruction.metadata.message_type): x.reply.content["arrays"]
                     for x in plain_grid.transcript if x.reply is not None and x.instruction.metadata.message_type == "train"}
    masked_seen = 0
    for exchange in grid.transcript:
        if exchange.reply is None or exchange.reply.has_error():
            continue
        for key, array in exchange.reply.content.array_records.get("arrays", {}).items():
            values = array.numpy()
            assert values.dtype == np.uint32, (key, values.dtype)
            plain_array = plain_updates[(exchange.reply.content["meta"]["site"], "train")].get(key)
            if plain_array is not None and values.size >= 256 and np.std(plain_array.numpy()) > 0:
                r = np.corrcoef(values.astype(np.float64).ravel(), plain_array.numpy().astype(np.float64).ravel())[0, 1]
                assert abs(r) < 0.2, (key, r)
                masked_seen += 1
        for entry in exchange.reply.content["meta"].values():  # the stage answers: keys, ciphertexts, shares
            assert "lora" not in str(entry)
    assert masked_seen > 10
    report = secure.report.read_text()
    assert "Secure aggregation" in report and "moved to the sites" in report


def test_a_site_vanishing_after_masking_leaves_the_survivors_sum(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    # site-1 (CT only) vanishes after its masked update, before unmasking; the plain reference
    # leaves the same site out of the same rounds (it fails its training).
    secure, _ = run(tmp_path / "secure", federation, backbone_file, mods=[fail_at("query.secagg_confirm", 0)],
                    secure_aggregation=True, rounds=1)
    plain, _ = run(tmp_path / "plain", federation, backbone_file, mods=[fail_at("train", 0)], rounds=1,
                   lora_aggregation="naive")
    record = secure.metrics()["rounds"][0]
    assert record["aggregated"] is True
    info = record["secure_aggregation"]
    assert info["final"] == ["site-2", "site-3"]
    assert info["dropped"] == {"site-1": "after its masked update, before unmasking"}
    sites = {s["name"]: s for s in record["sites"]}
    assert sites["site-1"]["status"] == "failed" and "lost power" in sites["site-1"]["reason"]
    assert relative_gap(adapters(secure, 1), adapters(plain, 1), adapters(plain, 0)) <= 1e-3


def test_a_group_below_the_minimum_cohort_is_not_aggregated(
    tmp_path: Path, federation: list[Path], backbone_file: Path
) -> None:
    secure, _ = run(tmp_path / "secure", federation, backbone_file, secure_aggregation=True, secure_min_cohort=3, rounds=1)
    record = secure.metrics()["rounds"][0]
    skipped = record["secure_aggregation"]["skipped_groups"]
    assert set(skipped) == {"pet", "fusion"} and "below secure-min-cohort 3" in skipped["pet"]
    assert set(record["contributors"]) == {"shared", "ct"}
    start, end = adapters(secure, 0), adapters(secure, 1)
    groups = json.loads(read_adapter_file(secure.checkpoint("adapt", 1))[1]["groups"])
    assert all(np.array_equal(start[k], end[k]) for k, g in groups.items() if g in ("pet", "fusion"))
    assert "below secure-min-cohort 3" in secure.report.read_text()


def test_the_range_covers_a_group_that_learns_faster_than_the_adapt_rate(
    tmp_path: Path, federation: list[Path], backbone_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Adam's first step moves every element with a gradient by exactly its rate, so a PET group at 8x
    # the adapt rate moves 16 lr in 2 steps: beyond a range of 4 lr per step unless the range grows with it.
    from pemma_core.model import pemma

    monkeypatch.setitem(pemma.GROUP_LR_SCALES, "pet", 8.0)
    secure, _ = run(tmp_path / "secure", federation, backbone_file, secure_aggregation=True, rounds=1, local_steps=2)
    record = secure.metrics()["rounds"][0]
    lr = json.loads((tmp_path / "secure" / "run.json").read_text())["lr"]
    assert all(s["status"] == "ok" and s["secure_clipped"] == 0 for s in record["sites"]), record["sites"]
    assert record["secure_aggregation"]["clip_range"] == pytest.approx(4.0 * 8.0 * lr * 2)


def test_dp_sites_report_epsilon_never_above_the_target(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    target = 8.0
    run_dir, grid = run(tmp_path / "dp", federation, backbone_file, secure_aggregation=True, dp_target_epsilon=target,
                        rounds=2, local_steps=2)
    spent = {}
    for record in run_dir.metrics()["rounds"]:
        for site in record["sites"]:
            assert site["status"] == "ok", site
            assert 0 < site["dp_epsilon"] <= target
            assert site["name"] not in spent or site["dp_epsilon"] > spent[site["name"]]  # more steps, more epsilon
            spent[site["name"]] = site["dp_epsilon"]
    assert len(spent) == 3
    for exchange in grid.transcript:  # the training loss is not privatised: it stays at the site
        if exchange.reply is not None and exchange.instruction.metadata.message_type == "train":
            assert "loss" not in exchange.reply.content["metrics"]
    assert "epsilon" in run_dir.report.read_text()


def test_the_simulate_options_reach_the_run_settings(tmp_path: Path) -> None:
    import argparse

    from simulation.simulate import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(
        ["--secure-aggregation", "--dp-target-epsilon", "8", "--phantom-sites", "16", "--out", str(tmp_path / "r")]))
    assert settings.secure_aggregation is True and settings.dp_target_epsilon == 8.0 and settings.phantom_sites == 16
    assert settings_from_args(parser.parse_args(["--out", str(tmp_path / "s")])).secure_aggregation is False


def test_each_site_and_run_has_its_own_privacy_budget(tmp_path: Path, federation: list[Path], backbone_file: Path) -> None:
    import yaml

    # Three sites sharing one cache folder (as the bench's IBSI sites do), and the same run folder
    # used twice: every site of every run starts its own budget.
    shared = tmp_path / "shared-cache"
    sites = []
    for path in federation:
        data = yaml.safe_load(path.read_text())
        data["cache_dir"] = str(shared)
        copy = path.parent / f"shared-cache-{tmp_path.name}.yaml"  # beside the original: its relative paths hold
        copy.write_text(yaml.safe_dump(data))
        sites.append(copy)
    for target in (4.0, 8.0):
        out = tmp_path / "run"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        run_dir, _ = run(out, sites, backbone_file, dp_target_epsilon=target, rounds=1)
        record = run_dir.metrics()["rounds"][0]
        assert record["aggregated"], record
        assert all(s["status"] == "ok" and 0 < s["dp_epsilon"] <= target for s in record["sites"]), record
        # same number of patients, same plan, same steps: the same epsilon, none counting another site's steps
        assert len({round(s["dp_epsilon"], 9) for s in record["sites"]}) == 1, record["sites"]
        assert all(s["dp_steps"] == 2 and "dp_stopped" not in s for s in record["sites"]), record["sites"]
