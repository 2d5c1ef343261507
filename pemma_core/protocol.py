"""The pemma message protocol: what the server and a site say to each other, and the checks
that keep a reply to "adapters, counts and aggregate metrics only" (docs/ARCHITECTURE.md, protocol).

Both ends import this module (the server app and strategy, the client app and its task
code); it is the one place that names:

* the **message types** (:class:`MessageType`): ``query.install_backbone``, then per phase
  a train message (:data:`TRAIN`: ``train.pretrain_ct``, ``train``, ``train.prognosis``),
  ``evaluate`` after adapt rounds, and ``query.ehr_stats`` before prognosis;
* the **record keys** of a message's :class:`~flwr.app.RecordDict`: an instruction holds
  :data:`ARRAYS` and :data:`CONFIG`, a reply :data:`ARRAYS`, :data:`METRICS` and
  :data:`META` (:data:`REPLY_RECORDS`);
* the **instruction config** (:class:`Instruction`, :func:`install_config`): its keys and
  the model spec in it, encoded with :meth:`ModelSpec.to_json` and decoded with
  :meth:`ModelSpec.from_json`;
* what **each kind of reply may hold** (:data:`REPLIES`, a :class:`ReplyKind` per message
  type) and the check both ends run (:func:`reply_problems`, :func:`check_reply`): only
  tensors from the key set the server sent and none shaped like an image
  (:func:`looks_like_image`); only the exact metric names of that kind, numbers only; only
  its config entries (a site's name and backbone fingerprint, plus ``ehr-stats`` in the
  reply to ``query.ehr_stats``: the JSON of :func:`pemma_core.data.clinical.partial_stats`,
  aggregates of its EHR training rows); and no case id of the site in any metric name or
  config value;
* the **wire form of tensors**: ``float32``, ``float16`` or ``int8`` (``wire-dtype``; int8:
  blockwise absmax quantisation, each tensor's scales under :func:`scales_name`) on the wire,
  always ``float32`` once received so the server averages in full precision.

Plain numpy/torch and dictionaries: no flwr import (``pemma_core`` never imports flwr).
Turning these dictionaries into Flower records and back is :mod:`server.records`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pemma_core.model.spec import FULL_GROUP, GROUPS, ModelSpec
from pemma_core.modes import MODES

if TYPE_CHECKING:  # torch is imported where tensors are handled: the run settings read this module
    import torch

# ----------------------------------------------------------------------------- messages

PHASES: tuple[str, ...] = ("pretrain-ct", "adapt", "prognosis")


@dataclass(frozen=True)
class MessageType:
    """A Flower message type: ``category`` (``train``, ``evaluate`` or ``query``) and ``action``.

    ``action="default"`` is the bare category, as Flower's handler decorators spell it
    (``@app.train()`` handles ``"train"``, ``@app.train("prognosis")`` ``"train.prognosis"``).
    """

    category: str
    action: str = "default"

    @property
    def name(self) -> str:
        """The ``message_type`` string of a Flower message."""
        return self.category if self.action == "default" else f"{self.category}.{self.action}"


JOIN = MessageType("query", "join")  # a site's name and its declared training cases, once per run
INSTALL_BACKBONE = MessageType("query", "install_backbone")  # the run's frozen CT backbone, once per site
EHR_STATS = MessageType("query", "ehr_stats")  # aggregates of a site's EHR training rows
EVALUATE = MessageType("evaluate")  # Dice per mode of the global adapters (after adapt rounds)
# Secure aggregation (server/secure_aggregation.py, client/secure_aggregation.py): the stages of one round.
SECAGG_KEYS = MessageType("query", "secagg_keys")  # a site's fresh public keys for this round
SECAGG_SHARES = MessageType("query", "secagg_shares")  # the members' keys in; encrypted Shamir shares out
SECAGG_CONFIRM = MessageType("query", "secagg_confirm")  # after the masked updates: who is still there
SECAGG_UNMASK = MessageType("query", "secagg_unmask")  # the final set in; the shares that remove the masks out
SECAGG_STAGES: tuple[MessageType, ...] = (SECAGG_KEYS, SECAGG_SHARES, SECAGG_CONFIRM, SECAGG_UNMASK)
TRAIN: dict[str, MessageType] = {  # one train message type per phase
    "pretrain-ct": MessageType("train", "pretrain_ct"),
    "adapt": MessageType("train"),
    "prognosis": MessageType("train", "prognosis"),
}

# Record keys of a message's RecordDict.
ARRAYS, CONFIG, METRICS, META = "arrays", "config", "metrics", "meta"
INSTRUCTION_RECORDS: tuple[str, ...] = (ARRAYS, CONFIG)
REPLY_RECORDS: tuple[str, ...] = (ARRAYS, METRICS, META)

# ----------------------------------------------------------------------------- instructions

_SPEC, _FINGERPRINT = "model-spec", "fingerprint"


@dataclass(frozen=True, kw_only=True)
class Instruction:
    """The config of a train or evaluate message: what a site is asked to do in one round.

    A phase sets its fields once; the strategy adds ``phase``, ``round`` and
    ``wire_dtype`` for each round. Fields are written in this order, ``None`` ones left out.
    """

    local_steps: int
    lr: float
    batch_size: int | None = None  # pretrain-ct and adapt; prognosis trains on whole cohorts
    seed: int
    spec: ModelSpec
    fingerprint: str | None = None  # the backbone the adapters belong to; none in pretrain-ct
    ehr_preprocessor: Mapping[str, Any] | None = None  # prognosis with EHR: the federation's preprocessor
    phase: str | None = None
    round: int | None = None  # the global round number (continues across a resume)
    wire_dtype: str | None = None
    dp: Mapping[str, Any] | None = None  # DP-SGD: target_epsilon, delta, clip, planned_steps (adapt)
    secure: Mapping[str, Any] | None = None  # secure aggregation: this round's members, cohorts, ranges, shares
    run: str | None = None  # adapt: the run's id, under which a site keeps its optimiser between rounds

    def to_config(self) -> dict[str, Any]:
        """The message config: hyphenated keys, the spec and the preprocessor as JSON."""
        out: dict[str, Any] = {}
        for name, key in _INSTRUCTION_KEYS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if name == "spec":
                value = value.to_json()
            elif name in ("ehr_preprocessor", "dp", "secure"):
                value = json.dumps(dict(value))
            out[key] = value
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Instruction:
        """The instruction a train or evaluate message carries.

        Raises ``ValueError`` naming every missing entry: every message has the spec, the
        phase, the round, steps, rate, seed and wire dtype; pretrain-ct and adapt messages
        also the batch size; adapt and prognosis ones the backbone fingerprint.
        """
        unknown = sorted(set(config) - set(_INSTRUCTION_KEYS.values()) - FLOWER_CONFIG_KEYS)
        if unknown:  # a site does what the protocol names, nothing else (e.g. no "eval-split")
            raise ValueError(f"message config: unknown key(s) {', '.join(map(repr, unknown))}: this site does not take them")
        phase = config.get("phase")
        if phase is not None and phase not in PHASES:
            raise ValueError(f"message config: unknown phase {phase!r}, expected one of {', '.join(PHASES)}")
        required = ["model-spec", "phase", "round", "local-steps", "lr", "seed", "wire-dtype"]
        required += ["batch-size"] if phase != "prognosis" else []
        required += ["fingerprint"] if phase != "pretrain-ct" else []
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"message config lacks {', '.join(repr(k) for k in missing)}")
        return cls(
            local_steps=int(config["local-steps"]),
            lr=float(config["lr"]),
            batch_size=int(config["batch-size"]) if "batch-size" in config else None,
            seed=int(config["seed"]),
            spec=_spec(config),
            fingerprint=str(config["fingerprint"]) if "fingerprint" in config else None,
            ehr_preprocessor=json.loads(str(config["ehr-preprocessor"])) if "ehr-preprocessor" in config else None,
            phase=str(phase),
            round=int(config["round"]),
            wire_dtype=check_wire_dtype(str(config["wire-dtype"])),
            dp=_json_mapping(config, "dp"),
            secure=_json_mapping(config, "secure-aggregation"),
            run=str(config["run"]) if "run" in config else None,
        )


_INSTRUCTION_KEYS: dict[str, str] = {
    "local_steps": "local-steps",
    "lr": "lr",
    "batch_size": "batch-size",
    "seed": "seed",
    "spec": _SPEC,
    "fingerprint": _FINGERPRINT,
    "ehr_preprocessor": "ehr-preprocessor",
    "phase": "phase",
    "round": "round",
    "wire_dtype": "wire-dtype",
    "dp": "dp",
    "secure": "secure-aggregation",
    "run": "run",
}


def _json_mapping(config: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    if key not in config:
        return None
    try:
        value = json.loads(str(config[key]))
    except ValueError as exc:
        raise ValueError(f"message config {key!r} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"message config {key!r} is not a JSON object")
    return value


FLOWER_CONFIG_KEYS = frozenset({"server-round"})  # added by Flower's FedAvg to every message config


def _spec(config: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec.from_json(str(config[_SPEC]))


def install_config(spec: ModelSpec, fingerprint: str) -> dict[str, str]:
    """The config of ``query.install_backbone``: the backbone's spec and fingerprint."""
    return {_SPEC: spec.to_json(), _FINGERPRINT: fingerprint}


def read_install_config(config: Mapping[str, Any]) -> tuple[ModelSpec, str]:
    """(spec, fingerprint) of a ``query.install_backbone`` message."""
    missing = [key for key in (_SPEC, _FINGERPRINT) if key not in config]
    if missing:
        raise ValueError(f"{INSTALL_BACKBONE.name} config lacks {', '.join(repr(k) for k in missing)}")
    return _spec(config), str(config[_FINGERPRINT])


# ----------------------------------------------------------------------------- replies

SITE, FINGERPRINT, EHR_STATS_KEY = "site", _FINGERPRINT, "ehr-stats"  # reply config (META) entries
WITHHELD = "withheld"  # why a site sent less than asked (a privacy floor), in its own words
SECAGG = "secagg"  # in the replies to the secure-aggregation stages: that stage's JSON (keys, ciphertexts, shares)
DP_STOPPED = "dp-stopped"  # in a train reply: why the site trained fewer steps (its privacy budget is spent)
PREPROCESSING = "preprocessing"  # in the join reply: the site's resampling grid and intensity normalisation


@dataclass
class Reply:
    """Exactly what a site sends back: tensors, aggregate metrics, config entries (``meta``)."""

    arrays: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str | None:
        """The site's name, if the reply gives one."""
        name = self.meta.get(SITE)
        return name if isinstance(name, str) and name else None


def reply_meta(
    site: str, fingerprint: str | None = None, ehr_stats: str | None = None, withheld: str | None = None
) -> dict[str, str]:
    """A reply's config entries: the site's name, the backbone it used, its EHR aggregates,
    and what it withheld (a privacy floor) and why."""
    meta = {SITE: site}
    for key, value in ((FINGERPRINT, fingerprint), (EHR_STATS_KEY, ehr_stats), (WITHHELD, withheld)):
        if value is not None:
            meta[key] = value
    return meta


# What a site declares when it joins: its training cases per modality (``survival``: with
# survival labels). The server weights and checks every later reply against it.
DECLARED: tuple[str, ...] = ("ct", "pet", "ehr", "survival")


def declared_metrics(counts: Mapping[str, int]) -> dict[str, int]:
    """A site's declared training cases as the metrics of its ``query.join`` reply (``train-cases-<modality>``)."""
    return {f"train-cases-{kind}": int(counts.get(kind, 0)) for kind in DECLARED}


def preprocessing_json(spacing: Sequence[float], ct_window: Sequence[float], pet_suv_max: float) -> str:
    """What a site's join reply says of its preprocessing (the model only works on data prepared the same way)."""
    return json.dumps({"spacing": [float(v) for v in spacing], "ct_window": [float(v) for v in ct_window],
                       "pet_suv_max": float(pet_suv_max)})


def read_preprocessing(text: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(preprocessing, None) from a join reply's entry, or (None, why it is unusable)."""
    try:
        value = json.loads(str(text))
        spacing = [float(v) for v in value["spacing"]]
        window = [float(v) for v in value["ct_window"]]
        suv = float(value["pet_suv_max"])
    except (ValueError, TypeError, KeyError) as exc:
        return None, f"preprocessing is not the expected JSON ({type(exc).__name__}: {exc})"
    if set(value) != {"spacing", "ct_window", "pet_suv_max"} or len(spacing) != 3 or len(window) != 2:
        return None, "preprocessing needs exactly spacing (3 numbers), ct_window (2) and pet_suv_max"
    if not all(np.isfinite([*spacing, *window, suv])) or not all(0 < v <= 100 for v in spacing):
        return None, f"preprocessing spacing {spacing} is not 3 finite sizes in (0, 100] mm"
    if not window[0] < window[1] or not 0 < suv <= 1e4:
        return None, f"preprocessing ct_window {window} / pet_suv_max {suv} out of range"
    return {"spacing": spacing, "ct_window": window, "pet_suv_max": suv}, None


def declared_of(metrics: Mapping[str, Any]) -> dict[str, int]:
    """The declared training cases a (checked) ``query.join`` reply holds, per modality (0 when absent)."""
    return {kind: int(metrics.get(f"train-cases-{kind}", 0)) for kind in DECLARED}


def examples_metrics(counts: Mapping[str, int]) -> dict[str, int]:
    """Per-group example counts as metrics (``examples-<group>``), groups sorted."""
    return {f"examples-{group}": int(counts[group]) for group in sorted(counts)}


def examples_of(metrics: Mapping[str, Any]) -> dict[str, int]:
    """The per-group example counts a reply's metrics hold (whole numbers only)."""
    return {
        key.removeprefix("examples-"): int(value)
        for key, value in metrics.items()
        if key.startswith("examples-") and isinstance(value, (int, float)) and float(value).is_integer()
    }


def dice_of(metrics: Mapping[str, Any]) -> dict[str, tuple[float, int]]:
    """Mode -> (Dice, cases) of an evaluate reply (``dice-<mode>``, ``cases-<mode>``)."""
    return {
        key.removeprefix("dice-"): (float(value), int(metrics.get(f"cases-{key.removeprefix('dice-')}", 1)))
        for key, value in metrics.items()
        if key.startswith("dice-")
    }


@dataclass(frozen=True)
class ReplyKind:
    """What the reply to one message type may hold."""

    tensors: bool  # tensors from the key set the server sent (else none at all)
    metrics: frozenset[str]  # the exact metric names allowed
    config: frozenset[str]  # the config (META) entries allowed


_EXAMPLES = frozenset(f"examples-{group}" for group in (*GROUPS, FULL_GROUP))
_DECLARED = frozenset(f"train-cases-{kind}" for kind in DECLARED)
# dp-*: the site's DP-SGD accounting (epsilon spent so far in this run, its steps); secure-clipped: elements
# the site clipped to the round's range before masking.
_TRAINING = frozenset({"num-examples", "steps", "loss", "train-seconds", "setup-seconds", "bytes-up", "dp-epsilon",
                       "dp-steps", "secure-clipped"}) | _EXAMPLES
# of the site's held-out split; c-score / c-pairs: the counts behind its C-index (pemma_core.training.survival.concordance_pairs);
# c-boot-scores / c-boot-pairs: the same counts for BOOTSTRAP_REPLICATES bootstrap samples of that split
# (survival.bootstrap_pair_counts), from which the server draws the pooled C-index's interval.
BOOTSTRAP_REPLICATES = 200
LIST_METRICS = frozenset({"c-boot-scores", "c-boot-pairs"})  # the only metrics that are lists, of that length
_SURVIVAL = frozenset({"c-index", "cases-survival", "events-survival", "c-score", "c-pairs"}) | LIST_METRICS
# Per reported mode, beside Dice and its case count: the mean HD95 over the cases where it is defined and
# that count, the mean surface Dice, and the two overlap sums (2 |P and G|, |P| + |G|, voxels) from which
# the server computes the HECKTOR aggregated Dice exactly (pemma_core.training.seg_metrics).
EVAL_METRICS = ("dice", "cases", "hd95", "hd95-cases", "nsd", "overlap", "volume")
_HD95 = frozenset(f"hd95-{mode}" for mode in MODES)
_EVALUATION = frozenset({"num-examples", "eval-seconds"}) | {f"{m}-{mode}" for m in EVAL_METRICS for mode in MODES}
_REPLY_CONFIG = frozenset({SITE, FINGERPRINT})

REPLIES: dict[MessageType, ReplyKind] = {
    JOIN: ReplyKind(tensors=False, metrics=_DECLARED, config=frozenset({SITE, PREPROCESSING})),
    INSTALL_BACKBONE: ReplyKind(tensors=False, metrics=frozenset(), config=_REPLY_CONFIG),
    EHR_STATS: ReplyKind(tensors=False, metrics=frozenset(), config=_REPLY_CONFIG | {EHR_STATS_KEY, WITHHELD}),
    TRAIN["pretrain-ct"]: ReplyKind(tensors=True, metrics=_TRAINING, config=_REPLY_CONFIG),
    TRAIN["adapt"]: ReplyKind(tensors=True, metrics=_TRAINING, config=_REPLY_CONFIG | {DP_STOPPED}),
    TRAIN["prognosis"]: ReplyKind(tensors=True, metrics=_TRAINING | _SURVIVAL, config=_REPLY_CONFIG | {WITHHELD}),
    EVALUATE: ReplyKind(tensors=False, metrics=_EVALUATION, config=_REPLY_CONFIG | {WITHHELD}),
    **{stage: ReplyKind(tensors=False, metrics=frozenset(), config=frozenset({SITE, SECAGG})) for stage in SECAGG_STAGES},
}

# ----------------------------------------------------------------------------- metric values

MAX_COUNT = 10**15  # counts beyond this are no count of cases or steps (and lose integer precision as floats)
MAX_SECONDS = 1e7  # about 4 months
MAX_DISTANCE = 1e6  # mm (a kilometre): no surface distance within a scanned body is larger
MAX_META_CHARS = 1 << 20  # a config entry (the EHR statistics JSON is the largest) stays under 1 MiB


def metric_range(name: str) -> str:
    """The kind of value metric ``name`` holds: ``fraction`` (Dice, surface Dice, C-index: in
    [0, 1]), ``loss`` (finite, >= 0), ``seconds`` (finite, >= 0), ``distance`` (HD95 in mm:
    finite, in [0, MAX_DISTANCE]) or ``count`` (a whole number >= 0: cases, ``hd95-cases-*``,
    the voxel sums ``overlap-*`` and ``volume-*``)."""
    if name.startswith(("dice-", "nsd-")) or name == "c-index":
        return "fraction"
    if name in _HD95:
        return "distance"
    if name in ("loss", "dp-epsilon"):
        return "loss"
    if name.endswith("-seconds"):
        return "seconds"
    return "count"


def metric_value_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be metric ``name`` (see :func:`metric_range`), or None.

    One number per metric: lists, nested values, booleans and strings are refused, and so
    are NaN, infinities and values outside the metric's range. A metric of
    :data:`LIST_METRICS` is a list of :data:`BOOTSTRAP_REPLICATES` counts instead.
    """
    if name in LIST_METRICS:
        if not isinstance(value, (list, tuple)) or len(value) != BOOTSTRAP_REPLICATES:
            return f"metric {name!r} is not a list of {BOOTSTRAP_REPLICATES} counts"
        return next((f"metric {name!r}: {problem}" for v in value
                     if (problem := metric_value_problem("count", v)) is not None), None)
    if isinstance(value, (list, tuple, dict, set)):
        return f"metric {name!r} is a {type(value).__name__}; a reply holds one number per metric"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"metric {name!r} is not a number ({type(value).__name__})"
    kind = metric_range(name)
    if kind == "count":
        if not isinstance(value, (int, np.integer)):
            return f"metric {name!r} is a count but not a whole number ({value!r})"
        if not 0 <= int(value) <= MAX_COUNT:
            return f"metric {name!r} = {int(value)} is not a count in [0, {MAX_COUNT:.0e}]"
        return None
    number = float(value)
    if not np.isfinite(number):
        return f"metric {name!r} is not finite ({number})"
    upper = {"fraction": 1.0, "loss": float("inf"), "seconds": MAX_SECONDS, "distance": MAX_DISTANCE}[kind]
    if not 0.0 <= number <= upper:
        return f"metric {name!r} = {number:.4g} is outside [0, {upper:g}]"
    return None


class WireViolation(RuntimeError):
    """A message would carry (or carried) something other than adapters, counts and metrics."""


def looks_like_image(shape: Sequence[int], roi_size: Sequence[int]) -> bool:
    """True if ``shape`` could hold an image, a label or a crop of either.

    Everything a model learns here is smaller than its input crop in at least one of the
    three trailing dimensions (the largest kernel is UNETR's 16^3 patch embedding; the
    smallest crop is 32^3), while any image, label or crop is at least the crop size in
    all three.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        return False
    return all(s >= r for s, r in zip(shape[-3:], roi_size, strict=True))


def reply_problems(
    kind: MessageType,
    reply: Reply,
    sent_keys: Iterable[str],
    roi_size: Sequence[int],
    case_ids: Iterable[str] = (),
) -> list[str]:
    """Reasons ``reply`` (to a message of type ``kind``) is not what :data:`REPLIES` allows.

    ``reply.arrays`` maps names to anything with a ``shape`` (its wire form: an int8 tensor
    comes with its scales, see :func:`wire_form_problems`); ``sent_keys`` is the key set the
    server sent (its int8 scales' names may be in it); ``case_ids`` (known at a site) are
    searched for in every metric name and every config value.
    """
    allowed = REPLIES[kind]
    problems: list[str] = []
    # The server's tensors, without their int8 scales (a site passes what it received, scales included).
    sent = {k for k in sent_keys if not is_scales_name(k)} if allowed.tensors else set()
    for name, value in reply.arrays.items():
        if is_scales_name(name) and name.removesuffix(SCALES_SUFFIX) not in sent:
            problems.append(f"scales {name!r} are not the scales of a tensor the server sent")
        elif not is_scales_name(name) and name not in sent:
            problems.append(f"tensor {name!r} is not one of the tensors the server sent")
        shape = tuple(getattr(value, "shape", ()))
        if looks_like_image(shape, roi_size):
            problems.append(f"tensor {name!r} has an image-like shape {shape}")
        dtype = getattr(value, "dtype", None)
        if dtype is not None and not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
            problems.append(f"tensor {name!r} has dtype {dtype}, expected a float or integer tensor")
    problems += wire_form_problems(reply.arrays)  # int8 tensors with valid scales, no stray scales
    for key, value in reply.metrics.items():
        if key not in allowed.metrics:  # exact names: "loss-case-007" is not "loss"
            problems.append(f"metric {str(key)[:80]!r} is not an aggregate metric name")
        elif (problem := metric_value_problem(key, value)) is not None:
            problems.append(problem)
    problems += _pair_count_problems(reply.metrics)
    for key, value in reply.meta.items():
        if key not in allowed.config:
            problems.append(f"config entry {str(key)[:80]!r} may not cross the wire")
        elif not isinstance(value, str):
            problems.append(f"config entry {key!r} is not a string")
        elif len(value) > MAX_META_CHARS:
            problems.append(f"config entry {key!r} is {len(value)} characters long, more than {MAX_META_CHARS}")
    texts = [*map(str, reply.metrics), *(str(v) for v in reply.meta.values())]
    for case_id in dict.fromkeys(case_ids):
        if case_id and any(case_id in text for text in texts):
            problems.append(f"a case id ({case_id!r}) appears in the message")
    return problems


def _pair_count_problems(metrics: Mapping[str, Any]) -> list[str]:
    """The C-index counts come together and agree: the score is at most twice the pairs
    (every pair concordant), a site cannot have more pairs than its cases make, and the
    C-index it sends is the one its counts give; the same bounds for every bootstrap replicate."""
    if not {"c-score", "c-pairs", *LIST_METRICS} & set(metrics):
        return []
    try:
        score, pairs, cases = (int(metrics[k]) for k in ("c-score", "c-pairs", "cases-survival"))
    except (KeyError, TypeError, ValueError):
        return ["c-score, c-pairs and cases-survival come together, as whole numbers"]
    if score > 2 * pairs or pairs > cases * (cases - 1) // 2:
        return [f"c-score {score} / c-pairs {pairs} are no pair counts of {cases} case(s)"]
    if "c-index" in metrics and pairs and abs(float(metrics["c-index"]) - score / (2 * pairs)) > 1e-9:
        return [f"c-index {float(metrics['c-index']):.4g} is not c-score / (2 c-pairs) = {score / (2 * pairs):.4g}"]
    boot = [metrics.get(k) for k in ("c-boot-scores", "c-boot-pairs")]
    if boot == [None, None]:
        return []
    if any(not isinstance(b, (list, tuple)) for b in boot):
        return ["c-boot-scores and c-boot-pairs come together"]
    if any(metric_value_problem(k, b) for k, b in zip(("c-boot-scores", "c-boot-pairs"), boot)):
        return []  # already reported, one problem per metric
    if any(int(s) > 2 * int(p) or int(p) > cases * (cases - 1) // 2 for s, p in zip(*boot)):
        return [f"c-boot-scores / c-boot-pairs hold no pair counts of {cases} case(s)"]
    return []


def check_reply(
    kind: MessageType,
    reply: Reply,
    sent_keys: Iterable[str],
    roi_size: Sequence[int],
    case_ids: Iterable[str] = (),
    where: str = "reply",
) -> None:
    """Raise :class:`WireViolation` listing every problem :func:`reply_problems` finds."""
    problems = reply_problems(kind, reply, sent_keys, roi_size, case_ids)
    if problems:
        raise WireViolation(f"{where} refused: " + "; ".join(problems))


# ----------------------------------------------------------------------------- tensors

WIRE_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16, "int8": np.int8}

# int8 transport: each floating tensor is cut, flattened, into blocks of INT8_BLOCK consecutive elements;
# a block travels as int8 values round(127 * x / absmax) and its absmax (float32) under the tensor's
# companion name (:func:`scales_name`). Dequantised, every element is within absmax / 127 / 2 of its value.
INT8_BLOCK = 64
SCALES_SUFFIX = "::absmax"  # reserved: no state_dict key holds "::" (torch joins module names with ".")
_INT8_LEVELS = 127  # symmetric: -128 is never used, so -x quantises to -q


def scales_name(name: str) -> str:
    """The wire name of the per-block absmax scales of the int8 tensor ``name``."""
    return name + SCALES_SUFFIX


def is_scales_name(name: str) -> bool:
    """True for a companion name (:func:`scales_name`): scales, not a tensor of the model."""
    return name.endswith(SCALES_SUFFIX)


def check_wire_dtype(name: str) -> str:
    """``name`` if it is a wire dtype (``float32``, ``float16`` or ``int8``), else ``ValueError``."""
    if name not in WIRE_DTYPES:
        raise ValueError(f"unknown wire-dtype {name!r}: expected one of {', '.join(WIRE_DTYPES)}")
    return name


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.asarray(value)


def _blocks(size: int) -> int:
    return -(-size // INT8_BLOCK)


def quantize_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values of ``array``'s shape, float32 absmax per block of :data:`INT8_BLOCK` flattened elements)."""
    flat = np.asarray(array, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise ValueError("cannot quantise a tensor holding NaN or infinite values to int8")
    padded = np.zeros(_blocks(flat.size) * INT8_BLOCK)
    padded[: flat.size] = flat
    blocks = padded.reshape(-1, INT8_BLOCK)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    divisor = np.where(absmax > 0, absmax, 1.0).astype(np.float64)[:, None]  # an all-zero block stays zero
    levels = np.clip(np.rint(blocks / divisor * _INT8_LEVELS), -_INT8_LEVELS, _INT8_LEVELS)
    return levels.ravel()[: flat.size].astype(np.int8).reshape(np.shape(array)), absmax


def dequantize_int8(values: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """The float32 tensor that :func:`quantize_int8` returned ``(values, absmax)`` for."""
    flat = np.asarray(values).ravel().astype(np.float32)
    step = np.repeat(np.asarray(absmax, dtype=np.float32) / np.float32(_INT8_LEVELS), INT8_BLOCK)[: flat.size]
    return (flat * step).reshape(np.shape(values))


def _scales_problem(name: str, values: Any, scales: Any) -> str | None:
    """Why ``scales`` are not valid absmax scales for the int8 tensor ``values`` (named ``name``), or None."""
    dtype, shape = getattr(values, "dtype", None), tuple(getattr(values, "shape", ()))
    if dtype is None or np.dtype(dtype) != np.int8:
        return f"scales {scales_name(name)!r} come with tensor {name!r} of dtype {dtype}, expected int8"
    expected = _blocks(int(np.prod(shape, dtype=np.int64)))
    scale_shape = tuple(getattr(scales, "shape", ()))
    if getattr(scales, "dtype", None) != np.float32 or scale_shape != (expected,):
        return (f"scales {scales_name(name)!r} are {getattr(scales, 'dtype', None)} of shape {scale_shape}, "
                f"expected float32 of shape ({expected},): one per block of {INT8_BLOCK} elements of {name!r}")
    scales = np.asarray(scales)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        return f"scales {scales_name(name)!r} of tensor {name!r} are not all finite and >= 0"
    return None


def wire_form_problems(arrays: Mapping[str, Any]) -> list[str]:
    """Reasons ``arrays`` are not a valid wire form: an int8 tensor travels with valid scales
    (:func:`scales_name`), and scales travel only with their int8 tensor."""
    problems: list[str] = []
    for name, value in arrays.items():
        if is_scales_name(name):
            base = name.removesuffix(SCALES_SUFFIX)
            if base not in arrays:
                problems.append(f"scales {name!r} travel without their tensor {base!r}")
            elif (problem := _scales_problem(base, arrays[base], value)) is not None:
                problems.append(problem)
        elif getattr(value, "dtype", None) == np.int8 and scales_name(name) not in arrays:
            problems.append(f"int8 tensor {name!r} travels without its scales {scales_name(name)!r}")
    return problems


def to_wire(state: Mapping[str, torch.Tensor | np.ndarray], wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """Tensors as numpy arrays in their wire form.

    Floating tensors are cast to ``wire_dtype``; for ``int8`` each becomes int8 values plus
    its scales (:func:`quantize_int8`, under :func:`scales_name`). Integer tensors (e.g. a
    counter buffer) travel unchanged, except int8 ones: int8 on the wire means quantised, so
    an int8 state tensor is refused (``ValueError``). Arrays are copied, never aliased.
    """
    dtype = WIRE_DTYPES[check_wire_dtype(wire_dtype)]
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        array = _as_numpy(value)
        if is_scales_name(name):
            raise ValueError(f"tensor name {name!r} ends in the reserved {SCALES_SUFFIX!r} of int8 scales")
        if not np.issubdtype(array.dtype, np.floating):
            if array.dtype == np.int8:
                raise ValueError(f"tensor {name!r} is int8: on the wire int8 means quantised, send it as a wider integer")
            out[name] = array.copy()
        elif dtype is np.int8:
            try:
                out[name], out[scales_name(name)] = quantize_int8(array)
            except ValueError as exc:
                raise ValueError(f"tensor {name!r}: {exc}") from exc
        else:
            out[name] = array.astype(dtype, copy=True)
    return out


def from_wire(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Received arrays as tensors: int8 ones dequantised with their scales, every floating one
    ``float32`` (what the server averages in); ``ValueError`` naming each problem of a malformed wire form."""
    problems = wire_form_problems(arrays)
    if problems:
        raise ValueError("malformed wire form: " + "; ".join(problems))
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if is_scales_name(name):
            continue
        if array.dtype == np.int8:
            out[name] = dequantize_int8(array, np.asarray(arrays[scales_name(name)]))
        else:
            out[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
    return out


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Received arrays as torch tensors (floating ones float32), ready for ``load_trainable_state``."""
    import torch

    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in from_wire(arrays).items()}


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data, int8 scales included (what dominates a message's size)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


__all__ = [
    "SECAGG",
    "SECAGG_CONFIRM",
    "SECAGG_KEYS",
    "SECAGG_SHARES",
    "SECAGG_STAGES",
    "SECAGG_UNMASK",
    "ARRAYS",
    "CONFIG",
    "DP_STOPPED",
    "EHR_STATS",
    "EHR_STATS_KEY",
    "EVALUATE",
    "EVAL_METRICS",
    "MAX_DISTANCE",
    "FINGERPRINT",
    "DECLARED",
    "FLOWER_CONFIG_KEYS",
    "INSTALL_BACKBONE",
    "JOIN",
    "MAX_COUNT",
    "INSTRUCTION_RECORDS",
    "META",
    "METRICS",
    "PHASES",
    "PREPROCESSING",
    "REPLIES",
    "REPLY_RECORDS",
    "SITE",
    "TRAIN",
    "WIRE_DTYPES",
    "WITHHELD",
    "Instruction",
    "MessageType",
    "Reply",
    "ReplyKind",
    "WireViolation",
    "check_reply",
    "check_wire_dtype",
    "dequantize_int8",
    "declared_metrics",
    "declared_of",
    "dice_of",
    "examples_metrics",
    "examples_of",
    "from_wire",
    "INT8_BLOCK",
    "is_scales_name",
    "install_config",
    "looks_like_image",
    "metric_range",
    "metric_value_problem",
    "payload_bytes",
    "quantize_int8",
    "preprocessing_json",
    "read_preprocessing",
    "read_install_config",
    "reply_meta",
    "reply_problems",
    "scales_name",
    "SCALES_SUFFIX",
    "to_tensors",
    "to_wire",
    "wire_form_problems",
]
