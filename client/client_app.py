"""pemma ClientApp: one hospital of the federation.

Each handler reads the site (its YAML), calls :mod:`client.task` (which calls
``pemma_core``) and replies with what may cross the wire: adapter tensors, per-group
example counts, aggregate metrics (checked by :mod:`pemma_core.wire` before the reply
leaves).

Message types (sent by :mod:`server.server_app`):

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

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import task
from pemma_core.model import ModelSpec

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, META_KEY = "arrays", "config", "metrics", "meta"


def _received(msg: Message) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays = {k: a.numpy() for k, a in msg.content.array_records.get(ARRAYS_KEY, ArrayRecord()).items()}
    config = dict(msg.content.config_records.get(CONFIG_KEY, ConfigRecord()))
    return arrays, config


def _reply(msg: Message, reply: task.SiteReply) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in reply.arrays.items()}),
            METRICS_KEY: MetricRecord(reply.metrics),
            META_KEY: ConfigRecord(reply.meta),
        }
    )
    return Message(content=content, reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The pemma ClientApp.

    ``overrides`` take precedence over the run config (``pemma simulate`` passes its
    options this way: Flower's Python simulation API has no run config); ``mods`` are
    Flower mods wrapped around every handler (tests use them to play a faulty site).
    """
    app = ClientApp(mods=list(mods or []))

    def site_of(context: Context) -> task.SiteConfig:
        return task.load_site(context.node_config, {**dict(context.run_config), **dict(overrides or {})})

    @app.query("install_backbone")
    def install_backbone(msg: Message, context: Context) -> Message:
        """Keep the run's frozen CT backbone at this site (checked by fingerprint)."""
        site = site_of(context)
        arrays, config = _received(msg)
        spec = ModelSpec.from_dict(json.loads(str(config["model-spec"])))
        fingerprint = task.install_backbone(site, context.node_config, arrays, spec, str(config["fingerprint"]))
        return _reply(msg, task.SiteReply({}, {}, {"site": site.name, "fingerprint": fingerprint}))

    @app.train("pretrain_ct")
    def pretrain_ct(msg: Message, context: Context) -> Message:
        """One round of federated CT pretraining of the whole backbone."""
        arrays, config = _received(msg)
        return _reply(msg, task.pretrain_site(site_of(context), config, arrays))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """One round of PEMMA adaptation on the modes this site serves."""
        arrays, config = _received(msg)
        return _reply(msg, task.train_site(site_of(context), context.node_config, config, arrays))

    @app.query("ehr_stats")
    def ehr_stats(msg: Message, context: Context) -> Message:
        """Aggregates of this site's EHR training rows (nothing per patient)."""
        return _reply(msg, task.ehr_stats_site(site_of(context)))

    @app.train("prognosis")
    def prognosis(msg: Message, context: Context) -> Message:
        """One round of the survival head (+ EHR encoder) on the frozen adapters."""
        arrays, config = _received(msg)
        return _reply(msg, task.prognosis_site(site_of(context), context.node_config, config, arrays))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Dice per mode of the global adapters on this site's test split."""
        arrays, config = _received(msg)
        return _reply(msg, task.evaluate_site(site_of(context), context.node_config, config, arrays))

    return app


app = make_client_app()
