"""The secure-aggregation stages of a round, over the grid (run config ``secure-aggregation``).

One round (docs/ARCHITECTURE.md, "Secure aggregation"):

1. ``query.secagg_keys``: each site sent work makes fresh key pairs and answers with its
   public keys; the sites that answer are the round's members.
2. ``query.secagg_shares``: every member gets all members' public keys and the Shamir
   threshold; it answers with its shares of its mask secrets, each encrypted for one
   other member (the server forwards what it cannot read).
3. ``train``: each member gets the ciphertexts addressed to it, the cohort of each parameter
   group (the members that train it), the quantisation range and the weight scale per
   group; it trains, clips its own update, quantises and masks it, and sends only that.
4. ``query.secagg_confirm``: the members whose masked update was accepted are asked
   whether they are still there; those that answer are the final set.
5. ``query.secagg_unmask``: the final set is told who is in it and answers with the
   shares that remove the masks: of the self-mask seed of each site in the final set, of
   the mask key of each member outside it (never both for one site, which the sites check).

The server then learns, per group, the sum of the final set's weighted updates and of
their weights, nothing per site (:mod:`server.secure_aggregation`). A site that vanishes at
any stage is left out and reported; the round completes while at least ``threshold``
members answer the unmask stage.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pemma_core import protocol, secure_sum
from pemma_core.secure_sum import SecureAggregationError
from server import records
from server.roster import one_line_cause
from server.secure_aggregation import SecureSum, ServerRound

log = logging.getLogger("flwr.pemma")

OnFail = Callable[[int, str], None]  # (node, one-line reason): the strategy marks the site failed

# How far one local round can move a tensor element, in units of lr x steps: Adam's step per
# element is at most about lr (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr; AdamW is what every
# phase trains with. Elements beyond the range are clipped by the site (and counted).
ADAM_RANGE_FACTOR = 4.0


@dataclass
class SecureRound:
    """What the server holds of one round's secure aggregation."""

    round: int
    names: dict[int, str]  # member node -> its id in the round (the site's label)
    threshold: int
    cohorts: dict[str, list[str]]  # group -> members that train it (sorted), groups aggregated this round
    skipped: dict[str, str]  # group -> why it is not aggregated this round
    clip_range: float  # per-element bound of a site's scaled update
    weight_scale: dict[str, int]  # group -> the largest weight a member may give
    target_range: int
    crypto: ServerRound
    instructions: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> its train message's secure entry
    final: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # site -> the stage it vanished at

    def node_of(self, name: str) -> int:
        return next(node for node, n in self.names.items() if n == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "members": sorted(self.names.values()),
            "threshold": self.threshold,
            "cohorts": {g: list(c) for g, c in sorted(self.cohorts.items())},
            "final": list(self.final),
            "dropped": dict(sorted(self.dropped.items())),
            "skipped_groups": dict(sorted(self.skipped.items())),
            "clip_range": self.clip_range,
            "quantisation_step": 2 * self.clip_range / self.target_range,
        }


def target_range(members: int) -> int:
    """The quantisation range per site: the sum over ``members`` sites stays below 2**32 with 4
    spare bits (so a sum whose masks did not cancel is caught, :func:`secure_sum.dequantize_sum`)."""
    headroom = max(1, math.ceil(math.log2(members + 1))) + 4
    return min(secure_sum.MAX_TARGET_RANGE, 2 ** (secure_sum.MODULUS_BITS - headroom))


def _stage(grid: Grid, stage: protocol.MessageType, payloads: Mapping[int, Mapping[str, Any]], names: Mapping[int, str],
           joined: Mapping[int, str], timeout: float, on_fail: OnFail) -> dict[int, dict[str, Any]]:
    """Send each node its ``payload`` as stage ``stage``; the decoded answers of the nodes that
    answered well. A node that fails, sends a bad reply or speaks for another name than it
    ``joined`` under is reported through ``on_fail`` and left out."""
    messages = [Message(content=RecordDict({protocol.CONFIG: ConfigRecord({protocol.SECAGG: json.dumps(dict(p))})}),
                        dst_node_id=node, message_type=stage.name) for node, p in payloads.items()]
    answers: dict[int, dict[str, Any]] = {}
    replied: set[int] = set()
    for msg in grid.send_and_receive(messages, timeout=timeout):
        node = msg.metadata.src_node_id
        if node not in payloads or node in replied:
            continue
        replied.add(node)
        if msg.has_error():
            on_fail(node, f"{stage.name}: {one_line_cause(msg.error.reason)}")
            continue
        reply, malformed = records.read_reply(msg)
        problems = malformed + protocol.reply_problems(stage, reply, (), (1, 1, 1))
        if reply.meta.get(protocol.SITE) != joined.get(node, names[node]):
            problems.append(f"the reply speaks for {str(reply.meta.get(protocol.SITE))[:80]!r}")
        try:
            answer = json.loads(str(reply.meta.get(protocol.SECAGG, "")))
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append(f"its {protocol.SECAGG!r} entry is not a JSON object ({exc})")
            answer = {}
        if problems:
            on_fail(node, f"{stage.name}: " + "; ".join(problems))
            continue
        answers[node] = answer
    for node in sorted(set(payloads) - replied):
        on_fail(node, f"{stage.name}: no reply (timed out or disconnected)")
    return answers


def _decoded(mapping: Any) -> dict[str, bytes]:
    """``{name: base64 text}`` -> ``{name: bytes}``; ValueError for anything else."""
    if not isinstance(mapping, dict):
        raise ValueError("expected a JSON object of base64 strings")
    return {str(k): secure_sum.b64decode(v) for k, v in mapping.items()}


def open_round(grid: Grid, round_: int, names: Mapping[int, str], joined: Mapping[int, str],
               groups: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
               groups_of: Mapping[int, frozenset[str]], weight_scale: Mapping[str, int], clip_range: float,
               max_dropouts: int, min_cohort: int, timeout: float, on_fail: OnFail) -> SecureRound | None:
    """Stages 1-2 for the nodes ``names`` (node -> id in the round; ``joined``: the name each
    node joined under); None when fewer than two members remain (nothing can be summed without
    showing one site's update)."""
    keys = _stage(grid, protocol.SECAGG_KEYS, {n: {"round": round_, "you": names[n]} for n in names}, names, joined,
                  timeout, on_fail)
    public: dict[int, tuple[bytes, bytes]] = {}
    for node, answer in keys.items():
        try:
            public[node] = (secure_sum.b64decode(answer["pk-enc"]), secure_sum.b64decode(answer["pk-mask"]))
        except (KeyError, TypeError, ValueError) as exc:
            on_fail(node, f"{protocol.SECAGG_KEYS.name}: bad public keys ({exc})")
    crypto = None
    while len(public) >= 2 and crypto is None:
        threshold = secure_sum.threshold_for(len(public), max_dropouts)
        try:
            crypto = ServerRound(round_, {names[n]: k for n, k in public.items()}, threshold, min_cohort=min_cohort)
        except SecureAggregationError as exc:  # a key that does not parse or copies another member's
            culprit = next((n for n in public if names[n] == exc.site), None)
            if culprit is None:
                raise
            on_fail(culprit, f"{protocol.SECAGG_KEYS.name}: {exc}")
            del public[culprit]
    if crypto is None:
        log.warning("round %d: secure aggregation needs at least 2 members, %d answered", round_, len(public))
        return None
    members = {name: [secure_sum.b64encode(k) for k in pair] for name, pair in crypto.members_message().items()}
    shares = _stage(grid, protocol.SECAGG_SHARES,
                    {n: {"round": round_, "you": names[n], "threshold": crypto.threshold, "members": members}
                     for n in public}, names, joined, timeout, on_fail)
    for node, answer in shares.items():
        try:
            sent = _decoded(answer.get("ciphertexts"))
        except ValueError as exc:
            on_fail(node, f"{protocol.SECAGG_SHARES.name}: bad ciphertexts ({exc})")
            continue
        if not crypto.add_shares(names[node], sent):
            on_fail(node, f"{protocol.SECAGG_SHARES.name}: {crypto.bad.get(names[node], 'ciphertexts refused')}")
    live = {n: names[n] for n in public if names[n] in crypto.shared}
    if len(live) < max(2, crypto.threshold):
        log.warning("round %d: secure aggregation: %d members shared their keys, threshold %d", round_, len(live),
                    crypto.threshold)
        return None
    cohorts: dict[str, list[str]] = {}
    for node, name in live.items():
        for group in groups_of.get(node, frozenset()):
            cohorts.setdefault(group, []).append(name)
    cohorts = {g: sorted(c) for g, c in cohorts.items()}
    skipped = {g: f"cohort of {len(c)} site(s) ({', '.join(c)}) is below secure-min-cohort {min_cohort}"
               for g, c in cohorts.items() if len(c) < min_cohort}
    planned = {g: c for g, c in cohorts.items() if g not in skipped}
    t_range = target_range(len(live))
    tensors = {k: g for k, g in groups.items() if g in planned}
    crypto.plan(tensors, {k: tuple(shapes[k]) for k in tensors}, planned, clip_range, t_range)
    sr = SecureRound(round=round_, names=live, threshold=crypto.threshold, cohorts=planned, skipped=skipped,
                     clip_range=float(clip_range), target_range=t_range,
                     weight_scale={g: int(weight_scale.get(g, 1)) for g in planned}, crypto=crypto)
    for gone in set(names) - set(live):
        sr.dropped[names[gone]] = "during the key exchange"
    for node, name in live.items():
        sr.instructions[node] = {
            "round": round_, "you": name,
            "ciphertexts": {k: secure_sum.b64encode(v) for k, v in crypto.ciphertexts_for(name).items()},
            "cohorts": planned, "clip-range": sr.clip_range, "target-range": t_range,
            "weight-scale": {g: sr.weight_scale[g] for g, c in planned.items() if name in c},
        }
    return sr


def close_round(grid: Grid, sr: SecureRound, accepted: Mapping[int, Mapping[str, np.ndarray]],
                joined: Mapping[int, str], timeout: float, on_fail: OnFail) -> SecureSum | None:
    """Stages 4-5 over the members whose masked update passed the strategy's checks
    (``accepted``: node -> masked arrays); the unmasked sums, or None when too few members
    answered to remove the masks."""
    kept = {}
    for node, arrays in accepted.items():
        if sr.crypto.add_masked(sr.names[node], arrays):
            kept[node] = arrays
        else:
            on_fail(node, f"masked update refused: {sr.crypto.bad.get(sr.names[node], '')}")
    for node, name in sr.names.items():
        if node not in kept and name not in sr.dropped:
            sr.dropped[name] = "before its masked update was accepted"
    confirmed = _stage(grid, protocol.SECAGG_CONFIRM, {n: {"round": sr.round, "you": sr.names[n]} for n in kept},
                       sr.names, joined, timeout, on_fail)
    final = sorted(sr.names[n] for n, answer in confirmed.items() if answer.get("ready") is True)
    for node in kept:
        if sr.names[node] not in final:
            sr.dropped.setdefault(sr.names[node], "after its masked update, before unmasking")
    sr.final = final
    try:
        request = sr.crypto.unmask_request(final)
    except SecureAggregationError as exc:
        log.warning("round %d: the masks cannot be removed: %s", sr.round, exc)
        return None
    unmask = _stage(grid, protocol.SECAGG_UNMASK,
                    {sr.node_of(name): {"round": sr.round, "you": name, **request} for name in final},
                    sr.names, joined, timeout, on_fail)
    shares: dict[str, dict[str, dict[str, bytes]]] = {}
    for node, answer in unmask.items():
        try:
            shares[sr.names[node]] = {kind: _decoded(dict(answer["shares"]).get(kind, {})) for kind in ("b", "sk")}
        except (KeyError, TypeError, ValueError) as exc:
            on_fail(node, f"{protocol.SECAGG_UNMASK.name}: bad shares ({exc})")
    try:
        return sr.crypto.unmask(final, shares)
    except SecureAggregationError as exc:
        log.warning("round %d: the masks cannot be removed: %s", sr.round, exc)
        return None


__all__ = ["ADAM_RANGE_FACTOR", "SecureRound", "close_round", "open_round", "target_range"]
