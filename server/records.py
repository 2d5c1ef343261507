"""Flower records <-> the plain dictionaries of :mod:`pemma_core.protocol`, for both apps.

:mod:`pemma_core.protocol` says what a message holds, in numpy arrays and dictionaries
(``pemma_core`` never imports flwr). This module is the only code that packs those into
Flower's ``ArrayRecord`` / ``ConfigRecord`` / ``MetricRecord`` / ``RecordDict`` and
unpacks them. The site (:mod:`client`) imports it too: it is the one module of
``server/`` the ClientApp uses (the project's top-level layout has no third app package),
and it imports nothing else of the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pemma_core import protocol
from pemma_core.protocol import ARRAYS, CONFIG, META, METRICS, MessageType, Reply


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Arrays as an ArrayRecord, as given (convert to the wire form first: :func:`protocol.to_wire`)."""
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays exactly as sent (dtype kept: checks see the wire form)."""
    return {name: array.numpy() for name, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's serialised arrays, as they travel."""
    return int(sum(len(array.data) for array in record.values()))


def instruction(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> RecordDict:
    """The content of a message to a site: tensors and config."""
    return RecordDict({ARRAYS: to_record(arrays), CONFIG: ConfigRecord(dict(config))})


def read_instruction(msg: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, config) of a message to a site; either may be empty."""
    arrays = from_record(msg.content.array_records.get(ARRAYS, ArrayRecord()))
    return arrays, dict(msg.content.config_records.get(CONFIG, ConfigRecord()))


def reply_message(msg: Message, reply: Reply) -> Message:
    """The Flower reply to ``msg`` carrying ``reply``."""
    content = RecordDict(
        {ARRAYS: to_record(reply.arrays), METRICS: MetricRecord(dict(reply.metrics)), META: ConfigRecord(dict(reply.meta))}
    )
    return Message(content=content, reply_to=msg)


def read_reply(msg: Message) -> tuple[Reply, list[str]]:
    """A site's reply, and what is wrong with its records (a reply holds exactly
    :data:`protocol.REPLY_RECORDS`); missing records read as empty."""
    content = msg.content
    problems = [f"reply lacks its {key!r} record" for key in protocol.REPLY_RECORDS if key not in content]
    problems += [f"unexpected record {key!r} in reply" for key in sorted(set(content.keys()) - set(protocol.REPLY_RECORDS))]
    reply = Reply(
        arrays=from_record(content.array_records.get(ARRAYS, ArrayRecord())),
        metrics=reply_metrics(msg),
        meta=dict(content.config_records.get(META, ConfigRecord())),
    )
    return reply, problems


def reply_metrics(msg: Message) -> dict[str, Any]:
    """A reply's metrics alone (no tensor decoded: for a reply whose whole content was read and checked already)."""
    return dict(msg.content.metric_records.get(METRICS, MetricRecord()))


def reply_config(msg: Message) -> dict[str, Any]:
    """A reply's config entries alone (no tensor decoded)."""
    return dict(msg.content.config_records.get(META, ConfigRecord()))


def reply_bytes(msg: Message) -> int:
    """Bytes of the tensors a reply carries, as they travelled."""
    return record_bytes(msg.content.array_records.get(ARRAYS, ArrayRecord()))


def handles(app: ClientApp, message_type: MessageType) -> Callable:
    """The decorator registering a ClientApp handler for ``message_type``
    (``@handles(app, protocol.EVALUATE)`` is ``@app.evaluate()``)."""
    return getattr(app, message_type.category)(message_type.action)


__all__ = [
    "from_record",
    "handles",
    "instruction",
    "read_instruction",
    "read_reply",
    "record_bytes",
    "reply_bytes",
    "reply_config",
    "reply_metrics",
    "reply_message",
    "to_record",
]
