"""pemma ClientApp: one hospital of the federation.

Each handler (one wrapper, :func:`_serve`) reads the site (its YAML) and the message
(:mod:`server.records`, :class:`pemma_core.protocol.Instruction`: a key the protocol does
not name is refused), calls :mod:`client.site_work` or :mod:`client.task` (which call
``pemma_core``), appends what it sends to the site's own audit log (:mod:`pemma_core.audit`,
``pemma audit SITE.yaml``) and replies with what may cross the wire: adapter tensors, per-group example counts,
aggregate metrics (checked against :mod:`pemma_core.protocol` before the reply leaves).
A request outside the site's ``limits:`` (its YAML) is refused. Any failure is replied as
one line, ``[pemma] <site>: <error>``, which the server reports as the site's cause.

Message types (:mod:`pemma_core.protocol`; sent by :mod:`server.server_app` and
:mod:`server.phases`):

* ``query.join``: the site's name and its training cases per modality, once per run;
* ``query.install_backbone``: the frozen CT backbone, once per run; kept in the site's
  cache after its fingerprint is checked (a site with its own ``backbone-file`` refuses
  a different one);
* ``train.pretrain_ct``: a round of FedAvg pretraining of the whole CT backbone;
* ``train``: a round of PEMMA adaptation (global adapters in, trained groups out);
* ``evaluate``: Dice per mode of the global adapters on the site's test split;
* ``query.ehr_stats``: aggregates of the site's EHR training rows (counts, sums, centred
  sums of squares, category sets), so the server can fit the federation's EHR
  preprocessor without any row;
* ``train.prognosis``: a round of the survival head (+ EHR encoder) on the frozen
  adapters; the reply holds the head groups, event counts and the held-out C-index.
* ``query.secagg_keys``, ``query.secagg_shares``, ``query.secagg_confirm``,
  ``query.secagg_unmask``: the stages of a secure-aggregation round (run config
  ``secure-aggregation``; :mod:`client.secure_aggregation`); a train message of such a
  round is answered with the site's clipped, quantised and masked update only.

Which site a node serves: ``context.node_config["site-config"]`` on a deployed
SuperNode, or the run config (``site-configs`` / ``federation-dir``) by ``partition-id``
in simulation.

A deployed SuperNode starts a fresh ClientApp process for every message, which imports this
module: :mod:`client.task` (the model's work: PyTorch, MONAI, peft, seconds to import) is
imported by the first message that needs it (install_backbone, the train messages,
evaluate), so that the queries and the secure-aggregation stages, done by
:mod:`client.site_work`, do not wait for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import site_work
from pemma_core import audit, protocol
from pemma_core.config.site import SiteConfig
from pemma_core.protocol import Instruction
from server import records


class SiteFailure(RuntimeError):
    """A site could not do what a message asked: one line, ``[pemma] <site>: <error>``, which the
    server finds inside whatever Flower (and Ray) wrap around it (:func:`server.roster.one_line_cause`)."""


# What a handler does: (site, node config, instruction or None, tensors received) -> the reply.
Work = Callable[[SiteConfig, Mapping[str, Any], Instruction | None, Mapping[str, np.ndarray]], protocol.Reply]


def _serve(message_type: protocol.MessageType, work: Work | None,
           run_config_of: Callable[[Context], Mapping[str, Any]]):
    """The Flower handler of ``message_type``: read the message, do the site's ``work``, log what is
    sent in the site's audit log (:mod:`pemma_core.audit`) and reply; any failure becomes one
    :class:`SiteFailure` line naming the site."""

    def handle(msg: Message, context: Context) -> Message:
        run_config = run_config_of(context)
        site = None
        instruction = None
        try:
            site = site_work.load_site(context.node_config, run_config, context.run_id)
            arrays, config = records.read_instruction(msg)
            instruction = Instruction.from_config(config) if message_type in _INSTRUCTED else None
            if work is None:  # a secure-aggregation stage: its state stays in the node's context between stages
                reply = site_work.secure_stage_site(site, message_type, config, context.state)
            else:
                reply = work(site, context.node_config, instruction if instruction is not None else config, arrays)
            if instruction is not None and instruction.secure is not None and message_type in protocol.TRAIN.values():
                reply = _task().masked_reply(site, instruction, arrays, reply, context.state)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, in one line, as the site's
            label = site.name if site is not None else site_work.site_label(context.node_config, run_config, context.run_id)
            cause = " ".join(f"{type(exc).__name__}: {exc}".split())
            if site is not None:
                _audit(site, msg, context, instruction, None, cause)
            raise SiteFailure(f"[pemma] {label}: {cause}") from exc
        _audit(site, msg, context, instruction, reply, None)
        return records.reply_message(msg, reply)

    handle.__doc__ = work.__doc__ if work is not None else site_work.secure_stage_site.__doc__
    return handle


def _audit(site: SiteConfig, msg: Message, context: Context, instruction: Instruction | None,
           reply: protocol.Reply | None, error: str | None) -> None:
    audit.record(site.cache_dir, site=site.name, message_type=msg.metadata.message_type,
                 phase=instruction.phase if instruction else None, round=instruction.round if instruction else None,
                 reply=reply, error=error, run_id=context.run_id)


# Messages whose config is an Instruction (the rounds); the queries carry their own config.
_INSTRUCTED = frozenset({*protocol.TRAIN.values(), protocol.EVALUATE})


def _task():
    """:mod:`client.task`, imported by the first message that needs the model (see the module's doc)."""
    from client import task

    return task


# Every message type a site answers, and the work it does (client/site_work.py without the model,
# client/task.py with it).
SITE_WORK: dict[protocol.MessageType, Work] = {
    protocol.JOIN: lambda site, node_config, config, arrays: site_work.join_site(site),
    protocol.EHR_STATS: lambda site, node_config, config, arrays: site_work.ehr_stats_site(site),
    protocol.INSTALL_BACKBONE: lambda *work: _task().install_backbone_site(*work),
    protocol.TRAIN["pretrain-ct"]: (
        lambda site, node_config, instruction, arrays: _task().pretrain_site(site, instruction, arrays)),
    protocol.TRAIN["adapt"]: lambda *work: _task().train_site(*work),
    protocol.TRAIN["prognosis"]: lambda *work: _task().prognosis_site(*work),
    protocol.EVALUATE: lambda *work: _task().evaluate_site(*work),
}


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The pemma ClientApp.

    ``overrides`` take precedence over the run config (``pemma simulate`` passes its
    options this way: Flower's Python simulation API has no run config); ``mods`` are
    Flower mods wrapped around every handler (tests and ``pemma simulate --adversary`` use
    them to play a faulty or hostile site).
    """
    app = ClientApp(mods=list(mods or []))

    def run_config_of(context: Context) -> dict[str, Any]:
        return {**dict(context.run_config), **dict(overrides or {})}

    for message_type, work in SITE_WORK.items():
        records.handles(app, message_type)(_serve(message_type, work, run_config_of))
    for stage in protocol.SECAGG_STAGES:
        records.handles(app, stage)(_serve(stage, None, run_config_of))
    return app


app = make_client_app()
