"""int8 adapter transport (``wire-dtype = int8``): the strategy's check and a whole federation in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_server_strategy import make_strategy, reply, sites_of

from pemma_core import protocol
from simulation.inprocess import InProcessGrid


@pytest.fixture(autouse=True)
def _task_identity(flower_identity: None) -> None:
    """Every test here builds Flower messages."""


@pytest.fixture()
def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=(4, 30)).astype(np.float32) for name in ("lora", "ct_adapter", "pet_adapter")}


def test_the_server_sends_int8_and_averages_dequantised_updates(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", "b", wire_dtype="int8")
    sent = strategy.configure_train(2, *_empty_round())[0].content["arrays"]
    assert {k: a.numpy().dtype for k, a in sent.items()} == {**{k: np.int8 for k in global_state},
                                                             **{protocol.scales_name(k): np.float32 for k in global_state}}
    updates = {name: global_state["lora"] + delta for name, delta in (("a", 0.1), ("b", -0.3))}
    arrays, _ = strategy.aggregate_train(2, [reply(n, name, protocol.to_wire({"lora": updates[name]}, "int8"),
                                                   {"shared": 1}) for n, name in ((1, "a"), (2, "b"))])
    assert all(s.status == "ok" for s in sites_of(strategy).values())
    received = [protocol.from_wire(protocol.to_wire({"lora": u}, "int8"))["lora"].astype(np.float64) for u in updates.values()]
    np.testing.assert_allclose(arrays["lora"].numpy(), sum(received) / 2, rtol=1e-6, atol=1e-7)
    step = max(np.abs(u).max() for u in updates.values()) / 127  # one int8 step of the largest block
    assert np.abs(arrays["lora"].numpy() - (updates["a"] + updates["b"]) / 2).max() <= step / 2


def _empty_round():
    from flwr.app import ArrayRecord, ConfigRecord

    return ArrayRecord(), ConfigRecord(), InProcessGrid(None, [{}] * 2)


@pytest.mark.parametrize(("fault", "reason"), [
    ("missing scales", "travels without its scales"),
    ("wrong length", "one per block of 64"),
    ("NaN scales", "not all finite"),
    ("stray scales", "travel without their tensor"),
    ("float32", "'lora' is float32 on the wire, expected int8"),
])
def test_a_malformed_int8_update_is_rejected_and_the_round_goes_on(global_state: dict[str, np.ndarray], fault: str,
                                                                  reason: str) -> None:
    strategy = make_strategy(global_state, "good", "bad", min_sites=1, wire_dtype="int8")
    good = protocol.to_wire({"lora": global_state["lora"] + 0.1}, "int8")
    bad = protocol.to_wire({"lora": global_state["lora"] + 0.2, "ct_adapter": global_state["ct_adapter"]}, "int8")
    if fault == "missing scales":
        del bad["lora::absmax"]
    elif fault == "wrong length":
        bad["lora::absmax"] = np.concatenate([bad["lora::absmax"], [1.0]]).astype(np.float32)
    elif fault == "NaN scales":
        bad["lora::absmax"][0] = np.nan
    elif fault == "stray scales":
        del bad["ct_adapter"]
    else:
        bad["lora"] = global_state["lora"] + 0.2
    arrays, _ = strategy.aggregate_train(1, [reply(1, "good", good, {"shared": 1}),
                                             reply(2, "bad", bad, {"shared": 1, "ct": 1})])
    sites = sites_of(strategy)
    assert sites["bad"].status == "rejected" and reason in sites["bad"].reason, sites["bad"].reason
    assert sites["good"].status == "ok" and arrays is not None
    np.testing.assert_allclose(arrays["lora"].numpy(), protocol.from_wire(good)["lora"], rtol=1e-6)


def test_int8_tensors_in_a_float32_run_are_rejected(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", min_sites=1, wire_dtype="float32")
    strategy.aggregate_train(1, [reply(1, "a", protocol.to_wire({"lora": global_state["lora"]}, "int8"), {"shared": 1})])
    site = sites_of(strategy)["a"]
    assert site.status == "rejected" and "'lora' is int8 on the wire, expected float32" in site.reason


@pytest.mark.slow
def test_an_int8_federation_sends_int8_and_scales_and_aggregates(tmp_path: Path) -> None:
    from client.client_app import make_client_app
    from pemma_core.config.run import RunSettings
    from pemma_core.model.files import read_adapter_file
    from pemma_core.phantoms.writer import make_federation
    from server.server_app import run_federation

    sites = list(make_federation(tmp_path / "fed", n_sites=3, cases_per_site=3, seed=0, test_cases=0).site_yamls)
    settings = RunSettings(run_dir=str(tmp_path / "run"), site_configs=",".join(map(str, sites)), rounds=1, local_steps=2,
                           batch_size=1, pretrain_rounds=0, evaluate=False, min_sites=2, prognosis_rounds=0,
                           wire_dtype="int8")
    grid = InProcessGrid(make_client_app(), [{"partition-id": i, "num-partitions": 3} for i in range(3)],
                         settings.to_run_config())
    run_dir = run_federation(grid, settings, progress=None)
    trains = [x for x in grid.transcript if x.reply is not None and x.instruction.metadata.message_type == "train"]
    assert len(trains) == 3
    for exchange in trains:
        assert not exchange.reply.has_error(), exchange.reply.error.reason if exchange.reply.has_error() else ""
        arrays = {k: a.numpy() for k, a in exchange.reply.content["arrays"].items()}
        tensors = [k for k in arrays if not protocol.is_scales_name(k)]
        assert tensors and all(arrays[k].dtype == np.int8 for k in tensors)
        assert set(arrays) == set(tensors) | {protocol.scales_name(k) for k in tensors}  # every tensor with its scales
        assert protocol.wire_form_problems(arrays) == []
        sent = {k: a.numpy() for k, a in exchange.instruction.content["arrays"].items()}
        assert all(a.dtype == np.int8 for k, a in sent.items() if not protocol.is_scales_name(k))  # the server's too
    record = run_dir.metrics()["rounds"][-1]
    assert record["aggregated"] and all(s["status"] == "ok" for s in record["sites"])
    adapters = read_adapter_file(run_dir.checkpoint("adapt", 1))[0]
    assert all(v.dtype.is_floating_point and v.isfinite().all() for v in adapters.values())
