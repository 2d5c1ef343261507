"""A site's role in one round of per-group secure aggregation (SecAgg-style), without Flower messaging.

The arithmetic both sides share is :mod:`pemma_core.secure_sum`; the server's role is
:mod:`server.secure_aggregation`. One :class:`SiteRound` per site and round, driven in
this order (each step refuses to run out of order):

1. :meth:`SiteRound.new` then :meth:`~SiteRound.public_keys`: two fresh SECP384R1 key
   pairs (``enc`` for the share ciphertexts, ``mask`` for the pairwise seeds) and a
   32-byte self-mask seed ``b``;
2. :meth:`~SiteRound.share_keys`: Shamir shares (t of n) of the mask private key and of
   ``b``, one Fernet ciphertext per other member under ECDH(enc)+HKDF;
3. :meth:`~SiteRound.receive_shares` then :meth:`~SiteRound.mask`: quantise the scaled
   update, add the self mask and the signed pairwise masks mod 2**32, per tensor and per
   group weight;
4. :meth:`~SiteRound.unmask_shares`: the decrypted shares the server needs, ``b`` of the
   survivors, the mask key of the dropped; never both for one site, and only once.

Between steps the whole state is :meth:`~SiteRound.to_state` (a dict of str/bytes/int,
for Flower's ``context.state``) and :meth:`~SiteRound.from_state`. It holds the site's
private keys and its self seed in the clear: it must stay on the site.

Why a site masks only once per round: two maskings of different values under the same
masks would hand the server their difference.
"""

from __future__ import annotations

import binascii
import json
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import quantize

from pemma_core.secure_sum import (
    MAX_WEIGHT,
    SELF_SEED_BYTES,
    WEIGHT_PREFIX,
    SecureAggregationError,
    apply_masks,
    b64decode,
    b64encode,
    check_quantization,
    check_threshold,
    generate_private_key,
    pairwise_seed,
    private_from_bytes,
    private_to_bytes,
    public_from_bytes,
    public_to_bytes,
    weight_name,
)

__all__ = ["SiteRound", "SecureAggregationError"]

_PHASES = ("keys", "shared", "received", "masked", "answered")
_GLOBAL_RNG = threading.Lock()  # numpy's global generator, borrowed for the stochastic rounding


def _check_name(name: object, field: str, site: str | None = None) -> str:
    if not isinstance(name, str) or not name:
        raise SecureAggregationError(f"{field}: site names must be non-empty str, got {name!r}",
                                     site=site, field=field)
    return name


def share_index(members: Sequence[str], holder: str) -> int:
    """The Shamir x-coordinate (1-based) of ``holder``'s share: its position in sorted ``members``."""
    return sorted(members).index(holder) + 1


class SiteRound:
    """One site's secure-aggregation state for one round (see the module docstring for the steps)."""

    def __init__(self, state: Mapping[str, object]):
        self._site = str(state["site"])
        self._round = int(state["round"])  # type: ignore[arg-type]
        self._seed = int(state["seed"])  # type: ignore[arg-type]
        self._phase = str(state["phase"])
        if self._phase not in _PHASES:
            raise SecureAggregationError(f"phase: unknown phase {self._phase!r}", site=self._site, field="phase")
        self._sk_enc = private_from_bytes(state["sk_enc"], field="sk_enc", site=self._site)  # type: ignore[arg-type]
        self._sk_mask = private_from_bytes(state["sk_mask"], field="sk_mask", site=self._site)  # type: ignore[arg-type]
        self._self_seed = bytes(state["self_seed"])  # type: ignore[arg-type]
        if len(self._self_seed) != SELF_SEED_BYTES:
            raise SecureAggregationError("self_seed: wrong length", site=self._site, field="self_seed")
        self._threshold = int(state.get("threshold", 0))  # type: ignore[arg-type]
        members = json.loads(str(state.get("members", "") or "{}"))
        self._members: dict[str, tuple[bytes, bytes]] = {
            name: (b64decode(keys[0]), b64decode(keys[1])) for name, keys in members.items()
        }
        shares = json.loads(str(state.get("shares", "") or "{}"))
        self._shares: dict[str, tuple[bytes, bytes]] = {
            owner: (b64decode(pair[0]), b64decode(pair[1])) for owner, pair in shares.items()
        }
        self._rejected: dict[str, str] = json.loads(str(state.get("rejected", "") or "{}"))
        self._cohorts: dict[str, list[str]] = json.loads(str(state.get("cohorts", "") or "{}"))
        self._answered: dict[str, list[str]] | None = json.loads(str(state.get("answered", "") or "null"))

    # -- construction and state -------------------------------------------------------

    @classmethod
    def new(cls, site: str, round_: int, seed: int) -> SiteRound:
        """Fresh keys and self seed for ``site`` in ``round_``; ``seed`` only drives the stochastic rounding.

        Raises :class:`SecureAggregationError` for an empty ``site``, a negative or
        non-int ``round_`` (below 2**32) or ``seed`` (below 2**63).
        """
        _check_name(site, "site")
        for field, value, bound in (("round_", round_, 2**32), ("seed", seed, 2**63)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
                raise SecureAggregationError(f"{field}: must be an int in [0, {bound}), got {value!r}",
                                             site=site, field=field)
        return cls({
            "site": site, "round": round_, "seed": seed, "phase": "keys",
            "sk_enc": private_to_bytes(generate_private_key()),
            "sk_mask": private_to_bytes(generate_private_key()),
            "self_seed": os.urandom(SELF_SEED_BYTES),
        })

    def to_state(self) -> dict[str, bytes | str | int]:
        """Everything needed to resume at the next step; private keys included (keep it on the site)."""
        return {
            "site": self._site,
            "round": self._round,
            "seed": self._seed,
            "phase": self._phase,
            "sk_enc": private_to_bytes(self._sk_enc),
            "sk_mask": private_to_bytes(self._sk_mask),
            "self_seed": self._self_seed,
            "threshold": self._threshold,
            "members": json.dumps({n: [b64encode(k[0]), b64encode(k[1])] for n, k in self._members.items()}),
            "shares": json.dumps({o: [b64encode(p[0]), b64encode(p[1])] for o, p in self._shares.items()}),
            "rejected": json.dumps(self._rejected),
            "cohorts": json.dumps(self._cohorts),
            "answered": json.dumps(self._answered),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, bytes | str | int]) -> SiteRound:
        """Inverse of :meth:`to_state`; raises :class:`SecureAggregationError` on a missing or malformed field."""
        for field in ("site", "round", "seed", "phase", "sk_enc", "sk_mask", "self_seed"):
            if field not in state:
                raise SecureAggregationError(f"state: missing field {field!r}", field=field)
        try:
            return cls(state)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            if isinstance(exc, SecureAggregationError):
                raise
            raise SecureAggregationError(f"state: malformed ({exc})", field="state") from None

    # -- read-only views ---------------------------------------------------------------

    @property
    def site(self) -> str:
        return self._site

    @property
    def round(self) -> int:
        return self._round

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def shares_from(self) -> list[str]:
        """Members whose shares this site holds (itself included), after :meth:`receive_shares`."""
        return sorted(self._shares)

    def _require(self, phase: str, step: str) -> None:
        if self._phase != phase:
            raise SecureAggregationError(
                f"{step}: site {self._site!r} is at step {self._phase!r}, expected {phase!r}",
                site=self._site, field="phase",
            )

    def _error(self, field: str, message: str) -> SecureAggregationError:
        return SecureAggregationError(f"site {self._site!r}: {field}: {message}", site=self._site, field=field)

    # -- step 1 ---------------------------------------------------------------------------

    def public_keys(self) -> tuple[bytes, bytes]:
        """``(pk_enc, pk_mask)`` as SubjectPublicKeyInfo DER."""
        return public_to_bytes(self._sk_enc.public_key()), public_to_bytes(self._sk_mask.public_key())

    # -- step 2 ---------------------------------------------------------------------------

    def share_keys(self, members: Mapping[str, tuple[bytes, bytes]], threshold: int) -> dict[str, bytes]:
        """Split the mask key and self seed t-of-n; ``{other member: ciphertext}``.

        ``members`` maps every member of the round (this site included) to its
        ``(pk_enc, pk_mask)``. Raises :class:`SecureAggregationError` when this site is
        missing or listed with other keys, a key does not parse as SECP384R1, two members
        share a key, or the threshold is invalid for n (:func:`check_threshold`).
        """
        self._require("keys", "share_keys")
        if not isinstance(members, Mapping):
            raise self._error("members", "must be a mapping name -> (pk_enc, pk_mask)")
        parsed: dict[str, tuple[bytes, bytes]] = {}
        seen: set[bytes] = set()
        for name, keys in members.items():
            _check_name(name, "members", self._site)
            if not isinstance(keys, (tuple, list)) or len(keys) != 2:
                raise self._error("members", f"{name!r}: must be a pair (pk_enc, pk_mask)")
            for label, key in zip(("pk_enc", "pk_mask"), keys):
                public_from_bytes(key, field=f"members[{name!r}].{label}", site=self._site)
                if key in seen:
                    raise self._error("members", f"{name!r}: {label} repeats another member's key")
                seen.add(key)
            parsed[name] = (bytes(keys[0]), bytes(keys[1]))
        if self._site not in parsed:
            raise self._error("members", "this site is not among the round's members")
        if parsed[self._site] != self.public_keys():
            raise self._error("members", "this site is listed with keys it did not publish")
        try:
            check_threshold(len(parsed), threshold)
        except SecureAggregationError as exc:
            raise self._error("threshold", str(exc)) from None
        names = sorted(parsed)
        sk_shares = create_shares(private_to_bytes(self._sk_mask), threshold, len(names))
        b_shares = create_shares(self._self_seed, threshold, len(names))
        out: dict[str, bytes] = {}
        for i, name in enumerate(names):
            if name == self._site:
                self._shares[name] = (sk_shares[i], b_shares[i])
                continue
            key = generate_shared_key(self._sk_enc, public_from_bytes(parsed[name][0]))
            plaintext = json.dumps({
                "round": self._round, "from": self._site, "to": name,
                "sk": b64encode(sk_shares[i]), "b": b64encode(b_shares[i]),
            }).encode()
            out[name] = encrypt(key, plaintext)
        self._members = parsed
        self._threshold = threshold
        self._phase = "shared"
        return out

    # -- step 3 ---------------------------------------------------------------------------

    def receive_shares(self, ciphertexts: Mapping[str, bytes]) -> dict[str, str]:
        """Decrypt and check the shares addressed to this site; ``{sender: reason}`` for those refused.

        A refused sender (undecryptable, naming the wrong pair or round, wrong share index)
        is not held, so this site will refuse to mask with it: the server should take it
        out of the round's cohorts. Raises :class:`SecureAggregationError` for a sender
        outside the round, this site as its own sender, or a value that is not bytes.
        """
        self._require("shared", "receive_shares")
        if not isinstance(ciphertexts, Mapping):
            raise self._error("ciphertexts", "must be a mapping sender -> bytes")
        my_index = share_index(list(self._members), self._site)
        rejected: dict[str, str] = {}
        accepted: dict[str, tuple[bytes, bytes]] = {}
        for sender, token in ciphertexts.items():
            if sender not in self._members:
                raise self._error("ciphertexts", f"sender {sender!r} is not a member of the round")
            if sender == self._site:
                raise self._error("ciphertexts", "a ciphertext names this site as its own sender")
            if not isinstance(token, bytes):
                raise self._error("ciphertexts", f"{sender!r}: must be bytes, got {type(token).__name__}")
            key = generate_shared_key(self._sk_enc, public_from_bytes(self._members[sender][0]))
            try:
                payload = json.loads(decrypt(key, token))
                sk_share, b_share = b64decode(payload["sk"]), b64decode(payload["b"])
            except InvalidToken:
                rejected[sender] = "ciphertext does not decrypt under the pair's key"
                continue
            except (ValueError, KeyError, TypeError, binascii.Error):
                rejected[sender] = "decrypted payload is malformed"
                continue
            if (payload.get("from"), payload.get("to"), payload.get("round")) != (sender, self._site, self._round):
                rejected[sender] = (f"payload names ({payload.get('from')!r} -> {payload.get('to')!r}, "
                                    f"round {payload.get('round')!r}), expected ({sender!r} -> {self._site!r}, "
                                    f"round {self._round})")
                continue
            for share in (sk_share, b_share):
                if len(share) < 20 or (len(share) - 4) % 16 or int.from_bytes(share[:4], "little") != my_index:
                    rejected[sender] = "share has the wrong index or length for this site"
                    break
            else:
                accepted[sender] = (sk_share, b_share)
        self._shares.update(accepted)
        self._rejected = rejected
        self._phase = "received"
        return dict(rejected)

    def mask(
        self,
        update: Mapping[str, np.ndarray],
        weights: Mapping[str, int],
        groups: Mapping[str, str],
        cohorts: Mapping[str, Sequence[str]],
        clip_range: float,
        target_range: int,
    ) -> dict[str, np.ndarray]:
        """``{tensor or weight_name(group): masked uint32 array}``, once per round.

        ``update``: tensor -> float array in ``[-clip_range, clip_range]`` (the scaled
        update); ``weights``: group -> example count (int, 0..2**32-1) for every group this
        site sends; ``groups``: tensor -> group for the model (must cover ``update``);
        ``cohorts``: group -> names of the sites that send it (this site included for each
        of its groups, nobody whose shares this site does not hold).

        Raises :class:`SecureAggregationError` naming the field for: a tensor missing or
        extra for the groups in ``weights``, a non-float, non-finite or out-of-range array,
        a reserved name, a bad weight, a cohort that omits this site, lists it for a
        group it does not send, or lists a peer without shares here.
        """
        self._require("received", "mask")
        check_quantization(clip_range, target_range)
        if not isinstance(weights, Mapping) or not weights:
            raise self._error("weights", "must be a non-empty mapping group -> int")
        for group, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or not 0 <= weight <= MAX_WEIGHT:
                raise self._error("weights", f"{group!r}: must be an int in [0, 2**32), got {weight!r}")
        cohort_of: dict[str, list[str]] = {}
        for group, names in cohorts.items():
            names = list(names)
            if len(set(names)) != len(names):
                raise self._error("cohorts", f"{group!r}: lists a site twice")
            for name in names:
                if name not in self._members:
                    raise self._error("cohorts", f"{group!r}: {name!r} is not a member of the round")
            cohort_of[group] = sorted(names)
        for group in weights:
            if self._site not in cohort_of.get(group, []):
                raise self._error("cohorts", f"{group!r}: this site sends it but is not in its cohort")
            for peer in cohort_of[group]:
                if peer not in self._shares:
                    raise self._error("cohorts", f"{group!r}: peer {peer!r} gave this site no valid shares")
        for group, names in cohort_of.items():
            if self._site in names and group not in weights:
                raise self._error("weights", f"{group!r}: this site is in its cohort but sends no weight")
        expected = sorted(t for t, g in groups.items() if g in weights)
        for name in update:
            if name.startswith(WEIGHT_PREFIX):
                raise self._error("update", f"{name!r}: the prefix {WEIGHT_PREFIX!r} is reserved")
            if name not in groups:
                raise self._error("update", f"{name!r}: tensor has no group")
            if groups[name] not in weights:
                raise self._error("update", f"{name!r}: its group {groups[name]!r} has no weight")
        missing = [t for t in expected if t not in update]
        if missing:
            raise self._error("update", f"missing tensors of the sent groups: {missing[:5]}")
        arrays: list[np.ndarray] = []
        for name in expected:
            array = update[name]
            if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
                raise self._error("update", f"{name!r}: must be a float numpy array")
            array = array.astype(np.float64)
            if not np.all(np.isfinite(array)):
                raise self._error("update", f"{name!r}: has non-finite values")
            if array.size and float(np.max(np.abs(array))) > clip_range:
                raise self._error("update", f"{name!r}: values beyond clip_range {clip_range} (scale it first)")
            arrays.append(array)

        # The stochastic rounding draws from numpy's global RNG; seeding it per site and round
        # keeps a run reproducible, and restoring it leaves the caller's stream untouched. The
        # lock keeps sites that answer side by side in one process (simulation) off each other's draws.
        with _GLOBAL_RNG:
            saved = np.random.get_state()
            try:
                np.random.seed([self._seed & 0xFFFFFFFF, self._seed >> 32, self._round])
                quantised = quantize(arrays, float(clip_range), int(target_range))
            finally:
                np.random.set_state(saved)

        peers = {peer for group in weights for peer in cohort_of[group] if peer != self._site}
        seeds = {peer: pairwise_seed(self._sk_mask, public_from_bytes(self._members[peer][1])) for peer in peers}
        out: dict[str, np.ndarray] = {}
        for name, q in zip(expected, quantised):
            group = groups[name]
            out[name] = apply_masks(
                np.asarray(q).astype(np.uint32), me=self._site, round_=self._round, group=group, tensor=name,
                self_seed=self._self_seed,
                pair_seeds={p: seeds[p] for p in cohort_of[group] if p != self._site},
            )
        for group, weight in weights.items():
            out[weight_name(group)] = apply_masks(
                np.array([int(weight)], dtype=np.uint32), me=self._site, round_=self._round, group=group,
                tensor=weight_name(group), self_seed=self._self_seed,
                pair_seeds={p: seeds[p] for p in cohort_of[group] if p != self._site},
            )
        self._cohorts = {g: cohort_of[g] for g in weights}
        self._phase = "masked"
        return out

    # -- step 4 ---------------------------------------------------------------------------

    def unmask_shares(self, final: Sequence[str], dropped: Sequence[str]) -> dict[str, dict[str, bytes]]:
        """``{"b": {u: share of b_u for u in final}, "sk": {u: share of sk_mask_u for u in dropped}}``.

        Answered once: the same request again returns the same shares, any other is
        refused (two different requests could together reveal both secrets of one site).
        Raises :class:`SecureAggregationError` when a site is in both lists, a name is not
        in the round or listed twice, ``len(final)`` is below the threshold, this site is
        not in ``final``, or this site holds no share of a requested secret.
        """
        final_list, dropped_list = list(final), list(dropped)
        request = {"final": sorted(final_list), "dropped": sorted(dropped_list)}
        if self._phase == "answered":
            if request != self._answered:
                raise self._error("final", "already answered a different unmask request this round")
        else:
            self._require("masked", "unmask_shares")
        for field, names in (("final", final_list), ("dropped", dropped_list)):
            if len(set(names)) != len(names):
                raise self._error(field, "lists a site twice")
            for name in names:
                if name not in self._members:
                    raise self._error(field, f"{name!r} is not a member of the round")
                if name not in self._shares:
                    raise self._error(field, f"this site holds no share from {name!r}")
        both = sorted(set(final_list) & set(dropped_list))
        if both:
            raise self._error("dropped", f"asked for both the self seed and the mask key of {both}")
        if len(final_list) < self._threshold:
            raise self._error("final", f"{len(final_list)} survivors, below the threshold {self._threshold}")
        if self._site not in final_list:
            raise self._error("final", "this site answers but is not among the survivors")
        self._answered = request
        self._phase = "answered"
        return {
            "b": {u: self._shares[u][1] for u in sorted(final_list)},
            "sk": {u: self._shares[u][0] for u in sorted(dropped_list)},
        }


# ----------------------------------------------------------------------------- the site's messages
# What a site's ClientApp does with each stage (client/client_app.py). The round's state lives in
# Flower's ``context.state`` under STATE_KEY between messages (one secure round at a time).

STATE_KEY = "pemma-secagg"


def _payload(config: Mapping[str, object], stage: str) -> dict:
    try:
        payload = json.loads(str(config["secagg"]))
    except (KeyError, ValueError) as exc:
        raise SecureAggregationError(f"{stage}: the message has no valid 'secagg' entry ({exc})", field="secagg") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("round"), int) or not isinstance(payload.get("you"), str):
        raise SecureAggregationError(f"{stage}: the 'secagg' entry lacks its round or the site's id", field="secagg")
    return payload


def _current(state: object, round_: int, stage: str) -> SiteRound:
    record = state.config_records.get(STATE_KEY) if hasattr(state, "config_records") else None
    if record is None:
        raise SecureAggregationError(f"{stage}: no secure-aggregation round in progress at this site", field="round")
    site_round = SiteRound.from_state(dict(record))
    if site_round.round != round_:
        raise SecureAggregationError(f"{stage}: round {round_} asked, this site is in round {site_round.round}",
                                     field="round")
    return site_round


def _save(state: object, site_round: SiteRound) -> None:
    from flwr.app import ConfigRecord

    state[STATE_KEY] = ConfigRecord(site_round.to_state())


def answer_stage(stage: str, config: Mapping[str, object], state: object, seed: int) -> dict:
    """The answer (a JSON object) of this site to secure-aggregation ``stage`` (its message
    type's action: ``secagg_keys``, ``secagg_shares``, ``secagg_confirm``, ``secagg_unmask``)."""
    payload = _payload(config, stage)
    round_, you = int(payload["round"]), str(payload["you"])
    if stage == "secagg_keys":
        site_round = SiteRound.new(you, round_, seed)
        pk_enc, pk_mask = site_round.public_keys()
        _save(state, site_round)
        return {"pk-enc": b64encode(pk_enc), "pk-mask": b64encode(pk_mask)}
    site_round = _current(state, round_, stage)
    if site_round.site != you:
        raise SecureAggregationError(f"{stage}: addressed to {you!r}, this site is {site_round.site!r}", field="you")
    if stage == "secagg_shares":
        members = payload.get("members")
        if not isinstance(members, dict):
            raise SecureAggregationError(f"{stage}: 'members' is not an object", field="members")
        keys = {str(name): (b64decode(pair[0]), b64decode(pair[1])) for name, pair in members.items()}
        ciphertexts = site_round.share_keys(keys, int(payload.get("threshold", 0)))
        _save(state, site_round)
        return {"ciphertexts": {name: b64encode(token) for name, token in ciphertexts.items()}}
    if stage == "secagg_confirm":
        if site_round.phase != "masked":
            raise SecureAggregationError(f"{stage}: this site sent no masked update in round {round_}", field="round")
        return {"ready": True}
    if stage == "secagg_unmask":
        answer = site_round.unmask_shares(list(payload.get("final", [])), list(payload.get("dropped", [])))
        _save(state, site_round)
        return {"shares": {kind: {u: b64encode(s) for u, s in shares.items()} for kind, shares in answer.items()}}
    raise SecureAggregationError(f"unknown secure-aggregation stage {stage!r}", field="stage")


def mask_update(secure: Mapping[str, object], state: object, site_name: str, received: Mapping[str, np.ndarray],
                trained: Mapping[str, np.ndarray], groups: Mapping[str, str], counts: Mapping[str, int],
                caps: Mapping[str, int]) -> tuple[dict[str, np.ndarray], int]:
    """This site's masked train reply tensors, and how many elements it clipped to the range.

    ``secure``: the train message's secure entry (cohorts, ranges, the ciphertexts addressed to
    this site); ``received``: the global tensors (float); ``trained``: this site's tensors after
    training (float; a group it did not train this round counts as unchanged, weight 0);
    ``counts``: its examples per group; ``caps``: its declared cases per group. The update
    ``w / W * (trained - received)`` of each group of its cohorts is clipped (to
    ``max-update-norm`` over the whole update when the run sets one, then per element to the
    round's range), quantised and masked.
    """
    round_, you = int(secure["round"]), str(secure["you"])
    site_round = _current(state, round_, "train")
    ciphertexts = {str(k): b64decode(v) for k, v in dict(secure.get("ciphertexts", {})).items()}
    refused = site_round.receive_shares(ciphertexts)
    if refused:
        raise SecureAggregationError("the shares of " + ", ".join(f"{s} ({why})" for s, why in sorted(refused.items()))
                                     + " do not check out: this site cannot mask with them", field="ciphertexts")
    cohorts = {str(g): [str(n) for n in c] for g, c in dict(secure["cohorts"]).items()}
    own = [g for g, c in cohorts.items() if you in c]
    scale = {str(g): int(w) for g, w in dict(secure["weight-scale"]).items()}
    clip_range = float(secure["clip-range"])
    delta = {k: np.asarray(trained.get(k, received[k]), dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
             for k, g in groups.items() if g in own}
    bound = float(secure.get("max-update-norm", 0) or 0)
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
    if bound and norm > bound:
        delta = {k: d * (bound / norm) for k, d in delta.items()}
    weights = {g: int(min(counts.get(g, 0), caps.get(g, counts.get(g, 0)), scale.get(g, 0))) for g in own}
    clipped = 0
    scaled = {}
    for k, d in delta.items():
        g = groups[k]
        x = d * (weights[g] / max(1, scale[g]))
        clipped += int(np.count_nonzero(np.abs(x) > clip_range))
        scaled[k] = np.clip(x, -clip_range, clip_range)
    masked = site_round.mask(scaled, weights, {k: groups[k] for k in scaled}, {g: cohorts[g] for g in own}, clip_range,
                             int(secure["target-range"]))
    _save(state, site_round)
    return masked, clipped


__all__ += ["STATE_KEY", "answer_stage", "mask_update"]
