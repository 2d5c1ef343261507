"""Who takes part in a run: every site joins once (``query.join``) before it is sent work.

A site is its Flower node (in a deployment, the node the SuperLink authenticated); the
name it gives when it joins is a label for reports. On joining it declares how many
training cases it holds per modality (:data:`pemma_core.protocol.DECLARED`); the server
records that in ``run.json`` and justifies every later reply against it
(:meth:`Roster.allowance`): which parameter groups the site may send (those its
modalities train) and what a round's example count may be.

Two nodes claiming one name are both kept and both reported (``duplicate_names``); their
labels carry the node id so that reports tell them apart. A node whose join fails (its
site YAML does not load, say) is named by what its error says and is sent nothing more.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from pemma_core import protocol
from pemma_core.aggregation import Allowance
from pemma_core.model.pemma import MODE_GROUPS
from pemma_core.model.spec import FULL_GROUP
from pemma_core.modes import servable_modes
from pemma_core.protocol import Instruction
from server import records

log = logging.getLogger("flwr.pemma")

ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour and cursor codes
_SITE_ERROR = re.compile(r"\[pemma\] ([^\n\r]*)")


def one_line_cause(reason: str) -> str:
    """The cause of a site's error reply in one line, without colour codes.

    A pemma site reports its failures as ``[pemma] <site>: <error>`` (see
    :mod:`client.client_app`); Flower (and Ray, in simulation) wrap that in their own text
    and tracebacks, so the last such line is the cause. Anything else: its last non-empty line.
    """
    text = ANSI_CODES.sub("", str(reason))
    found = _SITE_ERROR.findall(text)
    if found:  # Flower quotes the exception text: "...<'[pemma] site-2: ...'>"
        return found[-1].strip().removesuffix("'>").strip()[:500]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no reason given")[:500]


def site_of_cause(cause: str) -> str | None:
    """The site a ``[pemma] <site>: ...`` cause names (before the first colon), if any."""
    head, sep, _ = cause.partition(": ")
    return head.strip() or None if sep else None


def groups_for(declared: Mapping[str, int], phase: str) -> frozenset[str]:
    """Parameter groups a site with ``declared`` training cases may send in ``phase``."""
    held = {kind for kind in ("ct", "pet", "ehr") if declared.get(kind, 0) > 0}
    if phase == "pretrain-ct":
        return frozenset({FULL_GROUP}) if "ct" in held else frozenset()
    if phase == "prognosis":
        groups = {"prognosis"} if declared.get("survival", 0) > 0 else set()
        return frozenset(groups | ({"ehr"} if "ehr" in held and groups else set()))
    return frozenset(g for mode in servable_modes(held) for g in MODE_GROUPS[mode])


def weight_caps(declared: Mapping[str, int], phase: str) -> dict[str, int]:
    """Per group, the most cases a site's update of that group can stand for: its declared
    training cases of what the group learns from (an upper bound where a mode needs two
    modalities: cases holding both are at most the smaller count)."""
    ct, pet = declared.get("ct", 0), declared.get("pet", 0)
    if phase == "pretrain-ct":
        return {FULL_GROUP: ct}
    if phase == "prognosis":
        return {"prognosis": declared.get("survival", 0), "ehr": min(declared.get("ehr", 0), declared.get("survival", 0))}
    return {"shared": ct, "ct": ct, "pet": pet, "fusion": min(ct, pet)}


@dataclass
class Member:
    """A node that joined: the name it gave and the training cases it declared."""

    node_id: int
    name: str
    declared: dict[str, int]
    label: str = ""  # the name, or "name (node N)" when another node claims the same name
    preprocessing: dict[str, Any] | None = None  # spacing, CT window, SUV ceiling (protocol.read_preprocessing)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "node_id": self.node_id, "declared": dict(self.declared),
                "preprocessing": self.preprocessing}


@dataclass
class Roster:
    """The run's sites by node id, and the nodes that could not join."""

    timeout: float
    members: dict[int, Member] = field(default_factory=dict)
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (label, one-line cause)
    silent: set[int] = field(default_factory=set)  # nodes that did not answer the join request (asked again)

    def __call__(self, grid: Grid) -> dict[int, Member]:
        """Ask every connected node that has not joined yet to join (before each round)."""
        nodes = [n for n in grid.get_node_ids() if n not in self.members and n not in self.failed]
        if nodes:
            self.join(grid, nodes)
        return self.members

    def join(self, grid: Grid, nodes: Iterable[int]) -> None:
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type=protocol.JOIN.name) for n in nodes]
        asked = {m.metadata.dst_node_id for m in messages}
        for msg in grid.send_and_receive(messages, timeout=self.timeout):
            node = msg.metadata.src_node_id
            asked.discard(node)
            if msg.has_error():
                cause = one_line_cause(msg.error.reason)
                self.failed[node] = (site_of_cause(cause) or f"node-{node}", cause)
                log.warning("site %s could not join and is sent nothing more: %s", self.failed[node][0], cause)
                continue
            reply, malformed = records.read_reply(msg)
            problems = malformed + protocol.reply_problems(protocol.JOIN, reply, (), (1, 1, 1))
            if not reply.site:
                problems.append("the join reply names no site")
            preprocessing, why = protocol.read_preprocessing(reply.meta.get(protocol.PREPROCESSING))
            if why:
                problems.append(why)
            if problems:
                self.failed[node] = (reply.site or f"node-{node}", "join refused: " + "; ".join(problems))
                log.warning("node %d: %s", node, self.failed[node][1])
                continue
            self.members[node] = Member(node, str(reply.site), protocol.declared_of(reply.metrics),
                                        preprocessing=preprocessing)
        for node in asked:  # no reply at all: asked again before the next round
            log.warning("node %d did not answer the join request", node)
        self.silent = (self.silent | asked) - set(self.members) - set(self.failed)
        self._label()
        agreed = self.preprocessing()
        if agreed and agreed["differs"]:
            log.warning("sites %s prepare their data differently from the others (%s): the model is recorded with "
                        "the majority's preprocessing", ", ".join(agreed["differs"]),
                        {k: v for k, v in agreed.items() if k != "differs"})

    def _label(self) -> None:
        for names in self.duplicate_names().values():
            log.warning("nodes %s all claim the site name %r: each is reported with its node id",
                        ", ".join(map(str, names)), self.members[names[0]].name)
        duplicated = {node for nodes in self.duplicate_names().values() for node in nodes}
        for node, member in self.members.items():
            member.label = f"{member.name} (node {node})" if node in duplicated else member.name

    def duplicate_names(self) -> dict[str, list[int]]:
        """Names claimed by more than one node -> those nodes."""
        by_name: dict[str, list[int]] = {}
        for node, member in sorted(self.members.items()):
            by_name.setdefault(member.name, []).append(node)
        return {name: nodes for name, nodes in by_name.items() if len(nodes) > 1}

    def label(self, node: int) -> str:
        if node in self.members:
            return self.members[node].label
        if node in self.failed:
            return self.failed[node][0]
        return f"node-{node}"

    def allowance(self, node: int, phase: str, instruction: Instruction) -> Allowance:
        """What a reply of ``node`` in ``phase`` may hold: the groups its declared modalities
        train, example counts up to what the round allowed, weights up to its declared cases."""
        declared = self.members[node].declared if node in self.members else {}
        per_round = None
        if phase != "prognosis" and instruction.batch_size is not None:
            per_round = int(instruction.local_steps) * int(instruction.batch_size)
        elif phase == "prognosis":
            per_round = declared.get("survival", 0)  # counts are events of the training cohort
        return Allowance(groups=groups_for(declared, phase), max_examples=per_round,
                         weight_cap=weight_caps(declared, phase))

    def preprocessing(self) -> dict[str, Any] | None:
        """The federation's preprocessing: what most sites declared (ties: the first site by
        label), with ``differs`` listing the sites that declared another."""
        declared = [(m.label, m.preprocessing) for m in sorted(self.members.values(), key=lambda m: m.label)
                    if m.preprocessing is not None]
        if not declared:
            return None
        texts = [json.dumps(p, sort_keys=True) for _, p in declared]
        common = max(dict.fromkeys(texts), key=texts.count)
        return {**json.loads(common), "differs": [label for (label, _), t in zip(declared, texts) if t != common]}

    def to_json(self) -> dict[str, Any]:
        """What ``run.json`` records of the sites (``sites``, ``duplicate_names``, ``join_failures``,
        ``preprocessing``)."""
        return {
            "preprocessing": self.preprocessing(),
            "sites": [m.to_json() for _, m in sorted(self.members.items(), key=lambda item: item[1].label)],
            "duplicate_names": self.duplicate_names(),
            "join_failures": [{"site": label, "node_id": node, "cause": cause} for node, (label, cause) in self.failed.items()]
            + [{"site": f"node-{node}", "node_id": node, "cause": "no reply to the join request"} for node in sorted(self.silent)],
        }


__all__ = ["ANSI_CODES", "Member", "Roster", "groups_for", "one_line_cause", "site_of_cause", "weight_caps"]
