"""PemmaStrategy: validation and modality-aware aggregation of replies, through Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from pemma_core.aggregation import SiteUpdate, aggregate_adapters
from pemma_core.model.spec import ModelSpec
from pemma_core.protocol import Instruction
from server.strategy import PemmaStrategy, RoundRecord
from simulation.inprocess import InProcessGrid

GROUPS = {"lora": "shared", "ct_adapter": "ct", "pet_adapter": "pet"}
ROI = (32, 32, 32)


@pytest.fixture()
def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=(4, 3)).astype(np.float32) for name in GROUPS}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    InProcessGrid(client_app=None, node_configs=[])  # sets Flower's TaskIdentity so Message() works


def make_strategy(state: dict[str, np.ndarray], **kwargs) -> PemmaStrategy:
    options = dict(min_sites=2, max_update_norm=None, wire_dtype="float32")
    options.update(kwargs)
    instruction = Instruction(local_steps=1, lr=0.1, batch_size=1, seed=0, spec=ModelSpec(), fingerprint="fp")
    return PemmaStrategy("adapt", state, GROUPS, ROI, instruction, **options)


def reply(node: int, site: str, tensors: dict[str, np.ndarray], examples: dict[str, int], **extra_metrics) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    metrics = {"num-examples": max(examples.values(), default=0), "loss": 0.5, "train-seconds": 0.1}
    metrics.update({f"examples-{g}": n for g, n in examples.items()})
    metrics.update(extra_metrics)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}),
            "metrics": MetricRecord(metrics),
            "meta": ConfigRecord({"site": site, "fingerprint": "fp"}),
        }
    )
    return Message(content=content, reply_to=instruction)


def error_reply(node: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(Error(code=2, reason="RuntimeError: disk full"), reply_to=instruction)


def test_aggregation_per_group_matches_aggregate_adapters(global_state: dict[str, np.ndarray]) -> None:
    ct_site = {"lora": global_state["lora"] + 1.0, "ct_adapter": global_state["ct_adapter"] + 1.0}
    pet_site = {"lora": global_state["lora"] - 1.0, "pet_adapter": global_state["pet_adapter"] + 2.0}
    strategy = make_strategy(global_state)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, "site-ct", ct_site, {"shared": 4, "ct": 4}), reply(2, "site-pet", pet_site, {"shared": 2, "pet": 2})]
    )
    assert arrays is not None and metrics is not None
    expected = aggregate_adapters(
        global_state,
        [SiteUpdate("site-ct", ct_site, {"shared": 4, "ct": 4}), SiteUpdate("site-pet", pet_site, {"shared": 2, "pet": 2})],
        GROUPS,
    )
    for name, value in expected.items():
        np.testing.assert_array_equal(arrays[name].numpy(), value)
    # shared: (4 * (g + 1) + 2 * (g - 1)) / 6 = g + 1/3; ct and pet come from their only sender
    np.testing.assert_allclose(arrays["lora"].numpy(), global_state["lora"] + 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(arrays["pet_adapter"].numpy(), global_state["pet_adapter"] + 2.0)


def test_rejections_and_failures_leave_the_round_going(global_state: dict[str, np.ndarray]) -> None:
    good = {"lora": global_state["lora"] + 1.0}
    nan = {"lora": np.full((4, 3), np.nan, dtype=np.float32)}
    extra = {"lora": global_state["lora"], "backbone.secret": np.zeros((2, 2), dtype=np.float32)}
    strategy = make_strategy(global_state, min_sites=2)
    replies = [
        reply(1, "site-a", good, {"shared": 2}),
        reply(2, "site-b", good, {"shared": 2}),
        reply(3, "site-nan", nan, {"shared": 2}),
        reply(4, "site-extra", extra, {"shared": 2}),
        error_reply(5),
    ]
    strategy._current = RoundRecord(phase="adapt", round=1)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["lora"].numpy(), global_state["lora"] + 1.0)
    sites = {s.name: s for s in strategy._current.sites.values()}
    assert sites["site-a"].status == sites["site-b"].status == "ok"
    assert sites["site-nan"].status == "rejected" and "non-finite" in sites["site-nan"].reason
    assert sites["site-extra"].status == "rejected" and "backbone.secret" in sites["site-extra"].reason
    assert sites["node-5"].status == "failed" and "disk full" in sites["node-5"].reason


def test_min_sites_is_honoured(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, min_sites=2)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, "a", {"lora": global_state["lora"] + 1}, {"shared": 1}),
                                                   error_reply(2)])
    assert arrays is None and metrics is None
    np.testing.assert_array_equal(strategy.global_state["lora"], global_state["lora"])


def test_update_norm_bound_and_wire_dtype(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, min_sites=1, max_update_norm=1.0, wire_dtype="float16")
    far = {"lora": (global_state["lora"] + 10).astype(np.float16)}
    near = {"lora": (global_state["lora"] + 0.01).astype(np.float16)}
    wrong_dtype = {"lora": global_state["lora"] + 0.01}  # float32 while the run says float16
    strategy._current = RoundRecord(phase="adapt", round=1)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, "far", far, {"shared": 1}), reply(2, "near", near, {"shared": 1}), reply(3, "f32", wrong_dtype, {"shared": 1})]
    )
    sites = {s.name: s for s in strategy._current.sites.values()}
    assert "exceeds max_norm" in sites["far"].reason
    assert "float32 on the wire, expected float16" in sites["f32"].reason
    assert sites["near"].status == "ok"
    assert arrays["lora"].numpy().dtype == np.float32  # accumulated and kept in float32
    np.testing.assert_allclose(arrays["lora"].numpy(), near["lora"].astype(np.float32))


def test_reply_claiming_another_backbone_is_rejected(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, min_sites=1)
    msg = reply(1, "a", {"lora": global_state["lora"]}, {"shared": 1})
    msg.content["meta"]["fingerprint"] = "other"
    _, reasons = strategy.check_reply(msg)
    assert any("backbone" in r for r in reasons)


def test_ehr_stats_only_in_the_statistics_reply(global_state: dict[str, np.ndarray]) -> None:
    """``ehr-stats`` answers ``query.ehr_stats``; in a train or evaluate reply it is an unexpected entry."""
    strategy = make_strategy(global_state, min_sites=1)
    msg = reply(1, "a", {"lora": global_state["lora"] + 1}, {"shared": 1})
    msg.content["meta"]["ehr-stats"] = "{}"
    _, reasons = strategy.check_reply(msg)
    assert reasons == ["site 'a': config entry 'ehr-stats' may not cross the wire"]
    strategy._current = RoundRecord(phase="adapt", round=1)
    evaluation = reply(1, "a", {}, {}, **{"dice-ct": 0.5})
    evaluation.content["meta"]["ehr-stats"] = "{}"
    assert strategy.aggregate_evaluate(1, [evaluation]) is None  # the reply is ignored, with a logged reason
    assert strategy._current.sites[1].dice == {}


@pytest.mark.parametrize(("phase", "message_type"), [("pretrain-ct", "train.pretrain_ct"), ("adapt", "train"),
                                                     ("prognosis", "train.prognosis")])
def test_train_messages_carry_the_phase_type_and_the_instruction(
    global_state: dict[str, np.ndarray], phase: str, message_type: str
) -> None:
    spec = ModelSpec(rank=4)
    instruction = Instruction(local_steps=2, lr=0.1, batch_size=2, seed=5, spec=spec, fingerprint="fp")
    strategy = PemmaStrategy(phase, global_state, GROUPS, ROI, instruction, min_sites=2, wire_dtype="float16", round_offset=3)
    grid = InProcessGrid(client_app=None, node_configs=[{}, {}])
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    for msg in messages:
        assert msg.metadata.message_type == message_type
        config = dict(msg.content["config"])
        assert Instruction.from_config(config) == Instruction(
            local_steps=2, lr=0.1, batch_size=2, seed=5, spec=spec, fingerprint="fp", phase=phase, round=4,
            wire_dtype="float16",
        )
        assert {k: a.numpy().dtype for k, a in msg.content["arrays"].items()} == {k: np.float16 for k in GROUPS}
