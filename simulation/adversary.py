"""Misbehaving sites for ``pemma simulate --adversary SITE=KIND``: a Flower client mod.

:func:`adversary_mod` wraps every handler of the ClientApp; after the honest handler has
answered, it rewrites the reply of an adversary site (named by the reply's ``site``
entry) with the transform of its kind (:data:`ADVERSARY_KINDS`). Error replies and the
replies of other sites pass unchanged. Each transform (:func:`misbehave`) is a pure
function of the honest reply, the message type and the instruction's global tensors, so
a test can check it without a federation; the server's checks are what they exercise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pemma_core import protocol
from pemma_core.model.spec import GROUPS
from pemma_core.protocol import Reply

if TYPE_CHECKING:  # Flower is imported when the mod is made: `pemma simulate --help` lists the kinds at once
    from flwr.app import Context, Message

ADVERSARY_KINDS: dict[str, str] = {
    "scale": "train replies: every tensor's update (sent - global) multiplied by 1e6",
    "count": "train replies: every example count (examples-*, num-examples) set to 10**12",
    "huge": "train replies: every floating tensor filled with values near the float maximum",
    "nan": "train replies: every floating tensor all NaN",
    "foreign": "adapt train replies: tensors and counts of every group the site does not train (global + noise)",
    "list-metric": "train replies: metric loss sent as a list [loss, loss]",
    "impersonate": "train and evaluate replies claim another site's name (site-1, or site-2 for site-1)",
    "ehr-poison": "query.ehr_stats reply: negative centred sums of squares, 1,000 categories per categorical column",
}

SCALE = 1e6
HUGE_SHARE = 0.9  # of the dtype's maximum: finite, but any sum of two overflows
FOREIGN_NOISE = 1e-3
POISON_CATEGORIES = 1000
POISON_SPEC = [["age", "numeric"], ["sex", "categorical"]]  # a plausible EHR spec for a site that has none
POISON_ROWS = 20

Mod = Callable[["Message", "Context", Callable[["Message", "Context"], "Message"]], "Message"]


def parse_adversaries(values: list[str] | None) -> dict[str, str]:
    """``["site-2=scale", ...]`` (the ``--adversary`` options) -> ``{"site-2": "scale"}``.

    Raises ``ValueError`` naming the option: no ``=``, an empty site, an unknown kind, a
    site given twice. Whether the site exists is checked against the federation later.
    """
    out: dict[str, str] = {}
    for value in values or []:
        site, sep, kind = (part.strip() for part in value.partition("="))
        if not sep or not site or not kind:
            raise ValueError(f"--adversary {value}: expected SITE=KIND, e.g. site-2=scale")
        if kind not in ADVERSARY_KINDS:
            raise ValueError(f"--adversary {value}: unknown kind {kind!r}; expected one of {', '.join(ADVERSARY_KINDS)}")
        if site in out:
            raise ValueError(f"--adversary {value}: site {site!r} is already an adversary ({out[site]}); one kind per site")
        out[site] = kind
    return out


class AdversarySiteError(ValueError):
    """An ``--adversary`` names a site the federation does not have."""


def check_adversary_sites(adversaries: Mapping[str, str], site_names: list[str]) -> None:
    """:class:`AdversarySiteError` for an adversary site that is not one of the federation's ``site_names``."""
    unknown = [site for site in adversaries if site not in site_names]
    if unknown:
        raise AdversarySiteError(
            "; ".join(f"--adversary {site}={adversaries[site]}: no site named {site!r} in the federation" for site in unknown)
            + f" (sites: {', '.join(site_names)})"
        )


# ----------------------------------------------------------------------------- transforms


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def _map_floating(arrays: Mapping[str, np.ndarray], transform: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflowing to inf is the point of some kinds
        return {name: transform(name, a).astype(a.dtype) if _floating(a) else a for name, a in arrays.items()}


def _scaled(sent: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    def scale(name: str, array: np.ndarray) -> np.ndarray:
        base = np.asarray(global_state.get(name, np.zeros_like(array)), dtype=np.float64)
        return base + SCALE * (array.astype(np.float64) - base)

    return _map_floating(sent, scale)


def _huge(array: np.ndarray) -> np.ndarray:
    signs = np.where(np.arange(array.size) % 2 == 0, 1.0, -1.0).reshape(array.shape)
    return signs * (HUGE_SHARE * float(np.finfo(array.dtype).max))


def _foreign(reply: Reply, global_state: Mapping[str, np.ndarray], seed: int) -> Reply:
    """Every instruction tensor the reply lacks (global + small noise), a count for every group it has none for."""
    rng = np.random.default_rng(seed)
    wire = next((a.dtype for a in reply.arrays.values() if _floating(a)), np.dtype(np.float32))
    arrays = dict(reply.arrays)
    for name in sorted(set(global_state) - set(arrays)):
        base = np.asarray(global_state[name])
        arrays[name] = (base + FOREIGN_NOISE * rng.standard_normal(base.shape)).astype(wire) if _floating(base) else base
    metrics = dict(reply.metrics)
    counts = protocol.examples_of(metrics)
    num_examples = int(metrics.get("num-examples", max(counts.values(), default=1)))
    metrics.update({f"examples-{group}": num_examples for group in GROUPS if group not in counts})
    return Reply(arrays=arrays, metrics=metrics, meta=dict(reply.meta))


def _poisoned_ehr_stats(text: str | None) -> str:
    """EHR aggregates no honest site sends: negative centred sums of squares, 1,000 categories."""
    stats: dict[str, Any] = json.loads(text) if text else {
        "spec": POISON_SPEC, "rows": POISON_ROWS,
        "columns": {"age": {"count": POISON_ROWS, "sum": 60.0 * POISON_ROWS, "centred_sum_sq": 0.0, "missing": 0},
                    "sex": {"categories": ["F", "M"], "missing": 0}},
    }
    kinds = dict((name, kind) for name, kind in stats.get("spec", []))
    for name, column in stats.get("columns", {}).items():
        if kinds.get(name) == "numeric":
            column["centred_sum_sq"] = -1.0
        else:
            column["categories"] = [f"cat-{i:04d}" for i in range(POISON_CATEGORIES)]
    return json.dumps(stats, sort_keys=True)


def _other_site(site: str) -> str:
    return "site-2" if site == "site-1" else "site-1"


def misbehave(kind: str, reply: Reply, message_type: str, global_state: Mapping[str, np.ndarray], seed: int = 0) -> Reply | None:
    """The reply an adversary of ``kind`` sends instead of the honest ``reply`` to a message
    of ``message_type`` (whose instruction held ``global_state``); ``None``: send it unchanged."""
    if kind not in ADVERSARY_KINDS:
        raise ValueError(f"unknown adversary kind {kind!r}; expected one of {', '.join(ADVERSARY_KINDS)}")
    category = message_type.split(".", 1)[0]
    arrays, metrics, meta = dict(reply.arrays), dict(reply.metrics), dict(reply.meta)
    if category == "train" and kind == "scale":
        arrays = _scaled(arrays, global_state)
    elif category == "train" and kind == "count":
        metrics.update({k: 10**12 for k in metrics if k.startswith("examples-") or k == "num-examples"})
    elif category == "train" and kind == "huge":
        arrays = _map_floating(arrays, lambda _, a: _huge(a))
    elif category == "train" and kind == "nan":
        arrays = _map_floating(arrays, lambda _, a: np.full(a.shape, np.nan))
    elif message_type == protocol.TRAIN["adapt"].name and kind == "foreign":
        return _foreign(reply, global_state, seed)
    elif category == "train" and kind == "list-metric" and "loss" in metrics:
        metrics["loss"] = [float(metrics["loss"])] * 2
    elif category in ("train", "evaluate") and kind == "impersonate" and reply.site:
        meta[protocol.SITE] = _other_site(reply.site)
    elif message_type == protocol.EHR_STATS.name and kind == "ehr-poison":
        meta[protocol.EHR_STATS_KEY] = _poisoned_ehr_stats(meta.get(protocol.EHR_STATS_KEY))
    else:
        return None
    return Reply(arrays=arrays, metrics=metrics, meta=meta)


def adversary_mod(adversaries: Mapping[str, str]) -> Mod:
    """A ClientApp mod making each site of ``adversaries`` (site name -> kind) misbehave."""
    from server import records

    adversaries = dict(adversaries)
    for site, kind in adversaries.items():
        if kind not in ADVERSARY_KINDS:
            raise ValueError(f"adversary {site}: unknown kind {kind!r}; expected one of {', '.join(ADVERSARY_KINDS)}")

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        out = call_next(msg, context)
        if out.has_error():
            return out
        reply, _ = records.read_reply(out)
        kind = adversaries.get(reply.site or "")
        if kind is None:
            return out
        global_state, config = records.read_instruction(msg)
        changed = misbehave(kind, reply, msg.metadata.message_type, global_state, int(config.get("seed", 0)))
        return out if changed is None else records.reply_message(msg, changed)

    return mod


def phase_distances(run_path: str | Path) -> dict[str, float]:
    """Per phase of the run in ``run_path``, the L2 distance of its final global tensors from
    where the phase started (``pretrain-ct``: the backbone from its seeded initialisation;
    ``adapt``: the adapters from round 0; ``prognosis``: the head from its seeded
    initialisation): how far the federation moved, which an adversary must not inflate."""
    from dataclasses import replace

    import torch

    from pemma_core.config.run import RunSettings
    from pemma_core.model.factory import build_model
    from pemma_core.model.files import load_backbone, read_adapter_file, trainable_state
    from pemma_core.model.spec import ModelSpec, build_backbone
    from server.run_dir import RunDir

    def distance(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
        return float(np.sqrt(sum(float(torch.sum((a[k].double() - b[k].double()) ** 2)) for k in b)))

    run = RunDir(run_path)
    saved = run.read_json(run.run_json, {})
    settings = RunSettings(**{k: v for k, v in saved.items() if k in RunSettings.model_fields})
    spec = settings.model_spec()
    backbone, _ = load_backbone(run.backbone_file)
    out: dict[str, float] = {}
    if settings.pretrain_rounds and not settings.backbone_file:
        torch.manual_seed(settings.seed)
        start = {k: v for k, v in build_backbone(spec).state_dict().items() if v.is_floating_point()}
        out["pretrain-ct"] = distance({k: v for k, v in backbone.state_dict().items() if k in start}, start)
    adapt = run.checkpoints("adapt")
    out["adapt"] = distance(read_adapter_file(adapt[max(adapt)])[0], read_adapter_file(adapt[0])[0])
    prognosis = run.checkpoints("prognosis")
    if prognosis:
        head, metadata = read_adapter_file(prognosis[max(prognosis)])
        head_spec = replace(spec, survival=True, ehr_features=ModelSpec.from_json(metadata["spec"]).ehr_features)
        torch.manual_seed(settings.seed)
        groups = json.loads(metadata["groups"])
        model = build_model(head_spec, backbone)
        initial = {k: v for k, v in trainable_state(model).items() if groups[k] in ("prognosis", "ehr")}
        out["prognosis"] = distance(head, initial)
    return out


__all__ = [
    "ADVERSARY_KINDS",
    "AdversarySiteError",
    "adversary_mod",
    "check_adversary_sites",
    "misbehave",
    "parse_adversaries",
    "phase_distances",
]
