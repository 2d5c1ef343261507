"""`pemma simulate --adversary`: each kind's rewrite of a site's reply, through the ClientApp mod."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.clientapp import ClientApp

from pemma_core import protocol
from pemma_core.cli import main
from pemma_core.model.spec import GROUPS
from pemma_core.protocol import Reply
from server import records
from simulation import simulate
from simulation.adversary import (
    ADVERSARY_KINDS,
    AdversarySiteError,
    adversary_mod,
    check_adversary_sites,
    parse_adversaries,
)
from simulation.inprocess import InProcessGrid

ADAPT, PROGNOSIS, PRETRAIN = protocol.TRAIN["adapt"].name, protocol.TRAIN["prognosis"].name, protocol.TRAIN["pretrain-ct"].name
EVALUATE, EHR, INSTALL = protocol.EVALUATE.name, protocol.EHR_STATS.name, protocol.INSTALL_BACKBONE.name


@pytest.fixture(autouse=True)
def _task_identity(flower_identity: None) -> None:
    """Every test here builds Flower messages."""


@pytest.fixture()
def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {name: rng.normal(size=(3, 2)).astype(np.float32) for name in ("lora", "ct_adapter", "pet_adapter", "fusion")}


def instruction(message_type: str, state: dict[str, np.ndarray]) -> Message:
    return Message(records.instruction(state, {"seed": 5, "round": 1}), dst_node_id=1, message_type=message_type)


def honest(site: str, state: dict[str, np.ndarray], message_type: str = ADAPT) -> Reply:
    """What a CT-only site sends: shared and ct tensors (global + 0.01), counts for those groups."""
    if message_type == EVALUATE:
        return Reply(metrics={"num-examples": 2, "dice-ct": 0.7, "cases-ct": 2}, meta=protocol.reply_meta(site, "fp"))
    if message_type in (EHR, INSTALL):
        return Reply(meta=protocol.reply_meta(site, "fp"))
    arrays = {k: state[k] + np.float32(0.01) for k in ("lora", "ct_adapter")}
    metrics = {"num-examples": 4, "loss": 0.5, "train-seconds": 0.1, "examples-shared": 4, "examples-ct": 4}
    return Reply(arrays=arrays, metrics=metrics, meta=protocol.reply_meta(site, "fp"))


def through_mod(adversaries: dict[str, str], message_type: str, reply: Reply, state: dict[str, np.ndarray]) -> Reply:
    msg = instruction(message_type, state)
    out = adversary_mod(adversaries)(msg, None, lambda m, _: records.reply_message(m, reply))
    changed, problems = records.read_reply(out)
    assert problems == []
    return changed


def assert_same(a: Reply, b: Reply) -> None:
    assert a.arrays.keys() == b.arrays.keys() and a.metrics == b.metrics and a.meta == b.meta
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])


@pytest.mark.parametrize("kind", sorted(ADVERSARY_KINDS))
def test_other_sites_pass_unchanged(kind: str, global_state: dict[str, np.ndarray]) -> None:
    for message_type in (ADAPT, EVALUATE, EHR):
        sent = honest("site-1", global_state, message_type)
        assert_same(through_mod({"site-2": kind}, message_type, sent, global_state), sent)


def test_scale_multiplies_the_update(global_state: dict[str, np.ndarray]) -> None:
    sent = honest("site-2", global_state)
    for message_type in (ADAPT, PROGNOSIS, PRETRAIN):
        out = through_mod({"site-2": "scale"}, message_type, sent, global_state)
        for name, value in out.arrays.items():
            np.testing.assert_allclose(value - global_state[name], 1e6 * (sent.arrays[name] - global_state[name]), rtol=1e-3)
        assert out.metrics == sent.metrics and out.meta == sent.meta
    assert_same(through_mod({"site-2": "scale"}, EVALUATE, honest("site-2", global_state, EVALUATE), global_state),
                honest("site-2", global_state, EVALUATE))


def test_count_inflates_every_count_only(global_state: dict[str, np.ndarray]) -> None:
    sent = honest("site-2", global_state)
    out = through_mod({"site-2": "count"}, PROGNOSIS, sent, global_state)
    assert out.metrics == {**sent.metrics, "num-examples": 10**12, "examples-shared": 10**12, "examples-ct": 10**12}
    assert_same(Reply(out.arrays, sent.metrics, out.meta), sent)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_huge_and_nan_fill_every_floating_tensor(dtype: type, global_state: dict[str, np.ndarray]) -> None:
    sent = honest("site-2", global_state)
    sent.arrays = {k: v.astype(dtype) for k, v in sent.arrays.items()} | {"steps": np.array([3], dtype=np.int64)}
    huge = through_mod({"site-2": "huge"}, ADAPT, sent, global_state)
    nan = through_mod({"site-2": "nan"}, ADAPT, sent, global_state)
    for name in ("lora", "ct_adapter"):
        assert huge.arrays[name].dtype == dtype and nan.arrays[name].dtype == dtype
        assert np.all(np.isfinite(huge.arrays[name])) and np.all(np.abs(huge.arrays[name]) > 0.8 * np.finfo(dtype).max)
        assert {1.0, -1.0} == set(np.sign(huge.arrays[name]).ravel())
        assert np.all(np.isnan(nan.arrays[name]))
    if dtype == np.float32:
        assert np.abs(huge.arrays["lora"]).min() > 3.0e38
    np.testing.assert_array_equal(huge.arrays["steps"], [3])  # integer tensors are left alone
    assert huge.metrics == nan.metrics == sent.metrics


def test_foreign_sends_every_group_it_does_not_train(global_state: dict[str, np.ndarray]) -> None:
    sent = honest("site-2", global_state)
    out = through_mod({"site-2": "foreign"}, ADAPT, sent, global_state)
    assert set(out.arrays) == set(global_state)
    for name in ("lora", "ct_adapter"):
        np.testing.assert_array_equal(out.arrays[name], sent.arrays[name])
    for name in ("pet_adapter", "fusion"):
        noise = out.arrays[name] - global_state[name]
        assert out.arrays[name].dtype == np.float32 and 0 < np.abs(noise).max() < 1e-2
    assert protocol.examples_of(out.metrics) == {group: 4 for group in GROUPS}
    again = through_mod({"site-2": "foreign"}, ADAPT, sent, global_state)
    np.testing.assert_array_equal(again.arrays["fusion"], out.arrays["fusion"])  # seeded
    assert_same(through_mod({"site-2": "foreign"}, PROGNOSIS, sent, global_state), sent)  # adapt only


def test_list_metric(global_state: dict[str, np.ndarray]) -> None:
    sent = honest("site-2", global_state)
    out = through_mod({"site-2": "list-metric"}, ADAPT, sent, global_state)
    assert out.metrics == {**sent.metrics, "loss": [0.5, 0.5]}


@pytest.mark.parametrize(("adversary", "claimed"), [("site-2", "site-1"), ("site-1", "site-2")])
def test_impersonate_on_round_replies_only(adversary: str, claimed: str, global_state: dict[str, np.ndarray]) -> None:
    for message_type in (ADAPT, PROGNOSIS, EVALUATE):
        sent = honest(adversary, global_state, message_type)
        out = through_mod({adversary: "impersonate"}, message_type, sent, global_state)
        assert out.site == claimed and out.meta[protocol.FINGERPRINT] == "fp" and out.metrics == sent.metrics
    for message_type in (INSTALL, protocol.JOIN.name, EHR):  # joined under its own name
        sent = honest(adversary, global_state, INSTALL)
        assert through_mod({adversary: "impersonate"}, message_type, sent, global_state).site == adversary


def test_ehr_poison_with_and_without_stats(global_state: dict[str, np.ndarray]) -> None:
    stats = {"spec": [["age", "numeric"], ["stage", "categorical"]], "rows": 5,
             "columns": {"age": {"count": 5, "sum": 300.0, "centred_sum_sq": 40.0, "missing": 0},
                         "stage": {"categories": ["I", "II"], "missing": 1}}}
    sent = Reply(meta=protocol.reply_meta("site-3", "fp", json.dumps(stats)))
    out = json.loads(through_mod({"site-3": "ehr-poison"}, EHR, sent, global_state).meta[protocol.EHR_STATS_KEY])
    assert out["columns"]["age"] == {**stats["columns"]["age"], "centred_sum_sq": -1.0}
    assert out["columns"]["stage"]["categories"] == [f"cat-{i:04d}" for i in range(1000)]
    assert out["columns"]["stage"]["missing"] == 1 and out["rows"] == 5 and out["spec"] == stats["spec"]

    added = through_mod({"site-1": "ehr-poison"}, EHR, honest("site-1", global_state, EHR), global_state)
    poison = json.loads(added.meta[protocol.EHR_STATS_KEY])
    assert poison["spec"] == [["age", "numeric"], ["sex", "categorical"]] and poison["rows"] == 20
    assert poison["columns"]["age"]["centred_sum_sq"] == -1.0 and len(poison["columns"]["sex"]["categories"]) == 1000
    assert added.site == "site-1"
    sent = honest("site-3", global_state)  # other messages untouched
    assert_same(through_mod({"site-3": "ehr-poison"}, ADAPT, sent, global_state), sent)


def test_error_replies_pass_and_the_mod_runs_inside_a_client_app(global_state: dict[str, np.ndarray]) -> None:
    msg = instruction(ADAPT, global_state)
    failed = Message(Error(code=2, reason="RuntimeError: disk full"), reply_to=msg)
    assert adversary_mod({"site-2": "nan"})(msg, None, lambda m, _: failed) is failed

    app = ClientApp(mods=[adversary_mod({"site-2": "nan"})])

    @app.train()
    def train(msg: Message, context: object) -> Message:
        return records.reply_message(msg, honest(f"site-{context.node_id}", global_state))

    grid = InProcessGrid(app, [{}, {}])
    replies = {m.metadata.src_node_id: records.read_reply(m)[0]
               for m in grid.send_and_receive([instruction(ADAPT, global_state), Message(
                   records.instruction(global_state, {}), dst_node_id=2, message_type=ADAPT)])}
    assert np.all(np.isnan(replies[2].arrays["lora"])) and np.all(np.isfinite(replies[1].arrays["lora"]))


def test_parse_adversaries() -> None:
    assert parse_adversaries(None) == {}
    assert parse_adversaries(["site-2=scale", " site-3 = nan "]) == {"site-2": "scale", "site-3": "nan"}
    with pytest.raises(ValueError, match=r"--adversary site-2=boom: unknown kind 'boom'; expected one of scale, count"):
        parse_adversaries(["site-2=boom"])
    for bad in ("site-2", "=scale", "site-2="):
        with pytest.raises(ValueError, match="expected SITE=KIND"):
            parse_adversaries([bad])
    with pytest.raises(ValueError, match="site 'site-2' is already an adversary"):
        parse_adversaries(["site-2=scale", "site-2=nan"])
    with pytest.raises(ValueError, match="unknown kind"):
        adversary_mod({"site-2": "boom"})


def test_adversary_sites_must_be_in_the_federation(phantom_federation) -> None:
    names = simulate.site_names(list(phantom_federation.site_yamls))
    assert names == ["site-1", "site-2", "site-3"]
    check_adversary_sites({"site-2": "scale"}, names)
    with pytest.raises(AdversarySiteError, match=r"--adversary site-9=nan: no site named 'site-9'.*site-1, site-2, site-3"):
        check_adversary_sites({"site-2": "scale", "site-9": "nan"}, names)


def test_simulate_options_take_repeated_adversaries(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    args = parser.parse_args(["--adversary", "site-2=scale", "--adversary", "site-3=impersonate"])
    assert parse_adversaries(args.adversary) == {"site-2": "scale", "site-3": "impersonate"}
    assert parser.parse_args([]).adversary is None
    help_text = parser.format_help()
    assert all(kind in help_text for kind in ADVERSARY_KINDS)
    # A bad kind is a usage error (status 2), before anything is written.
    assert main(["simulate", "--adversary", "site-2=boom", "--out", str(tmp_path / "run")]) == 2
    assert "unknown kind 'boom'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
