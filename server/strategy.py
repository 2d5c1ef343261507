"""The PEMMA strategy: Flower's FedAvg with modality-aware, validated, robust aggregation.

Flower's :class:`~flwr.serverapp.strategy.FedAvg` does the protocol: node sampling,
building the train/evaluate messages, the round loop (``Strategy.start``). This class
changes who is asked and what happens to the replies:

* only sites that joined (:class:`server.roster.Roster`) are sent work, and a site that
  fails (an error reply) is sent nothing more in this phase; it is reported by its site
  name and the one-line cause of its error;
* every reply is checked before use (:mod:`pemma_core.protocol`): only the records, tensors,
  metric names and config entries its kind of reply may hold, every metric a finite
  number in its range, the name the node joined under (a node cannot speak for another
  site), the backbone fingerprint and the wire dtype; a reply that fails is *rejected* with
  its reasons and the round goes on without it;
* :func:`pemma_core.aggregation.aggregate_round` then validates each update's content
  (shapes, dtypes, finite values), justifies it against what the site declared when it
  joined (:meth:`Roster.allowance`: only the groups its modalities train, example counts
  within what the round allowed, weights up to its declared cases), rejects outliers
  (``outlier_factor``), clips to ``max_update_norm`` (adapt) and combines the rest by the
  run's rule (``mean``, ``median``, ``trimmed-mean``) over the updates sorted by site name,
  so a run is reproducible;
* the round aggregates only if at least ``min_sites`` updates were accepted; otherwise the
  global tensors stay as they were and the round is marked so.

The same class runs every phase: ``pretrain-ct`` (FedAvg of the whole CT backbone: one
group, ``backbone``), ``adapt`` (PEMMA adapters with their parameter groups) and
``prognosis`` (the survival head and EHR encoder on the frozen adapters; sites send only
groups ``prognosis`` / ``ehr``, weighted by their event counts, plus the C-index of their
held-out split, which the round record keeps per site).
Everything each round produced is kept in :attr:`PemmaStrategy.rounds` as a
:class:`RoundRecord`; :attr:`on_round_end` (if set) is called with it once the round's
evaluation is in, which is where the phase runner (:mod:`server.phases`) writes checkpoints
and metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pemma_core import protocol
from pemma_core.aggregation import SiteUpdate, aggregate_round
from pemma_core.lora_aggregation import LORA_AGGREGATIONS, exact_conflicts
from pemma_core.server_optimizer import SERVER_LR, SERVER_OPTIMIZERS, OptimizerState, server_step
from pemma_core.modes import servable_modes
from pemma_core.protocol import Instruction, Reply
from pemma_core.training import seg_metrics
from pemma_core.training.survival import pooled_bootstrap_interval, pooled_concordance
from server import records
from server.roster import Roster, one_line_cause
from server.secure_rounds import ADAM_RANGE_FACTOR, SecureRound, close_round, open_round

log = logging.getLogger("flwr.pemma")  # a child of Flower's logger: same handlers, streamed by `flwr run --stream`


@dataclass
class SiteReport:
    """What the server learned about one site in one round (goes to ``metrics.json``)."""

    name: str
    node_id: int
    status: str = "ok"  # ok | clipped | rejected | failed
    reason: str = ""
    clip_factor: float | None = None  # clipped: the factor its update was scaled by
    rms: dict[str, float] = field(default_factory=dict)  # per group: RMS of its update's change per element
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float = 0.0
    setup_seconds: float = 0.0
    loss: float | None = None
    examples: dict[str, int] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    # mode -> its other evaluate metrics: "agg-dice" (its own overlap / volume), "hd95", "nsd", as it sent them
    seg: dict[str, dict[str, float]] = field(default_factory=dict)
    c_index: float | None = None  # prognosis: C-index on the site's held-out split
    c_pairs: tuple[int, int] | None = None  # prognosis: its (score, admissible pairs) behind the C-index
    c_bootstrap: tuple[list[int], list[int]] | None = None  # prognosis: the same counts per bootstrap replicate
    dp_epsilon: float | None = None  # DP-SGD: the epsilon the site has spent in this run so far
    dp_steps: int | None = None  # DP-SGD: its private steps in this round
    dp_stopped: str = ""  # DP-SGD: why it trained fewer steps (its budget is spent)
    secure_clipped: int | None = None  # secure aggregation: elements it clipped to the round's range

    def summary(self) -> str:
        """One line for progress output: status, loss, training time, upload, Dice, C-index, reason."""
        line = f"{self.name:<10} {self.status:<8}"
        if self.loss is not None:
            line += f" loss {self.loss:.3f}  train {self.train_seconds:.1f} s  up {self.bytes_up / 1024:.0f} KiB"
        if self.dice:
            line += "  Dice " + " ".join(f"{m} {v:.3f}" for m, v in self.dice.items())
        if self.c_index is not None:
            line += f"  C-index {self.c_index:.3f}"
        if self.dp_epsilon is not None:
            line += f"  epsilon {self.dp_epsilon:.2f}"
        if self.reason:
            line += f"  {self.reason[:120]}"
        return line

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "node_id": self.node_id,
            "status": self.status,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "train_seconds": round(self.train_seconds, 4),
            "setup_seconds": round(self.setup_seconds, 4),
            "loss": self.loss,
            "examples": dict(self.examples),
            "dice": dict(self.dice),
        }
        if self.seg:
            out["seg"] = {mode: dict(values) for mode, values in self.seg.items()}
        if self.c_index is not None:
            out["c_index"] = self.c_index
        if self.c_pairs is not None:
            out["c_pairs"] = list(self.c_pairs)
        if self.clip_factor is not None:
            out["clip_factor"] = self.clip_factor
        for key in ("dp_epsilon", "dp_steps", "secure_clipped"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.dp_stopped:
            out["dp_stopped"] = self.dp_stopped
        if self.rms:
            out["rms"] = {g: float(f"{v:.6g}") for g, v in self.rms.items()}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class RoundRecord:
    phase: str
    round: int
    started: float = field(default_factory=time.perf_counter)
    train_wall_seconds: float = 0.0
    wall_seconds: float = 0.0
    aggregation_seconds: float = 0.0
    aggregated: bool = False
    note: str = ""
    sites: dict[int, SiteReport] = field(default_factory=dict)  # node id -> report
    contributors: dict[str, list[str]] = field(default_factory=dict)  # group -> sites whose tensors were aggregated
    reference_rms: float | None = None  # the outlier rule's reference (median RMS of the round's updates, one vote per site)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    secure: dict[str, Any] | None = None  # secure aggregation: members, cohorts, final set, dropouts, skipped groups
    # per group: the naive low-rank rule's relative error ||M - (sum w B)(sum w A)|| / ||M||, pooled over its pairs, and the largest
    lora_naive_error: dict[str, float] = field(default_factory=dict)
    lora_naive_error_max: dict[str, float] = field(default_factory=dict)
    lora_aggregation: str = ""  # "naive" or "exact" where the round aggregated low-rank pairs in plain (not secure) form
    server_optimizer: str = ""  # fedadam / fedyogi where the server stepped on the aggregated update

    def site(self, node_id: int, name: str) -> SiteReport:
        if node_id not in self.sites:
            self.sites[node_id] = SiteReport(name=name, node_id=node_id)
        elif name and self.sites[node_id].name.startswith("node-"):
            self.sites[node_id].name = name
        return self.sites[node_id]

    def to_json(self) -> dict[str, Any]:
        sites = sorted(self.sites.values(), key=lambda s: s.name)
        return {
            "phase": self.phase,
            "round": self.round,
            "wall_seconds": round(self.wall_seconds, 4),
            "train_wall_seconds": round(self.train_wall_seconds, 4),
            "aggregation_seconds": round(self.aggregation_seconds, 4),
            "aggregated": self.aggregated,
            "note": self.note,
            "sites": [s.to_json() for s in sites],
            "contributors": {g: list(names) for g, names in sorted(self.contributors.items())},
            "reference_rms": self.reference_rms,
            "train_metrics": dict(self.train_metrics),
            "eval_metrics": dict(self.eval_metrics),
            **({"secure_aggregation": self.secure} if self.secure is not None else {}),
            **({"lora_aggregation": self.lora_aggregation} if self.lora_aggregation else {}),
            **({"lora_naive_error": {g: float(f"{v:.6g}") for g, v in self.lora_naive_error.items()},
                "lora_naive_error_max": {g: float(f"{v:.6g}") for g, v in self.lora_naive_error_max.items()}}
               if self.lora_naive_error else {}),
            **({"server_optimizer": self.server_optimizer} if self.server_optimizer else {}),
        }


def state_to_record(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """Global tensors as an ArrayRecord in their wire form."""
    return records.to_record(protocol.to_wire(state, wire_dtype))


def _pair_counts(metrics: Mapping[str, Any]) -> tuple[int, int] | None:
    """A prognosis reply's (score, pairs) C-index counts (checked by the protocol), or None."""
    if "c-score" in metrics and "c-pairs" in metrics:
        return int(metrics["c-score"]), int(metrics["c-pairs"])
    return None


def _bootstrap_counts(metrics: Mapping[str, Any]) -> tuple[list[int], list[int]] | None:
    """A prognosis reply's bootstrap replicate counts (checked by the protocol), or None."""
    if "c-boot-scores" in metrics and "c-boot-pairs" in metrics:
        return [int(v) for v in metrics["c-boot-scores"]], [int(v) for v in metrics["c-boot-pairs"]]
    return None


def _pooled_c_index(reports: Iterable[SiteReport]) -> dict[str, float]:
    """``c-index-pooled`` and ``c-index-pairs``: one C-index over every reporting site's
    within-site pairs of its held-out split; nothing when no site has a pair. With it
    ``c-index-pooled-low`` / ``-high``: the 95% percentile interval of the site-stratified
    case bootstrap, when every counted site sent its replicates."""
    counted = [r for r in reports if r.c_pairs is not None]
    try:
        c_index, pairs = pooled_concordance([r.c_pairs for r in counted])
    except ValueError:
        return {}
    out = {"c-index-pooled": c_index, "c-index-pairs": pairs}
    if all(r.c_bootstrap is not None for r in counted):
        interval = pooled_bootstrap_interval([r.c_bootstrap for r in counted])
        if interval is not None:
            out["c-index-pooled-low"], out["c-index-pooled-high"] = interval
    return out


class PemmaStrategy(FedAvg):
    """FedAvg whose replies are validated, justified and aggregated per parameter group.

    Parameters
    ----------
    phase: ``"pretrain-ct"``, ``"adapt"`` or ``"prognosis"``.
    global_state: the global tensors at the start (float32 numpy arrays).
    groups: tensor name -> parameter group (one group ``backbone`` in pretrain-ct).
    roi_size: the model's crop, for the image-like-shape check.
    instruction: the config of every train and evaluate message (local steps, lr, seed,
        model spec, fingerprint...); ``phase``, ``round`` (the global round number) and
        ``wire_dtype`` are set for each round.
    roster: the sites that joined (names, declared cases); None: every node is a site
        named ``node-<id>`` that declared nothing (tests of the aggregation alone).
    min_sites: fewest accepted replies a round needs to aggregate; also the number of
        connected sites Flower waits for before sampling.
    max_update_norm: user bound on ``||update - global||_2``: larger updates are clipped to it.
    outlier_factor: automatic bound: a site whose update, per element, moved a group more
        than this many times the round's median is rejected (None: off).
    rule: how each group is combined (:data:`pemma_core.aggregation.RULES`).
    wire_dtype: ``float32``, ``float16`` or ``int8`` (blockwise absmax, with scales): tensors on the wire.
    round_offset: rounds already done (``--resume``): Flower's round ``r`` is global
        round ``round_offset + r``.
    evaluate: run federated evaluation (Dice per site and mode) after each round.
    on_round_start: called with the grid before each round's messages are built (the
        roster asks late sites to join; the server app installs the backbone there).
    on_round_end: called with the round's record and the new global tensors once the
        round (training and evaluation) is over: checkpoints and metrics are written there.
    round_timeout: seconds to wait for the replies of each secure-aggregation stage.
    secure: secure aggregation (``{"max_dropouts": int, "min_cohort": int}``; None: off):
        the server learns per group only the sum over the sites that trained it
        (:mod:`server.secure_rounds`); the sites clip and check their own updates.
    lora_aggregation: ``naive`` or ``exact`` (:mod:`pemma_core.lora_aggregation`): how low-rank
        pairs of ``mean`` groups are combined; the naive rule's error per group is written to
        each round record either way (not under secure aggregation, where the server sees only
        sums: ``exact`` is refused there). The phase runner passes it in phase ``adapt`` only.
    server_optimizer: ``none``, ``fedadam`` or ``fedyogi`` (:mod:`pemma_core.server_optimizer`),
        stepping on the aggregated update (plain and secure), with learning rate ``server_lr``;
        refused with ``exact``. Its moments are ``optimizer_state``, which the adapt phase
        writes with every round and sets again on resume. The phase runner passes it in phase
        ``adapt`` only.
    """

    def __init__(
        self,
        phase: str,
        global_state: Mapping[str, np.ndarray],
        groups: Mapping[str, str],
        roi_size: Sequence[int],
        instruction: Instruction,
        roster: Roster | None = None,
        min_sites: int = 2,
        max_update_norm: float | None = None,
        outlier_factor: float | None = None,
        rule: str = "mean",
        wire_dtype: str = "float32",
        round_offset: int = 0,
        evaluate: bool = True,
        on_round_end: Callable[[RoundRecord, dict[str, np.ndarray]], None] | None = None,
        on_round_start: Callable[[Grid], object] | None = None,
        secure: Mapping[str, int] | None = None,
        round_timeout: float = 600.0,
        lora_aggregation: str = "naive",
        server_optimizer: str = "none",
        server_lr: float = SERVER_LR,
        lr_scales: Mapping[str, float] | None = None,
    ) -> None:
        if phase not in protocol.PHASES:
            raise ValueError(f"unknown phase {phase!r}: expected one of {', '.join(protocol.PHASES)}")
        if min_sites < 1:
            raise ValueError(f"min-sites must be >= 1, got {min_sites}")
        if lora_aggregation not in LORA_AGGREGATIONS or server_optimizer not in SERVER_OPTIMIZERS or not server_lr > 0:
            raise ValueError(f"lora-aggregation must be one of {', '.join(LORA_AGGREGATIONS)} (got {lora_aggregation!r}), "
                             f"server-optimizer one of {', '.join(SERVER_OPTIMIZERS)} (got {server_optimizer!r}), "
                             f"server-lr > 0 (got {server_lr})")
        conflicts = exact_conflicts(rule, secure is not None, server_optimizer)
        if lora_aggregation == "exact" and conflicts:
            raise ValueError("; ".join(conflicts))
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
            arrayrecord_key=protocol.ARRAYS,
            configrecord_key=protocol.CONFIG,
        )
        self.phase = phase
        self.global_state = {k: np.asarray(v, dtype=np.asarray(v).dtype).copy() for k, v in global_state.items()}
        self.groups = dict(groups)
        # The fastest group's rate (each group learns at instruction.lr x its scale, 1 where absent): what
        # bounds how far one local round moves an element, so what secure aggregation's range must cover.
        self.max_lr_scale = max(float((lr_scales or {}).get(g, 1.0)) for g in set(self.groups.values()) or {""})
        self.roi_size = tuple(roi_size)
        self.instruction = instruction
        self.roster = roster
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.outlier_factor = outlier_factor
        self.rule = rule
        self.wire_dtype = protocol.check_wire_dtype(wire_dtype)
        self.round_offset = round_offset
        self.on_round_end = on_round_end
        self.on_round_start = on_round_start
        self.federated_evaluation = evaluate
        self.rounds: list[RoundRecord] = []
        self.failed: dict[int, str] = {}  # node -> one-line cause: sent nothing more in this phase
        self._current: RoundRecord | None = None
        self.secure = dict(secure) if secure is not None else None
        self._secure_round: SecureRound | None = None
        self._grid: Grid | None = None
        self._timeout = float(round_timeout)
        self.lora_aggregation = lora_aggregation
        self.server_optimizer = server_optimizer
        self.server_lr = float(server_lr)
        self.optimizer_state = OptimizerState()  # per-tensor moments; the adapt phase keeps them with its rounds

    # ------------------------------------------------------------------ helpers
    def _config(self, server_round: int, base: ConfigRecord) -> ConfigRecord:
        config = ConfigRecord(dict(base))
        this_round = replace(self.instruction, phase=self.phase, round=self.round_offset + server_round,
                             wire_dtype=self.wire_dtype)
        for key, value in this_round.to_config().items():
            config[key] = value
        return config

    def _name(self, node: int) -> str:
        """The site's label (as it joined; with its node id when another node claims the same name)."""
        return self.roster.label(node) if self.roster is not None else f"node-{node}"

    def _may_work(self, node: int) -> bool:
        """True for a node that joined and has not failed in this phase."""
        return node not in self.failed and (self.roster is None or node in self.roster.members)

    def _declared_modes(self, node: int) -> set[str] | None:
        if self.roster is None:
            return None
        declared = self.roster.members[node].declared if node in self.roster.members else {}
        return set(servable_modes(k for k in ("ct", "pet") if declared.get(k, 0) > 0))

    def _addressed(self, messages: Iterable[Message], message_type: str, record: RoundRecord) -> list[Message]:
        """The messages to sites that may work, typed ``message_type``, each site entered in ``record``."""
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if not self._may_work(node):
                continue
            record.site(node, self._name(node))
            if msg.metadata.message_type != message_type:  # FedAvg builds "train" messages; other phases have their own
                msg = Message(content=msg.content, dst_node_id=node, message_type=message_type)
            out.append(msg)
        return out

    def _fail(self, record: RoundRecord, report: SiteReport, node: int, reason: str, what: str) -> None:
        cause = one_line_cause(reason)
        self.failed[node] = cause
        report.status, report.reason = "failed", f"{what}: {cause}" if what else cause
        log.warning("round %d: site %s failed and is sent nothing more in %s: %s", record.round, report.name, self.phase,
                    report.reason)

    def summary(self) -> None:
        super().summary()
        log.info(
            "pemma %s: %d tensors, min-sites %d, rule %s, outlier-factor %s, max-update-norm %s, wire %s",
            self.phase, len(self.global_state), self.min_sites, self.rule, self.outlier_factor, self.max_update_norm,
            self.wire_dtype,
        )

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        record = RoundRecord(phase=self.phase, round=self.round_offset + server_round)
        self._current = record
        self.rounds.append(record)
        if self.on_round_start is not None:
            self.on_round_start(grid)
        wire_arrays = state_to_record(self.global_state, self.wire_dtype)
        messages = super().configure_train(server_round, wire_arrays, self._config(server_round, config), grid)
        out = self._addressed(messages, protocol.TRAIN[self.phase].name, record)
        if self.secure is not None:
            out = self._open_secure(grid, record, out)
        down = records.record_bytes(wire_arrays)
        for msg in out:
            record.sites[msg.metadata.dst_node_id].bytes_down = down
        log.info("round %d (%s): sent %d bytes of tensors to %d sites", record.round, self.phase, down, len(out))
        return out

    def check_reply(self, msg: Message) -> tuple[SiteUpdate | None, list[str]]:
        """(update, reasons to reject) for one train reply without error, by what the
        protocol and this run allow: records, tensors, metric names, values and config entries
        of the phase's reply, the name the node joined under, the backbone fingerprint, the
        wire dtype. The update's own content (shapes, finite values, counts against what the
        site declared, outliers) is :func:`aggregate_round`'s check."""
        node = msg.metadata.src_node_id
        name = self._name(node)
        reply, malformed = records.read_reply(msg)
        if malformed:
            return None, [f"site {name!r}: {p}" for p in malformed]
        kind = protocol.TRAIN[self.phase]
        reasons = [f"site {name!r}: {p}" for p in protocol.reply_problems(kind, reply, self.global_state, self.roi_size)]
        reasons += self._identity_problems(node, reply)
        reasons += [f"site {name!r}: {p}" for p in self._fingerprint_problems(reply)]
        for key, array in reply.arrays.items():
            # A floating global tensor comes back in the run's wire dtype (int8: its valid scales are
            # reply_problems' check); a site sending float32 in an int8 run (or int8 in a float run) is refused.
            floating = key in self.global_state and np.issubdtype(self.global_state[key].dtype, np.floating)
            if not protocol.is_scales_name(key) and (floating or np.issubdtype(array.dtype, np.floating)) \
                    and array.dtype != np.dtype(self.wire_dtype):
                reasons.append(f"site {name!r}: tensor {key!r} is {array.dtype} on the wire, expected {self.wire_dtype}")
        if reasons:
            return None, reasons
        tensors = protocol.from_wire(reply.arrays)  # checked above: int8 tensors dequantised with their scales
        return SiteUpdate(site=name, tensors=tensors, examples=protocol.examples_of(reply.metrics)), []

    def _fingerprint_problems(self, reply: Reply) -> list[str]:
        fingerprint = self.instruction.fingerprint
        if self.phase != "pretrain-ct" and fingerprint and reply.meta.get(protocol.FINGERPRINT) != fingerprint:
            return [f"trained on backbone {str(reply.meta.get(protocol.FINGERPRINT))[:12]}..., not {fingerprint[:12]}..."]
        return []

    def _identity_problems(self, node: int, reply: Reply) -> list[str]:
        if self.roster is None or node not in self.roster.members:
            return []
        joined = self.roster.members[node].name
        if reply.meta.get(protocol.SITE) != joined:
            return [f"site {self._name(node)!r}: the reply speaks for {str(reply.meta.get(protocol.SITE))[:80]!r}, "
                    f"this node joined as {joined!r}"]
        return []

    # ------------------------------------------------------------------ secure aggregation
    def _stage_failure(self, record: RoundRecord) -> Callable[[int, str], None]:
        def on_fail(node: int, reason: str) -> None:
            self._fail(record, record.site(node, self._name(node)), node, reason, "secure aggregation")

        return on_fail

    def _open_secure(self, grid: Grid, record: RoundRecord, messages: list[Message]) -> list[Message]:
        """Stages 1-2 of secure aggregation, then each member's train message with its secure entry."""
        self._grid = grid
        nodes = {m.metadata.dst_node_id: self._name(m.metadata.dst_node_id) for m in messages}
        allowances = {n: self.roster.allowance(n, self.phase, self.instruction) if self.roster is not None else None
                      for n in nodes}
        every = frozenset(self.groups.values())
        groups_of = {n: (a.groups if a is not None and a.groups is not None else every) for n, a in allowances.items()}
        weight_scale: dict[str, int] = {}
        for a in allowances.values():
            for g in every:
                cap = (a.weight_cap or {}).get(g) if a is not None else None
                limit = a.max_examples if a is not None else None
                bound = min(x for x in (cap, limit, protocol.MAX_COUNT) if x is not None)
                weight_scale[g] = max(weight_scale.get(g, 1), int(bound))
        span = ADAM_RANGE_FACTOR * float(self.instruction.lr) * self.max_lr_scale * int(self.instruction.local_steps)
        sr = open_round(grid, record.round, nodes, self._joined(nodes), self.groups,
                        {k: v.shape for k, v in self.global_state.items()}, groups_of, weight_scale, span,
                        int(self.secure["max_dropouts"]), int(self.secure["min_cohort"]), self._timeout,
                        self._stage_failure(record))
        self._secure_round = sr
        if sr is None:
            record.note = "secure aggregation: fewer than 2 sites took part in the key exchange; round not trained"
            return []
        record.secure = sr.to_json()
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in sr.instructions:
                continue
            entry = dict(sr.instructions[node])
            if self.max_update_norm:
                entry["max-update-norm"] = float(self.max_update_norm)
            config = ConfigRecord(dict(msg.content.config_records[protocol.CONFIG]))
            config["secure-aggregation"] = json.dumps(entry)
            content = RecordDict({protocol.ARRAYS: msg.content.array_records[protocol.ARRAYS], protocol.CONFIG: config})
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
        return out

    def _joined(self, nodes: Iterable[int]) -> dict[int, str]:
        """The name each node joined under (what its replies must speak for)."""
        if self.roster is None:
            return {n: self._name(n) for n in nodes}
        return {n: self.roster.members[n].name if n in self.roster.members else self._name(n) for n in nodes}

    def _aggregate_secure(self, record: RoundRecord, replies: Iterable[Message], start: float
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the members' masked replies, remove the masks (stages 4-5), and move each
        group by the weighted mean of its cohort's updates."""
        sr = self._secure_round
        accepted: dict[int, dict[str, np.ndarray]] = {}
        losses: list[tuple[float, int]] = []
        replied: set[int] = set()
        for node, report, msg in self._train_replies(record, replies, sr.names if sr is not None else {}, replied):
            reply, malformed = records.read_reply(msg)
            kind = protocol.TRAIN[self.phase]
            problems = malformed + protocol.reply_problems(kind, Reply({}, reply.metrics, reply.meta), (), self.roi_size)
            problems += self._identity_problems(node, reply) + self._fingerprint_problems(reply)
            if problems:
                self._reject(record, report, [f"site {report.name!r}: {p}" for p in problems])
                continue
            accepted[node] = reply.arrays
            report.examples = protocol.examples_of(reply.metrics)
            self._read_site_metrics(report, reply.metrics, reply.meta)
            report.loss = float(reply.metrics["loss"]) if "loss" in reply.metrics else None
            report.c_index = float(reply.metrics["c-index"]) if "c-index" in reply.metrics else None
            report.c_pairs = _pair_counts(reply.metrics)
            report.c_bootstrap = _bootstrap_counts(reply.metrics)
            if report.loss is not None:
                losses.append((report.loss, max(1, int(reply.metrics.get("num-examples", 1)))))
        for node in (sr.names if sr is not None else {}):
            if node not in replied and record.sites[node].status == "ok":
                self._fail(record, record.sites[node], node, "no reply (timed out or disconnected)", "")
        result = close_round(self._grid, sr, accepted, self._joined(sr.names), self._timeout, self._stage_failure(record)) \
            if sr is not None and len(accepted) >= 2 else None
        if sr is not None:
            record.secure = sr.to_json()
        if result is None or len(sr.final) < self.min_sites:
            record.note = (f"not aggregated: secure aggregation could not remove the masks "
                           f"({len(accepted)} masked update(s) accepted, final set {sr.final if sr else []}, "
                           f"min-sites {self.min_sites}); global tensors unchanged")
            log.warning("round %d: %s", record.round, record.note)
            record.aggregation_seconds = time.perf_counter() - start
            return None, None
        state = {k: v.copy() for k, v in self.global_state.items()}
        skipped = dict(sr.skipped) | dict(result.skipped)
        for group, contributors in result.contributors.items():
            weight = result.weights.get(group, 0)
            tensors = [k for k, g in self.groups.items() if g == group]
            if weight <= 0:
                skipped[group] = "its cohort trained it on no example this round"
                continue
            bound = sr.clip_range * len(contributors)
            if any(not np.all(np.isfinite(result.sums[k])) or np.max(np.abs(result.sums[k]), initial=0) > bound * 1.0001
                   for k in tensors):
                skipped[group] = ("its unmasked sum lies outside what its cohort's clipped updates can add up to: "
                                  "a site sent malformed masked values; group left unchanged")
                log.warning("round %d: group %s: %s", record.round, group, skipped[group])
                continue
            scale = sr.weight_scale[group] / weight
            for k in tensors:
                moved = self.global_state[k].astype(np.float64) + scale * result.sums[k]
                state[k] = moved.astype(self.global_state[k].dtype)
            record.contributors[group] = list(contributors)
        record.secure = {**sr.to_json(), "skipped_groups": dict(sorted(skipped.items()))}
        if not record.contributors:
            record.note = "not aggregated: no group could be aggregated securely; global tensors unchanged"
            record.aggregation_seconds = time.perf_counter() - start
            return None, None
        state = self._server_step(record, state, [k for k, g in self.groups.items() if g in record.contributors])
        self.global_state = state
        record.aggregated = True
        total = sum(n for _, n in losses) or 1
        record.train_metrics = {"loss": sum(l * n for l, n in losses) / total} if losses else {}
        c_indices = [(r.c_index, max(1, int(r.examples.get("prognosis", 1)))) for r in record.sites.values()
                     if r.c_index is not None and r.name in sr.final]
        if c_indices:
            record.train_metrics["c-index"] = sum(c * n for c, n in c_indices) / sum(n for _, n in c_indices)
        record.train_metrics.update(_pooled_c_index([r for r in record.sites.values() if r.name in sr.final]))
        record.aggregation_seconds = time.perf_counter() - start
        log.info("round %d (%s): securely aggregated %s over %s", record.round, self.phase,
                 ", ".join(sorted(record.contributors)), ", ".join(sr.final))
        return state_to_record(self.global_state), MetricRecord(record.train_metrics)

    def _train_replies(self, record: RoundRecord, replies: Iterable[Message], asked: Iterable[int] | Mapping[int, Any],
                       replied: set[int]) -> Iterator[tuple[int, SiteReport, Message]]:
        """(node, its report, its reply) for the first reply of each node ``asked``, its bytes counted;
        an error reply fails its site instead. Every node that replied is added to ``replied``."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if node in replied or node not in asked:  # a second reply, or from a node not asked
                continue
            replied.add(node)
            report = record.site(node, self._name(node))
            if msg.has_error():
                self._fail(record, report, node, msg.error.reason, "")
                continue
            report.bytes_up = records.reply_bytes(msg)
            yield node, report, msg

    @staticmethod
    def _read_site_metrics(report: SiteReport, metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """The checked metrics a train reply reports of the site's own work (time, privacy; not its loss,
        which the report shows only for an update that was used)."""
        report.train_seconds = float(metrics.get("train-seconds", 0.0))
        report.setup_seconds = float(metrics.get("setup-seconds", 0.0))
        if "dp-epsilon" in metrics:
            report.dp_epsilon = float(metrics["dp-epsilon"])
            report.dp_steps = int(metrics.get("dp-steps", 0))
        if "secure-clipped" in metrics:
            report.secure_clipped = int(metrics["secure-clipped"])
        if protocol.DP_STOPPED in meta:
            report.dp_stopped = str(meta[protocol.DP_STOPPED])[:300]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self._current or RoundRecord(phase=self.phase, round=self.round_offset + server_round)
        record.train_wall_seconds = time.perf_counter() - record.started
        start = time.perf_counter()
        if self.secure is not None:
            return self._aggregate_secure(record, replies, start)
        candidates: list[tuple[SiteUpdate, SiteReport, Mapping[str, Any], int]] = []  # in reply order
        replied: set[int] = set()
        for node, report, msg in self._train_replies(record, replies, record.sites, replied):
            update, reasons = self.check_reply(msg)
            if reasons or update is None:
                self._reject(record, report, reasons)
                continue
            metrics = records.reply_metrics(msg)  # checked by check_reply: every value a number in its range
            self._read_site_metrics(report, metrics, records.reply_config(msg))
            candidates.append((update, report, metrics, node))
        for node, report in record.sites.items():
            if node not in replied and report.status == "ok":  # timed out or disconnected: Flower returned no reply
                report.status, report.reason = "failed", "no reply (timed out or disconnected)"
                log.warning("round %d: no reply from %s, left out", record.round, report.name)
        # Sorted by site name so that a run is reproducible whatever order the replies came in.
        candidates.sort(key=lambda item: item[0].site)
        updates = [u for u, _, _, _ in candidates]
        allowances = ({u.site: self.roster.allowance(node, self.phase, self.instruction) for u, _, _, node in candidates}
                      if self.roster is not None else None)
        outcome = aggregate_round(self.global_state, updates, self.groups, self.max_update_norm, min_sites=self.min_sites,
                                  clip=True, allowances=allowances, outlier_factor=self.outlier_factor, rule=self.rule,
                                  lora_aggregation=self.lora_aggregation)
        accepted = {id(update) for update in outcome.accepted}
        rejections = iter(outcome.rejected)  # in the order of `updates`, like the accepted ones
        rejected = {id(u): list(next(rejections).reasons) for u in updates if id(u) not in accepted}
        clips = {clip.site: clip for clip in outcome.clipped}
        losses: list[tuple[float, int]] = []
        c_indices: list[tuple[float, int]] = []
        for update, report, metrics, _ in candidates:
            report.rms = dict(outcome.rms.get(update.site, {}))
            if id(update) not in accepted:
                self._reject(record, report, rejected[id(update)])
                continue
            report.examples = dict(update.examples)
            if update.site in clips:
                report.status, report.clip_factor, report.reason = "clipped", clips[update.site].factor, clips[update.site].reason
            if "loss" in metrics:
                report.loss = float(metrics["loss"])
                losses.append((report.loss, max(1, int(metrics.get("num-examples", 1)))))
            if "c-index" in metrics:
                report.c_index = float(metrics["c-index"])
                report.c_pairs = _pair_counts(metrics)
                report.c_bootstrap = _bootstrap_counts(metrics)
                c_indices.append((report.c_index, max(1, int(metrics.get("cases-survival", 1)))))
        record.reference_rms = outcome.reference_rms
        sent = list(record.sites.values())
        if not outcome.aggregated:
            record.note = (
                f"not aggregated: {len(accepted)} accepted update(s) of {len(sent)} site(s), "
                f"min-sites is {self.min_sites}; global tensors unchanged"
            )
            log.warning("round %d: %s", record.round, record.note)
            record.aggregation_seconds = time.perf_counter() - start
            return None, None
        record.lora_naive_error = dict(outcome.lora_naive_error)
        record.lora_naive_error_max = dict(outcome.lora_naive_error_max)
        if outcome.lora_naive_error:
            record.lora_aggregation = self.lora_aggregation
            log.info("round %d: naive low-rank aggregation error (relative, pooled / largest pair) %s%s",
                     record.round, ", ".join(f"{g} {v:.3g} / {outcome.lora_naive_error_max[g]:.3g}"
                                            for g, v in outcome.lora_naive_error.items()),
                     " (replaced by the exact product)" if self.lora_aggregation == "exact" else "")
        self.global_state = self._server_step(record, outcome.state,
                                              sorted({n for u in outcome.accepted for n in u.tensors}))
        record.aggregated = True
        record.contributors = {g: list(names) for g, names in outcome.contributors.items()}
        total = sum(n for _, n in losses) or 1
        record.train_metrics = {"loss": sum(l * n for l, n in losses) / total} if losses else {}
        if c_indices:  # case-weighted mean of the sites' held-out C-indices
            record.train_metrics["c-index"] = sum(c * n for c, n in c_indices) / max(1, sum(n for _, n in c_indices))
        record.train_metrics.update(_pooled_c_index(record.sites.values()))  # only accepted sites' reports hold counts
        record.aggregation_seconds = time.perf_counter() - start
        log.info(
            "round %d (%s): aggregated %d of %d sites%s",
            record.round, self.phase, len(accepted), len(sent),
            f", loss {record.train_metrics['loss']:.4f}" if losses else "",
        )
        return state_to_record(self.global_state), MetricRecord(record.train_metrics)

    def _server_step(self, record: RoundRecord, aggregated: dict[str, np.ndarray], moved: Sequence[str]
                     ) -> dict[str, np.ndarray]:
        """``aggregated``, or with a server optimiser its step from the current global state over the
        tensors ``moved`` (those some site sent: the groups that were aggregated)."""
        if self.server_optimizer == "none":
            return aggregated
        record.server_optimizer = self.server_optimizer
        return server_step(self.server_optimizer, self.global_state, aggregated, moved, self.optimizer_state,
                           lr=self.server_lr)

    def _reject(self, record: RoundRecord, report: SiteReport, reasons: list[str]) -> None:
        report.status, report.reason = "rejected", "; ".join(reasons)
        log.warning("round %d: update from %s rejected: %s", record.round, report.name, report.reason)

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.federated_evaluation:
            return []
        record = self._current or RoundRecord(phase=self.phase, round=self.round_offset + server_round)
        wire_arrays = state_to_record(self.global_state, self.wire_dtype)
        messages = super().configure_evaluate(server_round, wire_arrays, self._config(server_round, config), grid)
        return self._addressed(messages, protocol.EVALUATE.name, record)

    def evaluation_problems(self, node: int, reply: Reply) -> list[str]:
        """Why an evaluate reply cannot be used: the protocol's checks, the node's name,
        Dice only for modes its declared modalities serve, each with its case count, and
        HD95 / surface Dice / overlap sums only beside a mode's Dice and consistent with it
        (:func:`pemma_core.training.seg_metrics.reply_problems`)."""
        problems = protocol.reply_problems(protocol.EVALUATE, reply, (), self.roi_size) + self._identity_problems(node, reply)
        modes = self._declared_modes(node)
        for key in reply.metrics:
            if not str(key).startswith("dice-"):
                continue
            mode = str(key).removeprefix("dice-")
            if modes is not None and mode not in modes:
                problems.append(f"Dice for mode {mode!r}, which this site's declared modalities do not serve")
            cases = reply.metrics.get(f"cases-{mode}")
            if not isinstance(cases, (int, np.integer)) or isinstance(cases, bool) or cases < 1:
                problems.append(f"Dice for mode {mode!r} without a positive case count")
        return problems + seg_metrics.reply_problems(reply.metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        record = self._current or RoundRecord(phase=self.phase, round=self.round_offset + server_round)
        per_mode: dict[str, list[tuple[float, int]]] = {}
        per_mode_seg: dict[str, list[dict[str, float]]] = {}
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node in seen or not self._may_work(node):
                continue
            seen.add(node)
            report = record.site(node, self._name(node))
            if msg.has_error():
                self._fail(record, report, node, msg.error.reason, "evaluation failed")
                continue
            reply, malformed = records.read_reply(msg)
            problems = malformed + self.evaluation_problems(node, reply)
            if problems:
                log.warning("round %d: evaluation reply from %s rejected: %s", record.round, report.name, "; ".join(problems))
                if report.status in ("ok", "clipped"):
                    report.status = "rejected"
                    report.reason = "; ".join(filter(None, [report.reason, "evaluation reply: " + "; ".join(problems)]))
                continue
            for mode, (dice, cases) in protocol.dice_of(reply.metrics).items():
                report.dice[mode] = dice
                per_mode.setdefault(mode, []).append((dice, cases))
                seg = seg_metrics.site_summary(reply.metrics, mode)
                if shown := {k: v for k, v in seg.items() if k in ("agg-dice", "hd95", "nsd")}:
                    report.seg[mode] = shown
                per_mode_seg.setdefault(mode, []).append(seg)
        record.eval_metrics = {
            f"dice-{mode}": sum(d * n for d, n in values) / max(1, sum(n for _, n in values))
            for mode, values in sorted(per_mode.items())
        }
        for mode, sites in sorted(per_mode_seg.items()):
            record.eval_metrics.update(seg_metrics.combine_sites(sites, mode))
        record.wall_seconds = time.perf_counter() - record.started
        if record.eval_metrics:
            log.info(
                "round %d: Dice %s",
                record.round, ", ".join(
                    f"{k.removeprefix('dice-')} {v:.3f}"
                    + (f" (agg {record.eval_metrics[f'agg-{k}']:.3f})" if f"agg-{k}" in record.eval_metrics else "")
                    for k, v in record.eval_metrics.items() if k.startswith("dice-")
                ),
            )
        if self.on_round_end is not None:
            self.on_round_end(record, self.global_state)
        return MetricRecord(record.eval_metrics) if record.eval_metrics else None
