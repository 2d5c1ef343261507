"""Modality-aware aggregation and update validation on hand-made state dicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pemma_core.aggregation import (
    RULES,
    Allowance,
    RejectedUpdateError,
    Rejection,
    SiteUpdate,
    aggregate_adapters,
    aggregate_round,
    clip_update,
    delta_rms,
    one_group,
    validate_update,
)

GROUPS = {"lora.a": "shared", "pet.embed": "pet", "fusion.proj": "fusion", "head.w": "prognosis"}


def global_state() -> dict[str, np.ndarray]:
    return {
        "lora.a": np.zeros((2, 3), dtype=np.float32),
        "pet.embed": np.full((4,), 10.0, dtype=np.float32),
        "fusion.proj": np.ones((2, 2), dtype=np.float32),
        "head.w": np.array([0.5, -0.5], dtype=np.float32),
    }


def test_tensor_trained_by_one_site_equals_that_sites_tensor():
    state = global_state()
    pet_site = SiteUpdate("B", {"pet.embed": np.arange(4, dtype=np.float32)}, {"pet": 7})
    ct_site = SiteUpdate("A", {"lora.a": np.ones((2, 3), dtype=np.float32)}, {"shared": 3})
    new = aggregate_adapters(state, [ct_site, pet_site], GROUPS)
    np.testing.assert_array_equal(new["pet.embed"], np.arange(4))
    np.testing.assert_array_equal(new["lora.a"], np.ones((2, 3)))


def test_tensor_trained_by_nobody_keeps_its_global_value_and_inputs_are_untouched():
    state = global_state()
    update = SiteUpdate("A", {"lora.a": np.ones((2, 3), dtype=np.float32)}, {"shared": 3})
    new = aggregate_adapters(state, [update], GROUPS)
    assert set(new) == set(state)
    for name in ("pet.embed", "fusion.proj", "head.w"):
        np.testing.assert_array_equal(new[name], state[name])
        assert new[name] is not state[name]  # a new dict of new arrays
    np.testing.assert_array_equal(state["lora.a"], 0.0)


def test_weights_follow_the_count_of_the_tensors_own_group():
    state = global_state()
    # Site A trained LoRA on 1 example and fusion on 9; site B: LoRA on 3, fusion on 1.
    site_a = SiteUpdate(
        "A", {"lora.a": np.zeros((2, 3), np.float32), "fusion.proj": np.zeros((2, 2), np.float32)}, {"shared": 1, "fusion": 9}
    )
    site_b = SiteUpdate(
        "B", {"lora.a": np.full((2, 3), 4.0, np.float32), "fusion.proj": np.full((2, 2), 10.0, np.float32)}, {"shared": 3, "fusion": 1}
    )
    new = aggregate_adapters(state, [site_a, site_b], GROUPS)
    np.testing.assert_allclose(new["lora.a"], 0.25 * 0.0 + 0.75 * 4.0)
    np.testing.assert_allclose(new["fusion.proj"], 0.9 * 0.0 + 0.1 * 10.0)


def test_float16_updates_are_accumulated_in_float64_and_returned_in_the_global_dtype():
    state = {"lora.a": np.zeros((3,), dtype=np.float32)}
    # 2049 is not representable in float16 but each site's value is (2048 and 2050); an
    # accumulation in float16 would round the weighted sum 0.5*2048 + 0.5*2050 = 2049.
    updates = [
        SiteUpdate("A", {"lora.a": np.full((3,), 2048.0, dtype=np.float16)}, {"shared": 5}),
        SiteUpdate("B", {"lora.a": np.full((3,), 2050.0, dtype=np.float16)}, {"shared": 5}),
    ]
    new = aggregate_adapters(state, updates, {"lora.a": "shared"})
    assert new["lora.a"].dtype == np.float32
    np.testing.assert_array_equal(new["lora.a"], 2049.0)
    # many small float16 contributions: float16 running sums would stall far below 1.0
    many = [SiteUpdate(str(i), {"lora.a": np.full((3,), 1.0, dtype=np.float16)}, {"shared": 1}) for i in range(3000)]
    np.testing.assert_allclose(aggregate_adapters(state, many, {"lora.a": "shared"})["lora.a"], 1.0, rtol=1e-6)


def test_integer_tensor_is_rounded_and_keeps_its_dtype():
    state = {"steps": np.array([0], dtype=np.int64)}
    updates = [SiteUpdate("A", {"steps": np.array([10])}, {"backbone": 1}), SiteUpdate("B", {"steps": np.array([13])}, {"backbone": 1})]
    new = aggregate_adapters(state, updates, one_group(state))
    assert new["steps"].dtype == np.int64 and new["steps"][0] == 12  # rint(11.5) -> 12 (half to even)


def test_full_state_fedavg_is_the_single_group_case():
    state = {"conv.w": np.zeros((2, 2), np.float32), "conv.b": np.zeros((2,), np.float32)}
    groups = one_group(state)
    assert groups == {"conv.w": "backbone", "conv.b": "backbone"}
    updates = [
        SiteUpdate("A", {k: np.full_like(v, 1.0) for k, v in state.items()}, {"backbone": 100}),
        SiteUpdate("B", {k: np.full_like(v, 2.0) for k, v in state.items()}, {"backbone": 300}),
    ]
    new = aggregate_adapters(state, updates, groups)
    for value in new.values():
        np.testing.assert_allclose(value, 1.75)


def test_aggregate_refuses_inconsistent_input():
    state = global_state()
    with pytest.raises(ValueError, match="unknown tensor 'ghost'"):
        aggregate_adapters(state, [SiteUpdate("A", {"ghost": np.zeros(1)}, {"shared": 1})], GROUPS)
    with pytest.raises(ValueError, match="shape"):
        aggregate_adapters(state, [SiteUpdate("A", {"lora.a": np.zeros((3, 2))}, {"shared": 1})], GROUPS)
    with pytest.raises(ValueError, match="no examples for group 'shared'"):
        aggregate_adapters(state, [SiteUpdate("A", {"lora.a": np.zeros((2, 3))}, {"shared": 0})], GROUPS)
    with pytest.raises(ValueError, match="no parameter group"):
        aggregate_adapters(state, [SiteUpdate("A", {"lora.a": np.zeros((2, 3))}, {"shared": 1})], {})


# --------------------------------------------------------------------------- validation


def good_update() -> SiteUpdate:
    return SiteUpdate("A", {"lora.a": np.full((2, 3), 0.1, np.float16), "head.w": np.array([0.4, -0.4], np.float32)}, {"shared": 5, "prognosis": 5})


def test_valid_update_has_no_reasons():
    assert validate_update(good_update(), global_state(), GROUPS, max_norm=1.0) == []


@pytest.mark.parametrize(
    ("tensors", "examples", "expected"),
    [
        ({"ghost": np.zeros(2, np.float32)}, {"shared": 1}, "unknown tensor 'ghost'"),
        ({"lora.a": np.zeros((3, 2), np.float32)}, {"shared": 1}, "has shape (3, 2), expected (2, 3)"),
        ({"lora.a": np.zeros((2, 3), np.int32)}, {"shared": 1}, "dtype int32 (integer), expected floating"),
        ({"lora.a": np.array([[0, np.nan, 0], [0, 0, 0]], np.float32)}, {"shared": 1}, "non-finite"),
        ({"lora.a": np.array([[0, np.inf, 0], [0, 0, 0]], np.float32)}, {"shared": 1}, "non-finite"),
        ({"lora.a": np.zeros((2, 3), np.float32)}, {"shared": 0}, "zero count for its group 'shared'"),
        ({"lora.a": np.zeros((2, 3), np.float32)}, {"pet": 4}, "zero count for its group 'shared'"),
        ({}, {"shared": -2}, "negative count -2"),
        ({}, {"radiomics": 2}, "unknown group 'radiomics'"),
        ({}, {"shared": 2.5}, "not an integer"),
    ],
)
def test_each_rejection_reason(tensors, examples, expected):
    reasons = validate_update(SiteUpdate("siteX", tensors, examples), global_state(), GROUPS, max_norm=None)
    assert len(reasons) == 1, reasons
    assert expected in reasons[0] and "siteX" in reasons[0]


def test_tensor_without_group_is_rejected():
    reasons = validate_update(SiteUpdate("A", {"head.w": np.zeros(2, np.float32)}, {"shared": 1}), global_state(), {"lora.a": "shared"}, None)
    assert reasons == ["site 'A': tensor 'head.w' has no parameter group"]


def test_update_norm_is_measured_against_the_global_state_over_all_tensors():
    state = global_state()
    # difference: lora.a moves by 3 in one entry, head.w by 4 in one entry -> norm 5
    lora = state["lora.a"].copy()
    lora[0, 0] = 3.0
    head = state["head.w"].copy()
    head[1] += 4.0
    update = SiteUpdate("A", {"lora.a": lora, "head.w": head}, {"shared": 1, "prognosis": 1})
    assert validate_update(update, state, GROUPS, max_norm=5.01) == []
    reasons = validate_update(update, state, GROUPS, max_norm=4.99)
    assert len(reasons) == 1 and "update norm 5 exceeds max_norm 4.99" in reasons[0]
    with pytest.raises(ValueError, match="max_norm"):
        validate_update(update, state, GROUPS, max_norm=-1.0)


def test_several_problems_are_all_reported():
    update = SiteUpdate("A", {"ghost": np.zeros(1), "lora.a": np.full((2, 3), np.nan, np.float32)}, {"shared": -1})
    reasons = validate_update(update, global_state(), GROUPS, max_norm=None)
    assert len(reasons) == 3


# --------------------------------------------------------------------------- one round


def test_round_aggregates_the_accepted_updates_and_reports_the_rejected():
    state = global_state()
    bad = SiteUpdate("B", {"lora.a": np.full((2, 3), np.nan, np.float32)}, {"shared": 1})
    outcome = aggregate_round(state, [good_update(), bad], GROUPS, max_norm=1.0)
    assert outcome.aggregated
    assert [u.site for u in outcome.accepted] == ["A"]
    assert outcome.rejected == (Rejection("B", ("site 'B': tensor 'lora.a' has non-finite values",)),)
    expected = aggregate_adapters(state, [good_update()], GROUPS)
    for name in state:
        np.testing.assert_array_equal(outcome.state[name], expected[name])
    with pytest.raises(RejectedUpdateError, match="site 'B': tensor 'lora.a' has non-finite values"):
        outcome.raise_for_rejected()
    clean = aggregate_round(state, [good_update()], GROUPS)
    assert clean.raise_for_rejected() is clean


def test_round_with_too_few_accepted_updates_keeps_the_global_state():
    state = global_state()
    too_far = SiteUpdate("A", {"pet.embed": np.zeros(4, np.float32)}, {"pet": 3})  # moved by 20
    outcome = aggregate_round(state, [too_far, good_update()], GROUPS, max_norm=1.0, min_sites=2)
    assert not outcome.aggregated and [r.site for r in outcome.rejected] == ["A"]
    for name in state:
        np.testing.assert_array_equal(outcome.state[name], state[name])
        assert outcome.state[name] is not state[name]
    with pytest.raises(ValueError, match="min_sites"):
        aggregate_round(state, [], GROUPS, min_sites=-1)


# --------------------------------------------------------------------------- allowances


def test_tensor_or_count_of_a_group_the_site_may_not_send_is_rejected():
    state = global_state()
    allow = {"A": Allowance(groups=frozenset({"shared"}))}
    pet = SiteUpdate("A", {"pet.embed": np.zeros(4, np.float32)}, {"pet": 2})
    outcome = aggregate_round(state, [pet], GROUPS, allowances=allow)
    (rejection,) = outcome.rejected
    assert any("'A'" in r and "'pet.embed'" in r and "'pet'" in r and "may not send" in r for r in rejection.reasons)
    count_only = SiteUpdate("A", {"lora.a": np.zeros((2, 3), np.float32)}, {"shared": 1, "pet": 3})
    reasons = validate_update(count_only, state, GROUPS, allowance=allow["A"])
    assert reasons == ["site 'A': reports 3 examples for group 'pet', which it may not train"]
    assert validate_update(SiteUpdate("A", count_only.tensors, {"shared": 1, "pet": 0}), state, GROUPS, allowance=allow["A"]) == []


def test_count_above_max_examples_absurd_counts_and_unknown_sites_are_rejected():
    state = global_state()
    update = SiteUpdate("A", {"lora.a": np.zeros((2, 3), np.float32)}, {"shared": 10**12})
    reasons = validate_update(update, state, GROUPS, allowance=Allowance(max_examples=20))
    assert reasons == ["site 'A': count 1000000000000 for group 'shared' exceeds what the round allowed (20)"]
    assert validate_update(SiteUpdate("A", update.tensors, {"shared": 20}), state, GROUPS, allowance=Allowance(max_examples=20)) == []
    absurd = validate_update(SiteUpdate("A", update.tensors, {"shared": 2**60}), state, GROUPS)
    assert len(absurd) == 1 and "absurd count" in absurd[0]
    outcome = aggregate_round(state, [update], GROUPS, allowances={"B": Allowance()})
    assert not outcome.accepted and "no allowance" in outcome.rejected[0].reasons[0]
    with pytest.raises(ValueError, match="max_examples"):
        Allowance(max_examples=-1)
    with pytest.raises(TypeError, match="groups"):
        Allowance(groups="shared")


def test_weight_cap_bounds_the_weight_of_a_sites_count():
    state = global_state()
    big = SiteUpdate("A", {"lora.a": np.full((2, 3), 1.0, np.float32)}, {"shared": 100})  # declared 10 cases
    small = SiteUpdate("B", {"lora.a": np.full((2, 3), 5.0, np.float32)}, {"shared": 30})
    allow = {"A": Allowance(weight_cap={"shared": 10}), "B": Allowance(weight_cap={"pet": 1})}  # B: shared not capped
    outcome = aggregate_round(state, [big, small], GROUPS, allowances=allow)
    np.testing.assert_allclose(outcome.state["lora.a"], (10 * 1.0 + 30 * 5.0) / 40)
    assert outcome.weights == {"A": {"shared": 10.0}, "B": {"shared": 30.0}}
    assert outcome.accepted[0] is big and big.examples == {"shared": 100}  # inputs untouched
    zero_cap = validate_update(big, state, GROUPS, allowance=Allowance(weight_cap={"shared": 0}))
    assert len(zero_cap) == 1 and "declared no training cases" in zero_cap[0]


# --------------------------------------------------------------------------- clipping


def test_clipping_scales_the_float_delta_to_max_norm_and_leaves_integers_alone():
    state = {"w": np.zeros(3, np.float64), "b": np.ones(1, np.float64), "steps": np.array([5], np.int64)}
    update = SiteUpdate("A", {"w": np.array([3.0, 0.0, 0.0]), "b": np.array([5.0]), "steps": np.array([9])}, {"backbone": 1})
    # float delta (3, 0, 0, 4): norm 5; the counter moved by 4 but is not a learned weight
    outcome = aggregate_round(state, [update], one_group(state), 1.0, clip=True)
    assert outcome.accepted == (update,) and not outcome.rejected
    (clip,) = outcome.clipped
    assert clip.site == "A" and clip.factor == pytest.approx(0.2)
    assert "update norm 5 clipped to max-update-norm 1 (factor 0.2)" in clip.reason
    delta = np.concatenate([outcome.state["w"] - state["w"], outcome.state["b"] - state["b"]])
    assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(delta, [0.6, 0, 0, 0.8])
    assert outcome.state["steps"][0] == 9 and outcome.state["steps"].dtype == np.int64
    clipped = clip_update(update, state, 0.5)
    np.testing.assert_array_equal(clipped.tensors["steps"], [9])
    np.testing.assert_allclose(clipped.tensors["b"], [3.0])
    # within the bound: not clipped; without clip=True the bound still rejects (today's behaviour)
    assert not aggregate_round(state, [update], one_group(state), 6.0, clip=True).clipped
    assert "exceeds max_norm" in aggregate_round(state, [update], one_group(state), 1.0).rejected[0].reasons[0]


# --------------------------------------------------------------------------- outlier bound


def honest_updates(state, sites=("A", "B", "C"), seed=0, group_tensors=("lora.a",)):
    rng = np.random.default_rng(seed)
    return [
        SiteUpdate(site, {n: (state[n] + 0.01 * rng.normal(size=state[n].shape)).astype(np.float32) for n in group_tensors},
                   {GROUPS[n]: 4 for n in group_tensors})
        for site in sites
    ]


def scaled(update: SiteUpdate, state, name: str, factor: float) -> SiteUpdate:
    tensors = dict(update.tensors)
    tensors[name] = (state[name] + factor * (tensors[name].astype(np.float64) - state[name])).astype(np.float32)
    return SiteUpdate(update.site, tensors, update.examples)


def test_a_million_times_larger_update_is_rejected_and_the_honest_mean_kept():
    state = global_state()
    honest = honest_updates(state)
    attacker = scaled(honest_updates(state, sites=("X",), seed=1)[0], state, "lora.a", 1e6)
    outcome = aggregate_round(state, [attacker, *honest], GROUPS, outlier_factor=5)
    assert [r.site for r in outcome.rejected] == ["X"]
    (reason,) = outcome.rejected[0].reasons
    assert "'X'" in reason and "'shared'" in reason and "5 x" in reason and f"{outcome.reference_rms:.3g}" in reason
    np.testing.assert_allclose(outcome.state["lora.a"], np.mean([u.tensors["lora.a"] for u in honest], axis=0), rtol=1e-6)
    assert outcome.contributors == {"shared": ("A", "B", "C")}
    # without the bound the attacker dominates the mean
    assert np.abs(aggregate_round(state, [attacker, *honest], GROUPS).state["lora.a"]).max() > 100


def test_a_group_with_two_senders_is_caught_by_the_pooled_reference():
    state = global_state()
    shared_only = honest_updates(state, sites=("A", "B"))
    with_pet = honest_updates(state, sites=("C", "D"), seed=2, group_tensors=("lora.a", "pet.embed"))
    with_pet[1] = scaled(with_pet[1], state, "pet.embed", 1e6)
    outcome = aggregate_round(state, [*shared_only, *with_pet], GROUPS, outlier_factor=5)
    assert [r.site for r in outcome.rejected] == ["D"] and "'pet'" in outcome.rejected[0].reasons[0]
    np.testing.assert_array_equal(outcome.state["pet.embed"], with_pet[0].tensors["pet.embed"])
    # the two pet senders alone could not tell the outlier apart: it is below 5x their median
    pet_rms = [outcome.rms[s]["pet"] for s in ("C", "D")]
    assert max(pet_rms) < 5 * np.median(pet_rms)


def test_honest_sites_three_times_apart_are_kept():
    state = global_state()
    updates = [scaled(u, state, "lora.a", f) for u, f in zip(honest_updates(state), (1.0, 1.0, 3.0))]
    outcome = aggregate_round(state, updates, GROUPS, outlier_factor=5)
    assert not outcome.rejected and len(outcome.accepted) == 3
    ratio = outcome.rms["C"]["shared"] / outcome.reference_rms
    assert 2 < ratio < 5  # the largest really is about 3x the reference


def test_values_near_float32_max_are_rejected_without_overflow():
    state = global_state()
    huge = SiteUpdate("X", {"lora.a": np.full((2, 3), 3e38, np.float32)}, {"shared": 4})
    outcome = aggregate_round(state, [huge, *honest_updates(state)], GROUPS, 1.0, clip=True, outlier_factor=5)
    assert [r.site for r in outcome.rejected] == ["X"]
    assert all(np.all(np.isfinite(v)) for v in outcome.state.values())
    assert math.isfinite(outcome.rms["X"]["shared"])
    # float64 entries whose squares overflow: the norm is still computed and reported
    far = {"w": np.zeros(2)}
    reasons = validate_update(SiteUpdate("A", {"w": np.array([1e200, 1e200])}, {"backbone": 1}), far, one_group(far), 1.0)
    assert len(reasons) == 1 and "update norm 1.414e+200 exceeds" in reasons[0]


def test_reference_zero_rejects_nobody():
    state = global_state()
    same = [SiteUpdate(s, {"lora.a": state["lora.a"].copy()}, {"shared": 1}) for s in "ABC"]
    mover = SiteUpdate("D", {"lora.a": state["lora.a"] + 1.0}, {"shared": 1})
    outcome = aggregate_round(state, [*same, mover], GROUPS, outlier_factor=5)
    assert outcome.reference_rms == 0.0 and not outcome.rejected and len(outcome.accepted) == 4
    assert aggregate_round(state, same, GROUPS).reference_rms is None  # the rule was not applied


def test_rejections_keep_the_order_of_the_updates_whatever_rule_rejected_them():
    state = global_state()
    honest = honest_updates(state, sites=("A", "B", "C", "D"))
    invalid = SiteUpdate("N", {"lora.a": np.full((2, 3), np.nan, np.float32)}, {"shared": 1})
    outlier = scaled(honest[0], state, "lora.a", 1e6)
    outlier = SiteUpdate("O", outlier.tensors, outlier.examples)
    outcome = aggregate_round(state, [outlier, honest[1], invalid, honest[2], honest[3]], GROUPS, outlier_factor=5)
    assert [r.site for r in outcome.rejected] == ["O", "N"]
    assert [u.site for u in outcome.accepted] == ["B", "C", "D"] and outcome.accepted[0] is honest[1]


# --------------------------------------------------------------------------- robust rules


def round_of(values, rule, counts=None):
    state = {"w": np.zeros(2, np.float64), "n": np.zeros(2, np.int64)}
    counts = counts or [1] * len(values)
    updates = [
        SiteUpdate(f"s{i}", {"w": np.array([v, -v], float), "n": np.array([v, v], np.int64)}, {"backbone": c})
        for i, (v, c) in enumerate(zip(values, counts))
    ]
    return aggregate_round(state, updates, one_group(state), rule=rule)


def test_median_and_trimmed_mean_exact_values():
    assert round_of([1, 2, 100], "median").state["w"].tolist() == [2, -2]
    assert round_of([1, 2, 7, 100], "median").state["w"].tolist() == [4.5, -4.5]
    assert round_of([1, 2, 7, 100], "median").state["n"].tolist() == [4, 4]  # rint(4.5), half to even
    assert round_of([1, 2, 100], "trimmed-mean").state["w"].tolist() == [2, -2]  # k = 1
    assert round_of([1, 2, 3, 4, 100], "trimmed-mean").state["w"].tolist() == [3, -3]  # k = 1
    assert round_of(list(range(1, 10)) + [1000], "trimmed-mean").state["w"].tolist() == [5.5, -5.5]  # k = 2: mean of 3..8
    # unweighted: counts 1 and 99 give the plain mean, the mean rule follows the counts
    assert round_of([0, 10], "trimmed-mean", counts=[1, 99]).state["w"].tolist() == [5, -5]
    assert round_of([0, 10], "mean", counts=[1, 99]).state["w"].tolist() == [9.9, -9.9]
    assert round_of([0, 10], "median", counts=[1, 99]).weights == {"s0": {"backbone": 1.0}, "s1": {"backbone": 1.0}}


def test_median_ignores_one_huge_outlier_among_three():
    state = global_state()
    honest = honest_updates(state, sites=("A", "B"))
    attacker = SiteUpdate("X", {"lora.a": np.full((2, 3), 1e30, np.float32)}, {"shared": 1000})
    outcome = aggregate_round(state, [*honest, attacker], GROUPS, rule="median")
    low, high = np.minimum(*(u.tensors["lora.a"] for u in honest)), np.maximum(*(u.tensors["lora.a"] for u in honest))
    assert np.all(outcome.state["lora.a"] == high) and np.all(low <= outcome.state["lora.a"])


def test_rule_per_group_and_unknown_rule():
    state = global_state()
    updates = [
        SiteUpdate(s, {"lora.a": np.full((2, 3), v, np.float32), "pet.embed": np.full(4, v, np.float32)}, {"shared": c, "pet": c})
        for s, v, c in (("A", 0.0, 1), ("B", 1.0, 1), ("C", 8.0, 2))
    ]
    outcome = aggregate_round(state, updates, GROUPS, rule={"pet": "median"})
    np.testing.assert_allclose(outcome.state["pet.embed"], 1.0)
    np.testing.assert_allclose(outcome.state["lora.a"], (0 + 1 + 16) / 4)
    assert outcome.weights["C"] == {"shared": 2.0, "pet": 1.0}
    for bad in ("krum", {"pet": "krum"}):
        with pytest.raises(ValueError, match="unknown aggregation rule 'krum'; valid rules: mean, median, trimmed-mean"):
            aggregate_round(state, updates, GROUPS, rule=bad)
    assert RULES == ("mean", "median", "trimmed-mean")


# --------------------------------------------------------------------------- reported fields


def test_delta_rms_contributors_and_weights():
    state = {"a": np.zeros(4, np.float32), "b": np.zeros(12, np.float32), "c": np.ones(2, np.float32), "k": np.zeros(1, np.int64)}
    groups = {"a": "g", "b": "g", "c": "h", "k": "g"}
    one = SiteUpdate("A", {"a": np.ones(4, np.float32), "b": np.zeros(12, np.float32), "k": np.array([7])}, {"g": 3})
    two = SiteUpdate("B", {"c": np.full(2, 3.0, np.float32)}, {"h": 5})
    assert delta_rms(one, state, groups) == pytest.approx({"g": 0.5})  # sqrt(4 / 16); the integer tensor left out
    assert delta_rms(two, state, groups) == pytest.approx({"h": 2.0})
    outcome = aggregate_round(state, [two, one], groups)
    assert outcome.contributors == {"g": ("A",), "h": ("B",)}
    assert outcome.weights == {"A": {"g": 3.0}, "B": {"h": 5.0}}
    assert outcome.rms == {"A": pytest.approx({"g": 0.5}), "B": pytest.approx({"h": 2.0})}
    not_enough = aggregate_round(state, [one], groups, min_sites=2)
    assert not not_enough.aggregated and not_enough.contributors == {} and "A" in not_enough.rms


def test_random_rounds_never_raise_and_stay_finite():
    names = {"lora.a": ((2, 3), np.float32), "pet.embed": ((4,), np.float32), "fusion.proj": ((2, 2), np.float16),
             "head.w": ((2,), np.float32), "steps": ((1,), np.int64)}
    groups = {**GROUPS, "steps": "prognosis"}
    for seed in range(200):
        rng = np.random.default_rng(seed)
        state = {n: (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype) for n, (shape, dtype) in names.items()}
        updates, allowances = [], {}
        for i in range(int(rng.integers(0, 7))):
            site = f"s{i}"
            sent = [n for n in names if rng.random() < 0.6]
            scale = 10.0 ** rng.choice([-6, -2, -2, -2, 0, 3, 30, 38])
            tensors = {}
            for n in sent:
                if state[n].dtype == np.int64:
                    tensors[n] = state[n] + rng.integers(0, 100, size=state[n].shape)
                    continue
                value = state[n].astype(np.float64) + scale * rng.normal(size=state[n].shape)
                if rng.random() < 0.05:
                    value.flat[0] = np.nan
                with np.errstate(over="ignore"):  # float16 of 1e30 is inf: validation must reject it
                    tensors[n] = value.astype(state[n].dtype)
            counts = {g: int(rng.choice([0, 1, 5, 40, 10**12], p=[0.03, 0.4, 0.3, 0.24, 0.03])) for g in {groups[n] for n in sent}}
            updates.append(SiteUpdate(site, tensors, counts))
            if rng.random() < 0.9:
                allowed = frozenset(g for g in set(groups.values()) if rng.random() < 0.97)
                caps = {g: int(rng.integers(0, 30)) for g in allowed if rng.random() < 0.5}
                allowances[site] = Allowance(allowed, int(rng.choice([50, 10**13])), caps)
        outcome = aggregate_round(
            state, updates, groups, float(rng.choice([0.0, 0.1, 10.0, 1e40])), min_sites=int(rng.integers(0, 3)),
            clip=bool(rng.random() < 0.8), allowances=allowances, outlier_factor=float(rng.choice([1.5, 5.0])),
            rule=str(rng.choice(RULES)),
        )
        assert len(outcome.accepted) + len(outcome.rejected) == len(updates), seed
        assert set(outcome.state) == set(state)
        for name, value in outcome.state.items():
            assert value.dtype == state[name].dtype and np.all(np.isfinite(value)), (seed, name)
        for sites in outcome.contributors.values():
            assert set(sites) <= {u.site for u in outcome.accepted}


def test_a_site_that_sends_more_groups_gets_one_vote_in_the_outlier_reference():
    """Found by the scale adversary once the shared LoRA learnt from CT steps only: a CT+PET
    site sent 4 groups, each honest site 2, so its 4 scaled groups were half the (site, group)
    pairs and the pooled median sat among them; every update was then accepted."""
    groups = {"shared": "shared", "ct": "ct", "pet": "pet", "fusion": "fusion"}
    global_state = {name: np.zeros(16) for name in groups}
    honest = lambda site, names: SiteUpdate(site, {n: np.full(16, 0.01) for n in names}, {n: 2 for n in names})  # noqa: E731
    attacker = SiteUpdate("site-2", {n: np.full(16, 1e4) for n in groups}, {n: 1 for n in groups})
    updates = [honest("site-1", ["shared", "ct"]), attacker, honest("site-3", ["pet", "fusion"])]
    outcome = aggregate_round(global_state, updates, groups, None, min_sites=1, outlier_factor=5.0)
    assert [u.site for u in outcome.accepted] == ["site-1", "site-3"]
    assert outcome.reference_rms == pytest.approx(0.01)


def test_a_group_that_moves_faster_by_design_is_not_an_outlier():
    """Found in the long IBSI bench (seed 1, round 2): the fusion group moves several times more
    per element than the others at every CT+PET site, and the CT groups learn at a fraction of the
    rate, so site-b's honest fusion update read 5.7x the pooled reference and site-b was left out
    of three rounds. These are that round's rms values. An update is judged against the larger of
    the pooled reference and its group's median among the other senders: scaled tenfold, site-b's
    fusion update is still caught."""
    groups = {"shared": "shared", "ct": "ct", "pet": "pet", "fusion": "fusion"}
    state = {name: np.zeros(64) for name in groups}
    measured = {"a": {"ct": 0.0077, "shared": 0.0049},
                "b": {"pet": 0.0046, "ct": 0.0015, "fusion": 0.021, "shared": 0.0024},
                "c": {"pet": 0.0056, "ct": 0.0014, "fusion": 0.0162, "shared": 0.0018}}

    def updates(fusion_scale: float) -> list[SiteUpdate]:
        out = []
        for site, moves in measured.items():
            scale = {"fusion": fusion_scale if site == "b" else 1.0}
            out.append(SiteUpdate(site, {g: np.full(64, rms * scale.get(g, 1.0)) for g, rms in moves.items()},
                                  {g: 4 for g in moves}))
        return out

    honest = aggregate_round(state, updates(1.0), groups, outlier_factor=5)
    assert not honest.rejected and honest.rms["b"]["fusion"] > 5 * honest.reference_rms
    attacked = aggregate_round(state, updates(10.0), groups, outlier_factor=5)
    assert [r.site for r in attacked.rejected] == ["b"]
    assert "'fusion'" in attacked.rejected[0].reasons[0] and "other senders" in attacked.rejected[0].reasons[0]
