"""pemma ClientApp: one hospital of the federation.

Each handler reads the site (its YAML) and the message (:mod:`server.records`,
:class:`pemma_core.protocol.Instruction`), calls :mod:`client.task` (which calls
``pemma_core``) and replies with what may cross the wire: adapter tensors, per-group
example counts, aggregate metrics (checked against :mod:`pemma_core.protocol` before the
reply leaves).

Message types (:mod:`pemma_core.protocol`; sent by :mod:`server.server_app` and
:mod:`server.phases`):

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

Which site a node serves: ``context.node_config["site-config"]`` on a deployed
SuperNode, or the run config (``site-configs`` / ``federation-dir``) by ``partition-id``
in simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import task
from pemma_core import protocol
from pemma_core.protocol import Instruction
from server import records


def _instruction(msg: Message) -> tuple[dict[str, np.ndarray], Instruction]:
    arrays, config = records.read_instruction(msg)
    return arrays, Instruction.from_config(config)


def _round_handler(work: Callable[..., protocol.Reply], site_of: Callable[[Context], task.SiteConfig]) -> Callable:
    def handle(msg: Message, context: Context) -> Message:
        arrays, instruction = _instruction(msg)
        return records.reply_message(msg, work(site_of(context), context.node_config, instruction, arrays))

    handle.__doc__ = work.__doc__
    return handle


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The pemma ClientApp.

    ``overrides`` take precedence over the run config (``pemma simulate`` passes its
    options this way: Flower's Python simulation API has no run config); ``mods`` are
    Flower mods wrapped around every handler (tests use them to play a faulty site).
    """
    app = ClientApp(mods=list(mods or []))

    def site_of(context: Context) -> task.SiteConfig:
        return task.load_site(context.node_config, {**dict(context.run_config), **dict(overrides or {})}, context.run_id)

    @records.handles(app, protocol.INSTALL_BACKBONE)
    def install_backbone(msg: Message, context: Context) -> Message:
        """Keep the run's frozen CT backbone at this site (checked by fingerprint)."""
        site = site_of(context)
        arrays, config = records.read_instruction(msg)
        spec, fingerprint = protocol.read_install_config(config)
        fingerprint = task.install_backbone(site, context.node_config, arrays, spec, fingerprint)
        return records.reply_message(msg, protocol.Reply(meta=protocol.reply_meta(site.name, fingerprint)))

    @records.handles(app, protocol.TRAIN["pretrain-ct"])
    def pretrain_ct(msg: Message, context: Context) -> Message:
        """One round of federated CT pretraining of the whole backbone."""
        arrays, instruction = _instruction(msg)
        return records.reply_message(msg, task.pretrain_site(site_of(context), instruction, arrays))

    @records.handles(app, protocol.EHR_STATS)
    def ehr_stats(msg: Message, context: Context) -> Message:
        """Aggregates of this site's EHR training rows (nothing per patient)."""
        return records.reply_message(msg, task.ehr_stats_site(site_of(context)))

    # The round messages: adapt training, prognosis training and evaluation each hand the
    # global tensors and the instruction to the site's work (client/task.py) and reply.
    site_work: dict[protocol.MessageType, Callable[..., protocol.Reply]] = {
        protocol.TRAIN["adapt"]: task.train_site,
        protocol.TRAIN["prognosis"]: task.prognosis_site,
        protocol.EVALUATE: task.evaluate_site,
    }
    for message_type, work in site_work.items():
        records.handles(app, message_type)(_round_handler(work, site_of))

    return app


app = make_client_app()
