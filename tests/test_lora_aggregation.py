"""Exact aggregation of low-rank adapter pairs, the naive rule's error, and the server optimisers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pemma_core.aggregation import SiteUpdate, aggregate_round
from pemma_core.config.run import RunConfigError, RunSettings
from pemma_core.lora_aggregation import PairError, exact_low_rank, low_rank_pairs, pooled_error
from pemma_core.server_optimizer import (
    BETA1,
    BETA2,
    SERVER_LR,
    TAU,
    OptimizerState,
    load_state,
    save_state,
    server_step,
)

A = "net.blk.qkv.lora_A.default.weight"
B = "net.blk.qkv.lora_B.default.weight"
DOWN = "net.pe.pet_conv.lora_down"
UP = "net.pe.pet_conv.lora_up"
MAG = "net.blk.qkv.lora_magnitude_vector.default.weight"


def site_factors(rng: np.random.Generator, sites: int, out: int = 6, rank: int = 2, inner: int = 5):
    return [{A: rng.normal(size=(rank, inner)), B: rng.normal(size=(out, rank))} for _ in range(sites)]


# ----------------------------------------------------------------------------- pairs


def test_pairs_of_both_naming_schemes_and_not_the_magnitude() -> None:
    names = [A, B, DOWN, UP, MAG, "net.blk.qkv.lora_A.pet.weight", "net.blk.qkv.lora_B.pet.weight", "head.weight"]
    assert low_rank_pairs(names) == {A: B, DOWN: UP, "net.blk.qkv.lora_A.pet.weight": "net.blk.qkv.lora_B.pet.weight"}


@pytest.mark.parametrize("names", [[A], [B], [DOWN, UP, UP.replace("pe.", "pe2.")], [A, "net.blk.qkv.lora_B.pet.weight"]])
def test_a_factor_without_its_partner_is_refused(names: list[str]) -> None:
    with pytest.raises(ValueError, match="has no partner"):
        low_rank_pairs(names)


# ----------------------------------------------------------------------------- exact


def test_exact_is_the_weighted_mean_product_when_its_rank_fits() -> None:
    rng = np.random.default_rng(0)
    shared_a = rng.normal(size=(2, 5))
    updates = [{A: shared_a, B: rng.normal(size=(6, 2))} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    result = exact_low_rank(updates, weights, {A: B})
    w = np.array(weights) / sum(weights)
    product = sum(wk * u[B] @ u[A] for wk, u in zip(w, updates))
    np.testing.assert_allclose(result.tensors[B] @ result.tensors[A], product, atol=1e-12)
    # all sites share A: the naive rule is exact too, so its error is 0
    assert result.errors[A].relative == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(result.tensors[A] @ result.tensors[A].T, np.eye(2), atol=1e-12)  # orthonormal rows
    assert result.tensors[A].shape == (2, 5) and result.tensors[B].shape == (6, 2)


# (out, rank, in): small enough that the dense SVD is taken, and large (the QR path through the thin factors)
SIZES = [(6, 2, 5), (40, 3, 30)]


@pytest.mark.parametrize(("out", "rank", "inner"), SIZES)
def test_random_factors_naive_error_and_the_svd_tail(out: int, rank: int, inner: int) -> None:
    rng = np.random.default_rng(1)
    updates = site_factors(rng, 4, out, rank, inner)
    weights = [3.0, 1.0, 2.0, 2.0]
    result = exact_low_rank(updates, weights, {A: B})
    w = np.array(weights) / sum(weights)
    product = sum(wk * u[B] @ u[A] for wk, u in zip(w, updates))
    naive = sum(wk * u[B] for wk, u in zip(w, updates)) @ sum(wk * u[A] for wk, u in zip(w, updates))
    expected = np.linalg.norm(product - naive) / np.linalg.norm(product)
    assert expected > 0.05
    assert result.errors[A].relative == pytest.approx(expected, rel=1e-10)
    # Eckart-Young: the rank-r factors miss exactly the singular values beyond r
    s = np.linalg.svd(product, compute_uv=False)
    assert np.linalg.matrix_rank(product) > rank
    residual = np.linalg.norm(product - result.tensors[B] @ result.tensors[A])
    assert residual == pytest.approx(math.sqrt(np.sum(s[rank:] ** 2)), rel=1e-10)
    assert residual < np.linalg.norm(product - naive)
    np.testing.assert_allclose(result.tensors[A] @ result.tensors[A].T, np.eye(rank), atol=1e-12)


@pytest.mark.parametrize(("out", "rank", "inner"), SIZES)
def test_all_zero_b_keeps_a_alive(out: int, rank: int, inner: int) -> None:
    rng = np.random.default_rng(2)
    updates = [{A: rng.normal(size=(rank, inner)), B: np.zeros((out, rank))} for _ in range(2)]
    result = exact_low_rank(updates, [1.0, 1.0], {A: B})
    np.testing.assert_array_equal(result.tensors[B], 0.0)
    np.testing.assert_allclose(result.tensors[A] @ result.tensors[A].T, np.eye(rank), atol=1e-12)
    assert result.errors[A] == PairError(0.0, 0.0) and result.errors[A].relative == 0.0


def test_rank_above_the_matrix_size_keeps_shapes_and_product() -> None:
    rng = np.random.default_rng(3)
    updates = [{DOWN: rng.normal(size=(4, 3)), UP: rng.normal(size=(2, 4))} for _ in range(2)]
    result = exact_low_rank(updates, [1.0, 3.0], {DOWN: UP})
    product = 0.25 * updates[0][UP] @ updates[0][DOWN] + 0.75 * updates[1][UP] @ updates[1][DOWN]
    assert result.tensors[DOWN].shape == (4, 3) and result.tensors[UP].shape == (2, 4)
    np.testing.assert_allclose(result.tensors[UP] @ result.tensors[DOWN], product, atol=1e-12)
    assert np.all(np.linalg.norm(result.tensors[DOWN], axis=1) > 0.5)  # every row of A alive


def test_many_pairs_at_once_equal_each_pair_alone() -> None:
    """Pairs of one shape are factorised as one stack: the same factors and errors as one call per pair,
    for thin pairs (QR path), pairs whose sites' ranks fill the matrix (dense path) and rank > in."""
    rng = np.random.default_rng(7)
    shapes = {f"m{i}": shape for i, shape in enumerate([(6, 2, 5), (6, 2, 5), (6, 2, 5), (3, 2, 3), (2, 4, 3), (2, 4, 3), (8, 1, 9)])}
    pairs = {f"{m}.lora_down": f"{m}.lora_up" for m in shapes}
    updates = [{name: rng.normal(size=(shape[1], shape[2]) if name.endswith("down") else (shape[0], shape[1]))
                for m, shape in shapes.items() for name in (f"{m}.lora_down", f"{m}.lora_up")} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    together = exact_low_rank(updates, weights, pairs)
    for a_name, b_name in pairs.items():
        alone = exact_low_rank(updates, weights, {a_name: b_name})
        for name in (a_name, b_name):
            np.testing.assert_allclose(together.tensors[name], alone.tensors[name], rtol=1e-12, atol=1e-12)
        assert together.errors[a_name].naive_sq == pytest.approx(alone.errors[a_name].naive_sq, rel=1e-12)
        assert together.errors[a_name].product_sq == pytest.approx(alone.errors[a_name].product_sq, rel=1e-12)
    assert list(together.errors) == list(pairs)


def test_exact_refuses_bad_input() -> None:
    rng = np.random.default_rng(4)
    updates = site_factors(rng, 2)
    with pytest.raises(ValueError, match="lacks"):
        exact_low_rank([updates[0], {A: updates[1][A]}], [1.0, 1.0], {A: B})
    with pytest.raises(ValueError, match="positive sum"):
        exact_low_rank(updates, [0.0, 0.0], {A: B})
    with pytest.raises(ValueError, match="not a low-rank pair"):
        exact_low_rank([{A: updates[0][A], B: updates[0][B].T}], [1.0], {A: B})


def test_pooled_error_over_pairs() -> None:
    pooled, largest = pooled_error([PairError(1.0, 4.0), PairError(0.0, 12.0)])
    assert pooled == pytest.approx(math.sqrt(1 / 16)) and largest == pytest.approx(0.5)
    assert pooled_error([PairError(0.0, 0.0)]) == (0.0, 0.0)


# ----------------------------------------------------------------------------- aggregate_round


GROUPS = {A: "shared", B: "shared", MAG: "shared", DOWN: "pet", UP: "pet", "ct": "ct"}


def tiny_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {A: rng.normal(size=(2, 5)).astype(np.float32), B: np.zeros((6, 2), np.float32),
            MAG: np.ones(6, np.float32), DOWN: rng.normal(size=(2, 8)).astype(np.float32),
            UP: np.zeros((4, 2), np.float32), "ct": np.zeros(3, np.float32)}


def tiny_updates(rng: np.random.Generator, state: dict[str, np.ndarray]) -> list[SiteUpdate]:
    def moved(names):
        return {n: (state[n] + 0.3 * rng.normal(size=state[n].shape)).astype(np.float32) for n in names}

    return [
        SiteUpdate("ct-site", moved([A, B, MAG, "ct"]), {"shared": 3, "ct": 3}),
        SiteUpdate("pet-1", moved([A, B, MAG, DOWN, UP]), {"shared": 1, "pet": 2}),
        SiteUpdate("pet-2", moved([DOWN, UP]), {"pet": 6}),
    ]


def test_aggregate_round_exact_end_to_end() -> None:
    rng = np.random.default_rng(5)
    state = tiny_state(rng)
    updates = tiny_updates(rng, state)
    naive = aggregate_round(state, updates, GROUPS)
    exact = aggregate_round(state, updates, GROUPS, lora_aggregation="exact")
    # the naive round logs the same error the exact round removes
    assert naive.lora_naive_error == exact.lora_naive_error
    assert set(exact.lora_naive_error) == {"shared", "pet"} and all(v > 0 for v in exact.lora_naive_error.values())
    for (a, b), group in (((A, B), "shared"), ((DOWN, UP), "pet")):
        senders = [u for u in updates if a in u.tensors]
        w = np.array([u.examples[group] for u in senders], dtype=np.float64)
        w /= w.sum()
        product = sum(wk * u.tensors[b].astype(np.float64) @ u.tensors[a] for wk, u in zip(w, senders))
        got = exact.state[b].astype(np.float64) @ exact.state[a]
        rank = state[a].shape[0]
        tail = np.sqrt(np.sum(np.linalg.svd(product, compute_uv=False)[rank:] ** 2))
        assert np.linalg.norm(got - product) == pytest.approx(tail, rel=1e-4, abs=1e-5)
        assert not np.allclose(exact.state[a], naive.state[a])
        assert exact.state[a].dtype == np.float32
        naive_product = naive.state[b].astype(np.float64) @ naive.state[a]
        assert np.linalg.norm(naive_product - product) / np.linalg.norm(product) == pytest.approx(
            exact.lora_naive_error[group], rel=1e-4)
    # everything that is not a pair (the DoRA magnitude included) is the plain weighted mean
    for name in (MAG, "ct"):
        np.testing.assert_array_equal(exact.state[name], naive.state[name])


def test_aggregate_round_exact_uses_the_capped_weights() -> None:
    from pemma_core.aggregation import Allowance

    rng = np.random.default_rng(6)
    state = tiny_state(rng)
    updates = tiny_updates(rng, state)
    caps = {"ct-site": Allowance(), "pet-1": Allowance(), "pet-2": Allowance(weight_cap={"pet": 2})}
    capped = aggregate_round(state, updates, GROUPS, lora_aggregation="exact", allowances=caps)
    equal = [updates[0], updates[1], SiteUpdate("pet-2", updates[2].tensors, {"pet": 2})]
    expected = aggregate_round(state, equal, GROUPS, lora_aggregation="exact")
    np.testing.assert_array_equal(capped.state[UP], expected.state[UP])
    assert not np.allclose(capped.state[UP], aggregate_round(state, updates, GROUPS, lora_aggregation="exact").state[UP])


def test_aggregate_round_refusals() -> None:
    rng = np.random.default_rng(7)
    state = tiny_state(rng)
    updates = tiny_updates(rng, state)
    with pytest.raises(ValueError, match="robust rule"):
        aggregate_round(state, updates, GROUPS, lora_aggregation="exact", rule={"pet": "median"})
    # a robust group is not measured (its pairs are not averaged), the mean group is
    outcome = aggregate_round(state, updates, GROUPS, rule={"pet": "median"})
    assert set(outcome.lora_naive_error) == {"shared"}
    with pytest.raises(ValueError, match="lora_aggregation"):
        aggregate_round(state, updates, GROUPS, lora_aggregation="svd")
    with pytest.raises(ValueError, match="one parameter group"):
        aggregate_round(state, updates, {**GROUPS, UP: "fusion"})
    half = SiteUpdate("half", {UP: state[UP] + 0.1}, {"pet": 1})
    outcome = aggregate_round(state, [*updates, half], GROUPS, lora_aggregation="exact")
    assert [r.site for r in outcome.rejected] == ["half"] and "without its low-rank partner" in outcome.rejected[0].reasons[0]
    assert "half" in [u.site for u in aggregate_round(state, [*updates, half], GROUPS).accepted]


# ----------------------------------------------------------------------------- server optimisers


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_optimiser_two_steps_by_hand(kind: str) -> None:
    previous = {"w": np.array([1.0, -2.0, 0.5], np.float32), "still": np.array([3.0], np.float32)}
    aggregated = {"w": np.array([1.2, -2.5, 0.5], np.float32), "still": np.array([3.0], np.float32)}
    state = OptimizerState()
    first = server_step(kind, previous, aggregated, ["w"], state)
    d = aggregated["w"].astype(np.float64) - previous["w"]
    m = (1 - BETA1) * d
    v = (1 - BETA2) * d**2  # from v = 0 both rules give this
    np.testing.assert_allclose(first["w"], previous["w"] + SERVER_LR * m / (np.sqrt(v) + TAU), rtol=1e-6)
    np.testing.assert_array_equal(first["still"], previous["still"])
    assert "still" not in state.m and first["w"].dtype == np.float32
    # second step, a different pseudo-gradient: here Adam and Yogi differ
    second_target = {"w": first["w"] + np.array([0.05, 0.4, -0.1], np.float32), "still": first["still"]}
    second = server_step(kind, first, second_target, ["w"], state)
    d2 = second_target["w"].astype(np.float64) - first["w"]
    m2 = BETA1 * m + (1 - BETA1) * d2
    v2 = BETA2 * v + (1 - BETA2) * d2**2 if kind == "fedadam" else v - (1 - BETA2) * d2**2 * np.sign(v - d2**2)
    np.testing.assert_allclose(second["w"], first["w"] + SERVER_LR * m2 / (np.sqrt(v2) + TAU), rtol=1e-6)
    np.testing.assert_allclose(state.v["w"], v2)
    assert state.steps == {"w": 2}


def test_fedadam_and_fedyogi_differ_and_none_is_plain() -> None:
    previous = {"w": np.zeros(2)}
    steps = [np.array([1.0, 0.01]), np.array([0.01, 1.0])]
    out = {}
    for kind in ("fedadam", "fedyogi"):
        state, current = OptimizerState(), previous
        for delta in steps:
            current = server_step(kind, current, {"w": current["w"] + delta}, ["w"], state)
        out[kind] = current["w"]
    assert not np.allclose(out["fedadam"], out["fedyogi"])
    np.testing.assert_array_equal(server_step("none", previous, {"w": np.ones(2)}, ["w"], OptimizerState())["w"], 1.0)
    with pytest.raises(ValueError, match="server-optimizer"):
        server_step("sgd", previous, previous, [], OptimizerState())


# ----------------------------------------------------------------------------- run settings


def test_run_settings_names_defaults_and_refusals() -> None:
    settings = RunSettings()
    assert (settings.lora_aggregation, settings.server_optimizer, settings.server_lr) == ("auto", "none", SERVER_LR)
    ok = RunSettings.from_run_config({"lora-aggregation": "exact"})
    assert ok.lora_aggregation == "exact"
    assert RunSettings.from_run_config({"server-optimizer": "fedyogi", "secure-aggregation": True,
                                        "server-lr": 0.1}).server_lr == 0.1
    for config, message in (
        ({"lora-aggregation": "exact", "aggregation": "median"}, "needs aggregation = mean"),
        ({"lora-aggregation": "exact", "aggregation": "trimmed-mean"}, "needs aggregation = mean"),
        ({"lora-aggregation": "exact", "secure-aggregation": True}, "only the sums"),
        ({"lora-aggregation": "exact", "server-optimizer": "fedadam"}, "basis"),
        ({"lora-aggregation": "svd"}, "lora-aggregation: expected one of"),
        ({"server-optimizer": "sgd"}, "server-optimizer: expected one of"),
        ({"server-lr": 0.0}, "server-lr: expected a number > 0"),
    ):
        with pytest.raises(RunConfigError, match=message):
            RunSettings.from_run_config(config)


def test_auto_is_exact_where_the_server_sees_each_sites_factors_else_naive() -> None:
    # the naive rule's mean(B) mean(A) collapsed the federated CT mode on IBSI at seed 1 (BENCHMARKS.md)
    assert RunSettings().lora_aggregation_rule == "exact"
    for config in ({"aggregation": "median"}, {"aggregation": "trimmed-mean"}, {"secure-aggregation": True},
                   {"server-optimizer": "fedadam"}):
        assert RunSettings.from_run_config(config).lora_aggregation_rule == "naive", config
    assert RunSettings.from_run_config({"lora-aggregation": "naive"}).lora_aggregation_rule == "naive"
    assert RunSettings.from_run_config({"lora-aggregation": "exact"}).lora_aggregation_rule == "exact"


# ----------------------------------------------------------------------------- the strategy, through Flower messages


@pytest.fixture()
def strategy_setup(flower_identity: None):
    from pemma_core.model.spec import ModelSpec
    from pemma_core.protocol import Instruction
    from server.strategy import PemmaStrategy
    from test_server_strategy import begin_round, make_roster, reply

    rng = np.random.default_rng(8)
    state = {A: rng.normal(size=(2, 5)).astype(np.float32), B: np.zeros((6, 2), np.float32),
             "ct": np.zeros(3, np.float32)}
    groups = {A: "shared", B: "shared", "ct": "ct"}
    sent = [{n: (state[n] + 0.3 * rng.normal(size=state[n].shape)).astype(np.float32) for n in (A, B)}
            for _ in range(2)]
    replies = [reply(1, "site-a", sent[0], {"shared": 4}), reply(2, "site-b", sent[1], {"shared": 12})]

    def run(**options):
        instruction = Instruction(local_steps=10, lr=0.1, batch_size=2, seed=0, spec=ModelSpec(), fingerprint="fp")
        strategy = PemmaStrategy("adapt", state, groups, (32, 32, 32), instruction,
                                 roster=make_roster("site-a", "site-b"), min_sites=2, **options)
        begin_round(strategy, 2)
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return strategy, {k: arrays[k].numpy() for k in state}

    product = 0.25 * sent[0][B].astype(np.float64) @ sent[0][A] + 0.75 * sent[1][B].astype(np.float64) @ sent[1][A]
    return state, sent, product, run


def test_strategy_exact_changes_the_pair_and_records_the_error(strategy_setup) -> None:
    state, sent, product, run = strategy_setup
    naive_strategy, naive = run()
    exact_strategy, exact = run(lora_aggregation="exact")
    naive_product = naive[B].astype(np.float64) @ naive[A]
    tail = np.sqrt(np.sum(np.linalg.svd(product, compute_uv=False)[2:] ** 2))  # rank-2 truncation of a rank-4 sum
    residual = np.linalg.norm(exact[B].astype(np.float64) @ exact[A] - product)
    assert residual == pytest.approx(tail, rel=1e-4)
    assert np.linalg.norm(naive_product - product) > 1.5 * residual
    for strategy, rule in ((naive_strategy, "naive"), (exact_strategy, "exact")):
        record = strategy.rounds[-1].to_json()
        assert record["lora_aggregation"] == rule
        assert record["lora_naive_error"]["shared"] == pytest.approx(
            np.linalg.norm(naive_product - product) / np.linalg.norm(product), rel=1e-4)
        assert record["lora_naive_error_max"]["shared"] == pytest.approx(record["lora_naive_error"]["shared"], rel=1e-6)
        assert "server_optimizer" not in record
    np.testing.assert_array_equal(exact["ct"], state["ct"])


def test_strategy_fedadam_steps_on_the_aggregated_update(strategy_setup) -> None:
    state, sent, _, run = strategy_setup
    _, plain = run()
    strategy, stepped = run(server_optimizer="fedadam", server_lr=0.05)
    expected = server_step("fedadam", state, plain, [A, B], OptimizerState(), lr=0.05)
    for name in (A, B):
        np.testing.assert_allclose(stepped[name], expected[name], rtol=1e-6)
    np.testing.assert_array_equal(stepped["ct"], state["ct"])  # nobody sent it: no step, no moments
    assert set(strategy.optimizer_state.m) == {A, B}
    assert strategy.rounds[-1].to_json()["server_optimizer"] == "fedadam"


def test_strategy_refuses_exact_with_secure_or_an_optimiser(strategy_setup) -> None:
    _, _, _, run = strategy_setup
    for options in ({"secure": {"max_dropouts": 1, "min_cohort": 2}}, {"server_optimizer": "fedyogi"},
                    {"rule": "median"}):
        with pytest.raises(ValueError, match="lora-aggregation = exact"):
            run(lora_aggregation="exact", **options)


def test_report_shows_the_naive_error_and_the_server_step(tmp_path) -> None:
    from server.report import write_report
    from server.run_dir import RunDir
    from server.strategy import RoundRecord

    run = RunDir(tmp_path)
    run.write_json(run.run_json, RunSettings(lora_aggregation="naive", server_optimizer="fedyogi", server_lr=0.02).to_json())
    records = []
    for number, error in ((1, 0.25), (2, 0.125)):
        record = RoundRecord("adapt", number, aggregated=True, lora_aggregation="naive", server_optimizer="fedyogi")
        record.lora_naive_error, record.lora_naive_error_max = {"pet": error, "shared": 0.5}, {"pet": 2 * error, "shared": 0.75}
        records.append(record.to_json())
    run.write_json(run.metrics_json, {"run": {}, "rounds": records})
    report = write_report(run).read_text()
    assert "## Low-rank aggregation" in report and "server optimiser **fedyogi** (server-lr 0.02)" in report
    assert "| 1 | pet 0.25 (0.5), shared 0.5 (0.75) | fedyogi |" in report
    assert "| 2 | pet 0.125 (0.25), shared 0.5 (0.75) | fedyogi |" in report


def test_the_server_optimiser_moments_read_back_for_their_round_only(tmp_path) -> None:
    state = OptimizerState()
    previous = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}
    server_step("fedadam", previous, {"a": np.full(3, 0.5, np.float32), "b": previous["b"]}, ["a"], state)
    path = tmp_path / "server-optimizer" / "round-4.safetensors"
    save_state(path, state, 4)
    back = load_state(path, 4)
    assert back.steps == {"a": 1} and set(back.v) == {"a"}
    assert np.array_equal(back.m["a"], state.m["a"]) and np.array_equal(back.v["a"], state.v["a"])
    with pytest.raises(ValueError, match="after round 4, not 3"):
        load_state(path, 3)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{path}.*unreadable"):
        load_state(path, 4)
