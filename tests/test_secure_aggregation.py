"""Per-group secure aggregation (client/server roles over pemma_core.secure_sum), one round in process."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import quantize

from client.secure_aggregation import SiteRound
from pemma_core.secure_sum import (
    SecureAggregationError,
    add_mod,
    dequantize_sum,
    mask_stream,
    sub_mod,
    threshold_for,
    weight_name,
)
from server.secure_aggregation import ServerRound

ROUND = 3
CLIP = 0.5
TARGET = 2**20
STEP = 2 * CLIP / TARGET
GROUPS = {"lora.a": "shared", "lora.b": "shared", "pet.delta": "pet"}
SHAPES = {"lora.a": (4, 8), "lora.b": (16,), "pet.delta": (2, 3, 5)}
# Which groups each site trains; the cohorts follow from it.
TRAINS = {"a": ["shared"], "b": ["shared", "pet"], "c": ["shared", "pet"]}


def _cohorts(trains):
    out: dict[str, list[str]] = {}
    for site, groups in trains.items():
        for g in groups:
            out.setdefault(g, []).append(site)
    return {g: sorted(v) for g, v in out.items()}


def _update(site: str, trains, shapes) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(sum(map(ord, site)))
    tensors = {t: rng.uniform(-CLIP, CLIP, shapes[t]) for t, g in GROUPS.items() if g in trains[site]}
    weights = {g: 10 + 7 * ord(site[0]) % 13 for g in trains[site]}
    return tensors, weights


def _seed(site: str) -> int:
    return 1000 + ord(site[0])


def _reference_quantized(site: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the site's quantisation gives: same seeding, same (sorted) order."""
    names = sorted(tensors)
    saved = np.random.get_state()
    np.random.seed([_seed(site) & 0xFFFFFFFF, _seed(site) >> 32, ROUND])
    q = quantize([tensors[n].astype(np.float64) for n in names], CLIP, TARGET)
    np.random.set_state(saved)
    return {n: np.asarray(a).astype(np.uint32) for n, a in zip(names, q)}


class Federation:
    """Drives one round through every step; ``roundtrip`` passes each site through to_state/from_state."""

    def __init__(self, trains=TRAINS, max_dropouts=1, roundtrip=False, min_cohort=2, shapes=SHAPES):
        self.trains = trains
        self.shapes = shapes
        self.roundtrip = roundtrip
        self.names = sorted(trains)
        self.sites = {s: SiteRound.new(s, ROUND, _seed(s)) for s in self.names}
        self._cycle()
        self.threshold = threshold_for(len(self.names), max_dropouts)
        self.server = ServerRound(ROUND, {s: r.public_keys() for s, r in self.sites.items()}, self.threshold,
                                  min_cohort=min_cohort)
        self.data = {s: _update(s, trains, shapes) for s in self.names}
        self.masked: dict[str, dict[str, np.ndarray]] = {}

    def _cycle(self):
        if self.roundtrip:
            for s, r in self.sites.items():
                state = r.to_state()
                assert all(isinstance(k, str) and isinstance(v, (str, bytes, int)) for k, v in state.items())
                self.sites[s] = SiteRound.from_state(dict(state))

    def share(self):
        members = self.server.members_message()
        for s in self.names:
            assert self.server.add_shares(s, self.sites[s].share_keys(members, self.threshold))
        self._cycle()
        for s in self.names:
            assert self.sites[s].receive_shares(self.server.ciphertexts_for(s)) == {}
        self._cycle()
        self.server.plan(GROUPS, self.shapes, _cohorts(self.trains), CLIP, TARGET)

    def mask(self, senders):
        for s in senders:
            tensors, weights = self.data[s]
            self.masked[s] = self.sites[s].mask(tensors, weights, GROUPS, _cohorts(self.trains), CLIP, TARGET)
            assert self.server.add_masked(s, self.masked[s]), self.server.bad
        self._cycle()

    def unmask(self, final, responders=None):
        request = self.server.unmask_request(final)
        answers = {s: self.sites[s].unmask_shares(request["final"], request["dropped"])
                   for s in (responders if responders is not None else request["final"])}
        self._cycle()
        return self.server.unmask(final, answers)

    def plain(self, contributors_by_group):
        """Exact uint32 and float sums of the contributors' (quantised) values, per tensor; weight sums."""
        q_sum, f_sum, w_sum = {}, {}, {}
        for t, g in GROUPS.items():
            who = contributors_by_group.get(g, [])
            if not who:
                continue
            q_sum[t] = sum(_reference_quantized(s, self.data[s][0])[t] for s in who)
            f_sum[t] = sum(self.data[s][0][t] for s in who)
        for g, who in contributors_by_group.items():
            w_sum[g] = sum(self.data[s][1][g] for s in who)
        return q_sum, f_sum, w_sum


def test_unmasked_sums_equal_plain_sums_per_group():
    fed = Federation()
    fed.share()
    fed.mask(fed.names)
    result = fed.unmask(fed.names)
    cohorts = _cohorts(TRAINS)
    assert result.contributors == cohorts and result.skipped == {} and result.bad == {}
    q_sum, f_sum, w_sum = fed.plain(cohorts)
    assert result.weights == w_sum
    worst = 0.0
    for t in GROUPS:
        np.testing.assert_array_equal(result.quantized[t], q_sum[t])
        k = len(cohorts[GROUPS[t]])
        err = float(np.max(np.abs(result.sums[t] - f_sum[t])))
        assert err <= k * STEP
        worst = max(worst, err / STEP)
    print(f"max abs error of the dequantised sums: {worst:.3f} quantisation steps (step {STEP:.3g})")


def test_masked_payload_is_unrelated_to_the_quantised_values():
    trains = {"a": ["shared"], "b": ["shared"], "c": ["shared"]}
    fed = Federation(trains, shapes={**SHAPES, "lora.a": (64, 64)})
    fed.data["b"][0]["lora.a"] = np.linspace(-CLIP, CLIP, 4096).reshape(64, 64)
    fed.share()
    fed.mask(["b"])
    masked = fed.masked["b"]["lora.a"].reshape(-1)
    plain = _reference_quantized("b", fed.data["b"][0])["lora.a"].reshape(-1)
    assert np.all(plain < 2**21)  # the quantised values sit in the low bits...
    assert np.mean(masked != plain) > 0.999
    top_bit = (masked >> np.uint32(31)).astype(float)
    assert abs(top_bit.mean() - 0.5) < 0.05  # ...the masked ones spread over all 32
    high = (masked >> np.uint32(21)).astype(float)
    r = np.corrcoef(high, plain.astype(float))[0, 1]
    assert abs(r) < 0.1
    assert fed.masked["b"][weight_name("shared")][0] != fed.data["b"][1]["shared"]


@pytest.mark.parametrize("when", ["after_masking", "before_masking"])
def test_dropout_recovers_the_sum_over_survivors(when):
    fed = Federation()
    fed.share()
    fed.mask(["a", "b", "c"] if when == "after_masking" else ["a", "b"])
    result = fed.unmask(["a", "b"])
    # pet's cohort (b, c) loses c: one contributor is below min_cohort, so it is not revealed.
    assert result.contributors == {"shared": ["a", "b"]}
    assert "pet" in result.skipped and "min_cohort" in result.skipped["pet"]
    assert "pet.delta" not in result.sums
    q_sum, f_sum, w_sum = fed.plain({"shared": ["a", "b"]})
    assert result.weights == {"shared": w_sum["shared"]}
    for t in ("lora.a", "lora.b"):
        np.testing.assert_array_equal(result.quantized[t], q_sum[t])
        assert float(np.max(np.abs(result.sums[t] - f_sum[t]))) <= 2 * STEP


def test_dropout_with_four_sites_keeps_a_smaller_cohort():
    trains = {"a": ["shared"], "b": ["shared", "pet"], "c": ["shared", "pet"], "d": ["shared", "pet"]}
    fed = Federation(trains, max_dropouts=1)
    assert fed.threshold == 3
    fed.share()
    fed.mask(fed.names)
    result = fed.unmask(["a", "b", "d"])
    assert result.contributors == {"shared": ["a", "b", "d"], "pet": ["b", "d"]}
    q_sum, _, w_sum = fed.plain(result.contributors)
    assert result.weights == w_sum
    for t in GROUPS:
        np.testing.assert_array_equal(result.quantized[t], q_sum[t])


def test_state_round_trip_gives_the_same_result():
    fed = Federation(roundtrip=True)
    fed.share()
    fed.mask(["a", "b", "c"])
    result = fed.unmask(["a", "b"])
    q_sum, _, _ = fed.plain({"shared": ["a", "b"]})
    np.testing.assert_array_equal(result.quantized["lora.a"], q_sum["lora.a"])
    state = fed.sites["a"].to_state()
    assert state["phase"] == "answered"
    with pytest.raises(SecureAggregationError, match="state: missing field 'sk_mask'"):
        SiteRound.from_state({k: v for k, v in state.items() if k != "sk_mask"})


def test_sites_refuse_dangerous_unmask_requests():
    fed = Federation()
    fed.share()
    fed.mask(fed.names)
    site = fed.sites["a"]
    with pytest.raises(SecureAggregationError, match=r"both the self seed and the mask key of \['c'\]"):
        site.unmask_shares(["a", "b", "c"], ["c"])
    with pytest.raises(SecureAggregationError, match="below the threshold 2"):
        site.unmask_shares(["a"], ["b", "c"])
    with pytest.raises(SecureAggregationError, match="'z' is not a member"):
        site.unmask_shares(["a", "b", "z"], [])
    with pytest.raises(SecureAggregationError, match="not among the survivors"):
        site.unmask_shares(["b", "c"], ["a"])
    first = site.unmask_shares(["a", "b"], ["c"])
    assert set(first["b"]) == {"a", "b"} and set(first["sk"]) == {"c"}
    assert site.unmask_shares(["a", "b"], ["c"]) == first  # a retry is answered the same
    with pytest.raises(SecureAggregationError, match="already answered a different"):
        site.unmask_shares(["a", "b", "c"], [])


def test_unmask_with_fewer_than_threshold_responders_fails_clearly():
    fed = Federation()
    fed.share()
    fed.mask(fed.names)
    with pytest.raises(SecureAggregationError, match=r"1 valid shares of b of 'a', need 2"):
        fed.unmask(["a", "b", "c"], responders=["a"])
    other = Federation()
    other.share()
    other.mask(other.names)
    with pytest.raises(SecureAggregationError, match="1 sites, below the threshold 2"):
        other.server.unmask_request(["a"])


def test_min_cohort_skip_is_reported():
    fed = Federation(min_cohort=3)
    fed.share()
    fed.mask(fed.names)
    result = fed.unmask(fed.names)
    assert result.contributors == {"shared": ["a", "b", "c"]}
    assert "below min_cohort 3" in result.skipped["pet"]


def test_bad_masked_input_is_dropped_before_unmasking():
    fed = Federation()
    fed.share()
    fed.mask(["a", "b"])
    tensors, weights = fed.data["c"]
    arrays = fed.sites["c"].mask(tensors, weights, GROUPS, _cohorts(TRAINS), CLIP, TARGET)
    arrays["lora.b"] = arrays["lora.b"][:-1]
    assert fed.server.add_masked("c", arrays) is False
    assert "'lora.b' has shape (15,)" in fed.server.bad["c"]
    assert fed.server.eligible() == ["a", "b"]
    with pytest.raises(SecureAggregationError, match=r"\['c'\] sent no accepted masked input"):
        fed.server.unmask_request(["a", "b", "c"])
    result = fed.unmask(["a", "b"])
    q_sum, _, _ = fed.plain({"shared": ["a", "b"]})
    np.testing.assert_array_equal(result.quantized["lora.b"], q_sum["lora.b"])
    assert "c" in result.bad


def test_a_bad_share_costs_only_its_responder():
    fed = Federation()
    fed.share()
    fed.mask(fed.names)
    request = fed.server.unmask_request(fed.names)
    answers = {s: fed.sites[s].unmask_shares(request["final"], request["dropped"]) for s in fed.names}
    forged = answers["c"]["b"]["a"]
    answers["c"]["b"]["a"] = answers["b"]["b"]["a"][:4] + forged[4:]  # another holder's index
    result = fed.server.unmask(fed.names, answers)
    assert "another holder's index" in result.bad["c"]
    q_sum, _, _ = fed.plain(_cohorts(TRAINS))
    np.testing.assert_array_equal(result.quantized["pet.delta"], q_sum["pet.delta"])


def test_wrong_share_values_are_detected_not_summed():
    fed = Federation()  # t = 2 of 3: the third share cross-checks the first two
    fed.share()
    fed.mask(fed.names)
    request = fed.server.unmask_request(fed.names)
    answers = {s: fed.sites[s].unmask_shares(request["final"], request["dropped"]) for s in fed.names}
    share = bytearray(answers["c"]["b"]["a"])
    share[10] ^= 1
    answers["c"]["b"]["a"] = bytes(share)
    with pytest.raises(SecureAggregationError, match="shares of b of 'a' do not combine"):
        fed.server.unmask(fed.names, answers)


def test_tampered_ciphertext_is_rejected_by_its_recipient():
    fed = Federation()
    members = fed.server.members_message()
    cts = {s: fed.sites[s].share_keys(members, fed.threshold) for s in fed.names}
    for s in fed.names:
        assert fed.server.add_shares(s, cts[s])
    routed = fed.server.ciphertexts_for("b")
    routed["a"] = cts["c"]["b"]  # c's ciphertext replayed as a's
    rejected = fed.sites["b"].receive_shares(routed)
    assert set(rejected) == {"a"} and "does not decrypt" in rejected["a"]
    tensors, weights = fed.data["b"]
    with pytest.raises(SecureAggregationError, match="peer 'a' gave this site no valid shares"):
        fed.sites["b"].mask(tensors, weights, GROUPS, _cohorts(TRAINS), CLIP, TARGET)


def test_site_rejects_malformed_inputs_naming_the_field():
    fed = Federation()
    fed.share()
    site = fed.sites["b"]
    tensors, weights = fed.data["b"]
    cohorts = _cohorts(TRAINS)
    with pytest.raises(SecureAggregationError, match=r"site 'b': update: 'lora.a': values beyond clip_range"):
        site.mask({**tensors, "lora.a": tensors["lora.a"] * 3}, weights, GROUPS, cohorts, CLIP, TARGET)
    with pytest.raises(SecureAggregationError, match=r"update: missing tensors.*pet.delta"):
        site.mask({k: v for k, v in tensors.items() if k != "pet.delta"}, weights, GROUPS, cohorts, CLIP, TARGET)
    with pytest.raises(SecureAggregationError, match=r"update: 'lora.b': must be a float numpy array"):
        site.mask({**tensors, "lora.b": tensors["lora.b"].astype(np.int64)}, weights, GROUPS, cohorts, CLIP, TARGET)
    with pytest.raises(SecureAggregationError, match=r"weights: 'pet': must be an int"):
        site.mask(tensors, {**weights, "pet": -1}, GROUPS, cohorts, CLIP, TARGET)
    with pytest.raises(SecureAggregationError, match=r"cohorts: 'pet': this site sends it but is not in its cohort"):
        site.mask(tensors, weights, GROUPS, {**cohorts, "pet": ["c"]}, CLIP, TARGET)
    with pytest.raises(SecureAggregationError, match="target_range"):
        site.mask(tensors, weights, GROUPS, cohorts, CLIP, 2**31)
    site.mask(tensors, weights, GROUPS, cohorts, CLIP, TARGET)
    with pytest.raises(SecureAggregationError, match="is at step 'masked'"):
        site.mask(tensors, weights, GROUPS, cohorts, CLIP, TARGET)  # a second masking would leak a difference


def test_share_keys_refuses_a_weak_threshold_or_substituted_keys():
    fed = Federation()
    members = fed.server.members_message()
    with pytest.raises(SecureAggregationError, match="threshold"):
        fed.sites["a"].share_keys(members, 1)
    four = {**members, "d": SiteRound.new("d", ROUND, 1).public_keys()}
    with pytest.raises(SecureAggregationError, match="threshold"):
        fed.sites["a"].share_keys(four, 2)  # 2 of 4 is not a majority
    swapped = {**members, "a": members["b"][::-1]}
    with pytest.raises(SecureAggregationError, match="keys it did not publish|repeats"):
        fed.sites["a"].share_keys(swapped, 2)


def test_threshold_for():
    assert threshold_for(3, 1) == 2
    assert threshold_for(5, 2) == 3
    assert threshold_for(2, 5) == 2
    with pytest.raises(SecureAggregationError, match="threshold"):
        threshold_for(4, 2)  # t = 2 is not > 4/2
    with pytest.raises(SecureAggregationError, match="max_dropouts"):
        threshold_for(4, -1)


def test_mask_stream_and_modular_arithmetic():
    seed = bytes(range(32))
    a = mask_stream(seed, "x", 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    np.testing.assert_array_equal(a, mask_stream(seed, "x", 1000))
    assert np.mean(a == mask_stream(seed, "y", 1000)) == 0
    assert np.mean(a == mask_stream(bytes(32), "x", 1000)) == 0
    v = np.array([0, 1, 2**31], dtype=np.uint32)
    np.testing.assert_array_equal(sub_mod(add_mod(v, a[:3]), a[:3]), v)
    np.testing.assert_array_equal(add_mod(np.array([2**32 - 1], dtype=np.uint32), np.array([2], dtype=np.uint32)), [1])
    np.testing.assert_allclose(dequantize_sum(np.array([0, 2 * TARGET], dtype=np.uint32), 2, CLIP, TARGET),
                               [-2 * CLIP, 2 * CLIP])
    with pytest.raises(SecureAggregationError, match="masks did not cancel"):
        dequantize_sum(a[:3], 2, CLIP, TARGET)
