"""Modality-aware aggregation and update validation on hand-made state dicts."""

from __future__ import annotations

import numpy as np
import pytest

from pemma_core.aggregation import (
    RejectedUpdateError,
    Rejection,
    SiteUpdate,
    aggregate_adapters,
    aggregate_round,
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
