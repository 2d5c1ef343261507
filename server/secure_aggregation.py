"""The server's role in one round of per-group secure aggregation (SecAgg-style), without Flower messaging.

The site's role is :mod:`client.secure_aggregation`; the shared arithmetic is
:mod:`pemma_core.secure_sum`. One :class:`ServerRound` per round, driven in this order:

1. ``ServerRound(round_, public_keys, threshold)`` with every member's ``(pk_enc, pk_mask)``;
   :meth:`~ServerRound.members_message` is what each site gets for ``share_keys``;
2. :meth:`~ServerRound.add_shares` per site, then :meth:`~ServerRound.ciphertexts_for`
   each site; a site that refused another's shares (``receive_shares``) is reported with
   :meth:`~ServerRound.exclude` before the cohorts are fixed;
3. :meth:`~ServerRound.plan` (tensor groups, shapes, cohorts, quantisation), then
   :meth:`~ServerRound.add_masked` per site;
4. :meth:`~ServerRound.unmask_request` for the final set F (a subset of
   :meth:`~ServerRound.eligible`), sent to every site of F, then
   :meth:`~ServerRound.unmask` with their answers.

A site that sends something malformed (shares to the wrong names, a masked tensor of the
wrong shape or dtype, a share that does not parse or carries another site's index) is
recorded in :attr:`~ServerRound.bad` with the reason and left out; ``add_*`` return False
for it rather than raising. Before :meth:`unmask_request` this keeps it out of F; after,
F is fixed (every survivor has already released the self-seed shares of F), so a bad
responder only loses its shares, and the round still succeeds while at least
``threshold`` responders answer correctly.

What the server learns: per group, the sum over F ∩ cohort of the quantised updates and
of the example counts. A group where that intersection is smaller than ``min_cohort`` is
not reported (:attr:`SecureSum.skipped`); note that the self seeds are per site, not per
group, so a server that deviates from this code could still compute such a group's sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from pemma_core.secure_sum import (
    MAX_WEIGHT,
    SELF_SEED_BYTES,
    WEIGHT_PREFIX,
    SecureAggregationError,
    add_mod,
    apply_masks,
    check_quantization,
    check_threshold,
    dequantize_sum,
    pairwise_seed,
    private_from_bytes,
    public_from_bytes,
    public_to_bytes,
    weight_name,
)

__all__ = ["SecureSum", "ServerRound", "SecureAggregationError"]


@dataclass
class SecureSum:
    """What one round of secure aggregation reveals.

    ``sums``: tensor -> float64 sum over the group's contributors of their scaled updates
    (dequantised); ``quantized``: the same as the uint32 sum of quantised values;
    ``weights``: group -> sum of example counts; ``contributors``: group -> sorted names;
    ``skipped``: group -> why it was not aggregated; ``bad``: site -> what it did wrong.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    contributors: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)


def _share_ok(share: object, index: int, length: int | None) -> str | None:
    if not isinstance(share, bytes):
        return "share is not bytes"
    if len(share) < 20 or (len(share) - 4) % 16:
        return "share has a malformed length"
    if length is not None and len(share) != length:
        return "share length differs from the other holders'"
    if int.from_bytes(share[:4], "little") != index:
        return "share carries another holder's index"
    return None


class ServerRound:
    """The server's secure-aggregation state for one round (see the module docstring for the steps)."""

    def __init__(self, round_: int, public_keys: Mapping[str, tuple[bytes, bytes]], threshold: int,
                 *, min_cohort: int = 2):
        """Raises :class:`SecureAggregationError` naming the site for a key that does not parse or
        repeats another's, and for an invalid threshold or ``min_cohort`` (int >= 1)."""
        if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ < 2**32:
            raise SecureAggregationError(f"round_: must be an int in [0, 2**32), got {round_!r}", field="round_")
        if isinstance(min_cohort, bool) or not isinstance(min_cohort, int) or min_cohort < 1:
            raise SecureAggregationError(f"min_cohort: must be an int >= 1, got {min_cohort!r}", field="min_cohort")
        seen: set[bytes] = set()
        keys: dict[str, tuple[bytes, bytes]] = {}
        for site, pair in public_keys.items():
            if not isinstance(site, str) or not site:
                raise SecureAggregationError(f"public_keys: site names must be non-empty str, got {site!r}",
                                             field="public_keys")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise SecureAggregationError(f"site {site!r}: public_keys: must be (pk_enc, pk_mask)",
                                             site=site, field="public_keys")
            for label, key in zip(("pk_enc", "pk_mask"), pair):
                public_from_bytes(key, field=f"public_keys[{site!r}].{label}", site=site)
                if key in seen:
                    raise SecureAggregationError(f"site {site!r}: {label} repeats another member's key",
                                                 site=site, field=label)
                seen.add(key)
            keys[site] = (bytes(pair[0]), bytes(pair[1]))
        check_threshold(len(keys), threshold)
        self.round = round_
        self.threshold = threshold
        self.min_cohort = min_cohort
        self._keys = keys
        self.members: list[str] = sorted(keys)
        self.bad: dict[str, str] = {}
        self._ciphertexts: dict[str, dict[str, bytes]] = {}
        self._plan: dict[str, object] | None = None
        self.cohorts: dict[str, list[str]] = {}
        self._masked: dict[str, dict[str, np.ndarray]] = {}
        self._request: dict[str, list[str]] | None = None

    def _mark_bad(self, site: str, reason: str) -> bool:
        self.bad.setdefault(site, reason)
        return False

    # -- step 2 ---------------------------------------------------------------------------

    def members_message(self) -> dict[str, tuple[bytes, bytes]]:
        """``{site: (pk_enc, pk_mask)}`` for every member: the argument of ``SiteRound.share_keys``."""
        return dict(self._keys)

    def add_shares(self, site: str, ciphertexts: Mapping[str, bytes]) -> bool:
        """Keep ``site``'s ciphertexts for routing; False (and :attr:`bad`) unless they address exactly the other members."""
        if site not in self._keys:
            raise SecureAggregationError(f"add_shares: {site!r} is not a member of the round", site=site, field="site")
        if site in self._ciphertexts:
            return self._mark_bad(site, "ciphertexts: sent shares twice")
        if not isinstance(ciphertexts, Mapping):
            return self._mark_bad(site, "ciphertexts: not a mapping")
        expected = set(self.members) - {site}
        if set(ciphertexts) != expected:
            return self._mark_bad(site, f"ciphertexts: addressed to {sorted(ciphertexts)}, expected {sorted(expected)}")
        if not all(isinstance(v, bytes) and v for v in ciphertexts.values()):
            return self._mark_bad(site, "ciphertexts: a value is not non-empty bytes")
        self._ciphertexts[site] = dict(ciphertexts)
        return True

    @property
    def shared(self) -> list[str]:
        """Sites whose shares were accepted and that are not marked bad."""
        return sorted(s for s in self._ciphertexts if s not in self.bad)

    def ciphertexts_for(self, site: str) -> dict[str, bytes]:
        """``{sender: ciphertext}`` addressed to ``site``: the argument of its ``receive_shares``."""
        if site not in self._keys:
            raise SecureAggregationError(f"ciphertexts_for: {site!r} is not a member of the round",
                                         site=site, field="site")
        return {u: cts[site] for u, cts in sorted(self._ciphertexts.items()) if u != site and u in self.shared}

    def exclude(self, site: str, reason: str) -> None:
        """Mark ``site`` bad (e.g. another site refused its shares); before :meth:`plan` it joins no cohort."""
        if site not in self._keys:
            raise SecureAggregationError(f"exclude: {site!r} is not a member of the round", site=site, field="site")
        self._mark_bad(site, reason)

    # -- step 3 ---------------------------------------------------------------------------

    def plan(self, groups: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
             cohorts: Mapping[str, Sequence[str]], clip_range: float, target_range: int) -> None:
        """Fix what each site must send: the tensors (and weight) of every group whose cohort lists it.

        Raises :class:`SecureAggregationError` for a cohort naming a site outside
        :attr:`shared`, a group without tensors, or a tensor without a shape.
        """
        if self._plan is not None:
            raise SecureAggregationError("plan: already fixed for this round", field="plan")
        check_quantization(clip_range, target_range)
        fixed: dict[str, list[str]] = {}
        for group, names in cohorts.items():
            names = sorted(names)
            if len(set(names)) != len(names):
                raise SecureAggregationError(f"cohorts: {group!r} lists a site twice", field="cohorts")
            for name in names:
                if name not in self.shared:
                    raise SecureAggregationError(
                        f"cohorts: {group!r} lists {name!r}, which has no accepted shares this round",
                        site=name, field="cohorts")
            tensors = [t for t, g in groups.items() if g == group]
            if not tensors:
                raise SecureAggregationError(f"groups: no tensor belongs to group {group!r}", field="groups")
            for t in tensors:
                if t.startswith(WEIGHT_PREFIX):
                    raise SecureAggregationError(f"groups: {t!r} uses the reserved prefix", field="groups")
                if t not in shapes:
                    raise SecureAggregationError(f"shapes: no shape for tensor {t!r}", field="shapes")
            fixed[group] = names
        self.cohorts = fixed
        self._plan = {
            "tensors": {g: sorted(t for t, gg in groups.items() if gg == g) for g in fixed},
            "shapes": {t: tuple(int(d) for d in shapes[t]) for t, g in groups.items() if g in fixed},
            "clip_range": float(clip_range),
            "target_range": int(target_range),
        }

    def expected_names(self, site: str) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` that ``site``'s masked input must hold exactly."""
        if self._plan is None:
            raise SecureAggregationError("expected_names: call plan() first", field="plan")
        out: dict[str, tuple[int, ...]] = {}
        for group, names in self.cohorts.items():
            if site in names:
                for t in self._plan["tensors"][group]:  # type: ignore[index]
                    out[t] = self._plan["shapes"][t]  # type: ignore[index]
                out[weight_name(group)] = (1,)
        return out

    def add_masked(self, site: str, arrays: Mapping[str, np.ndarray]) -> bool:
        """Keep a copy of ``site``'s masked input; False (and :attr:`bad`) for a name, shape or dtype off the plan."""
        if self._plan is None:
            raise SecureAggregationError("add_masked: call plan() first", field="plan")
        if site not in self._keys:
            raise SecureAggregationError(f"add_masked: {site!r} is not a member of the round", site=site, field="site")
        if self._request is not None:
            return self._mark_bad(site, "masked input: arrived after the final set was fixed")
        if site in self.bad:
            return False
        if site in self._masked:
            return self._mark_bad(site, "masked input: sent twice")
        expected = self.expected_names(site)
        if not expected:
            return self._mark_bad(site, "masked input: the site is in no cohort")
        if not isinstance(arrays, Mapping) or set(arrays) != set(expected):
            got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
            return self._mark_bad(site, f"masked input: names {got}, expected {sorted(expected)}")
        kept: dict[str, np.ndarray] = {}
        for name, shape in expected.items():
            a = arrays[name]
            if not isinstance(a, np.ndarray) or a.dtype != np.uint32:
                return self._mark_bad(site, f"masked input: {name!r} is not a uint32 array")
            if tuple(a.shape) != shape:
                return self._mark_bad(site, f"masked input: {name!r} has shape {tuple(a.shape)}, expected {shape}")
            kept[name] = np.array(a, dtype=np.uint32, copy=True)
        self._masked[site] = kept
        return True

    def eligible(self) -> list[str]:
        """Sites whose masked input was accepted and that are not marked bad: candidates for F."""
        return sorted(s for s in self._masked if s not in self.bad)

    # -- step 4 ---------------------------------------------------------------------------

    def unmask_request(self, final: Sequence[str]) -> dict[str, list[str]]:
        """Fix F; ``{"final": F, "dropped": cohort members not in F}``, to send to every site of F.

        Raises :class:`SecureAggregationError` for a name outside :meth:`eligible`, fewer
        than ``threshold`` sites, or a second, different request.
        """
        final_list = sorted(set(final))
        if self._request is not None:
            if final_list != self._request["final"]:
                raise SecureAggregationError("unmask_request: the final set is already fixed", field="final")
            return {k: list(v) for k, v in self._request.items()}
        eligible = set(self.eligible())
        outside = [s for s in final_list if s not in eligible]
        if outside:
            raise SecureAggregationError(f"final: {outside} sent no accepted masked input", field="final")
        if len(final_list) < self.threshold:
            raise SecureAggregationError(
                f"final: {len(final_list)} sites, below the threshold {self.threshold}", field="final")
        in_cohorts = {s for names in self.cohorts.values() for s in names}
        self._request = {"final": final_list, "dropped": sorted(in_cohorts - set(final_list))}
        return {k: list(v) for k, v in self._request.items()}

    def _reconstruct(self, owner: str, kind: str, shares: list[bytes]) -> bytes:
        if len(shares) < self.threshold:
            raise SecureAggregationError(
                f"unmask: {len(shares)} valid shares of {kind} of {owner!r}, need {self.threshold}",
                site=owner, field=kind)
        try:
            secret = combine_shares(shares[: self.threshold])
            # Extra shares lie on the same polynomial only if every share is honest.
            if len(shares) > self.threshold and combine_shares(shares) != secret:
                raise ValueError("shares disagree")
        except ValueError as exc:
            raise SecureAggregationError(f"unmask: shares of {kind} of {owner!r} do not combine ({exc})",
                                         site=owner, field=kind) from None
        return secret

    def unmask(self, final: Sequence[str], shares_by_responder: Mapping[str, Mapping[str, Mapping[str, bytes]]]) -> SecureSum:
        """Recover the secrets, strip the masks and return the per-group sums.

        ``shares_by_responder``: responder -> its ``SiteRound.unmask_shares`` answer. A
        responder outside F or with a malformed answer is recorded in :attr:`bad` and its
        shares ignored. Raises :class:`SecureAggregationError` if ``final`` differs from
        :meth:`unmask_request`'s, or a secret has fewer than ``threshold`` valid shares, or
        a recovered mask key does not match the published one.
        """
        if self._request is None or sorted(set(final)) != self._request["final"]:
            raise SecureAggregationError("unmask: call unmask_request() with this final set first", field="final")
        plan = self._plan
        assert plan is not None
        final_list, dropped = self._request["final"], self._request["dropped"]
        b_shares: dict[str, list[bytes]] = {u: [] for u in final_list}
        sk_shares: dict[str, list[bytes]] = {u: [] for u in dropped}
        lengths: dict[tuple[str, str], int] = {}
        for responder in sorted(shares_by_responder):
            answer = shares_by_responder[responder]
            if responder not in final_list:
                self._mark_bad(responder, "unmask: answered but is not in the final set")
                continue
            problem = None
            if not isinstance(answer, Mapping) or set(answer) != {"b", "sk"}:
                problem = "unmask: answer must hold exactly 'b' and 'sk'"
            elif not isinstance(answer["b"], Mapping) or set(answer["b"]) != set(final_list):
                problem = "unmask: 'b' must hold one share per site of the final set"
            elif not isinstance(answer["sk"], Mapping) or set(answer["sk"]) != set(dropped):
                problem = "unmask: 'sk' must hold one share per dropped site"
            else:
                index = self.members.index(responder) + 1
                for kind, table in (("b", answer["b"]), ("sk", answer["sk"])):
                    for owner, share in table.items():
                        why = _share_ok(share, index, lengths.get((kind, owner)))
                        if why:
                            problem = f"unmask: {kind} share of {owner!r}: {why}"
                            break
                    if problem:
                        break
            if problem:
                self._mark_bad(responder, problem)
                continue
            for owner, share in answer["b"].items():
                lengths.setdefault(("b", owner), len(share))
                b_shares[owner].append(share)
            for owner, share in answer["sk"].items():
                lengths.setdefault(("sk", owner), len(share))
                sk_shares[owner].append(share)

        self_seeds: dict[str, bytes] = {}
        for owner in final_list:
            seed = self._reconstruct(owner, "b", b_shares[owner])
            if len(seed) != SELF_SEED_BYTES:
                raise SecureAggregationError(f"unmask: recovered self seed of {owner!r} has the wrong length",
                                             site=owner, field="b")
            self_seeds[owner] = seed
        mask_keys = {}
        for owner in dropped:
            raw = self._reconstruct(owner, "sk", sk_shares[owner])
            try:
                key = private_from_bytes(raw, field="sk", site=owner)
            except SecureAggregationError:
                raise SecureAggregationError(f"unmask: recovered mask key of {owner!r} does not parse",
                                             site=owner, field="sk") from None
            if public_to_bytes(key.public_key()) != self._keys[owner][1]:
                raise SecureAggregationError(f"unmask: recovered mask key of {owner!r} is not its published one",
                                             site=owner, field="sk")
            mask_keys[owner] = key

        result = SecureSum()
        pair_cache: dict[tuple[str, str], bytes] = {}
        clip, target = plan["clip_range"], plan["target_range"]
        for group, cohort in sorted(self.cohorts.items()):
            contributors = [s for s in cohort if s in final_list]
            lost = [s for s in cohort if s not in final_list]
            if len(contributors) < self.min_cohort:
                result.skipped[group] = (f"{len(contributors)} contributing site(s) {contributors}, "
                                         f"below min_cohort {self.min_cohort}")
                continue
            for v in contributors:
                for u in lost:
                    if (u, v) not in pair_cache:
                        pair_cache[(u, v)] = pairwise_seed(mask_keys[u], public_from_bytes(self._keys[v][1]))
            names = list(plan["tensors"][group]) + [weight_name(group)]  # type: ignore[index]
            k = len(contributors)
            sums: dict[str, np.ndarray] = {}
            for name in names:
                total = np.zeros(self._masked[contributors[0]][name].shape, dtype=np.uint32)
                for v in contributors:
                    total = add_mod(total, self._masked[v][name])
                for v in contributors:
                    total = apply_masks(total, me=v, round_=self.round, group=group, tensor=name,
                                        self_seed=self_seeds[v], pair_seeds={u: pair_cache[(u, v)] for u in lost},
                                        sign=-1)
                sums[name] = total
            weight = int(sums.pop(weight_name(group))[0])
            try:
                if weight > k * MAX_WEIGHT:
                    raise SecureAggregationError("weight sum out of range", field="weights")
                floats = {t: dequantize_sum(s, k, clip, target) for t, s in sums.items()}  # type: ignore[arg-type]
            except SecureAggregationError as exc:
                result.skipped[group] = f"masks did not cancel ({exc}): a contributor masked inconsistently"
                continue
            result.quantized.update(sums)
            result.sums.update(floats)
            result.weights[group] = weight
            result.contributors[group] = contributors
        result.bad = dict(self.bad)
        return result
