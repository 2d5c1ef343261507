"""PemmaStrategy: validation and modality-aware aggregation of replies, through Flower messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from pemma_core.aggregation import SiteUpdate, aggregate_adapters
from pemma_core.model.spec import ModelSpec
from pemma_core.protocol import Instruction
from server.roster import Member, Roster
from server.strategy import PemmaStrategy, RoundRecord
from simulation.inprocess import InProcessGrid

GROUPS = {"lora": "shared", "ct_adapter": "ct", "pet_adapter": "pet"}
ROI = (32, 32, 32)


@pytest.fixture()
def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=(4, 3)).astype(np.float32) for name in GROUPS}


@pytest.fixture(autouse=True)
def _task_identity(flower_identity: None) -> None:
    """Every test here builds Flower messages."""


PET_SITE = {"ct": 100, "pet": 100, "ehr": 0, "survival": 100}  # declared training cases: every adapt group allowed


def make_roster(*names: str, declared: dict[str, dict[str, int]] | None = None) -> Roster:
    """Nodes 1..n, joined as ``names`` (each declaring ``declared[name]``, default :data:`PET_SITE`)."""
    roster = Roster(timeout=1.0)
    for node, name in enumerate(names, start=1):
        roster.members[node] = Member(node, name, dict((declared or {}).get(name, PET_SITE)), label=name)
    return roster


def make_strategy(state: dict[str, np.ndarray], *names: str, declared=None, **kwargs) -> PemmaStrategy:
    """A strategy over sites ``names`` (nodes 1..n) with one round begun, as Flower begins it."""
    options = dict(min_sites=2, max_update_norm=None, wire_dtype="float32")
    options.update(kwargs)
    instruction = Instruction(local_steps=10, lr=0.1, batch_size=2, seed=0, spec=ModelSpec(), fingerprint="fp")
    names = names or ("site-a", "site-b", "site-c", "site-d", "site-e")
    strategy = PemmaStrategy("adapt", state, GROUPS, ROI, instruction, roster=make_roster(*names, declared=declared),
                             **options)
    begin_round(strategy, len(names))
    return strategy


def begin_round(strategy: PemmaStrategy, nodes: int, server_round: int = 1) -> list[Message]:
    """``configure_train`` on a grid of ``nodes`` nodes: the messages the round sends."""
    return list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), InProcessGrid(None, [{}] * nodes)))


def sites_of(strategy: PemmaStrategy) -> dict:
    return {s.name: s for s in strategy._current.sites.values()}


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
    strategy = make_strategy(global_state, "site-ct", "site-pet")
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
    strategy = make_strategy(global_state, "site-a", "site-b", "site-nan", "site-extra", "site-broken", min_sites=2)
    replies = [
        reply(1, "site-a", good, {"shared": 2}),
        reply(2, "site-b", good, {"shared": 2}),
        reply(3, "site-nan", nan, {"shared": 2}),
        reply(4, "site-extra", extra, {"shared": 2}),
        error_reply(5),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["lora"].numpy(), global_state["lora"] + 1.0)
    sites = sites_of(strategy)
    assert sites["site-a"].status == sites["site-b"].status == "ok"
    assert sites["site-nan"].status == "rejected" and "non-finite" in sites["site-nan"].reason
    assert sites["site-extra"].status == "rejected" and "backbone.secret" in sites["site-extra"].reason
    assert sites["site-broken"].status == "failed" and sites["site-broken"].reason == "RuntimeError: disk full"
    # the failed site is sent nothing more in this phase; the others are
    assert sorted(m.metadata.dst_node_id for m in begin_round(strategy, 5, server_round=2)) == [1, 2, 3, 4]


def _with_array(msg: Message, name: str, array: Array) -> Message:
    msg.content["arrays"][name] = array
    return msg


def test_a_tensor_whose_bytes_do_not_decode_is_refused_and_the_round_goes_on(global_state: dict[str, np.ndarray]) -> None:
    """The bytes of an Array are the site's: a header numpy cannot read, an object dtype (which only
    pickle could load), data shorter than its header says or another serialisation type is a
    rejected reply naming the tensor, never a crashed round."""
    good = {"lora": global_state["lora"] + 1.0}
    honest = Array(global_state["lora"]).data
    header_end = honest.index(b"\n") + 1
    pickled = honest[:header_end].replace(b"'<f4'", b"'|O' ").ljust(header_end)  # same header length
    negative = honest[:header_end].replace(b"(4, 3)", b"(-1, 3)").ljust(header_end)
    bad = {
        "site-garbage": Array("float32", (4, 3), "numpy.ndarray", b"\x93NUMPY garbage"),
        "site-object": Array("float32", (4, 3), "numpy.ndarray", pickled + honest[header_end:]),
        "site-short": Array("float32", (4, 3), "numpy.ndarray", honest[:-8]),
        "site-negative": Array("float32", (4, 3), "numpy.ndarray", negative[:header_end - 1] + b"\n" + honest[header_end:]),
        "site-stype": Array("float32", (4, 3), "torch.Tensor", honest),
    }
    names = ("site-a", "site-b", *bad)
    strategy = make_strategy(global_state, *names, min_sites=2)
    replies = [reply(1, "site-a", good, {"shared": 2}), reply(2, "site-b", good, {"shared": 2})]
    replies += [_with_array(reply(n, name, good, {"shared": 2}), "lora", array)
                for n, (name, array) in enumerate(bad.items(), start=3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["lora"].numpy(), global_state["lora"] + 1.0)
    sites = sites_of(strategy)
    assert sites["site-a"].status == sites["site-b"].status == "ok"
    for name in bad:
        assert sites[name].status == "rejected" and "tensor 'lora'" in sites[name].reason, (name, sites[name].reason)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "uint32", "int64", "bool", ">f4"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (4, 3), (2, 3, 4)])
def test_arrays_travel_as_flowers_own_bytes_and_read_back_as_numpy_reads_them(dtype: str, shape: tuple) -> None:
    """records.to_array / to_numpy keep numpy's headers per form (speed); the bytes and arrays are Flower's."""
    from server.records import to_array, to_numpy

    value = (np.arange(math.prod(shape)) % 7 - 3).reshape(shape).astype(dtype)
    assert to_array(value).data == Array(value).data
    for form in (value, np.asfortranarray(value), value.T, value[..., ::2] if value.ndim else value):
        flowers = Array(np.asarray(form))
        for decoded in (to_numpy(to_array(form)), to_numpy(flowers)):
            assert decoded.dtype == flowers.numpy().dtype and decoded.shape == np.shape(form)
            np.testing.assert_array_equal(decoded, flowers.numpy())
            assert decoded.flags.writeable


def test_min_sites_is_honoured(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", "b", min_sites=2)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, "a", {"lora": global_state["lora"] + 1}, {"shared": 1}),
                                                   error_reply(2)])
    assert arrays is None and metrics is None
    np.testing.assert_array_equal(strategy.global_state["lora"], global_state["lora"])


def test_update_norm_bound_clips_and_wire_dtype(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "far", "near", "f32", min_sites=1, max_update_norm=1.0, wire_dtype="float16")
    far = {"lora": (global_state["lora"] + 10).astype(np.float16)}
    near = {"lora": (global_state["lora"] + 0.01).astype(np.float16)}
    wrong_dtype = {"lora": global_state["lora"] + 0.01}  # float32 while the run says float16
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, "far", far, {"shared": 1}), reply(2, "near", near, {"shared": 1}), reply(3, "f32", wrong_dtype, {"shared": 1})]
    )
    sites = sites_of(strategy)
    far_delta = far["lora"].astype(np.float64) - global_state["lora"]
    assert sites["far"].status == "clipped" and sites["far"].clip_factor == pytest.approx(1 / np.linalg.norm(far_delta))
    assert "float32 on the wire, expected float16" in sites["f32"].reason and sites["f32"].status == "rejected"
    assert sites["near"].status == "ok"
    assert arrays["lora"].numpy().dtype == np.float32  # accumulated and kept in float32
    clipped = global_state["lora"] + far_delta / np.linalg.norm(far_delta)
    expected = (clipped + near["lora"].astype(np.float64)) / 2
    np.testing.assert_allclose(arrays["lora"].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_reply_claiming_another_backbone_is_rejected(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", min_sites=1)
    msg = reply(1, "a", {"lora": global_state["lora"]}, {"shared": 1})
    msg.content["meta"]["fingerprint"] = "other"
    _, reasons = strategy.check_reply(msg)
    assert any("backbone" in r for r in reasons)


def test_ehr_stats_only_in_the_statistics_reply(global_state: dict[str, np.ndarray]) -> None:
    """``ehr-stats`` answers ``query.ehr_stats``; in a train or evaluate reply it is an unexpected entry."""
    strategy = make_strategy(global_state, "a", min_sites=1)
    msg = reply(1, "a", {"lora": global_state["lora"] + 1}, {"shared": 1})
    msg.content["meta"]["ehr-stats"] = "{}"
    _, reasons = strategy.check_reply(msg)
    assert reasons == ["site 'a': config entry 'ehr-stats' may not cross the wire"]
    evaluation = reply(1, "a", {}, {}, **{"dice-ct": 0.5, "cases-ct": 3})
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


CT_ONLY = {"ct": 10, "pet": 0, "ehr": 0, "survival": 10}


def test_a_site_sends_only_what_its_declared_modalities_train_and_the_round_allowed(
    global_state: dict[str, np.ndarray],
) -> None:
    strategy = make_strategy(global_state, "ct-site", "pet-site", "greedy", declared={"ct-site": CT_ONLY}, min_sites=1)
    foreign = {"lora": global_state["lora"] + 0.1, "pet_adapter": global_state["pet_adapter"] + 0.1}
    honest = {"lora": global_state["lora"] + 0.1, "pet_adapter": global_state["pet_adapter"] + 0.1}
    strategy.aggregate_train(1, [reply(1, "ct-site", foreign, {"shared": 4, "pet": 4}),
                                 reply(2, "pet-site", honest, {"shared": 4, "pet": 4}),
                                 reply(3, "greedy", honest, {"shared": 10**12, "pet": 4})])
    sites = sites_of(strategy)
    assert sites["ct-site"].status == "rejected" and "pet" in sites["ct-site"].reason
    assert sites["greedy"].status == "rejected" and "allowed" in sites["greedy"].reason  # 10 steps x batch 2 = 20
    assert sites["pet-site"].status == "ok" and strategy.rounds[-1].contributors == {"pet": ["pet-site"], "shared": ["pet-site"]}


def test_a_node_cannot_speak_for_another_site(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "site-1", "site-2", min_sites=1)
    update = {"lora": global_state["lora"] + 0.1}
    strategy.aggregate_train(1, [reply(1, "site-1", update, {"shared": 2}), reply(2, "site-1", update, {"shared": 2})])
    sites = sites_of(strategy)
    assert sites["site-1"].status == "ok"
    assert sites["site-2"].status == "rejected" and "speaks for 'site-1'" in sites["site-2"].reason


def test_an_outlier_is_rejected_by_the_automatic_bound(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", "b", "c", "x", outlier_factor=5.0)
    rng = np.random.default_rng(1)
    deltas = {name: rng.normal(scale=0.01, size=(4, 3)) for name in "abcx"}
    updates = {name: {"lora": (global_state["lora"] + d).astype(np.float32)} for name, d in deltas.items()}
    updates["x"] = {"lora": (global_state["lora"] + 1e6 * deltas["x"]).astype(np.float32)}
    arrays, _ = strategy.aggregate_train(1, [reply(i, n, updates[n], {"shared": 2}) for i, n in enumerate("abcx", 1)])
    sites = sites_of(strategy)
    assert sites["x"].status == "rejected" and "exceeds" in sites["x"].reason and "median" in sites["x"].reason
    assert [sites[n].status for n in "abc"] == ["ok"] * 3
    honest = np.mean([updates[n]["lora"].astype(np.float64) for n in "abc"], axis=0)
    np.testing.assert_allclose(arrays["lora"].numpy(), honest, rtol=1e-5)


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"dice-ct": 1e6, "cases-ct": 3}, "outside [0, 1]"),
        ({"dice-ct": -1.4, "cases-ct": 3}, "outside [0, 1]"),
        ({"dice-ct": float("nan"), "cases-ct": 3}, "not finite"),
        ({"dice-ct": 0.5}, "without a positive case count"),
        ({"dice-pet": 0.5, "cases-pet": 3}, "do not serve"),  # a CT-only site
        ({"dice-ct": [0.5, 0.6], "cases-ct": 3}, "is a list"),
    ],
)
def test_evaluation_replies_are_checked_before_they_count(
    global_state: dict[str, np.ndarray], metrics: dict, problem: str
) -> None:
    strategy = make_strategy(global_state, "honest", "ct-site", declared={"ct-site": CT_ONLY}, min_sites=1)
    replies = [reply(1, "honest", {}, {}, **{"dice-ct": 0.6, "cases-ct": 3}), reply(2, "ct-site", {}, {}, **metrics)]
    for msg in replies:
        for key in ("loss", "train-seconds", "num-examples"):
            del msg.content["metrics"][key]
    result = strategy.aggregate_evaluate(1, replies)
    assert dict(result) == {"dice-ct": pytest.approx(0.6)}  # the honest site's Dice only
    site = sites_of(strategy)["ct-site"]
    assert site.status == "rejected" and problem in site.reason and site.dice == {}


def test_a_site_that_fails_evaluation_is_not_asked_again_in_the_phase(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", "b", min_sites=1)
    failed = Message(Error(code=2, reason="\x1b[91mClientAppException\x1b[0m\nTraceback...\n[pemma] b: OSError: disk full"),
                     reply_to=Message(RecordDict(), dst_node_id=2, message_type="evaluate"))
    strategy.aggregate_evaluate(1, [reply(1, "a", {}, {}, **{"dice-ct": 0.6, "cases-ct": 3}), failed])
    assert sites_of(strategy)["b"].reason == "evaluation failed: b: OSError: disk full"  # one line, no colour codes
    assert [m.metadata.dst_node_id for m in begin_round(strategy, 2, server_round=2)] == [1]


def _malformed_reply(rng: np.random.Generator, global_state: dict[str, np.ndarray], node: int) -> Message:
    """A train reply with 1-3 random faults (some of which Flower itself refuses to carry)."""
    tensors = {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in global_state.items()}
    metrics: dict = {"num-examples": 4, "loss": 0.5, "train-seconds": 0.1, "examples-shared": 4, "examples-ct": 4,
                     "examples-pet": 4}
    meta: dict = {"site": f"s{node}", "fingerprint": "fp"}
    junk = [float("nan"), float("inf"), -1, 10**13, -1e300, 1e300, 2.5, "x", [1, 2], True, [[1]], {"a": 1}, b"\x00", None]
    faults = rng.integers(1, 4)
    for _ in range(faults):
        fault = rng.integers(0, 12)
        name = str(rng.choice(list(GROUPS)))
        tensors.setdefault(name, global_state[name].copy())
        if fault == 0:
            tensors[name] = np.full(global_state[name].shape, rng.choice([np.nan, np.inf, 3.0e38]), dtype=np.float32)
        elif fault == 1:
            tensors[name] = rng.normal(size=tuple(rng.integers(1, 6, size=rng.integers(0, 4)))).astype(np.float32)
        elif fault == 2:
            tensors[name] = tensors[name].astype(rng.choice([np.float64, np.int32, np.int8, np.float16, np.uint8]))
        elif fault == 3:
            tensors["".join(rng.choice(list("abc.xyz"), size=8))] = np.zeros((2, 2), np.float32)
        elif fault == 4:
            tensors[name] = np.zeros((64, 64, 64), np.float32)  # image-shaped
        elif fault == 5:
            metrics[str(rng.choice(list(metrics)))] = junk[rng.integers(len(junk))]
        elif fault == 6:
            metrics[f"examples-{rng.choice(['shared', 'ct', 'pet', 'fusion', 'zzz'])}"] = junk[rng.integers(len(junk))]
        elif fault == 7:
            metrics["".join(rng.choice(list("abcdef-"), size=6))] = 1.0
        elif fault == 8:
            meta[str(rng.choice(["site", "fingerprint", "ehr-stats", "junk"]))] = junk[rng.integers(len(junk))]
        elif fault == 9:
            meta["site"] = f"s{node + 1}"  # speaks for another site
        elif fault == 10:
            tensors[name] = (global_state[name] + 1e6).astype(np.float32)
        else:
            tensors.pop(name)
            metrics["examples-shared"] = 0  # a tensor of a group with no count
    content = {"arrays": ArrayRecord(), "metrics": MetricRecord(), "meta": ConfigRecord()}
    for key, value in tensors.items():
        content["arrays"][key] = Array(np.asarray(value))
    for key, value in metrics.items():
        try:
            content["metrics"][key] = value
        except (TypeError, ValueError):  # Flower refuses it: the fault cannot reach the wire
            pass
    for key, value in meta.items():
        try:
            content["meta"][key] = value
        except (TypeError, ValueError):
            pass
    if rng.random() < 0.05:
        content.pop(str(rng.choice(["arrays", "metrics", "meta"])))
    if rng.random() < 0.03:
        content["extra"] = ConfigRecord({"x": 1})
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=RecordDict(content), reply_to=instruction)


def test_fuzz_a_thousand_malformed_replies_crash_nothing_and_none_is_aggregated(global_state: dict[str, np.ndarray]) -> None:
    """Random keys, shapes, dtypes, nested values, NaN/Inf, huge and negative counts, wrong types in
    every metric and config field: 0 crashes, and no malformed reply ever moves the global tensors."""
    rng = np.random.default_rng(2026)
    names = [f"s{i}" for i in range(1, 9)]
    sent = 0
    for round_ in range(125):  # 125 rounds x 8 malformed replies = 1,000
        strategy = make_strategy(global_state, *names, min_sites=1, outlier_factor=5.0, max_update_norm=10.0)
        replies = []
        for node in range(1, 9):
            replies.append(_malformed_reply(rng, global_state, node))
        sent += len(replies)
        before = {k: v.copy() for k, v in strategy.global_state.items()}
        arrays, _ = strategy.aggregate_train(round_ + 1, replies)
        accepted = [s for s in strategy._current.sites.values() if s.status in ("ok", "clipped")]
        # a reply whose faults Flower itself refused to carry may be honest; any other reply must be refused
        for site in accepted:
            node = site.node_id
            msg = replies[node - 1]
            arrays_in = {k: a.numpy() for k, a in msg.content["arrays"].items()} if "arrays" in msg.content else {}
            assert set(arrays_in) <= set(GROUPS) and all(np.isfinite(a).all() for a in arrays_in.values()), site
        if arrays is None:
            assert all(np.array_equal(before[k], strategy.global_state[k]) for k in before)
        else:
            assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
            moved = np.sqrt(sum(np.sum((a.numpy().astype(np.float64) - before[k]) ** 2) for k, a in arrays.items()))
            assert moved <= 10.0 + 1e-3  # no 1e6, no 3e38: every accepted update is within max-update-norm
    assert sent >= 1000


def test_a_site_that_does_not_reply_is_failed_for_the_round(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", "b", min_sites=1)
    strategy.aggregate_train(1, [reply(1, "a", {"lora": global_state["lora"] + 0.1}, {"shared": 2})])
    sites = sites_of(strategy)
    assert sites["a"].status == "ok"
    assert sites["b"].status == "failed" and "no reply" in sites["b"].reason


def test_replies_from_nodes_not_asked_are_ignored(global_state: dict[str, np.ndarray]) -> None:
    strategy = make_strategy(global_state, "a", "b", min_sites=1)
    stranger = reply(7, "a", {"lora": global_state["lora"] + 5.0}, {"shared": 2})
    arrays, _ = strategy.aggregate_train(1, [reply(1, "a", {"lora": global_state["lora"] + 0.1}, {"shared": 2}), stranger])
    np.testing.assert_allclose(arrays["lora"].numpy(), global_state["lora"] + 0.1, rtol=1e-6)
    assert 7 not in strategy._current.sites


@pytest.mark.parametrize("options, reason", [
    ({"rule": "median"}, "needs aggregation = mean"),
    ({"secure": {"max_dropouts": 0, "min_cohort": 2}}, "only the sums"),
    ({"server_optimizer": "fedadam"}, "basis"),
])
def test_the_strategy_refuses_exact_aggregation_where_it_cannot_be_exact(options: dict, reason: str) -> None:
    """The run settings refuse these combinations first; a strategy built another way refuses them too."""
    with pytest.raises(ValueError, match=reason):
        PemmaStrategy("adapt", {}, GROUPS, ROI, Instruction(local_steps=1, lr=0.1, seed=0, spec=ModelSpec()),
                      lora_aggregation="exact", **options)
